"""The collectives of a data-parallel run, as no-ops in one process.

The scorers' statistics are torchmetrics ``Metric`` states (``litgpt_plop.scoring.metrics``): torchmetrics sums,
maxes or concatenates them over ranks, with ``gather_on_comm_device`` doing the transfers. What stays here is what
is not a metric: ``all_gather_rows`` (the placement checks compare each rank's digests,
``litgpt_plop.model.devices``) and ``all_reduce_sum`` (WeightLoRA averages its gates' gradients in place between
backward and step, ``litgpt_plop.weightlora.controller``: torchmetrics has no all-reduce, only gathers).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torchmetrics.utilities.distributed import gather_all_tensors


def distributed() -> bool:
    """True when running under an initialized ``torch.distributed`` process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def comm_device() -> torch.device:
    """Where the backend's collectives take their tensors: NCCL moves only CUDA tensors, gloo (and the rest) CPU
    ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_on_comm_device(tensor: torch.Tensor, group: Any | None = None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (the same number of dimensions everywhere, each of any size), in rank order, on
    ``tensor``'s device: torchmetrics' ``gather_all_tensors``, which pads uneven shapes, run on the backend's device
    (torchmetrics gathers on the tensor's own device, and a CPU state under NCCL or a CUDA one under gloo fails)."""
    gathered = gather_all_tensors(tensor.to(comm_device()), group)
    return [part.to(tensor.device) for part in gathered]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (the tensor itself when not distributed). Reduce sums and counts,
    never means, so ranks with different amounts of data combine correctly."""
    if not distributed():
        return tensor
    reduced = tensor.to(comm_device())
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(tensor.device)


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of ``tensor`` (``(n_rank, ...)``, ``n_rank`` may differ per rank) of every rank, concatenated in
    rank order, on every rank."""
    if not distributed():
        return tensor
    return torch.cat(gather_on_comm_device(tensor))

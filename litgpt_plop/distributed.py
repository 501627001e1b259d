"""The collectives the scorers and the placement checks need, as no-ops in one process.

Every rank of a data-parallel run calibrates its share of the prompts; the scorers then sum their statistics (or
gather per-prompt rows) over ranks, so each ends with the scores one process running every prompt would get.
Sums and counts are reduced, never means, so ranks with different amounts of data combine correctly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed() -> bool:
    """True when running under an initialized ``torch.distributed`` process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo (and the rest) take CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (the tensor itself when not distributed). Reduce sums and counts,
    never means, so ranks with different amounts of data combine correctly."""
    if not distributed():
        return tensor
    reduced = tensor.to(_comm_device())
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(tensor.device)


def all_reduce_max(value: float) -> float:
    """The largest ``value`` over all ranks."""
    if not distributed():
        return value
    reduced = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return float(reduced.item())


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of ``tensor`` (``(n_rank, ...)``, ``n_rank`` may differ per rank) of every rank, concatenated in
    rank order, on every rank."""
    if not distributed():
        return tensor
    device = _comm_device()
    size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    largest = int(max(s.item() for s in sizes))
    padded = torch.zeros((largest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.to(device)
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)]).to(tensor.device)

"""Devices for ``litgpt-plop finetune``: Fabric's precision and quantization, and several devices (``--devices N``,
``--num_nodes M``): data parallelism with Fabric.

Why DDP, not the sharded strategy ``litgpt finetune_lora`` uses for several devices (LitGPT 0.5.13:
``ModelParallelStrategy`` with its ``parallelize_fn``, i.e. FSDP2; earlier releases ``FSDPStrategy``):

- WeightLoRA removes adapters mid-run and WeightLoRA+ replaces them with larger ones. Under DDP the model is a
  full copy on every rank, so the surgery is the one-device surgery, run identically on every rank, followed by a
  new DDP wrapper around the changed model (``rewrap``). Under FSDP the parameters become shards (DTensors) when
  the model is wrapped: removing or resizing an adapter would mean unsharding, re-sharding and rebuilding the
  optimizer, losing the surgery's row-by-row optimizer state.
- LitGPT's loop (``litgpt.finetune.lora.fit``) generates a sample on rank 0 alone at every evaluation. Under
  FSDP2 every forward all-gathers the shards, a collective the other ranks never join, so it hangs: stock
  ``litgpt finetune_lora --devices 2`` (0.5.13, two CPU processes, gloo, torch 2.13) stops at its first
  evaluation's sample. Under DDP a forward is local to its rank.
- Calibration needs the full model on every rank anyway (``litgpt_plop.scoring.calibration``), so the peak memory per
  device is that of the full model whatever the strategy; what sharding would save is the frozen base weights'
  memory during training, at the price of a gather before every save (``save_adapter`` writes from the full
  module on rank 0).

So every plugin trains with DDP (gloo on CPU, NCCL on GPUs): memory per device is that of a one-device run plus
DDP's gradient buckets, which hold only the adapters (the base model is frozen).

The order that makes DDP sound: the base weights load into the unwrapped model, the plugin places the adapters
(calibrating on every rank), and only then is the model wrapped (``setup_model``): DDP registers the parameters it
is given, so adapters created after wrapping would never have their gradients averaged.
"""

from __future__ import annotations

import gc
import hashlib
import json
import sys
from typing import Any, get_args

import lightning as L
import torch
from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
from lightning.fabric.plugins import BitsandbytesPrecision
from lightning.fabric.wrappers import _FabricModule
from torch.nn.parallel import DistributedDataParallel

from litgpt_plop.distributed import all_gather_rows
from litgpt_plop.model.checkpoint import PRECISION_DTYPES
from litgpt_plop.errors import InputError
from litgpt_plop.selection.placement import Placement

# What Fabric takes as ``precision`` (its own lists; anything else is its ValueError deep inside the launch).
FABRIC_PRECISIONS = (*get_args(_PRECISION_INPUT_STR), *get_args(_PRECISION_INPUT_STR_ALIAS))
# Fabric's name for the strategy of several devices (see the module docstring for why not FSDP).
MULTI_DEVICE_STRATEGY = "ddp"


def precision_and_quantization(
    precision: str, quantize: str | None
) -> tuple[list[BitsandbytesPrecision] | None, str | None, str | None]:
    """(Fabric plugins, Fabric precision, CPU 4-bit choice): on a GPU, quantization is Lightning's bitsandbytes
    precision plugin, as in ``litgpt finetune_lora``; Lightning refuses it on CPU, where bitsandbytes' own CPU
    kernels quantize the loaded model instead."""
    if quantize is None:
        return None, precision, None
    if "mixed" in precision:
        raise InputError("Quantization and mixed precision is not supported.")
    if torch.cuda.is_available():
        return [BitsandbytesPrecision(quantize[4:], PRECISION_DTYPES[precision])], None, None
    if quantize == "bnb.int8-training":
        raise InputError(
            "--quantize bnb.int8-training needs a CUDA GPU. On CPU, 4-bit works: --quantize bnb.nf4, bnb.nf4-dq,"
            " bnb.fp4 or bnb.fp4-dq"
        )
    return None, precision, quantize


def strategy_for(devices: int, num_nodes: int) -> str:
    """Fabric's strategy: ``"auto"`` (one device) or DDP for several devices or nodes."""
    return MULTI_DEVICE_STRATEGY if devices * num_nodes > 1 else "auto"


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside Fabric's wrapper (``model`` itself when it is not wrapped)."""
    return model.module if isinstance(model, _FabricModule) else model


def setup_model(fabric: L.Fabric, model: torch.nn.Module) -> torch.nn.Module:
    """Wrap the placed model for several devices (a no-op otherwise: one device set it up when it was built)."""
    if fabric.world_size == 1 or isinstance(model, _FabricModule):
        return model
    return fabric.setup_module(model)


def rewrap(fabric: L.Fabric, model: torch.nn.Module) -> None:
    """After adapters were removed or replaced (WeightLoRA's cuts), wrap the model in a new DDP wrapper, in place.

    The old wrapper's reducer holds the parameters it was built with: removed ones would never get a gradient again
    (DDP waits for them), new ones would never be averaged. Fabric's wrapper (the object LitGPT's loop holds) keeps
    the same identity; only the DDP module inside it is replaced. The new wrapper checks that every rank has the same
    parameter shapes, so ranks that cut differently fail here, loudly, instead of training different models.
    """
    if not isinstance(model, _FabricModule) or not isinstance(model._forward_module, DistributedDataParallel):
        return
    old = model._forward_module
    model._forward_module = fabric.strategy.setup_module(model.module)
    del old
    gc.collect()  # the old reducer's autograd hooks on kept parameters go with it


def placement_digest(placement: Placement) -> str:
    """A short hash of the whole placement (sites, ranks, scores, gates) but its timings (``*seconds``, measured by
    each rank for itself): equal on two ranks only if they decided the same, from the same scores."""
    text = json.dumps(_without_timings(placement.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not str(k).endswith("seconds")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def check_same_placement(fabric: L.Fabric, placement: Placement, when: str) -> None:
    """Every rank says which placement it has (one line each, so a log shows all ranks agree) and the run stops if
    any two differ: the scores are summed over ranks, so they should be identical, bit for bit."""
    if fabric.world_size == 1:
        return
    digest = placement_digest(placement)
    sys.stdout.flush()  # the line goes out whole, in one write, after what this rank printed before
    print(
        f"[rank {fabric.global_rank}/{fabric.world_size}] {when}: {len(placement.sites)} adapters, placement {digest}",
        flush=True,
    )
    gathered = all_gather_rows(torch.tensor([list(bytes.fromhex(digest))], dtype=torch.int64))
    if len({tuple(row.tolist()) for row in gathered}) != 1:
        raise RuntimeError(f"The ranks decided different placements ({when}); see the [rank i/n] lines above")


def check_same_adapters(fabric: L.Fabric, model: torch.nn.Module) -> None:
    """Before rank 0 saves: every rank holds the same trained adapters, so what rank 0 writes is what every rank
    trained. Compares a float64 checksum per adapter tensor (DDP keeps them bit-identical)."""
    if fabric.world_size == 1:
        return
    sums = [p.detach().double().sum().item() for name, p in unwrapped(model).named_parameters() if "lora_" in name]
    gathered = all_gather_rows(torch.tensor([sums], dtype=torch.float64))
    if not torch.equal(gathered.min(dim=0).values, gathered.max(dim=0).values):
        raise RuntimeError("The ranks hold different adapter weights: the data-parallel training diverged")


"""The calibration pass: run task prompts through a frozen LitGPT model and feed what the linears and blocks
see to the scorers (``litgpt_plop.scoring.plop``), without storing activations.

The pass
    * works on ``litgpt.model.GPT`` and ``litgpt.lora.GPT``, dense or with bitsandbytes ``Linear4bit`` base
      linears (found with ``litgpt_plop.model.modules``);
    * runs under ``torch.no_grad()`` in eval mode. Not ``torch.inference_mode()``: ``Linear4bit.forward`` casts
      its bias in place (``bias.data = ...``) and an inference-mode tensor stored in a parameter breaks training
      afterwards;
    * guards the bitsandbytes CPU hazard: on CPUs with avx512_bf16, a ``Linear4bit`` forward in eval mode on an
      input that does not require grad repacks its weight into a CPU-only layout for good (training then gets
      no input gradient and ``dequantize_4bit`` returns garbage). During the pass every ``Linear4bit`` gets
      ``support_avx512bf16_for_cpu = False``; the previous value is restored afterwards;
    * masks padding: batches are right-padded ``(input_ids, attention_mask)``; with causal attention the real
      tokens never see the right pads, every statistic only reads real tokens, and columns that are padding in
      every row are dropped before the forward, so a batch and the same batch with more (or no) padding give
      bit-identical scores. (Within a ragged batch, a short row's real tokens go through attention kernels
      sized for the longest row: the same values up to float rounding, ~1e-7);
    * stops before ``ln_f``/``lm_head`` unless a scorer needs the head (no vocabulary-sized logits);
    * removes its hooks and restores each module's train/eval mode even when it fails;
    * on CPU, hands the memory malloc keeps from each batch's forward back to the system
      (``litgpt_plop.memory.release_free_memory``; a 4-bit forward dequantizes every weight it uses);
    * under ``torch.distributed`` each rank takes its share of the batches (batch ``i`` goes to rank
      ``i % world_size``) and the scorers sum their statistics over ranks at the end (torchmetrics ``Metric``s,
      ``litgpt_plop.scoring.metrics``), so every rank ends with the same scores, equal to one process running all
      the batches. The model must be a full copy on every rank (DDP-style): the pass does no collective inside
      the forward, so ranks may run different numbers of batches. Not meant for FSDP-sharded models.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from litgpt_plop.distributed import distributed
from litgpt_plop.errors import InputError
from litgpt_plop.args import CalibrationArgs
from litgpt_plop.model.modules import gpt_of
from litgpt_plop.scoring.metrics import Totals
from litgpt_plop.scoring.prompts import select_samples
from litgpt_plop.model.quantize import no_cpu_repack
from litgpt_plop.memory import release_free_memory

# ---- batches ----------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One right-padded calibration batch.

    Args:
        input_ids: ``(B, T)`` token ids; pad positions hold any valid id.
        mask: ``(B, T)`` bool, True on real tokens (a prefix of each row).
        index: the batch's position in the whole calibration set (the same on every rank).
    """

    input_ids: torch.Tensor
    mask: torch.Tensor
    index: int = 0

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)


def as_batch(input_ids: torch.Tensor, mask_or_lengths: torch.Tensor | None = None, index: int = 0) -> Batch:
    """A ``Batch`` from ``input_ids`` and an attention mask ``(B, T)`` or lengths ``(B,)`` (None: no padding).

    Raises ``ValueError`` for left padding or holes in the mask, and for a batch that is all padding.
    """
    if input_ids.dim() != 2:
        raise InputError(f"Calibration batch {index}: input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if mask_or_lengths is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
    elif mask_or_lengths.dim() == 1:
        lengths = mask_or_lengths.to(input_ids.device)
        mask = torch.arange(T, device=input_ids.device)[None, :] < lengths[:, None]
    else:
        if mask_or_lengths.shape != input_ids.shape:
            raise InputError(
                f"Calibration batch {index}: attention mask shape {tuple(mask_or_lengths.shape)} does not match"
                f" input_ids shape {tuple(input_ids.shape)}"
            )
        mask = mask_or_lengths.to(device=input_ids.device, dtype=torch.bool)
    if T > 1 and (mask[:, 1:] & ~mask[:, :-1]).any():
        raise InputError(f"Calibration batch {index}: only right padding is supported (the mask has a real token after a pad)")
    if not mask.any():
        raise InputError(f"Calibration batch {index} is all padding: it has no real token")
    return Batch(input_ids=input_ids, mask=mask, index=index)


def make_batches(
    token_ids: Sequence[torch.Tensor], batch_size: int, max_seq_length: int, pad_id: int = 0
) -> tuple[list[Batch], int]:
    """Right-padded batches of ``batch_size`` prompts in the given order, each padded to its longest prompt.

    Prompts longer than ``max_seq_length`` are truncated to their first ``max_seq_length`` tokens (a warning
    says how many). Returns the batches and the number of truncated prompts. Raises ``ValueError`` for no
    prompts or an empty prompt.
    """
    if len(token_ids) == 0:
        raise InputError("Calibration data is empty: no prompts to calibrate on")
    prompts = []
    truncated = 0
    for i, ids in enumerate(token_ids):
        ids = torch.as_tensor(ids).long().flatten()
        if ids.numel() == 0:
            raise InputError(f"Calibration prompt {i} is empty (no tokens)")
        if ids.numel() > max_seq_length:
            ids = ids[:max_seq_length]
            truncated += 1
        prompts.append(ids)
    if truncated:
        warnings.warn(
            f"{truncated} of {len(prompts)} calibration prompts are longer than {max_seq_length} tokens and were"
            " truncated to their first tokens",
            stacklevel=2,
        )
    batches = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        lengths = torch.tensor([len(ids) for ids in chunk])
        input_ids = torch.full((len(chunk), int(lengths.max())), pad_id, dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = ids
        batches.append(as_batch(input_ids, lengths, index=len(batches)))
    return batches, truncated


# ---- data parallel ----------------------------------------------------------------------------------------


def shard_batches(batches: Sequence[Batch]) -> list[Batch]:
    """This rank's share of the batches: batch ``i`` goes to rank ``i % world_size`` (all of them when not
    distributed). Sharding whole batches keeps every batch as one process would see it."""
    if not distributed():
        return list(batches)
    return list(batches[dist.get_rank() :: dist.get_world_size()])


# ---- the pass ---------------------------------------------------------------------------------------------

# A forward hook registered with ``with_kwargs=True``: (module, args, kwargs, output) -> None.
ForwardHook = Callable[[nn.Module, tuple, dict, Any], None]


class Scorer(Protocol):
    """What the pass needs from a scorer (see ``litgpt_plop.scoring.plop``)."""

    needs_head: bool

    def hooks(self) -> list[tuple[nn.Module, ForwardHook]]:
        """The forward hooks to register for the pass."""

    def start_batch(self, batch: Batch) -> None:
        """Called before each forward, with the batch whose padding the hooks must mask."""

    def end_batch(self) -> None:
        """Called after each forward."""

    def reduce(self) -> None:
        """Called once after the last batch, on every rank: sum the statistics over ranks."""


@dataclass
class CalibrationStats:
    """What the pass saw, summed over ranks."""

    samples: int
    tokens: int
    batches: int
    seconds: float
    truncated: int = 0
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def pass_totals() -> Totals:
    """What a pass counts, as a ``Metric`` summed (the seconds maxed) over ranks: ``pass_stats`` reads it."""
    return Totals(counts=("samples", "tokens", "batches"), durations=("seconds",))


def pass_stats(totals: Totals, truncated: int) -> CalibrationStats:
    """The ``CalibrationStats`` of a pass from each rank's ``pass_totals``; call it on every rank. Raises
    ``InputError`` when no rank saw a real token."""
    counts = totals.gathered()
    if counts["tokens"] == 0:
        raise InputError("Calibration data is empty: no real tokens on any rank")
    return CalibrationStats(
        samples=counts["samples"],
        tokens=counts["tokens"],
        batches=counts["batches"],
        seconds=round(counts["seconds"], 3),
        truncated=truncated,
        world_size=dist.get_world_size() if distributed() else 1,
    )


class _StopForward(Exception):
    """Raised by a hook before ``ln_f`` when no scorer needs the head: skips the vocabulary-sized logits."""


def _stop_forward(module: nn.Module, args: tuple) -> None:
    raise _StopForward


def _without_pad_columns(batch: Batch, max_seq_length: int, device: torch.device) -> Batch:
    """``batch`` on ``device`` without the columns that are padding in every row: they change nothing but the
    attention kernel's rounding, so a batch with extra padding gives bit-identical scores (and costs less). Raises
    ``InputError`` for a batch that is all padding or longer than ``max_seq_length``."""
    if not batch.mask.any():
        raise InputError(f"Calibration batch {batch.index} is all padding: it has no real token")
    width = int(batch.lengths.max())
    if width > max_seq_length:
        raise InputError(
            f"Calibration batch {batch.index} has prompts of {width} tokens, more than the model's"
            f" max_seq_length {max_seq_length}"
        )
    return Batch(batch.input_ids[:, :width].to(device), batch.mask[:, :width].to(device), batch.index)


def calibrate(
    model: nn.Module,
    batches: Sequence[Batch],
    scorers: Sequence[Scorer],
    progress: bool = True,
    truncated: int = 0,
    reduce: bool = True,
) -> CalibrationStats:
    """Run ``batches`` through the LitGPT model inside ``model`` once, feeding every scorer.

    The batches are used as given (shard them first under data parallelism: ``shard_batches``). After the
    last batch each scorer sums its statistics over ranks, so call this on every rank. ``reduce=False`` leaves
    that to the caller (who then calls each scorer's ``reduce`` once): for feeding the same scorers batch by
    batch over several calls, as ``benchmarks/calibration_overhead.py`` does.

    Raises ``ValueError`` for no batches, a batch that is all padding (see ``as_batch``), a batch longer than
    the model's ``max_seq_length``, and (from the scorers) non-finite activations.
    """
    gpt = gpt_of(model)
    if len(batches) == 0 and not distributed():
        raise InputError("Calibration data is empty: no batches to calibrate on")
    device = gpt.transformer.wte.weight.device
    training = {module: module.training for module in gpt.modules()}
    handles = []
    totals = pass_totals()
    start = time.perf_counter()
    try:
        with no_cpu_repack(gpt):
            gpt.eval()
            for scorer in scorers:
                for module, hook in scorer.hooks():
                    handles.append(module.register_forward_hook(hook, with_kwargs=True))
            if not any(scorer.needs_head for scorer in scorers):
                handles.append(gpt.transformer.ln_f.register_forward_pre_hook(_stop_forward))
            show = progress and (not distributed() or dist.get_rank() == 0)
            with torch.no_grad():
                for batch in tqdm(batches, desc="Calibrating", unit="batch", disable=not show):
                    batch = _without_pad_columns(batch, gpt.max_seq_length, device)
                    for scorer in scorers:
                        scorer.start_batch(batch)
                    try:
                        gpt(batch.input_ids)
                    except _StopForward:
                        pass
                    for scorer in scorers:
                        scorer.end_batch()
                    totals.update(samples=int((batch.lengths > 0).sum()), tokens=int(batch.mask.sum()), batches=1)
                    if device.type == "cpu":  # what malloc keeps from the forward (a 4-bit one dequantizes every weight)
                        release_free_memory()
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in training.items():
            module.training = mode
    if reduce:
        for scorer in scorers:
            scorer.reduce()
    totals.update(seconds=time.perf_counter() - start)
    return pass_stats(totals, truncated)


def run_calibration(
    model: nn.Module,
    token_ids: Sequence[torch.Tensor],
    scorers: Sequence[Scorer],
    args: CalibrationArgs | None = None,
    shard: bool = True,
) -> CalibrationStats:
    """The whole pass from tokenized prompts: pick at most ``args.num_samples`` (seeded), batch them (prompts
    longer than ``min(args.max_seq_length, model.max_seq_length)`` are truncated, with a warning), give each
    rank its share of the batches when ``shard`` and distributed, and calibrate.

    Under data parallelism pass the same ``token_ids`` on every rank (``shard=True``), or each rank's own
    prompts with ``shard=False``.
    """
    args = CalibrationArgs() if args is None else args
    batches, truncated = calibration_batches(gpt_of(model), token_ids, args, shard)
    return calibrate(model, batches, scorers, progress=args.progress, truncated=truncated)


def calibration_batches(
    gpt: nn.Module, token_ids: Sequence[torch.Tensor], args: CalibrationArgs, shard: bool
) -> tuple[list[Batch], int]:
    """The batches ``run_calibration`` runs and how many prompts were truncated (summed over ranks): at most
    ``args.num_samples`` prompts (seeded), truncated to ``min(args.max_seq_length, gpt.max_seq_length)``, this
    rank's share of them when ``shard``. The layer-sequential pass (``litgpt_plop.scoring.sequential``) runs the same."""
    if len(token_ids) == 0:
        raise InputError("Calibration data is empty: no prompts to calibrate on")
    token_ids = select_samples(token_ids, args.num_samples, args.seed)
    max_seq_length = min(args.max_seq_length, gpt.max_seq_length)
    batches, truncated = make_batches(token_ids, args.batch_size, max_seq_length)
    if shard:
        batches = shard_batches(batches)  # every rank truncated the same prompts: its count is the total
    else:
        total = Totals(counts=("truncated",))
        total.update(truncated=truncated)
        truncated = total.gathered()["truncated"]
    return batches, truncated

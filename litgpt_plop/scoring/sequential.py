"""Layer-sequential calibration: the pass of ``litgpt_plop.scoring.calibration`` with its loops swapped, so that
only one block's weights are in memory at a time (docs/methods.md, "The calibration pass").

The whole-model pass runs every batch through every block; this one embeds every batch once, then, for each
block, brings its weights from the memory-mapped checkpoint (``CheckpointBlocks``), runs every batch through it
with the scorers' hooks attached, keeps its outputs as the next block's inputs (on the host) and releases it:
its tensors go back to the meta device and the checkpoint pages it touched are handed back to the kernel
(``MappedCheckpoint.release``). Peak memory: one block, the embedding while it is used (the head at the end if a
scorer needs it), and every batch's hidden states (``prompts x tokens x n_embd``).

It computes what the whole-model pass computes, the same operations on the same tensors:

    * the forward is ``litgpt.model.GPT.forward``'s without a KV cache: embedding (scaled where the config says),
      the rope cache sliced to the batch's width (per block where ``rope_indices`` says), no mask (causal; a
      block's sliding window is its own), each block in turn, ``ln_f`` and ``lm_head`` only for a scorer that
      needs the head. Blocks after the last one any scorer or the weights' scores read are never loaded;
    * the weights are what ``load_checkpoint_model`` makes of the file: assigned from the mapping, the block
      linears quantized when asked, every other float tensor converted to the precision (the rope cache
      included), then moved to the device;
    * each batch visits each block once, so a scorer sees a batch once per block. ``CkaScorer`` adds up what each
      visit gives (its other layers' rows are zero); ``PlopScorer`` keeps one row per prompt, so the rows the
      visits of a batch append are summed back into one (``_fold_visits``): every site's value comes from one
      visit and the others add exact zeros, so the rows are the whole-model pass's, bit for bit;
    * what the scores read from the weights after the pass is read while each block is loaded: PLoP's
      denominators (cached in its scorer) and, when asked, ``kappa``'s condition numbers
      (``litgpt_plop.scoring.kappa.score_weights``, block by block, merged as one call over every block gives).

Under ``torch.distributed`` each rank takes its share of the batches (``shard_batches``) and the scorers sum over
ranks at the end, as in the whole-model pass.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from litgpt import Config
from litgpt.model import GPT
from tqdm import tqdm

from litgpt_plop.args import CalibrationArgs
from litgpt_plop.distributed import distributed
from litgpt_plop.errors import InputError
from litgpt_plop.memory import release_free_memory
from litgpt_plop.model.checkpoint import (
    CONFIG_FILE,
    PRECISION_DTYPES,
    WEIGHTS_FILE,
    MappedCheckpoint,
    check_checkpoint_dir,
    convert_floats,
)
from litgpt_plop.model.quantize import QUANTIZE_CHOICES, no_cpu_repack, quantize_choice, quantize_linears_4bit
from litgpt_plop.scoring.calibration import (
    Batch,
    CalibrationStats,
    _without_pad_columns,
    calibration_batches,
    pass_stats,
    pass_totals,
)
from litgpt_plop.scoring.cka import CkaScorer
from litgpt_plop.scoring.kappa import KappaScores, geometric_mean, score_weights
from litgpt_plop.scoring.plop import PlopScorer
from litgpt_plop.selection.placement import HEAD_KIND


class _OneBlock(GPT):
    """A ``GPT`` that holds one block and nothing else: what ``quantize_linears_4bit`` walks (every block of a GPT)
    when only that block is to be quantized."""

    def __init__(self, block: nn.Module) -> None:
        nn.Module.__init__(self)
        self.transformer = nn.ModuleDict({"h": nn.ModuleList([block])})


class CheckpointBlocks:
    """A LitGPT checkpoint directory as a model whose pieces are loaded one at a time.

    ``gpt`` is the ``litgpt.model.GPT`` built on the meta device: the scorers are made on it (they read its config
    and find its modules), and ``loaded`` fills one piece of it (a block, the embedding, the final norm and head)
    with its weights for as long as it is needed.

    Args:
        checkpoint_dir: a LitGPT checkpoint directory (``lit_model.pth`` and ``model_config.yaml``).
        precision: ``32-true``, ``bf16-true`` or ``16-true``; None keeps the dtype the weights are stored in.
        quantize: ``bnb.nf4``, ``bnb.nf4-dq``, ``bnb.fp4`` or ``bnb.fp4-dq``: each block's linears in bitsandbytes
            4-bit, quantized on the CPU as the block loads (as ``load_checkpoint_model`` quantizes them).
        device: where each piece runs; None: the GPU if there is one, else the CPU.
    """

    def __init__(
        self,
        checkpoint_dir: Path,
        precision: str | None = None,
        quantize: str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
        if precision is not None and precision not in PRECISION_DTYPES:
            raise InputError(f"Unsupported --precision {precision!r}; choose one of {list(PRECISION_DTYPES)}")
        if quantize is not None and quantize not in QUANTIZE_CHOICES:
            raise InputError(f"Unsupported --quantize {quantize!r}; choose one of {list(QUANTIZE_CHOICES)}")
        self.config = Config.from_file(checkpoint_dir / CONFIG_FILE)
        with torch.device("meta"):
            self.gpt = GPT(self.config)
        self.gpt.requires_grad_(False).eval()
        self.dtype = PRECISION_DTYPES[precision] if precision is not None else None
        self.quantize = quantize
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoint = MappedCheckpoint(checkpoint_dir / WEIGHTS_FILE)

    def rope_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` as ``stream_checkpoint`` makes them: on the CPU in float32, converted to the precision."""
        cos, sin = self.gpt.rope_cache(device=torch.device("cpu"))
        if self.dtype is not None:
            cos, sin = cos.to(self.dtype), sin.to(self.dtype)
        return cos.to(self.device), sin.to(self.device)

    def _fill(self, prefix: str, module: nn.Module, block: bool) -> None:
        state = {key[len(prefix) :]: value for key, value in self.checkpoint.state_dict.items() if key.startswith(prefix)}
        module.load_state_dict(state, strict=True, assign=True)
        if block and self.quantize is not None:
            quant_type, double_quant = quantize_choice(self.quantize)
            quantize_linears_4bit(
                _OneBlock(module), quant_type=quant_type, double_quant=double_quant, dtype=self.dtype,
                release=self.checkpoint.release,
            )  # fmt: skip
        if self.dtype is not None:
            convert_floats(module, self.dtype, self.checkpoint)
        module.requires_grad_(False).to(self.device).eval()

    def _empty(self, name: str, module: nn.Module) -> None:
        """Hand back the checkpoint pages ``module`` touched and put its tensors back on the meta device."""
        for tensor in [*module.parameters(), *module.buffers()]:
            self.checkpoint.release(tensor.data)
        if name.startswith("transformer.h."):  # a new meta block: quantizing swapped the old one's linears
            index = int(name.rsplit(".", 1)[1])
            with torch.device("meta"):
                self.gpt.transformer.h[index] = type(module)(self.config, index).requires_grad_(False).eval()
        else:
            module.to_empty(device="meta")

    def loaded(self, names: Sequence[str]) -> "_Loaded":
        """A context in which the pieces ``names`` of ``gpt`` (``transformer.h.<i>``, ``transformer.wte``,
        ``transformer.ln_f``, ``lm_head``) hold their weights on the device; on exit they are emptied again."""
        return _Loaded(self, list(names))


class _Loaded:
    def __init__(self, source: CheckpointBlocks, names: list[str]) -> None:
        self.source, self.names = source, names

    def __enter__(self) -> list[nn.Module]:
        modules = []
        try:
            for name in self.names:
                module = self.source.gpt.get_submodule(name)
                self.source._fill(f"{name}.", module, block=name.startswith("transformer.h."))
                modules.append(self.source.gpt.get_submodule(name))
        except BaseException:
            self.__exit__()
            raise
        return modules

    def __exit__(self, *exc: object) -> None:
        for name in self.names:
            self.source._empty(name, self.source.gpt.get_submodule(name))
        release_free_memory()


# ---- the pass ---------------------------------------------------------------------------------------------


def _fold_visits(scorer: PlopScorer, folded: list[torch.Tensor] | None, batches: int) -> list[torch.Tensor]:
    """Take the ``batches`` per-prompt rows the last piece's visits added to ``scorer.statistics`` out of it and
    add them to ``folded`` (None: the first piece); the statistics count each batch once."""
    statistics = scorer.statistics
    rows = statistics.rows[len(statistics.rows) - batches :]
    del statistics.rows[len(statistics.rows) - batches :]
    if folded is None:
        return rows
    statistics.batches -= batches
    return [total + row for total, row in zip(folded, rows)]


def _piece_denominators(scorer: PlopScorer, layers: list[int], head: bool) -> None:
    """PLoP's denominators of the sites in ``layers`` (and of the head), while those weights are loaded, added to
    the scorer's cache (which its scores read after the pass). ``denominators`` computes every candidate site the
    scorer has: it is given only these for the call."""
    kept = scorer.layers, scorer.needs_head, scorer._denominators
    scorer.layers, scorer.needs_head, scorer._denominators = layers, head, {}
    try:
        piece = scorer.denominators()
    finally:
        scorer.layers, scorer.needs_head, scorer._denominators = kept
    scorer._denominators.update(piece)


def _merge_kappa(pieces: list[KappaScores], kinds: Sequence[str]) -> KappaScores:
    """The ``KappaScores`` one ``score_weights`` call over every piece's sites gives: its sites in the same order
    (every single-matrix site, then each expert site's geometric mean), the same means."""
    per_site, per_expert = {}, {}
    for piece in pieces:
        per_site.update({key: value for key, value in piece.per_site.items() if key not in piece.per_expert})
        per_expert.update(piece.per_expert)
    per_site.update({key: geometric_mean(values) for key, values in per_expert.items()})
    per_kind = {kind: geometric_mean([v for key, v in per_site.items() if key.split(".", 1)[1] == kind]) for kind in kinds}
    return KappaScores(per_site, per_kind, seconds=sum(p.seconds for p in pieces), per_expert=per_expert)


class _Pass:
    """One layer-sequential pass: the batches' hidden states and what each scorer has gathered so far."""

    def __init__(self, source: CheckpointBlocks, batches: list[Batch], scorers: Sequence[PlopScorer | CkaScorer]):
        for scorer in scorers:
            if not isinstance(scorer, (PlopScorer, CkaScorer)):
                raise TypeError(f"The layer-sequential pass feeds PlopScorer and CkaScorer, not {type(scorer).__name__}")
        self.source, self.batches, self.scorers = source, batches, list(scorers)
        self.hidden: list[torch.Tensor] = []
        self.folded: dict[int, list[torch.Tensor] | None] = {id(s): None for s in scorers if isinstance(s, PlopScorer)}
        self.kappa: list[KappaScores] = []
        self.kappa_seconds = 0.0

    def embed(self) -> None:
        """Every batch's embedding, as ``GPT.forward`` makes it, kept on the host."""
        config = self.source.config
        with self.source.loaded(["transformer.wte"]) as (wte,):
            for batch in self.batches:
                x = wte(batch.input_ids)
                if config.scale_embeddings:
                    x = x * torch.tensor(config.n_embd**0.5, dtype=x.dtype)
                self.hidden.append(x.cpu())

    def visit(self, modules: list[nn.Module], forward) -> None:
        """Run every batch through ``forward(j, x)`` with the scorers' hooks on ``modules`` (and inside them)."""
        inside = {m for module in modules for m in module.modules()}
        handles = []
        try:
            for scorer in self.scorers:
                for module, hook in scorer.hooks():
                    if module in inside:
                        handles.append(module.register_forward_hook(hook, with_kwargs=True))
            for j, batch in enumerate(self.batches):
                for scorer in self.scorers:
                    scorer.start_batch(batch)
                out = forward(j, self.hidden[j].to(self.source.device))
                for scorer in self.scorers:
                    scorer.end_batch()
                if out is not None:
                    self.hidden[j] = out.cpu()
        finally:
            for handle in handles:
                handle.remove()
        for scorer in self.scorers:
            if isinstance(scorer, PlopScorer):
                self.folded[id(scorer)] = _fold_visits(scorer, self.folded[id(scorer)], len(self.batches))

    def read_weights(self, blocks: list[int], head: bool, kinds: Sequence[str] | None, layers: Sequence[int]) -> None:
        """What the scores read from the loaded weights (``blocks``, and the head when ``head``): PLoP's
        denominators, and ``kappa``'s condition numbers of the ``kinds`` in ``layers`` when ``kinds`` is given."""
        for scorer in self.scorers:
            if isinstance(scorer, PlopScorer):
                _piece_denominators(scorer, [l for l in blocks if l in scorer.layers], head and scorer.needs_head)
        if kinds is None:
            return
        if head:
            kinds, blocks = [HEAD_KIND] if HEAD_KIND in kinds else [], []
        else:
            kinds, blocks = [k for k in kinds if k != HEAD_KIND], [l for l in blocks if l in layers]
        if kinds and (blocks or head):
            t0 = time.perf_counter()
            self.kappa.append(score_weights(self.source.gpt, kinds, blocks))
            self.kappa_seconds += time.perf_counter() - t0

    def finish(self) -> None:
        for scorer in self.scorers:
            if isinstance(scorer, PlopScorer) and self.folded[id(scorer)] is not None:
                scorer.statistics.rows.extend(self.folded[id(scorer)])


def _last_block(source: CheckpointBlocks, scorers: Sequence[PlopScorer | CkaScorer], layers: Sequence[int]) -> int:
    """How many blocks the pass loads: all of them when a scorer reads the head, else up to the last one a scorer
    or the weights' scores (``layers``) read."""
    if any(scorer.needs_head for scorer in scorers):
        return source.config.n_layer
    read = [*layers, *(layer for scorer in scorers for layer in scorer.layers)]
    return max(read) + 1 if read else 0


def calibrate_sequential(
    source: CheckpointBlocks,
    batches: Sequence[Batch],
    scorers: Sequence[PlopScorer | CkaScorer],
    progress: bool = True,
    truncated: int = 0,
    reduce: bool = True,
    kappa: tuple[Sequence[str], Sequence[int]] | None = None,
) -> tuple[CalibrationStats, KappaScores | None]:
    """``litgpt_plop.scoring.calibration.calibrate`` one block at a time (the module docstring says how), on the
    checkpoint of ``source``, whose ``gpt`` the scorers were made on.

    ``kappa``: ``(kinds, layers)`` whose condition numbers to compute while their weights are loaded (what
    ``score_weights(model, kinds, layers)`` gives on the whole model); returned beside the stats (None without it).
    Their time is ``KappaScores.seconds``, not the pass's. Raises as ``calibrate`` does.
    """
    gpt, config = source.gpt, source.config
    if len(batches) == 0 and not distributed():
        raise InputError("Calibration data is empty: no batches to calibrate on")
    start = time.perf_counter()
    batches = [_without_pad_columns(batch, gpt.max_seq_length, source.device) for batch in batches]
    kinds, layers = (list(kappa[0]), list(kappa[1])) if kappa is not None else (None, [])
    run = _Pass(source, batches, scorers)
    show = progress and (not distributed() or dist.get_rank() == 0)
    cos, sin = source.rope_cache()
    with torch.no_grad():
        run.embed()
        for i in tqdm(range(_last_block(source, scorers, layers)), desc="Calibrating", unit="block", disable=not show):
            with source.loaded([f"transformer.h.{i}"]) as (block,), no_cpu_repack(block):
                rope = config.rope_indices[i] if config.rope_indices is not None else slice(None)

                def forward(j: int, x: torch.Tensor, block: nn.Module = block, rope=rope) -> torch.Tensor:
                    width = x.shape[1]
                    return block(x, cos[:width].unsqueeze(0)[..., rope], sin[:width].unsqueeze(0)[..., rope])

                run.visit([block], forward)
                run.read_weights([i], False, kinds, layers)
        head_scored = any(scorer.needs_head for scorer in scorers)
        if head_scored or (kinds is not None and HEAD_KIND in kinds):
            with source.loaded(["transformer.ln_f", "lm_head"]) as (ln_f, head):
                if head_scored:

                    def through_head(j: int, x: torch.Tensor) -> None:
                        head(ln_f(x))  # the hooks read it; the next block is none

                    run.visit([ln_f, head], through_head)
                run.read_weights([], True, kinds, layers)
    run.finish()
    if reduce:
        for scorer in scorers:
            scorer.reduce()
    totals = pass_totals()
    for batch in batches:
        totals.update(samples=int((batch.lengths > 0).sum()), tokens=int(batch.mask.sum()), batches=1)
    totals.update(seconds=time.perf_counter() - start - run.kappa_seconds)
    stats = pass_stats(totals, truncated)
    return stats, (_merge_kappa(run.kappa, kinds) if kinds is not None else None)


def run_sequential_calibration(
    source: CheckpointBlocks,
    token_ids: Sequence[torch.Tensor],
    scorers: Sequence[PlopScorer | CkaScorer],
    args: CalibrationArgs | None = None,
    shard: bool = True,
    kappa: tuple[Sequence[str], Sequence[int]] | None = None,
) -> tuple[CalibrationStats, KappaScores | None]:
    """``run_calibration`` (the same prompts, batches and shares of them), layer-sequential: ``calibrate_sequential``."""
    args = CalibrationArgs() if args is None else args
    batches, truncated = calibration_batches(source.gpt, token_ids, args, shard)
    return calibrate_sequential(source, batches, scorers, progress=args.progress, truncated=truncated, kappa=kappa)

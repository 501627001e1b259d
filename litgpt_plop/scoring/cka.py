"""CKA's score, computed in the calibration pass (docs/methods.md section 2), and its scorer.

CKA, per block: X = residual stream entering it, Y = leaving it. ``last`` pooling keeps one vector per prompt
(its last real token) and computes linear CKA with the biased HSIC; ``tokens`` treats every real token as a
sample and averages the unbiased HSIC over batches (Nguyen, Raghu, Kornblith 2021) with O(1) state per layer,
computed by ``litgpt_plop.scoring.hsic.BatchHsic`` (one Gram matrix per block boundary, shared by the two blocks it
joins; equal to ``unbiased_hsic`` to float64 rounding).
LOWER similarity = the block changes its input more = gets LoRA. A layer whose pooled inputs (or outputs) are
the same for every sample has a ~zero centred matrix and a meaningless CKA: it is listed in
``degenerate_layers`` with a warning, and ``litgpt_plop.selection.rules`` never selects it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
from litgpt import GPT

from litgpt_plop.scoring.calibration import Batch, ForwardHook
from litgpt_plop.scoring.hsic import BatchHsic, TokenSide
from litgpt_plop.scoring.metrics import HsicSums, PooledRows

# ---- the math, on plain tensors ---------------------------------------------------------------------------


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA with the biased HSIC between ``x`` ``(n, d1)`` and ``y`` ``(n, d2)`` (rows are samples):
    centre the columns, then ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``. 0.0 when a centred matrix is zero."""
    x = x.double() - x.double().mean(dim=0)
    y = y.double() - y.double().mean(dim=0)
    # Gram form (n x n), the same numbers as the feature form, cheaper for n << d.
    k = x @ x.T
    l = y @ y.T
    denominator = k.norm() * l.norm()
    if denominator == 0:
        return 0.0
    return float((k * l).sum() / denominator)


def _relative_centred_norm(x: torch.Tensor) -> float:
    """``||X - mean||_F / ||X||_F`` (0.0 for an all-zero X)."""
    x = x.double()
    total = x.norm()
    if total == 0:
        return 0.0
    return float((x - x.mean(dim=0)).norm() / total)


# ---- results ----------------------------------------------------------------------------------------------


@dataclass
class CkaScores:
    """Layer-wise CKA similarity between what enters and what leaves each block. Lower = the block changes
    the representation more = more important.

    Args:
        per_layer: CKA per layer.
        degenerate_layers: layers whose centred input or output is ~zero (every sample the same there): their
            CKA means nothing and they must not be selected on it.
        pooling: ``last`` or ``tokens``.
        samples: pooled vectors (``last``) or tokens (``tokens``) the similarity was computed on.
    """

    per_layer: dict[int, float]
    degenerate_layers: list[int] = field(default_factory=list)
    pooling: str = "last"
    samples: int = 0


# ---- the scorer (hooked into the calibration pass) ---------------------------------------------------------


class CkaScorer:
    """Running CKA statistics for the blocks ``layers`` of ``gpt`` (hooks on ``gpt.transformer.h[i]``).

    ``last``: the last real token's input and output vector of each prompt, n x d per layer (fine for n ~ 128;
    gathered from every rank by ``reduce``). ``tokens``: per layer, sums over batches of the three unbiased
    HSIC values and of the norms the degeneracy check needs: O(1) state, summed over ranks by ``reduce``. Either
    is kept in torchmetrics ``Metric``s (``litgpt_plop.scoring.metrics``): ``rows`` per layer, ``statistics``.
    """

    def __init__(self, gpt: GPT, layers: Sequence[int], pooling: str = "last", degenerate_tol: float = 1e-4) -> None:
        if pooling not in ("last", "tokens"):
            raise ValueError(f"Unknown CKA pooling {pooling!r}; use 'last' or 'tokens'")
        self.gpt = gpt
        self.layers = list(layers)
        self.pooling = pooling
        self.degenerate_tol = degenerate_tol
        self.needs_head = False
        self._batch: Batch | None = None
        # last: pooled (inputs, outputs) per layer
        self.rows = {layer: PooledRows(gpt.config.n_embd) for layer in self.layers}
        # tokens: per layer [hsic_xy, hsic_xx, hsic_yy, batches, ||Xc||^2, ||X||^2, ||Yc||^2, ||Y||^2, tokens]
        self.statistics = HsicSums(len(self.layers), 9)
        self._gathered: tuple[dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]], torch.Tensor, int] | None = None
        self._skipped = 0  # the current batch's: 1 when it has fewer than 4 real tokens
        self._grams: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # for resampling ('last' pooling)
        self._hsic: BatchHsic | None = None  # tokens: the current batch's HSIC work
        self._batch_sums: torch.Tensor | None = None

    def hooks(self) -> list[tuple[nn.Module, ForwardHook]]:
        return [(self.gpt.transformer.h[layer], self._make_hook(row, layer)) for row, layer in enumerate(self.layers)]

    def _make_hook(self, row: int, layer: int) -> ForwardHook:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            batch = self._batch
            x = args[0] if args else kwargs["x"]
            if self.pooling == "tokens":
                x_side = self._side(x, layer)  # block - 1's output side, when that block is scored too
                self._add_tokens(row, x_side, self._side(output, layer))
                return
            lengths = batch.lengths
            samples = torch.nonzero(lengths > 0).flatten()
            last = lengths[samples] - 1
            xs, ys = x[samples, last].float(), output[samples, last].float()
            if not torch.isfinite(xs).all() or not torch.isfinite(ys).all():
                raise self._non_finite(layer)
            self.rows[layer].update(xs.detach(), ys.detach())  # advanced indexing already copied

        return hook

    @property
    def pooled(self) -> dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """``last``: per layer, the pooled (inputs, outputs) rows: every rank's after ``reduce``, this rank's before."""
        if self._gathered is not None:
            return self._gathered[0]
        return {layer: (rows.inputs, rows.outputs) for layer, rows in self.rows.items()}

    @property
    def sums(self) -> torch.Tensor:
        """``tokens``: the sums per layer, over every rank after ``reduce``, over this rank's batches before."""
        return self._gathered[1] if self._gathered is not None else self.statistics.sums

    @property
    def skipped_batches(self) -> int:
        """``tokens``: the batches of fewer than 4 real tokens (every rank's after ``reduce``)."""
        return self._gathered[2] if self._gathered is not None else int(self.statistics.skipped)

    def _non_finite(self, layer: int) -> ValueError:
        return ValueError(
            f"Non-finite activations (NaN or inf) entering or leaving block {layer} in calibration batch {self._batch.index}"
        )

    def _side(self, activations: torch.Tensor, layer: int) -> TokenSide:
        side = self._hsic.side(activations)
        # Squares of float32/bf16/fp16 values cannot overflow float64: the sum is finite exactly when every element is.
        finite = torch.isfinite(side.raw_sq) if activations.dtype != torch.float64 else torch.isfinite(activations).all()
        if not bool(finite):
            raise self._non_finite(layer)
        return side

    def _add_tokens(self, row: int, x: TokenSide, y: TokenSide) -> None:
        """Add one batch's HSIC terms and norms to ``sums[row]`` (batches of fewer than 4 tokens are skipped)."""
        n = x.centred.shape[0]
        if n < 4:  # the unbiased estimator needs 4 samples
            if row == 0:
                self._skipped = 1
            return
        one = torch.ones((), dtype=torch.float64, device=x.centred.device)
        terms = [self._hsic.cross_hsic(x, y), x.self_hsic, y.self_hsic, one, x.centred_sq, x.raw_sq, y.centred_sq, y.raw_sq, n * one]
        self._batch_sums[row] = torch.stack(terms)  # added to self.sums in end_batch: one transfer per batch

    def start_batch(self, batch: Batch) -> None:
        self._batch = batch
        self._hsic = BatchHsic(batch.mask) if self.pooling == "tokens" else None
        # this batch's terms per layer, zero for a layer it skips (adding 0.0 leaves a sum as it was)
        self._batch_sums = torch.zeros(len(self.layers), 9, dtype=torch.float64, device=batch.mask.device)
        self._skipped = 0

    def end_batch(self) -> None:
        if self.pooling == "tokens":
            self.statistics.update(self._batch_sums.cpu(), self._skipped)
        self._batch = self._hsic = self._batch_sums = None

    def reduce(self) -> None:
        """Every rank ends with every rank's statistics (pooled rows in rank order); the local ones, now part of
        those, are reset."""
        if self._gathered is not None:  # the local statistics were reset: a second gather would hold nothing
            raise RuntimeError(f"{type(self).__name__}.reduce was already called: it gathers a pass's statistics once")
        if self.pooling == "last":
            pooled = {}
            for layer, rows in self.rows.items():
                x, y = rows.gathered()
                pooled[layer] = ([x], [y])
                rows.reset()
            self._gathered = (pooled, self.statistics.sums, 0)
        else:
            sums, skipped = self.statistics.gathered()
            self.statistics.reset()
            self._gathered = ({layer: ([], []) for layer in self.layers}, sums, skipped)

    def result(self) -> CkaScores:
        """The scores (after the pass). Warns about degenerate layers."""
        return self.scores_of(None)

    def _resampled(self, layer: int, index: torch.Tensor) -> tuple[float, float]:
        """(CKA, relative centred norm) of the prompts ``index`` of ``layer``: ``linear_cka`` on the resampled rows,
        computed from the full-sample Gram matrices (cached), to float rounding."""
        if layer not in self._grams:
            x, y = torch.cat(self.pooled[layer][0]).double(), torch.cat(self.pooled[layer][1]).double()
            self._grams[layer] = (x @ x.T, y @ y.T)
        centred, relative = [], []
        for gram in self._grams[layer]:
            g = gram[index][:, index]
            g = g - g.mean(dim=0, keepdim=True) - g.mean(dim=1, keepdim=True) + g.mean()  # H G H
            centred.append(g)
            total = float(gram[index, index].sum())
            relative.append(math.sqrt(max(float(g.trace()), 0.0) / total) if total > 0 else 0.0)
        k, l = centred
        denominator = float(k.norm() * l.norm())
        return (float((k * l).sum()) / denominator if denominator else 0.0), min(relative)

    def scores_of(self, prompts: Sequence[int] | None, warn: bool = True) -> CkaScores:
        """The scores over the given prompts (indices, repeats counting again: for resampling; only with ``last``
        pooling, whose state is one row per prompt); ``None``: every prompt."""
        if prompts is not None and self.pooling != "last":
            raise ValueError("CKA can be resampled by prompt only with 'last' pooling")
        index = None if prompts is None else torch.as_tensor(list(prompts), dtype=torch.long)
        per_layer, degenerate = {}, []
        samples = 0
        if self.skipped_batches and warn:
            warnings.warn(
                f"CKA 'tokens' pooling skipped {self.skipped_batches} batch(es) with fewer than 4 real tokens",
                stacklevel=2,
            )
        for row, layer in enumerate(self.layers):
            if self.pooling == "last":
                if index is not None:  # a resample: from the Gram matrices, O(n^2) per layer
                    samples = len(index)
                    per_layer[layer], relative = self._resampled(layer, index)
                    flat = relative <= self.degenerate_tol
                    if flat:
                        degenerate.append(layer)
                    continue
                x, y = torch.cat(self.pooled[layer][0]), torch.cat(self.pooled[layer][1])
                samples = x.shape[0]
                if samples < 2:
                    raise ValueError(f"CKA with 'last' pooling needs at least 2 prompts, got {samples}")
                flat = min(_relative_centred_norm(x), _relative_centred_norm(y)) <= self.degenerate_tol
                per_layer[layer] = linear_cka(x, y)
            else:
                hsic_xy, hsic_xx, hsic_yy, batches, xc, x_sq, yc, y_sq, tokens = self.sums[row].tolist()
                samples = int(tokens)
                if batches == 0:
                    raise ValueError("CKA with 'tokens' pooling needs batches of at least 4 real tokens; none had that many")
                relative = min(math.sqrt(xc / x_sq) if x_sq > 0 else 0.0, math.sqrt(yc / y_sq) if y_sq > 0 else 0.0)
                flat = relative <= self.degenerate_tol or hsic_xx <= 0 or hsic_yy <= 0
                per_layer[layer] = 0.0 if (hsic_xx <= 0 or hsic_yy <= 0) else hsic_xy / math.sqrt(hsic_xx * hsic_yy)
            if flat:
                degenerate.append(layer)
        if degenerate and warn:
            warnings.warn(
                f"CKA is degenerate on layer(s) {degenerate}: the {self.pooling!r}-pooled vectors entering or leaving"
                " these blocks are (nearly) the same for every calibration sample (e.g. every prompt ends with the"
                " same template token), so their similarity says nothing. They will not be selected. Use more varied"
                " prompts or --cka.pooling tokens.",
                stacklevel=2,
            )
        return CkaScores(per_layer=per_layer, degenerate_layers=degenerate, pooling=self.pooling, samples=samples)

"""The two scores a calibration pass computes (docs/methods.md sections 1 and 2) and the scorers that compute them.

PLoP, per site (one LoRA-able linear map in one block)::

    NFN(site) = [ mean over every real token t of ||W z_t|| / ||z_t|| ] / denominator

over the real (non-padding) tokens z_t of every batch. The numerator is the module's own output:
``||W z|| = ||y - bias||``, so no extra matmul. The fused ``attn.qkv`` is split into its ``[q | k | v]`` row
slices, each its own site. The denominator is a per-site constant: ``||W||_F / sqrt(d_in)`` (closed form, the
default) or a seeded Monte-Carlo ``mean_r ||W r||`` over random unit vectors r. (The authors draw fresh r per
batch; a fixed seeded draw estimates the same expectation, and keeps padded/unpadded batches and every rank
identical.) Per kind: mean over layers. Per layer: mean over that layer's kinds. LOWER = less aligned with
the task = gets LoRA.

CKA, per block: X = residual stream entering it, Y = leaving it. ``last`` pooling keeps one vector per prompt
(its last real token) and computes linear CKA with the biased HSIC; ``tokens`` treats every real token as a
sample and averages the unbiased HSIC over batches (Nguyen, Raghu, Kornblith 2021) with O(1) state per layer,
computed by ``litgpt_plop.hsic.BatchHsic`` (one Gram matrix per block boundary, shared by the two blocks it
joins; equal to ``unbiased_hsic`` to float64 rounding).
LOWER similarity = the block changes its input more = gets LoRA. A layer whose pooled inputs (or outputs) are
the same for every sample has a ~zero centred matrix and a meaningless CKA: it is listed in
``degenerate_layers`` with a warning, and ``litgpt_plop.select`` never selects it.
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
from litgpt import GPT

from litgpt_plop.calibration import Batch, ForwardHook, all_gather_rows, all_reduce_sum
from litgpt_plop.hsic import BatchHsic, TokenSide, unbiased_hsic  # noqa: F401 - unbiased_hsic: part of this API
from litgpt_plop.modules import KIND_TO_PATH, base_linear, qkv_row_slices, site_module
from litgpt_plop.placement import HEAD_KIND, HEAD_LAYER, QKV_KINDS

# ---- the math, on plain tensors ---------------------------------------------------------------------------


def weight_matrix(linear: nn.Module) -> torch.Tensor:
    """The dense float32 ``(d_out, d_in)`` weight of an ``nn.Linear`` or a bitsandbytes ``Linear4bit``
    (dequantized; call it for one module at a time, never for the whole model at once)."""
    weight = linear.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.detach().float()
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            "This Linear4bit weight is in bitsandbytes' CPU inference layout (repacked by an eval-mode forward);"
            " run the calibration pass, which unpacks it, before reading the weight"
        )
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(weight.data, quant_state).float()


def normalized_output_norms(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """``||W z_t|| / ||z_t||`` for each row t, from inputs ``z`` ``(N, d_in)`` and bias-free outputs ``W z``
    ``(N, d_out)``; rows whose input is exactly zero (no direction) are dropped."""
    input_norms = inputs.float().norm(dim=-1)
    keep = input_norms > 0
    return outputs.float()[keep].norm(dim=-1) / input_norms[keep]


def _norms(rows: torch.Tensor) -> torch.Tensor:
    """Float32 norms over the last dimension, the numbers ``rows.float().norm(dim=-1)`` gives without the copy."""
    return torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32)


def closed_form_denominator(weight: torch.Tensor) -> float:
    """``||W||_F / sqrt(d_in)``: the expected ``||W r||`` for a random unit vector r (up to Jensen's gap)."""
    # accumulated in float64 without a float64 copy of the matrix (the same number as weight.double().norm())
    return float(torch.linalg.vector_norm(weight, dtype=torch.float64) / math.sqrt(weight.shape[1]))


def monte_carlo_denominator(weight: torch.Tensor, num_samples: int, seed: int) -> float:
    """``mean_r ||W r||`` over ``num_samples`` random unit Gaussian vectors r, drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    r = torch.randn(num_samples, weight.shape[1], generator=generator, dtype=torch.float64)
    r = r / r.norm(dim=1, keepdim=True)
    return float((r.to(weight.device) @ weight.double().T).norm(dim=1).mean())


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
class PlopScores:
    """PLoP's normalised feature norms. Lower = less aligned with the task inputs = more in need of LoRA.

    Args:
        per_site: NFN per ``"<layer>.<kind>"``.
        per_kind: mean over layers of each kind's sites.
        per_layer: mean over each layer's kinds (the head, not being in a block, is left out).
        denominator: ``closed_form`` or ``monte_carlo``.
        tokens: real tokens seen (all ranks).
        batches: batches seen (all ranks).
    """

    per_site: dict[str, float]
    per_kind: dict[str, float]
    per_layer: dict[int, float]
    denominator: str = "closed_form"
    tokens: int = 0
    batches: int = 0


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


# ---- scorers (hooked into the calibration pass) -----------------------------------------------------------


class PlopScorer:
    """Running PLoP statistics for the ``kinds`` of the ``layers`` of ``gpt`` (the head once, if asked).

    State per site and per prompt: the sum of the normalised output norms over the prompt's real tokens and
    their count. A site's NFN is the mean over every token the pass saw (summed sums / summed counts), so how
    the prompts are grouped into batches does not change it. ``reduce`` gathers every rank's prompts; the
    per-prompt rows stay for resampling (``litgpt_plop.stability``).
    """

    def __init__(
        self,
        gpt: GPT,
        kinds: Sequence[str],
        layers: Sequence[int],
        denominator: str = "closed_form",
        mc_samples: int = 1024,
        seed: int = 42,
    ) -> None:
        if denominator not in ("closed_form", "monte_carlo"):
            raise ValueError(f"Unknown NFN denominator {denominator!r}; use 'closed_form' or 'monte_carlo'")
        self.gpt = gpt
        self.kinds = list(kinds)
        self.layers = list(layers)
        self.denominator = denominator
        self.mc_samples = mc_samples
        self.seed = seed
        self.needs_head = HEAD_KIND in self.kinds
        self.sites = [(layer, kind) for layer in self.layers for kind in self.kinds if kind != HEAD_KIND]
        if self.needs_head:
            self.sites.append((HEAD_LAYER, HEAD_KIND))
        self.index = {site: i for i, site in enumerate(self.sites)}
        # per prompt: (sum of normalised output norms, tokens) for every site; (prompts, sites, 2) after reduce
        self.sample_sums: list[torch.Tensor] | torch.Tensor = []
        self.batches = 0
        self._batch: Batch | None = None
        self._ratios: torch.Tensor | None = None  # (sites, B, T): ||W z|| / ||z|| over the current batch's grid
        self._site_input_norms: torch.Tensor | None = None  # (sites, B, T): ||z||
        self._input: torch.Tensor | None = None  # the last input seen, and its version and per-token norms
        self._input_version = 0
        self._input_norms: torch.Tensor | None = None
        self._denominators: dict[tuple[int, str], float] = {}
        self._reduced = False

    def _module_groups(self) -> list[tuple[int, nn.Module, list[tuple[str, int | None, int | None]]]]:
        """``(layer, base linear, [(kind, row start, row stop)])`` per distinct module; q/k/v share the qkv."""
        groups = []
        block_kinds = [k for k in self.kinds if k != HEAD_KIND]
        paths = list(dict.fromkeys(KIND_TO_PATH[k] for k in block_kinds))
        for layer in self.layers:
            for path in paths:
                kinds = [k for k in block_kinds if KIND_TO_PATH[k] == path]
                linear = base_linear(site_module(self.gpt, layer, kinds[0]))
                if path == "attn.qkv":
                    rows = qkv_row_slices(self.gpt.config)
                    groups.append((layer, linear, [(k, rows[k].start, rows[k].stop) for k in QKV_KINDS if k in kinds]))
                else:
                    groups.append((layer, linear, [(kinds[0], None, None)]))
        if self.needs_head:
            groups.append((HEAD_LAYER, base_linear(site_module(self.gpt, HEAD_LAYER, HEAD_KIND)), [(HEAD_KIND, None, None)]))
        return groups

    def hooks(self) -> list[tuple[nn.Module, ForwardHook]]:
        return [(linear, self._make_hook(layer, parts)) for layer, linear, parts in self._module_groups()]

    def _make_hook(self, layer: int, parts: list[tuple[str, int | None, int | None]]) -> ForwardHook:
        rows = [self.index[(layer, kind)] for kind, _, _ in parts]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            inputs = args[0] if args else kwargs["input"]
            # fc_1 and fc_2 (and a LoRA wrapper's linear) get the very same input tensor: its norms once
            if self._input is not inputs or self._input_version != inputs._version:
                self._input, self._input_version = inputs, inputs._version
                self._input_norms = _norms(inputs)  # (B, T)
            # ||W z|| = ||y - bias||; without a bias, y itself (no float32 copy of a bf16 output)
            outputs = output if module.bias is None else output.float() - module.bias.float()
            for row, (_, start, stop) in zip(rows, parts):
                torch.div(_norms(outputs[..., start:stop]), self._input_norms, out=self._ratios[row])
                self._site_input_norms[row] = self._input_norms

        return hook

    def start_batch(self, batch: Batch) -> None:
        self._batch = batch
        # Per site, the ratios and input norms over the whole padded (B, T) grid, on the activations' device; the
        # real tokens are picked and summed per prompt once, in end_batch: one gather, transfer and index_add for
        # all sites rather than one per site. (Norms on the grid are the numbers norms of the gathered rows give:
        # each row is reduced on its own.)
        shape = (len(self.sites), *batch.mask.shape)
        self._ratios = torch.zeros(shape, device=batch.mask.device)
        self._site_input_norms = torch.zeros(shape, device=batch.mask.device)
        self._input = None

    def end_batch(self) -> None:
        batch = self._batch
        kept = self._site_input_norms[:, batch.mask] != 0  # (sites, N); an exactly-zero input has no direction: left out
        # 0.0 in place of a left-out token adds nothing to a sum, so summing every token is summing the kept ones.
        ratios = self._ratios[:, batch.mask].masked_fill_(~kept, 0.0).T.double().cpu()  # (N, sites)
        # A NaN or inf input or output element makes that token's ratio NaN or inf (W z with a non-finite z is
        # non-finite), so checking the ratios checks the activations, once per batch.
        finite = torch.isfinite(ratios).all(dim=0)
        if not bool(finite.all()):
            layer, kind = self.sites[int((~finite).nonzero()[0, 0])]
            raise ValueError(
                f"Non-finite activations (NaN or inf) at the linear of site {layer}.{kind} in calibration batch {batch.index}"
            )
        prompts = batch.mask.nonzero()[:, 0].cpu()  # which prompt of the batch each real token belongs to
        current = torch.zeros(batch.mask.shape[0], len(self.sites), 2, dtype=torch.float64)
        # index_add_ adds the tokens one after another, per site: the order of the former per-site loop
        current[:, :, 0].index_add_(0, prompts, ratios)
        current[:, :, 1].index_add_(0, prompts, kept.T.double().cpu())
        self.sample_sums.append(current)
        self.batches += 1
        self._batch = self._ratios = self._site_input_norms = self._input = self._input_norms = None

    def reduce(self) -> None:
        """Every rank ends with every rank's prompts (two numbers per site and prompt) and batch count."""
        n = len(self.sites)
        mine = torch.cat(self.sample_sums) if len(self.sample_sums) else torch.zeros(0, n, 2, dtype=torch.float64)
        self.sample_sums = all_gather_rows(mine.flatten(1)).view(-1, n, 2)
        self.batches = int(all_reduce_sum(torch.tensor([float(self.batches)], dtype=torch.float64)).item())
        self._reduced = True

    def denominators(self) -> dict[tuple[int, str], float]:
        """The per-site denominator, computed once (one dequantized module at a time) and cached."""
        if not self._denominators:
            for layer, linear, parts in self._module_groups():
                weight = weight_matrix(linear)
                for kind, start, stop in parts:
                    rows = weight[start:stop]
                    if self.denominator == "closed_form":
                        value = closed_form_denominator(rows)
                    else:
                        seed = zlib.crc32(f"{self.seed}:{layer}.{kind}".encode())
                        value = monte_carlo_denominator(rows, self.mc_samples, seed)
                    self._denominators[(layer, kind)] = value
                del weight
        return self._denominators

    def result(self) -> PlopScores:
        """The scores (after the pass; ``calibrate`` calls ``reduce`` first)."""
        return self.scores_of(None)

    def scores_of(self, prompts: Sequence[int] | None) -> PlopScores:
        """The scores over the given prompts (indices into ``sample_sums``, repeats counting again: for resampling);
        ``None``: every prompt."""
        denominators = self.denominators()
        sample_sums = self.sample_sums if isinstance(self.sample_sums, torch.Tensor) else torch.cat(self.sample_sums)
        chosen = sample_sums if prompts is None else sample_sums[torch.as_tensor(list(prompts), dtype=torch.long)]
        sums = chosen.sum(dim=0)
        per_site = {}
        for (layer, kind), i in self.index.items():
            total, tokens = sums[i].tolist()
            if tokens == 0:
                raise ValueError(f"PLoP saw no token with a non-zero input at site {layer}.{kind}")
            if denominators[(layer, kind)] == 0:
                raise ValueError(f"The weight of site {layer}.{kind} is all zeros: its NFN is undefined")
            per_site[f"{layer}.{kind}"] = total / tokens / denominators[(layer, kind)]
        per_kind = {}
        for kind in self.kinds:
            values = [v for (layer, k), v in zip(self.sites, per_site.values()) if k == kind]
            per_kind[kind] = sum(values) / len(values)
        per_layer = {}
        for layer in self.layers:
            values = [v for (l, k), v in zip(self.sites, per_site.values()) if l == layer and k != HEAD_KIND]
            if values:
                per_layer[layer] = sum(values) / len(values)
        return PlopScores(
            per_site=per_site,
            per_kind=per_kind,
            per_layer=per_layer,
            denominator=self.denominator,
            tokens=int(sums[:, 1].max().item()) if len(self.sites) else 0,
            batches=self.batches,
        )


class CkaScorer:
    """Running CKA statistics for the blocks ``layers`` of ``gpt`` (hooks on ``gpt.transformer.h[i]``).

    ``last``: the last real token's input and output vector of each prompt, n x d per layer (fine for n ~ 128;
    gathered from every rank by ``reduce``). ``tokens``: per layer, sums over batches of the three unbiased
    HSIC values and of the norms the degeneracy check needs: O(1) state, summed over ranks by ``reduce``.
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
        self.pooled: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {l: ([], []) for l in self.layers}
        # tokens: per layer [hsic_xy, hsic_xx, hsic_yy, batches, ||Xc||^2, ||X||^2, ||Yc||^2, ||Y||^2, tokens]
        self.sums = torch.zeros(len(self.layers), 9, dtype=torch.float64)
        self.skipped_batches = 0
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
            self.pooled[layer][0].append(xs.detach())  # advanced indexing already copied
            self.pooled[layer][1].append(ys.detach())

        return hook

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
                self.skipped_batches += 1
            return
        one = torch.ones((), dtype=torch.float64, device=x.centred.device)
        terms = [self._hsic.cross_hsic(x, y), x.self_hsic, y.self_hsic, one, x.centred_sq, x.raw_sq, y.centred_sq, y.raw_sq, n * one]
        self._batch_sums[row] = torch.stack(terms)  # added to self.sums in end_batch: one transfer per batch

    def start_batch(self, batch: Batch) -> None:
        self._batch = batch
        self._hsic = BatchHsic(batch.mask) if self.pooling == "tokens" else None
        # this batch's terms per layer, zero for a layer it skips (adding 0.0 leaves a sum as it was)
        self._batch_sums = torch.zeros(len(self.layers), 9, dtype=torch.float64, device=batch.mask.device)

    def end_batch(self) -> None:
        if self.pooling == "tokens":
            self.sums += self._batch_sums.cpu()
        self._batch = self._hsic = self._batch_sums = None

    def reduce(self) -> None:
        if self.pooling == "last":
            for layer, (xs, ys) in self.pooled.items():
                width = self.gpt.config.n_embd
                x = torch.cat(xs) if xs else torch.zeros(0, width)
                y = torch.cat(ys) if ys else torch.zeros(0, width)
                self.pooled[layer] = ([all_gather_rows(x)], [all_gather_rows(y)])
        else:
            self.sums = all_reduce_sum(self.sums)

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

"""PLoP's score, computed in the calibration pass (docs/methods.md section 1), and its scorer. CKA's is in
``litgpt_plop.scoring.cka``.

PLoP, per site (one LoRA-able linear map in one block)::

    NFN(site) = [ mean over every real token t of ||W z_t|| / ||z_t|| ] / denominator

over the real (non-padding) tokens z_t of every batch. The numerator is the module's own output:
``||W z|| = ||y - bias||``, so no extra matmul. The fused ``attn.qkv`` is split into its ``[q | k | v]`` row
slices, each its own site. The denominator is a per-site constant: ``||W||_F / sqrt(d_in)`` (closed form, the
default) or a seeded Monte-Carlo ``mean_r ||W r||`` over random unit vectors r. (The authors draw fresh r per
batch; a fixed seeded draw estimates the same expectation, and keeps padded/unpadded batches and every rank
identical.) Per kind: mean over layers. Per layer: mean over that layer's kinds. LOWER = less aligned with
the task = gets LoRA.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
from litgpt import GPT

from litgpt_plop.scoring.calibration import Batch, ForwardHook
from litgpt_plop.scoring.experts import ExpertRouting, token_weighted, unused_experts
from litgpt_plop.scoring.metrics import PromptSums
from litgpt_plop.model.modules import (
    KIND_TO_PATH,
    base_linear,
    is_expert_site,
    qkv_row_slices,
    site_experts,
    site_module,
)
from litgpt_plop.selection.placement import HEAD_KIND, HEAD_LAYER, QKV_KINDS
from litgpt_plop.memory import release_free_memory

# ---- the math, on plain tensors ---------------------------------------------------------------------------


def stored_weight(linear: nn.Module) -> torch.Tensor:
    """The ``(d_out, d_in)`` weight of an ``nn.Linear`` as it is stored (no copy: a memory-mapped weight stays
    mapped), or of a bitsandbytes ``Linear4bit`` dequantized in its compute dtype (one module at a time)."""
    weight = linear.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.detach()
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            "This Linear4bit weight is in bitsandbytes' CPU inference layout (repacked by an eval-mode forward);"
            " run the calibration pass, which unpacks it, before reading the weight"
        )
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(weight.data, quant_state)


def weight_matrix(linear: nn.Module) -> torch.Tensor:
    """The dense float32 ``(d_out, d_in)`` weight of an ``nn.Linear`` or a bitsandbytes ``Linear4bit``
    (dequantized; call it for one module at a time, never for the whole model at once)."""
    return stored_weight(linear).float()


def normalized_output_norms(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """``||W z_t|| / ||z_t||`` for each row t, from inputs ``z`` ``(N, d_in)`` and bias-free outputs ``W z``
    ``(N, d_out)``; rows whose input is exactly zero (no direction) are dropped."""
    input_norms = inputs.float().norm(dim=-1)
    keep = input_norms > 0
    return outputs.float()[keep].norm(dim=-1) / input_norms[keep]


def _norms(rows: torch.Tensor) -> torch.Tensor:
    """Float32 norms over the last dimension, the numbers ``rows.float().norm(dim=-1)`` gives without the copy."""
    return torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32)


ROW_CHUNK = 1 << 22  # values per slice of rows the denominators read at once (16 MiB in float32)


def _row_slices(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``weight`` in slices of whole rows of about ``ROW_CHUNK`` values: the denominators read a large matrix (a
    70B model's MLP matrix is 235M values) a slice at a time, so no float copy of the whole of it is ever made."""
    return weight.split(max(1, ROW_CHUNK // max(1, weight.shape[1])))


def closed_form_denominator(weight: torch.Tensor) -> float:
    """``||W||_F / sqrt(d_in)``: the expected ``||W r||`` for a random unit vector r (up to Jensen's gap)."""
    # A slice of rows at a time, without a copy of the whole matrix: each row's sum of squares in float32, the rows'
    # sums in float64. Within 1e-8 of weight.double().norm() on a 14336 x 4096 bf16 matrix, and 7x faster than a
    # float64 reduction (which took a minute of an 8B model's plan).
    squares = sum(float(rows.float().square().sum(dim=1).double().sum()) for rows in _row_slices(weight))
    return math.sqrt(squares) / math.sqrt(weight.shape[1])


def monte_carlo_denominator(weight: torch.Tensor, num_samples: int, seed: int) -> float:
    """``mean_r ||W r||`` over ``num_samples`` random unit Gaussian vectors r, drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    r = torch.randn(num_samples, weight.shape[1], generator=generator, dtype=torch.float64)
    r = (r / r.norm(dim=1, keepdim=True)).to(weight.device)
    squares = torch.zeros(num_samples, dtype=torch.float64, device=weight.device)
    for rows in _row_slices(weight):  # ||W r||^2 summed over slices of W's rows
        squares += (r @ rows.double().T).square().sum(dim=1)
    return float(squares.sqrt().mean())


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
        per_expert: in a mixture of experts, each MLP site's NFN per expert (None for an expert that received no
            calibration token); the site's NFN is their mean weighted by ``expert_tokens``.
        expert_tokens: the real tokens each expert of each such site received.
        unused_experts: per MoE block (``"<layer>"``), the experts that received no calibration token at all.
    """

    per_site: dict[str, float]
    per_kind: dict[str, float]
    per_layer: dict[int, float]
    denominator: str = "closed_form"
    tokens: int = 0
    batches: int = 0
    per_expert: dict[str, list[float | None]] = field(default_factory=dict)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    unused_experts: dict[str, list[int]] = field(default_factory=dict)


# ---- scorers (hooked into the calibration pass) -----------------------------------------------------------


class PlopScorer:
    """Running PLoP statistics for the ``kinds`` of the ``layers`` of ``gpt`` (the head once, if asked).

    State per site and per prompt: the sum of the normalised output norms over the prompt's real tokens and
    their count, in ``statistics`` (a torchmetrics ``Metric``). A site's NFN is the mean over every token the pass
    saw (summed sums / summed counts), so how the prompts are grouped into batches does not change it. ``reduce``
    gathers every rank's prompts; the per-prompt rows stay for resampling (``litgpt_plop.selection.stability``).

    In a mixture of experts an MLP site is one matrix per expert: each (site, expert) is a *unit* with its own sums
    over the tokens the router sent to that expert (``litgpt_plop.scoring.experts``); elsewhere a unit is a site.
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
        # the rows of the statistics: one per site, or one per (site, expert) in a mixture of experts
        self.units = [(layer, kind, e) for layer, kind in self.sites for e in site_experts(gpt, kind)]
        self.unit_index = {unit: i for i, unit in enumerate(self.units)}
        moe_layers = sorted({layer for layer, kind in self.sites if is_expert_site(gpt, kind)})
        self.routing = ExpertRouting(gpt, moe_layers) if moe_layers else None
        # per prompt: (sum of normalised output norms, tokens) for every unit; every rank's once reduced
        self.statistics = PromptSums(len(self.units))
        self._gathered: tuple[torch.Tensor, int] | None = None
        self._batch: Batch | None = None
        self._ratios: torch.Tensor | None = None  # (units, B, T): ||W z|| / ||z|| over the current batch's grid
        self._site_input_norms: torch.Tensor | None = None  # (units, B, T): ||z||; 0 where an expert got no token
        self._input: torch.Tensor | None = None  # the last input seen, and its version and per-token norms
        self._input_version = 0
        self._input_norms: torch.Tensor | None = None
        self._denominators: dict[tuple[int, str, int | None], float] = {}

    @property
    def sample_sums(self) -> torch.Tensor:
        """``(prompts, units, 2)``: every rank's prompts after ``reduce``, this rank's so far before."""
        return self._gathered[0] if self._gathered is not None else self.statistics.rows_of("rows")

    @property
    def batches(self) -> int:
        """The batches seen: on every rank after ``reduce``, on this one so far before."""
        return self._gathered[1] if self._gathered is not None else int(self.statistics.batches)

    def _module_groups(self) -> list[tuple[int, int | None, nn.Module, list[tuple[str, int | None, int | None]]]]:
        """``(layer, expert, base linear, [(kind, row start, row stop)])`` per distinct module; q/k/v share the qkv;
        in a mixture of experts each expert's linear is its own module (expert None elsewhere)."""
        groups = []
        block_kinds = [k for k in self.kinds if k != HEAD_KIND]
        paths = list(dict.fromkeys(KIND_TO_PATH[k] for k in block_kinds))
        for layer in self.layers:
            for path in paths:
                kinds = [k for k in block_kinds if KIND_TO_PATH[k] == path]
                if path == "attn.qkv":
                    linear = base_linear(site_module(self.gpt, layer, kinds[0]))
                    rows = qkv_row_slices(self.gpt.config)
                    groups.append((layer, None, linear, [(k, rows[k].start, rows[k].stop) for k in QKV_KINDS if k in kinds]))
                else:
                    for expert in site_experts(self.gpt, kinds[0]):
                        linear = base_linear(site_module(self.gpt, layer, kinds[0], expert))
                        groups.append((layer, expert, linear, [(kinds[0], None, None)]))
        if self.needs_head:
            head = base_linear(site_module(self.gpt, HEAD_LAYER, HEAD_KIND))
            groups.append((HEAD_LAYER, None, head, [(HEAD_KIND, None, None)]))
        return groups

    def hooks(self) -> list[tuple[nn.Module, ForwardHook]]:
        routers = self.routing.hooks() if self.routing is not None else []
        return routers + [(linear, self._make_hook(layer, expert, parts)) for layer, expert, linear, parts in self._module_groups()]

    def _make_hook(self, layer: int, expert: int | None, parts: list[tuple[str, int | None, int | None]]) -> ForwardHook:
        rows = [self.unit_index[(layer, kind, expert)] for kind, _, _ in parts]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            inputs = args[0] if args else kwargs["input"]
            # fc_1 and fc_2 (and a LoRA wrapper's linear) get the very same input tensor: its norms once
            if self._input is not inputs or self._input_version != inputs._version:
                self._input, self._input_version = inputs, inputs._version
                self._input_norms = _norms(inputs)  # (B, T), or (routed tokens,) for an expert
            # ||W z|| = ||y - bias||; without a bias, y itself (no float32 copy of a bf16 output)
            outputs = output if module.bias is None else output.float() - module.bias.float()
            if expert is not None:  # an expert sees only its routed tokens: put each back at its grid position
                tokens = self.routing.of(layer, expert, inputs.shape[0])
                row = rows[0]
                self._ratios[row].view(-1)[tokens] = _norms(outputs) / self._input_norms
                self._site_input_norms[row].view(-1)[tokens] = self._input_norms
                return
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
        shape = (len(self.units), *batch.mask.shape)
        self._ratios = torch.zeros(shape, device=batch.mask.device)
        self._site_input_norms = torch.zeros(shape, device=batch.mask.device)
        self._input = None

    def end_batch(self) -> None:
        batch = self._batch
        # (units, N); an exactly-zero input has no direction, and an expert's unrouted tokens have none: left out
        kept = self._site_input_norms[:, batch.mask] != 0
        # 0.0 in place of a left-out token adds nothing to a sum, so summing every token is summing the kept ones.
        ratios = self._ratios[:, batch.mask].masked_fill_(~kept, 0.0).T.double().cpu()  # (N, units)
        # A NaN or inf input or output element makes that token's ratio NaN or inf (W z with a non-finite z is
        # non-finite), so checking the ratios checks the activations, once per batch.
        finite = torch.isfinite(ratios).all(dim=0)
        if not bool(finite.all()):
            layer, kind, _ = self.units[int((~finite).nonzero()[0, 0])]
            raise ValueError(
                f"Non-finite activations (NaN or inf) at the linear of site {layer}.{kind} in calibration batch {batch.index}"
            )
        prompts = batch.mask.nonzero()[:, 0].cpu()  # which prompt of the batch each real token belongs to
        current = torch.zeros(batch.mask.shape[0], len(self.units), 2, dtype=torch.float64)
        # index_add_ adds the tokens one after another, per site: the order of the former per-site loop
        current[:, :, 0].index_add_(0, prompts, ratios)
        current[:, :, 1].index_add_(0, prompts, kept.T.double().cpu())
        self.statistics.update(current)
        self._batch = self._ratios = self._site_input_norms = self._input = self._input_norms = None
        if self.routing is not None:
            self.routing.clear()

    def reduce(self) -> None:
        """Every rank ends with every rank's prompts (two numbers per site and prompt, in rank order) and batch
        count; the local statistics, now part of those, are reset."""
        if self._gathered is not None:  # the local statistics were reset: a second gather would hold nothing
            raise RuntimeError(f"{type(self).__name__}.reduce was already called: it gathers a pass's statistics once")
        self._gathered = self.statistics.gathered()
        self.statistics.reset()

    def denominators(self) -> dict[tuple[int, str, int | None], float]:
        """The denominator per unit ``(layer, kind, expert)`` (expert None outside a mixture of experts), computed
        once (one dequantized module at a time) and cached."""
        if not self._denominators:
            for layer, expert, linear, parts in self._module_groups():
                weight = stored_weight(linear)  # dense: the stored tensor itself; read a slice of rows at a time
                for kind, start, stop in parts:
                    rows = weight[start:stop]
                    if self.denominator == "closed_form":
                        value = closed_form_denominator(rows)
                    else:
                        name = f"{layer}.{kind}" if expert is None else f"{layer}.{kind}.{expert}"
                        value = monte_carlo_denominator(rows, self.mc_samples, zlib.crc32(f"{self.seed}:{name}".encode()))
                    self._denominators[(layer, kind, expert)] = value
                weight = rows = None  # a slice keeps the whole copy alive: both go before the next module's copy
                if linear.weight.device.type == "cpu":
                    release_free_memory()  # else malloc keeps the copy's pages (litgpt_plop.memory)
        return self._denominators

    def result(self) -> PlopScores:
        """The scores (after the pass; ``calibrate`` calls ``reduce`` first)."""
        return self.scores_of(None)

    def scores_of(self, prompts: Sequence[int] | None) -> PlopScores:
        """The scores over the given prompts (indices into ``sample_sums``, repeats counting again: for resampling);
        ``None``: every prompt."""
        denominators = self.denominators()
        sample_sums = self.sample_sums
        chosen = sample_sums if prompts is None else sample_sums[torch.as_tensor(list(prompts), dtype=torch.long)]
        sums = chosen.sum(dim=0)
        per_site, per_expert, expert_tokens = {}, {}, {}
        for layer, kind in self.sites:
            values, counts = [], []
            for expert in site_experts(self.gpt, kind):
                total, tokens = sums[self.unit_index[(layer, kind, expert)]].tolist()
                where = f"{layer}.{kind}" if expert is None else f"{layer}.{kind} (expert {expert})"
                if denominators[(layer, kind, expert)] == 0:
                    raise ValueError(f"The weight of site {where} is all zeros: its NFN is undefined")
                values.append(total / tokens / denominators[(layer, kind, expert)] if tokens else None)
                counts.append(int(tokens))
            if not any(counts):
                raise ValueError(f"PLoP saw no token with a non-zero input at site {layer}.{kind}")
            if is_expert_site(self.gpt, kind):  # weighted by the tokens each expert saw; unused experts weigh 0
                per_expert[f"{layer}.{kind}"], expert_tokens[f"{layer}.{kind}"] = values, counts
                per_site[f"{layer}.{kind}"] = token_weighted(values, counts)
            else:
                per_site[f"{layer}.{kind}"] = values[0]
        per_kind = {}
        for kind in self.kinds:
            values = [v for (layer, k), v in zip(self.sites, per_site.values()) if k == kind]
            per_kind[kind] = sum(values) / len(values)
        per_layer = {}
        for layer in self.layers:
            values = [v for (l, k), v in zip(self.sites, per_site.values()) if l == layer and k != HEAD_KIND]
            if values:
                per_layer[layer] = sum(values) / len(values)
        dense = [self.unit_index[u] for u in self.units if u[2] is None]
        tokens = 0
        if dense:
            tokens = int(sums[dense, 1].max().item())
        elif expert_tokens:  # every scored site is in the experts: each token reaches n_expert_per_token of them
            tokens = max(sum(counts) for counts in expert_tokens.values()) // self.gpt.config.n_expert_per_token
        return PlopScores(
            per_site=per_site,
            per_kind=per_kind,
            per_layer=per_layer,
            denominator=self.denominator,
            tokens=tokens,
            batches=self.batches,
            per_expert=per_expert,
            expert_tokens=expert_tokens,
            unused_experts=unused_experts(expert_tokens),
        )

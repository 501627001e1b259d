"""``kappa``: LoRA on the pretrained weights with the lowest condition number, from the weights alone (no data).

The criterion of KappaTune (O. Ludwig; its selector as integrated with PEFT): a matrix whose singular values are
spread evenly (low condition number ``kappa = sigma_max / sigma_min``) encodes nothing very specialised, so
adapting it should disturb the pretrained model least. Here it is a placement method like the others
(docs/methods.md section 4): every candidate site is scored by its weight's condition number, and PLoP's
selection rules (``litgpt_plop.select.choose_kinds`` / ``choose_sites``: ``num_kinds``, or a greedy budget, by
kind or by site) choose the LOWEST. A kind is ranked by the geometric mean of its sites' condition numbers over
the candidate layers: condition numbers are ratios spanning orders of magnitude (3.9 to 7.7e5 on
SmolLM2-135M), where an arithmetic mean would be one outlier layer's value.

Because it needs no data, every calibrated plan also computes it (``with_data_free_choice``), so that its report
can say whether the task's prompts changed the choice (``litgpt_plop.report_kappa``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

import torch
import torch.nn as nn
from litgpt import GPT, Config

from litgpt_plop.errors import InputError
from litgpt_plop.memory import release_free_memory
from litgpt_plop.modules import KIND_TO_PATH, base_linear, gpt_of, qkv_row_slices, site_experts, site_module
from litgpt_plop.placement import HEAD_KIND, HEAD_LAYER, Placement, PlacementError, Scores
from litgpt_plop.quantize import no_cpu_repack
from litgpt_plop.scoring import weight_matrix
from litgpt_plop.select import budget_params, choose_kinds, choose_sites, resolve_candidates

# Above this condition number the Gram matrix's rounding (relative error about kappa^2 * 1e-16 on sigma_min^2)
# would show in the result, so the singular values are computed directly instead.
GRAM_KAPPA_LIMIT = 1e6
# Rows (or columns) of a weight turned into float64 at a time when forming its Gram matrix: bounds the memory
# for a tall matrix such as a vocabulary-sized head.
_GRAM_BLOCK = 8192
HOW = "eigenvalues of the float64 Gram matrix of the smaller side; float64 svdvals where kappa > 1e6"


@dataclass
class KappaArgs:
    """kappa (docs/methods.md section 4): LoRA on the weights with the lowest condition number, no data needed."""

    num_kinds: int = 3
    """How many kinds to choose (the lowest geometric-mean condition number). Ignored when ``budget`` is set."""
    budget: int | float | None = None
    """Trainable-parameter budget instead of ``num_kinds``: a float in (0, 1] is a fraction of what the ``all``
    placement costs at the same rank, an int is a parameter count. Kinds (or sites) are added lowest first and
    the first one that does not fit stops the selection (PLoP's rule)."""
    granularity: Literal["kind", "site"] = "kind"
    """``kind``: choose whole kinds (every candidate layer). ``site``: choose individual (layer, kind) sites by
    their own condition number; needs ``budget``."""

    def __post_init__(self) -> None:
        if self.num_kinds <= 0:
            raise InputError(f"`--kappa.num_kinds` must be positive, got {self.num_kinds}")
        if self.budget is not None:
            if isinstance(self.budget, bool):
                raise InputError(f"`--kappa.budget` must be a number, got {self.budget!r}")
            if isinstance(self.budget, float) and not 0.0 < self.budget <= 1.0:
                raise InputError(
                    f"`--kappa.budget` as a float is a fraction of the `all` placement and must be in (0, 1],"
                    f" got {self.budget}; pass an int for a parameter count"
                )
            if isinstance(self.budget, int) and self.budget <= 0:
                raise InputError(f"`--kappa.budget` as an int is a parameter count and must be positive, got {self.budget}")
        if self.granularity not in ("kind", "site"):
            raise InputError(f"`--kappa.granularity` must be 'kind' or 'site', got {self.granularity!r}")
        if self.granularity == "site" and self.budget is None:
            raise InputError("`--kappa.granularity site` chooses sites until a budget is used: set `--kappa.budget`")


@dataclass
class KappaScores:
    """Condition numbers of the candidate sites.

    Args:
        per_site: ``sigma_max / sigma_min`` of each ``"<layer>.<kind>"`` site's weight (``inf`` if singular).
        per_kind: each kind's geometric mean over the candidate layers (what ``kappa`` ranks).
        seconds: how long computing them took.
        per_expert: in a mixture of experts, each MLP site's condition number per expert; ``per_site`` holds
            their geometric mean (every expert weighs the same: no data says how often each is used).
    """

    per_site: dict[str, float]
    per_kind: dict[str, float]
    seconds: float = 0.0
    per_expert: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class _SiteTable:
    """A score table in the shape ``litgpt_plop.select``'s choosers read."""

    per_site: dict[str, float]


# ---- the math ---------------------------------------------------------------------------------------------


def gram_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The float64 Gram matrix of the smaller side of ``weight`` (``W W^T`` for a wide matrix, ``W^T W`` for a
    tall one), summed over blocks of the long side so that no float64 copy of a large weight is made."""
    tall = weight.shape[0] > weight.shape[1]
    size = weight.shape[1] if tall else weight.shape[0]
    gram = torch.zeros(size, size, dtype=torch.float64, device=weight.device)
    for block in weight.split(_GRAM_BLOCK, dim=0 if tall else 1):
        block = block.double()
        gram += block.T @ block if tall else block @ block.T
    return gram


def condition_number(weight: torch.Tensor) -> float:
    """``sigma_max / sigma_min`` over the ``min(d_out, d_in)`` singular values of a ``(d_out, d_in)`` weight.

    The squared singular values are the eigenvalues of the Gram matrix of the smaller side: on SmolLM2-135M's 210
    matrices 2.4 to 6.6 times faster than float64 ``torch.linalg.svdvals`` (and than float32) on one CPU thread in
    two runs, and within 1e-6 of it (benchmarks/RESULTS.md, "Cross-task"). In float64, because the Gram matrix squares the condition number: its rounding relative to
    sigma_min^2 is about ``kappa^2 * eps``, which float32's eps (6e-8) would make noise for SmolLM2's worst query
    slice (kappa 7.7e5) and float64's keeps near 1e-4. Above ``GRAM_KAPPA_LIMIT`` float64 svdvals is used instead.
    ``inf`` for a singular matrix; a ``ValueError`` for an all-zero one, whose condition number is undefined.
    """
    eigenvalues = torch.linalg.eigvalsh(gram_matrix(weight))
    largest, smallest = float(eigenvalues[-1]), float(eigenvalues[0])
    if not largest > 0:
        raise ValueError("The weight is all zeros: its condition number is undefined")
    if smallest > largest / GRAM_KAPPA_LIMIT**2:
        return math.sqrt(largest / smallest)
    singular_values = torch.linalg.svdvals(weight.double())
    smallest_sv = float(singular_values[-1])
    return float(singular_values[0]) / smallest_sv if smallest_sv > 0 else math.inf


def geometric_mean(values: Sequence[float]) -> float:
    return 10 ** (sum(math.log10(v) for v in values) / len(values))


# ---- scoring a model --------------------------------------------------------------------------------------


def site_weights(gpt: GPT, kinds: Sequence[str], layers: Sequence[int]):
    """``(layer, kind, expert, weight)`` for every candidate site, one dequantized module at a time (q/k/v: row
    slices; in a mixture of experts, an MLP site once per expert; expert None elsewhere)."""
    block_kinds = [k for k in kinds if k != HEAD_KIND]
    paths = list(dict.fromkeys(KIND_TO_PATH[k] for k in block_kinds))
    for layer in layers:
        for path in paths:
            path_kinds = [k for k in block_kinds if KIND_TO_PATH[k] == path]
            for expert in site_experts(gpt, path_kinds[0]):
                weight = weight_matrix(base_linear(site_module(gpt, layer, path_kinds[0], expert)))
                if path == "attn.qkv":
                    slices = qkv_row_slices(gpt.config)
                    for kind in path_kinds:
                        yield layer, kind, None, weight[slices[kind]]
                else:
                    yield layer, path_kinds[0], expert, weight
                on_cpu = weight.device.type == "cpu"
                del weight
                if on_cpu:
                    release_free_memory()  # else malloc keeps the copy's pages (litgpt_plop.memory)
    if HEAD_KIND in kinds:
        yield HEAD_LAYER, HEAD_KIND, None, weight_matrix(base_linear(site_module(gpt, HEAD_LAYER, HEAD_KIND)))


def score_weights(model: nn.Module, kinds: Sequence[str], layers: Sequence[int]) -> KappaScores:
    """The condition number of every candidate site of the LitGPT model in ``model`` (dense or 4-bit)."""
    gpt = gpt_of(model)
    t0 = time.perf_counter()
    per_site: dict[str, float] = {}
    per_expert: dict[str, list[float]] = {}
    # a 4-bit weight repacked by an earlier eval-mode forward is unpacked first (dequantizing it would be garbage)
    with torch.no_grad(), no_cpu_repack(gpt):
        for layer, kind, expert, weight in site_weights(gpt, kinds, layers):
            where = f"{layer}.{kind}" if expert is None else f"{layer}.{kind} (expert {expert})"
            try:
                value = condition_number(weight)
            except ValueError as e:
                raise ValueError(f"Site {where}: {e}") from None
            if expert is None:
                per_site[f"{layer}.{kind}"] = value
            else:
                per_expert.setdefault(f"{layer}.{kind}", []).append(value)
            del weight  # before the next site's weight is made: one dense copy at a time
    # a site spanning every expert: the geometric mean over them, as over layers for a kind
    per_site.update({key: geometric_mean(values) for key, values in per_expert.items()})
    per_kind = {}
    for kind in kinds:
        per_kind[kind] = geometric_mean([v for key, v in per_site.items() if key.split(".", 1)[1] == kind])
    return KappaScores(per_site=per_site, per_kind=per_kind, seconds=time.perf_counter() - t0, per_expert=per_expert)


# ---- choosing ---------------------------------------------------------------------------------------------


def choose_by_kappa(
    config: Config, scores: KappaScores, kinds: Sequence[str], layers: Sequence[int], rank: int, args: KappaArgs
) -> list[tuple[int, str]]:
    """The ``(layer, kind)`` sites PLoP's rules choose from the condition numbers, lowest first."""
    # Ranking kinds by the mean of log10(kappa) over layers is ranking them by the geometric mean; for single
    # sites the logarithm keeps the order.
    table = _SiteTable({key: math.log10(value) for key, value in scores.per_site.items()})
    if args.granularity == "site":
        return choose_sites(config, table, kinds, layers, rank, args, group="kappa")
    chosen = choose_kinds(config, table, kinds, layers, layers, rank, args, group="kappa")
    return [(layer, kind) for kind in chosen for layer in ([HEAD_LAYER] if kind == HEAD_KIND else layers)]


def _record(
    config: Config, scores: KappaScores, sites: list[tuple[int, str]] | None, rank: int, args: KappaArgs, error: str | None
) -> dict[str, Any]:
    return {
        "num_kinds": args.num_kinds if args.budget is None else None,
        "budget": args.budget,
        "budget_params": budget_params(config, args.budget, rank) if args.budget is not None else None,
        "granularity": args.granularity,
        "rank": rank,
        "choice": None if sites is None else [f"{layer}.{kind}" for layer, kind in sites],
        "error": error,
        "computed_as": HOW,
    }


def kappa_placement(
    model: nn.Module,
    candidate_kinds: Sequence[str] | None,
    rank: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    kappa: KappaArgs | None = None,
    candidate_layers: Sequence[int] | None = None,
) -> Placement:
    """The ``kappa`` method's placement: score the weights of the LitGPT model in ``model``, choose the lowest."""
    args = KappaArgs() if kappa is None else kappa
    config = gpt_of(model).config
    kinds, layers = resolve_candidates(config, candidate_kinds, candidate_layers)
    scores = score_weights(model, kinds, layers)
    sites = choose_by_kappa(config, scores, kinds, layers, rank, args)
    record = Scores(
        candidate_kinds=kinds,
        candidate_layers=layers,
        kappa_per_site=scores.per_site,
        kappa_per_kind=scores.per_kind,
        kappa=_record(config, scores, sites, rank, args, None),
        kappa_per_expert=scores.per_expert,
    )
    return Placement.from_sites(
        config, [(layer, kind, rank) for layer, kind in sites], lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        method="kappa", scores=record,
    )  # fmt: skip


def with_data_free_choice(placement: Placement, model: nn.Module, rank: int, args: KappaArgs) -> Placement:
    """``placement`` (of a calibrated method) with the condition numbers of its candidates and what ``kappa``
    would choose from them with ``args`` on the same candidates: what the calibration changed. A ``kappa`` choice
    that cannot be made (a budget its first kind does not fit) is recorded as an error, not raised. The time it
    took goes to the calibration record (``kappa_seconds``), beside the pass's own: scores hold no timings, so
    that the same model and prompts always give the same scores."""
    config = gpt_of(model).config
    kinds, layers = placement.scores.candidate_kinds, placement.scores.candidate_layers
    scores = score_weights(model, kinds, layers)
    try:
        sites, error = choose_by_kappa(config, scores, kinds, layers, rank, args), None
    except PlacementError as e:
        sites, error = None, str(e)
    extended = replace(
        placement.scores,
        kappa_per_site=scores.per_site,
        kappa_per_kind=scores.per_kind,
        kappa=_record(config, scores, sites, rank, args, error),
        kappa_per_expert=scores.per_expert,
    )
    calibration = {**(placement.calibration or {}), "kappa_seconds": round(scores.seconds, 3)}
    return replace(placement, scores=extended, calibration=calibration)

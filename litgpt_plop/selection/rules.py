"""The selection rules: which kinds, sites or layers a method chooses from its score tables. ``litgpt_plop.decide``
runs the scorers and calls these.

Methods:
    ``plop``: the ``num_kinds`` candidate kinds with the LOWEST NFN, on every candidate layer; or, with a
        ``budget``, kinds lowest-first while they fit; or, with ``granularity="site"``, single (layer, kind)
        sites lowest-first while they fit.
    ``plop-inverse``: the same with the HIGHEST NFN first (the paper's ablation baseline, PLoP^-1).
    ``cka``: the ``ratio`` of candidate layers with the LOWEST CKA similarity, every candidate kind on them.
    ``plop+cka``: PLoP's kinds (ranked over the candidate layers) on CKA's layers; a budget is then counted on
        CKA's layers.
    ``kappa``: PLoP's rules on the condition numbers of the weights instead of the NFN (``litgpt_plop.scoring.kappa``;
        no data).

Budgets are greedy and never skip: the first kind (or site) in score order that does not fit stops the
selection, so a chosen item never has a worse score than one left out. Layers whose CKA is degenerate
(``CkaScores.degenerate_layers``) are never chosen; if too few other layers remain for the ratio, selection
fails with a ``PlacementError`` saying what to change.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Protocol, Sequence

from litgpt import Config

from litgpt_plop.args import CkaArgs
from litgpt_plop.selection.placement import (
    HEAD_KIND,
    HEAD_LAYER,
    PlacementError,
    model_kinds,
    site_params,
)

if TYPE_CHECKING:  # litgpt_plop.scoring.kappa builds on this module
    pass


class SiteScores(Protocol):
    """A per-site score table: ``per_site[f"{layer}.{kind}"]``, lower = chosen first (PLoP's NFN, log condition numbers)."""

    per_site: dict[str, float]


class LayerScores(Protocol):
    """A per-layer score table (CKA's): lower = chosen first; degenerate layers are never chosen."""

    per_layer: dict[int, float]
    degenerate_layers: list[int]


class SelectionArgs(Protocol):
    """The selection options PLoP's rules read (``PlopArgs``, ``litgpt_plop.scoring.kappa.KappaArgs``)."""

    num_kinds: int
    budget: int | float | None
    granularity: str


def resolve_candidates(
    config: Config, candidate_kinds: Sequence[str] | None = None, candidate_layers: Sequence[int] | None = None
) -> tuple[list[str], list[int]]:
    """The candidate kinds (default: every kind of the model but the head) and layers (default: all), checked."""
    known = model_kinds(config, include_head=True)
    kinds = list(model_kinds(config)) if candidate_kinds is None else list(dict.fromkeys(candidate_kinds))
    unknown = [k for k in kinds if k not in known]
    if unknown:
        raise PlacementError(f"Unknown candidate kind(s) {unknown} for model {config.name!r}; its kinds are {list(known)}")
    if not kinds:
        raise PlacementError("No candidate kinds: nothing to place")
    layers = list(range(config.n_layer)) if candidate_layers is None else sorted(set(candidate_layers))
    outside = [l for l in layers if not 0 <= l < config.n_layer]
    if outside:
        raise PlacementError(f"Candidate layer(s) {outside} out of range for a model with {config.n_layer} layers")
    if not layers:
        raise PlacementError("No candidate layers: nothing to place")
    return kinds, layers


def budget_params(config: Config, budget: float | int, rank: int) -> int:
    """A budget in parameters: an int as it is, a float in (0, 1] as that fraction of the ``all`` placement
    (every kind but the head on every layer) at ``rank``."""
    if isinstance(budget, float):
        all_params = config.n_layer * sum(site_params(config, kind, rank) for kind in model_kinds(config))
        return int(budget * all_params)
    return int(budget)


def site_layers(kind: str, layers: Sequence[int]) -> list[int]:
    return [HEAD_LAYER] if kind == HEAD_KIND else list(layers)


def plop_site_score(scores: SiteScores, layer: int, kind: str) -> float:
    key = f"{layer}.{kind}"
    if key not in scores.per_site:
        raise PlacementError(f"No score for site {key}: score with the same candidate kinds and layers")
    return scores.per_site[key]


def plop_kind_scores(scores: SiteScores, kinds: Sequence[str], layers: Sequence[int]) -> dict[str, float]:
    """Each kind's NFN as the mean over ``layers`` of its sites (what PLoP ranks)."""
    result = {}
    for kind in kinds:
        values = [plop_site_score(scores, layer, kind) for layer in site_layers(kind, layers)]
        result[kind] = sum(values) / len(values)
    return result


def _budget_error(budget: float | int, params: int, rank: int, item: str, cost: int, group: str = "plop") -> PlacementError:
    what = f"{budget:g} of the `all` placement = {params:,} parameters" if isinstance(budget, float) else f"{params:,} parameters"
    return PlacementError(
        f"The {'PLoP' if group == 'plop' else '--' + group} budget ({what} at rank {rank}) selects nothing: the first"
        f" candidate in score order, {item}, alone needs {cost:,}. Raise --{group}.budget or lower the rank."
    )


def choose_kinds(
    config: Config,
    scores: SiteScores,
    kinds: Sequence[str],
    ranking_layers: Sequence[int],
    placed_layers: Sequence[int],
    rank: int,
    args: SelectionArgs,
    inverse: bool = False,
    group: str = "plop",
) -> list[str]:
    """PLoP's kinds: lowest NFN first (highest with ``inverse``), ranked by the mean over ``ranking_layers``;
    ``args.num_kinds`` of them, or as many as fit ``args.budget`` when placed on ``placed_layers``. Any per-site
    score table works (``group`` names its options in messages)."""
    per_kind = plop_kind_scores(scores, kinds, ranking_layers)
    order = sorted(kinds, key=lambda k: (per_kind[k], kinds.index(k)), reverse=inverse)
    if args.budget is None:
        if args.num_kinds > len(order):
            warnings.warn(f"--{group}.num_kinds={args.num_kinds} but only {len(order)} candidate kinds: choosing all of them", stacklevel=2)
        return order[: args.num_kinds]
    limit = budget_params(config, args.budget, rank)
    chosen, total = [], 0
    for kind in order:
        cost = len(site_layers(kind, placed_layers)) * site_params(config, kind, rank)
        if total + cost > limit:
            if not chosen:
                item = f"kind {kind!r} on {len(site_layers(kind, placed_layers))} layer(s)"
                raise _budget_error(args.budget, limit, rank, item, cost, group)
            break
        chosen.append(kind)
        total += cost
    return chosen


def choose_sites(
    config: Config,
    scores: SiteScores,
    kinds: Sequence[str],
    layers: Sequence[int],
    rank: int,
    args: SelectionArgs,
    inverse: bool = False,
    group: str = "plop",
) -> list[tuple[int, str]]:
    """PLoP at site granularity: single (layer, kind) sites by their own NFN, lowest first (highest with
    ``inverse``), while they fit ``args.budget``."""
    if args.budget is None:
        raise PlacementError(f"--{group}.granularity site chooses sites until a budget is used: set --{group}.budget")
    sites = [(layer, kind) for kind in kinds for layer in site_layers(kind, layers)]
    order = sorted(
        sites, key=lambda s: (plop_site_score(scores, *s), s[0], kinds.index(s[1])), reverse=inverse
    )
    limit = budget_params(config, args.budget, rank)
    chosen, total = [], 0
    for layer, kind in order:
        cost = site_params(config, kind, rank)
        if total + cost > limit:
            if not chosen:
                raise _budget_error(args.budget, limit, rank, f"site {layer}.{kind}", cost, group)
            break
        chosen.append((layer, kind))
        total += cost
    return chosen


def choose_layers(scores: LayerScores, layers: Sequence[int], args: CkaArgs) -> list[int]:
    """CKA's layers: the ``args.ratio`` of ``layers`` (rounded, at least one) with the lowest CKA similarity,
    degenerate layers excluded (with a warning; a ``PlacementError`` when too few others remain)."""
    missing = [l for l in layers if l not in scores.per_layer]
    if missing:
        raise PlacementError(f"No CKA score for layer(s) {missing}: calibrate with the same candidate layers")
    keep = max(1, int(args.ratio * len(layers) + 0.5))
    degenerate = [l for l in layers if l in scores.degenerate_layers]
    eligible = [l for l in layers if l not in scores.degenerate_layers]
    if len(eligible) < keep:
        raise PlacementError(
            f"CKA is degenerate on layer(s) {degenerate} (every calibration sample looks the same there), leaving"
            f" {len(eligible)} usable layer(s) for the {keep} that --cka.ratio={args.ratio} asks for. Use more varied"
            " prompts, --cka.pooling tokens, a lower ratio, or leave those layers out of the candidates."
        )
    if degenerate:
        warnings.warn(
            f"Not selecting layer(s) {degenerate}: their CKA is degenerate (every calibration sample looks the same"
            " there), so their score says nothing",
            stacklevel=2,
        )
    ranked = sorted(eligible, key=lambda l: (scores.per_layer[l], l))
    return sorted(ranked[:keep])

"""Turning calibration scores into a ``Placement``; ``plan_placement`` (calibrate, then choose) and
``decide_placement`` (any method of the registry but the gated ones) are the calls the commands and callbacks use.

Methods:
    ``plop``: the ``num_kinds`` candidate kinds with the LOWEST NFN, on every candidate layer; or, with a
        ``budget``, kinds lowest-first while they fit; or, with ``granularity="site"``, single (layer, kind)
        sites lowest-first while they fit.
    ``plop-inverse``: the same with the HIGHEST NFN first (the paper's ablation baseline, PLoP^-1).
    ``cka``: the ``ratio`` of candidate layers with the LOWEST CKA similarity, every candidate kind on them.
    ``plop+cka``: PLoP's kinds (ranked over the candidate layers) on CKA's layers; a budget is then counted on
        CKA's layers.
    ``kappa``: PLoP's rules on the condition numbers of the weights instead of the NFN (``litgpt_plop.kappa``;
        no data).

Budgets are greedy and never skip: the first kind (or site) in score order that does not fit stops the
selection, so a chosen item never has a worse score than one left out. Layers whose CKA is degenerate
(``CkaScores.degenerate_layers``) are never chosen; if too few other layers remain for the ratio, selection
fails with a ``PlacementError`` saying what to change.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch
import torch.nn as nn
from litgpt import Config

from litgpt_plop.errors import InputError
from litgpt_plop.args import CalibrationArgs, CkaArgs, PlopArgs
from litgpt_plop.calibration import CalibrationStats, run_calibration
from litgpt_plop.methods import DECIDED_BEFORE_TRAINING, Method, get_method
from litgpt_plop.modules import gpt_of
from litgpt_plop.placement import (
    HEAD_KIND,
    HEAD_LAYER,
    Placement,
    PlacementError,
    Scores,
    model_kinds,
    preset,
    site_params,
)
from litgpt_plop.stability import choice_stability
from litgpt_plop.cka import CkaScorer, CkaScores
from litgpt_plop.scoring import PlopScorer, PlopScores

if TYPE_CHECKING:  # litgpt_plop.kappa builds on this module
    from litgpt_plop.kappa import KappaArgs


class SiteScores(Protocol):
    """A per-site score table: ``per_site[f"{layer}.{kind}"]``, lower = chosen first (PLoP's NFN, log condition numbers)."""

    per_site: dict[str, float]


class SelectionArgs(Protocol):
    """The selection options PLoP's rules read (``PlopArgs``, ``litgpt_plop.kappa.KappaArgs``)."""

    num_kinds: int
    budget: int | float | None
    granularity: str


def calibrated_method(name: str) -> Method:
    """The calibrated method called ``name``; ``PlacementError`` naming the choices otherwise."""
    try:
        return get_method(name, "calibrated", what="placement method")
    except ValueError as e:
        raise PlacementError(str(e)) from None


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


def _site_layers(kind: str, layers: Sequence[int]) -> list[int]:
    return [HEAD_LAYER] if kind == HEAD_KIND else list(layers)


def _plop_site_score(scores: SiteScores, layer: int, kind: str) -> float:
    key = f"{layer}.{kind}"
    if key not in scores.per_site:
        raise PlacementError(f"No score for site {key}: score with the same candidate kinds and layers")
    return scores.per_site[key]


def plop_kind_scores(scores: SiteScores, kinds: Sequence[str], layers: Sequence[int]) -> dict[str, float]:
    """Each kind's NFN as the mean over ``layers`` of its sites (what PLoP ranks)."""
    result = {}
    for kind in kinds:
        values = [_plop_site_score(scores, layer, kind) for layer in _site_layers(kind, layers)]
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
        cost = len(_site_layers(kind, placed_layers)) * site_params(config, kind, rank)
        if total + cost > limit:
            if not chosen:
                item = f"kind {kind!r} on {len(_site_layers(kind, placed_layers))} layer(s)"
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
    sites = [(layer, kind) for kind in kinds for layer in _site_layers(kind, layers)]
    order = sorted(
        sites, key=lambda s: (_plop_site_score(scores, *s), s[0], kinds.index(s[1])), reverse=inverse
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


def choose_layers(scores: CkaScores, layers: Sequence[int], args: CkaArgs) -> list[int]:
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


def select_placement(
    config: Config,
    method: str,
    plop_scores: PlopScores | None = None,
    cka_scores: CkaScores | None = None,
    rank: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    candidate_kinds: Sequence[str] | None = None,
    candidate_layers: Sequence[int] | None = None,
    plop: PlopArgs | None = None,
    cka: CkaArgs | None = None,
    calibration: dict[str, Any] | None = None,
) -> Placement:
    """The placement ``method`` makes of the scores (see the module docstring for the rules). It records
    ``method``, the ``Scores`` it was based on (with the options used) and the ``calibration`` record."""
    spec = calibrated_method(method)
    plop = PlopArgs() if plop is None else plop
    cka = CkaArgs() if cka is None else cka
    kinds, layers = resolve_candidates(config, candidate_kinds, candidate_layers)
    if spec.uses_plop and plop_scores is None:
        raise PlacementError(f"Method {method!r} needs PLoP scores")
    if spec.uses_cka and cka_scores is None:
        raise PlacementError(f"Method {method!r} needs CKA scores")

    scores = Scores(candidate_kinds=kinds, candidate_layers=layers)
    placed_layers = layers
    if spec.uses_cka:
        placed_layers = choose_layers(cka_scores, layers, cka)
        scores = replace(
            scores,
            cka_per_layer={str(l): cka_scores.per_layer[l] for l in layers},
            degenerate_layers=[l for l in layers if l in cka_scores.degenerate_layers],
            cka={"pooling": cka_scores.pooling, "ratio": cka.ratio, "samples": cka_scores.samples},
        )
    if spec.uses_plop:
        scores = _with_nfn(scores, config, plop_scores, kinds, layers, rank, plop)

    common = dict(lora_alpha=lora_alpha, lora_dropout=lora_dropout, method=method, scores=scores, calibration=calibration)
    if spec.uses_plop and plop.granularity == "site":
        sites = choose_sites(config, plop_scores, kinds, placed_layers, rank, plop, inverse=spec.inverse)
        return Placement.from_sites(config, [(l, k, rank) for l, k in sites], **common)
    chosen = kinds
    if spec.uses_plop:
        chosen = choose_kinds(config, plop_scores, kinds, layers, placed_layers, rank, plop, spec.inverse)
    return Placement.from_kinds(config, chosen, layers=placed_layers, rank=rank, **common)


def _with_nfn(
    scores: Scores, config: Config, plop_scores: PlopScores, kinds: list[str], layers: list[int], rank: int, plop: PlopArgs
) -> Scores:
    """``scores`` with PLoP's NFN per site, kind and layer over the candidates, and PLoP's options as used."""
    block_kinds = [k for k in kinds if k != HEAD_KIND]
    per_layer = {}
    if block_kinds:
        per_layer = {str(l): sum(_plop_site_score(plop_scores, l, k) for k in block_kinds) / len(block_kinds) for l in layers}
    return replace(
        scores,
        nfn_per_site={f"{l}.{k}": _plop_site_score(plop_scores, l, k) for k in kinds for l in _site_layers(k, layers)},
        nfn_per_kind=plop_kind_scores(plop_scores, kinds, layers),
        nfn_per_layer=per_layer,
        nfn_per_expert={key: v for key, v in plop_scores.per_expert.items() if _is_candidate(key, kinds, layers)},
        expert_tokens={key: v for key, v in plop_scores.expert_tokens.items() if _is_candidate(key, kinds, layers)},
        unused_experts={l: v for l, v in plop_scores.unused_experts.items() if int(l) in layers},
        plop={
            "denominator": plop_scores.denominator,
            "num_kinds": plop.num_kinds if plop.budget is None else None,
            "budget": plop.budget,
            "budget_params": budget_params(config, plop.budget, rank) if plop.budget is not None else None,
            "granularity": plop.granularity,
        },
    )


def _is_candidate(key: str, kinds: Sequence[str], layers: Sequence[int]) -> bool:
    """Whether the site ``"<layer>.<kind>"`` is among the candidates."""
    layer, kind = key.split(".", 1)
    return kind in kinds and int(layer) in layers


def plan_placement(
    model: nn.Module,
    token_ids: Sequence[torch.Tensor],
    method: str = "plop",
    rank: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    candidate_kinds: Sequence[str] | None = None,
    candidate_layers: Sequence[int] | None = None,
    plop: PlopArgs | None = None,
    cka: CkaArgs | None = None,
    calibration: CalibrationArgs | None = None,
    shard: bool = True,
) -> Placement:
    """Calibrate ``model`` on ``token_ids`` (one pass, every scorer the method needs) and decide the placement.

    Args:
        model: a module holding a frozen LitGPT ``GPT`` (``litgpt.model.GPT`` or ``litgpt.lora.GPT``; dense or
            bitsandbytes 4-bit). Its train/eval modes are restored afterwards.
        token_ids: tokenized prompts (see ``litgpt_plop.calibration.calibration_token_ids``). At most
            ``calibration.num_samples`` are used; prompts longer than ``calibration.max_seq_length`` are
            truncated with a warning.
        method: a calibrated method of the registry (``litgpt_plop.methods``).
        rank: LoRA rank of every site.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout (recorded in the placement).
        candidate_kinds: the kinds the method may choose from (default: every kind but the head).
        candidate_layers: the layers it may choose from (default: all).
        plop: PLoP options (``--plop.*``).
        cka: CKA options (``--cka.*``).
        calibration: calibration options (``--calibration.*``; ``file`` is not read here).
        shard: under ``torch.distributed``, give each rank its share of the batches of ``token_ids`` (pass the
            same prompts on every rank). Every rank returns the same placement.
    """
    spec = calibrated_method(method)
    plop = PlopArgs() if plop is None else plop
    cka = CkaArgs() if cka is None else cka
    calibration = CalibrationArgs() if calibration is None else calibration
    gpt = gpt_of(model)
    kinds, layers = resolve_candidates(gpt.config, candidate_kinds, candidate_layers)
    if spec.uses_plop and plop.granularity == "site" and plop.budget is None:
        raise PlacementError("--plop.granularity site chooses sites until a budget is used: set --plop.budget")

    plop_scorer = PlopScorer(gpt, kinds, layers, plop.denominator, plop.mc_samples, calibration.seed) if spec.uses_plop else None
    cka_scorer = CkaScorer(gpt, layers, cka.pooling, cka.degenerate_tol) if spec.uses_cka else None
    scorers = [s for s in (plop_scorer, cka_scorer) if s is not None]
    stats: CalibrationStats = run_calibration(model, token_ids, scorers, calibration, shard=shard)
    record = {
        **stats.to_dict(),
        "num_samples": calibration.num_samples,
        "batch_size": calibration.batch_size,
        "max_seq_length": calibration.max_seq_length,
        "prompt_style": calibration.prompt_style,
        "seed": calibration.seed,
    }

    def choose(prompts: Sequence[int] | None) -> Placement:
        """The method's choice from the scores over ``prompts`` (None: all of them)."""
        return select_placement(
            gpt.config, method,
            plop_scores=plop_scorer.scores_of(prompts) if plop_scorer is not None else None,
            cka_scores=cka_scorer.scores_of(prompts, warn=prompts is None) if cka_scorer is not None else None,
            rank=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, candidate_kinds=kinds, candidate_layers=layers,
            plop=plop, cka=cka, calibration=record,
        )  # fmt: skip

    placement = choose(None)
    if placement.scores.unused_experts:  # reported, and left out of the token-weighted means
        idle = "; ".join(f"block {layer}: {experts}" for layer, experts in placement.scores.unused_experts.items())
        warnings.warn(
            f"Some experts received no calibration token, so PLoP has no score for them ({idle}); each site's NFN is"
            " the token-weighted mean over the experts that did. More or more varied prompts would reach them.",
            stacklevel=2,
        )
    if calibration.resamples and (cka_scorer is None or cka.pooling == "last"):
        prompts = stats.samples  # every rank's prompts, as the scorers gathered them
        stability = choice_stability(choose, prompts, calibration.resamples, calibration.seed)
        placement = replace(placement, scores=replace(placement.scores, stability=stability))
    # What the weights alone would choose, for the report's "calibrated vs data-free" section; with PLoP's own
    # selection options, so that both choices have the same size. (kappa builds on this module: imported here.)
    from litgpt_plop.kappa import KappaArgs, with_data_free_choice

    same_size = KappaArgs(num_kinds=plop.num_kinds, budget=plop.budget, granularity=plop.granularity) if spec.uses_plop else KappaArgs()
    return with_data_free_choice(placement, gpt, rank, same_size)


def decide_placement(
    model: nn.Module,
    method: str,
    token_ids: Sequence[torch.Tensor] | None,
    candidate_kinds: Sequence[str],
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float = 0.0,
    calibration: CalibrationArgs | None = None,
    plop: PlopArgs | None = None,
    cka: CkaArgs | None = None,
    seed: int | None = None,
    kappa: KappaArgs | None = None,
) -> Placement:
    """The placement of a calibrated method (calibrating on ``token_ids``), of a method that scores the weights
    (``kappa``, with its ``KappaArgs``) or of a preset (no data needed for either).

    ``seed`` draws the ``random`` preset's kinds (default: ``calibration.seed``).
    """
    spec = get_method(method, *DECIDED_BEFORE_TRAINING)
    calibration = CalibrationArgs() if calibration is None else calibration
    if spec.kind == "weights":
        from litgpt_plop.kappa import kappa_placement  # kappa builds on this module's choosers

        return kappa_placement(model, candidate_kinds, lora_r, lora_alpha, lora_dropout, kappa=kappa)
    if spec.calibrates:
        if not token_ids:
            raise InputError("Calibration data is empty: no prompts to score on")
        return plan_placement(
            model, token_ids, method=method, rank=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            candidate_kinds=candidate_kinds, plop=plop, cka=cka, calibration=calibration,
        )  # fmt: skip
    config = gpt_of(model).config
    seed = calibration.seed if seed is None else seed
    placement = preset(
        method, config, rank=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, candidates=candidate_kinds, seed=seed
    )
    if method != "random":
        placement = placement.restricted(kinds=candidate_kinds)
    placement.validate(config)
    return placement

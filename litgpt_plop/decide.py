"""Deciding a placement: calibrate, score and choose, the one call every command and callback makes.

``decide_placement`` takes any method of the registry but the gated ones: a calibrated method runs one
calibration pass with every scorer it needs (``litgpt_plop.scoring.plop``) and turns the scores into a ``Placement``
with the selection rules (``litgpt_plop.selection.rules``); ``kappa`` scores the weights alone
(``litgpt_plop.scoring.kappa``) and chooses with the same rules; a preset needs neither. Every calibrated plan
also records what ``kappa`` would choose on the same candidates (``with_data_free_choice``), so that its report
can say whether the task's prompts changed the choice.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn as nn
from litgpt import Config

from litgpt_plop.args import CalibrationArgs, CkaArgs, KappaArgs, PlopArgs
from litgpt_plop.errors import InputError
from litgpt_plop.model.modules import gpt_of
from litgpt_plop.scoring.calibration import run_calibration
from litgpt_plop.scoring.cka import CkaScorer, CkaScores
from litgpt_plop.scoring.kappa import HOW, KappaScores, data_free_skipped, score_weights
from litgpt_plop.scoring.plop import PlopScorer, PlopScores
from litgpt_plop.scoring.sequential import CheckpointBlocks, run_sequential_calibration
from litgpt_plop.selection.methods import DECIDED_BEFORE_TRAINING, Method, get_method
from litgpt_plop.selection.placement import (
    HEAD_KIND,
    HEAD_LAYER,
    Placement,
    PlacementError,
    Scores,
    preset,
)
from litgpt_plop.selection.rules import (
    budget_params,
    choose_kinds,
    choose_layers,
    choose_sites,
    plop_kind_scores,
    plop_site_score,
    resolve_candidates,
    site_layers,
)
from litgpt_plop.selection.stability import choice_stability

def calibrated_method(name: str) -> Method:
    """The calibrated method called ``name``; ``PlacementError`` naming the choices otherwise."""
    try:
        return get_method(name, "calibrated", what="placement method")
    except ValueError as e:
        raise PlacementError(str(e)) from None



@dataclass(frozen=True)
class _SiteTable:
    """A score table in the shape ``litgpt_plop.selection.rules``'s choosers read."""

    per_site: dict[str, float]


# ---- the math ---------------------------------------------------------------------------------------------


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
        per_layer = {str(l): sum(plop_site_score(plop_scores, l, k) for k in block_kinds) / len(block_kinds) for l in layers}
    return replace(
        scores,
        nfn_per_site={f"{l}.{k}": plop_site_score(plop_scores, l, k) for k in kinds for l in site_layers(k, layers)},
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
    model: nn.Module | CheckpointBlocks,
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
            bitsandbytes 4-bit). Its train/eval modes are restored afterwards. Or a checkpoint to calibrate one
            block at a time (``CheckpointBlocks``: ``litgpt_plop.scoring.sequential``), with the same scores.
        token_ids: tokenized prompts (see ``litgpt_plop.scoring.calibration.calibration_token_ids``). At most
            ``calibration.num_samples`` are used; prompts longer than ``calibration.max_seq_length`` are
            truncated with a warning.
        method: a calibrated method of the registry (``litgpt_plop.selection.methods``).
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
    return plan_placements(
        model, token_ids, [method], rank, lora_alpha, lora_dropout, candidate_kinds, candidate_layers, plop, cka,
        calibration, shard,
    )[method]  # fmt: skip


def calibration_record(stats: dict[str, Any], calibration: CalibrationArgs, sequential: bool) -> dict[str, Any]:
    """``placement.json``'s calibration record: what the pass measured and the options it ran with."""
    return {
        **stats,
        "num_samples": calibration.num_samples,
        "batch_size": calibration.batch_size,
        "max_seq_length": calibration.max_seq_length,
        "prompt_style": calibration.prompt_style,
        "seed": calibration.seed,
        "layer_sequential": sequential,
        "data_free": calibration.data_free,
    }


def plan_placements(
    model: nn.Module | CheckpointBlocks,
    token_ids: Sequence[torch.Tensor],
    methods: Sequence[str],
    rank: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    candidate_kinds: Sequence[str] | None = None,
    candidate_layers: Sequence[int] | None = None,
    plop: PlopArgs | None = None,
    cka: CkaArgs | None = None,
    calibration: CalibrationArgs | None = None,
    shard: bool = True,
) -> dict[str, Placement]:
    """``plan_placement`` for several calibrated ``methods`` from one calibration pass with every scorer any of
    them needs (the race's candidates): each method's placement, by name."""
    specs = [calibrated_method(m) for m in methods]
    plop = PlopArgs() if plop is None else plop
    cka = CkaArgs() if cka is None else cka
    calibration = CalibrationArgs() if calibration is None else calibration
    gpt = model.gpt if isinstance(model, CheckpointBlocks) else gpt_of(model)
    kinds, layers = resolve_candidates(gpt.config, candidate_kinds, candidate_layers)
    uses_plop, uses_cka = any(s.uses_plop for s in specs), any(s.uses_cka for s in specs)
    if uses_plop and plop.granularity == "site" and plop.budget is None:
        raise PlacementError("--plop.granularity site chooses sites until a budget is used: set --plop.budget")

    plop_scorer = PlopScorer(gpt, kinds, layers, plop.denominator, plop.mc_samples, calibration.seed) if uses_plop else None
    cka_scorer = CkaScorer(gpt, layers, cka.pooling, cka.degenerate_tol) if uses_cka else None
    scorers = [s for s in (plop_scorer, cka_scorer) if s is not None]
    weights = None  # the data-free comparison's condition numbers, once for every method
    tokens = sum(min(len(ids), calibration.max_seq_length) for ids in token_ids)
    skipped = data_free_skipped(calibration.data_free, gpt.config, kinds, layers, tokens)
    if isinstance(model, CheckpointBlocks):  # read block by block, as the pass loads them
        kappa = None if skipped else (kinds, layers)
        stats, weights = run_sequential_calibration(model, token_ids, scorers, calibration, shard, kappa=kappa)
    else:
        stats = run_calibration(model, token_ids, scorers, calibration, shard=shard)
    record = calibration_record(stats.to_dict(), calibration, sequential=isinstance(model, CheckpointBlocks))
    placements = {}
    if weights is None and not skipped:
        weights = score_weights(model, kinds, layers)
    for spec in specs:

        def choose(prompts: Sequence[int] | None, spec: Method = spec) -> Placement:
            """The method's choice from the scores over ``prompts`` (None: all of them)."""
            return select_placement(
                gpt.config, spec.name,
                plop_scores=plop_scorer.scores_of(prompts) if spec.uses_plop else None,
                cka_scores=cka_scorer.scores_of(prompts, warn=prompts is None) if spec.uses_cka else None,
                rank=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, candidate_kinds=kinds,
                candidate_layers=layers, plop=plop, cka=cka, calibration=record,
            )  # fmt: skip

        placement = choose(None)
        if placement.scores.unused_experts:  # reported, and left out of the token-weighted means
            idle = "; ".join(f"block {layer}: {experts}" for layer, experts in placement.scores.unused_experts.items())
            warnings.warn(
                f"Some experts received no calibration token, so PLoP has no score for them ({idle}); each site's NFN"
                " is the token-weighted mean over the experts that did. More or more varied prompts would reach them.",
                stacklevel=2,
            )
        if calibration.resamples and (not spec.uses_cka or cka.pooling == "last"):
            prompts = stats.samples  # every rank's prompts, as the scorers gathered them
            stability = choice_stability(choose, prompts, calibration.resamples, calibration.seed)
            placement = replace(placement, scores=replace(placement.scores, stability=stability))
        # What the weights alone would choose, for the report's "calibrated vs data-free" section; with PLoP's own
        # selection options, so that both choices have the same size.
        same_size = KappaArgs(num_kinds=plop.num_kinds, budget=plop.budget, granularity=plop.granularity) if spec.uses_plop else KappaArgs()
        if skipped:
            placements[spec.name] = replace(placement, scores=replace(placement.scores, kappa={"skipped": skipped}))
        else:
            placements[spec.name] = with_data_free_choice(placement, gpt, rank, same_size, weights)
    return placements


def decide_placement(
    model: nn.Module | CheckpointBlocks,
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

    ``seed`` draws the ``random`` preset's kinds (default: ``calibration.seed``). A ``CheckpointBlocks`` (calibrated
    one block at a time) serves a calibrated method or a preset, not ``kappa``.
    """
    spec = get_method(method, *DECIDED_BEFORE_TRAINING)
    calibration = CalibrationArgs() if calibration is None else calibration
    if spec.kind == "weights":
        if isinstance(model, CheckpointBlocks):
            raise TypeError("kappa scores a loaded model: load the checkpoint (load_checkpoint_model)")
        return kappa_placement(model, candidate_kinds, lora_r, lora_alpha, lora_dropout, kappa=kappa)
    if spec.calibrates:
        if not token_ids:
            raise InputError("Calibration data is empty: no prompts to score on")
        return plan_placement(
            model, token_ids, method=method, rank=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            candidate_kinds=candidate_kinds, plop=plop, cka=cka, calibration=calibration,
        )  # fmt: skip
    config = model.config if isinstance(model, CheckpointBlocks) else gpt_of(model).config
    seed = calibration.seed if seed is None else seed
    placement = preset(
        method, config, rank=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, candidates=candidate_kinds, seed=seed
    )
    if method != "random":
        placement = placement.restricted(kinds=candidate_kinds)
    placement.validate(config)
    return placement


# ---- kappa ------------------------------------------------------------------------------------------------


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


def with_data_free_choice(
    placement: Placement, model: nn.Module, rank: int, args: KappaArgs, scores: KappaScores | None = None
) -> Placement:
    """``placement`` (of a calibrated method) with the condition numbers of its candidates and what ``kappa``
    would choose from them with ``args`` on the same candidates: what the calibration changed. A ``kappa`` choice
    that cannot be made (a budget its first kind does not fit) is recorded as an error, not raised. The time it
    took goes to the calibration record (``kappa_seconds``), beside the pass's own: scores hold no timings, so
    that the same model and prompts always give the same scores. ``scores``: the candidates' condition numbers
    where they are known already."""
    config = gpt_of(model).config
    kinds, layers = placement.scores.candidate_kinds, placement.scores.candidate_layers
    scores = score_weights(model, kinds, layers) if scores is None else scores
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

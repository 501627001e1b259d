"""The race's candidates: each method's placement, matched to one trainable-parameter budget.

A placement with more parameters trains faster per step, so an unmatched race would mostly measure size. Every
candidate keeps its sites and gets the rank whose parameter count is closest to the reference's at ``--lora_r``
(``benchmarks.placement_quality`` matches its grid the same way); alpha scales with the rank, so every adapter
keeps LitGPT's ``lora_alpha / lora_r`` scaling.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
import torch.nn as nn

from litgpt_plop.args import CalibrationArgs, CkaArgs, KappaArgs, PlopArgs
from litgpt_plop.decide import decide_placement, plan_placements
from litgpt_plop.errors import InputError
from litgpt_plop.model.modules import gpt_of
from litgpt_plop.race.args import DEFAULT_CANDIDATES, OPTIONAL_CANDIDATES, RaceArgs
from litgpt_plop.selection.methods import DECIDED_BEFORE_TRAINING, Method, get_method
from litgpt_plop.selection.placement import Placement, Site


def candidate_names(args: RaceArgs) -> list[str]:
    """The methods that race, checked: ``--race.candidates`` or the default list (``kappa`` and ``cka`` included
    for now; ``race_candidates`` drops them where they place the same adapters as PLoP)."""
    names = list(dict.fromkeys(args.candidates or (*DEFAULT_CANDIDATES, *OPTIONAL_CANDIDATES)))
    for name in names:
        get_method(name, *DECIDED_BEFORE_TRAINING, what="race candidate")  # a placement known before training
    if args.reference not in names:
        raise InputError(f"--race.reference {args.reference!r} is not among the candidates {names}")
    return names


def prompts_method(method: Method, race: RaceArgs) -> Method:
    """The method whose needs the calibration prompts must meet: a race's CKA candidate where it has one."""
    return get_method("cka") if method.kind == "race" and "cka" in (race.candidates or ()) else method


def closest_rank(budget: int, params_at_rank_one: int) -> int:
    """The integer rank r >= 1 whose ``r * params_at_rank_one`` is closest to ``budget`` (the smaller on a tie)."""
    low = max(1, budget // params_at_rank_one)
    return min((low, low + 1), key=lambda r: (abs(r * params_at_rank_one - budget), r))


def matched(placement: Placement, budget: int, lora_r: int, lora_alpha: int, config) -> Placement:
    """``placement`` with every rank scaled so that its parameters are as close to ``budget`` as a whole rank
    allows, and alpha scaled with it (``lora_alpha / lora_r`` per adapter, as LitGPT)."""
    at_rank_one = Placement.from_sites(config, [(s.layer, s.kind, 1) for s in placement.sites]).trainable_params(config)
    rank = closest_rank(budget, at_rank_one)
    alpha = max(1, round(rank * lora_alpha / lora_r))
    return replace(placement, sites=[Site(s.layer, s.kind, rank) for s in placement.sites], lora_alpha=alpha)


def race_candidates(
    model: nn.Module,
    args: RaceArgs,
    token_ids: Sequence[torch.Tensor] | None,
    candidate_kinds: Sequence[str],
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    calibration: CalibrationArgs,
    plop: PlopArgs,
    cka: CkaArgs,
    kappa: KappaArgs,
    seed: int,
) -> list[Placement]:
    """Every candidate's placement on ``model`` (one calibration pass for all calibrated ones), matched to the
    reference's parameters, without duplicates: a candidate that places exactly the sites of an earlier one is
    left out (by default ``kappa`` and ``cka`` race only where they differ from PLoP)."""
    names = candidate_names(args)
    config = gpt_of(model).config
    calibrated = [n for n in names if get_method(n).calibrates]
    planned = {}
    if calibrated:
        if not token_ids:
            raise InputError("Calibration data is empty: no prompts to score the race's calibrated candidates on")
        planned = plan_placements(
            model, token_ids, calibrated, lora_r, lora_alpha, lora_dropout, candidate_kinds, plop=plop, cka=cka,
            calibration=calibration,
        )  # fmt: skip
    placements = {}
    for name in names:
        placements[name] = planned.get(name) or decide_placement(
            model, name, None, candidate_kinds, lora_r, lora_alpha, lora_dropout, calibration=calibration, seed=seed,
            kappa=kappa,
        )  # fmt: skip
    budget = placements[args.reference].trainable_params(config)
    chosen, seen = [], set()
    for name in names:
        sites = tuple((s.layer, s.kind) for s in placements[name].sites)
        if sites in seen:
            continue
        seen.add(sites)
        chosen.append(matched(placements[name], budget, lora_r, lora_alpha, config))
    if len(chosen) < 2:
        raise InputError(f"The race's candidates {names} all place the same adapters: nothing to race")
    return chosen

"""Which adapters a thresholding keeps, and what is recorded about each cut (docs/methods.md, section 3).

Two rules: the K alive adapters of largest gate magnitude (``top_k_mask``), or, with a parameter budget
(``--weightlora.budget``), the alive adapters in order of gate magnitude, largest first, while their parameters fit
(``budget_mask``: greedy, stopping at the first that does not fit, as PLoP's budget). A cut (a WeightLoRA+ round,
the end of the warm-up) is recorded with the gates it was decided on (``cut_record``), for ``placement.json``
(``scores.weightlora["cuts"]``) and the report.
"""

from __future__ import annotations

from typing import Any

import torch
from litgpt import Config

from litgpt_plop.errors import InputError
from litgpt_plop.selection.placement import Placement, site_params
from litgpt_plop.selection.rules import budget_params
from litgpt_plop.weightlora.args import WeightLoRAArgs
from litgpt_plop.weightlora.gates import top_k_mask


def checked_budget(candidates: Placement, args: WeightLoRAArgs, config: Config) -> int | None:
    """``args.budget`` in parameters (a fraction of the ``all`` placement at the candidates' largest rank, as
    ``--plop.budget``), None without one. Every candidate must fit it alone: the largest gate may be on any of
    them, and a greedy cut that cannot take its first adapter would keep nothing."""
    if args.budget is None:
        return None
    rank = candidates.max_rank
    limit = budget_params(config, args.budget, rank)
    site = max(candidates.sites, key=lambda s: site_params(config, s.kind, s.rank))
    cost = site_params(config, site.kind, site.rank)
    if cost > limit:
        what = f"{limit:,}"
        if isinstance(args.budget, float):
            what = f"{args.budget:g} of `all` at rank {rank} = {limit:,}"
        raise InputError(
            f"`--weightlora.budget` ({what} parameters) is smaller than the candidate adapter {site.key} alone"
            f" ({cost:,} parameters at rank {site.rank}): if its gate were the largest, nothing would be kept. Use"
            f" `--weightlora.budget` {cost} or more, or smaller candidates"
        )
    return limit


def budget_mask(gates: torch.Tensor, alive: list[bool], costs: list[int], budget: int) -> torch.Tensor:
    """The ``alive`` adapters in order of |w|, largest first (ties: the earlier candidate), while their ``costs``
    (parameters) fit ``budget``; the first that does not fit stops the selection, so no kept gate is smaller than a
    removed one. A gate of exactly 0 stops it too: its adapter adds nothing, and keeping it would make thresholding
    the gates a second time keep more than the first. A CPU bool mask."""
    magnitude = gates.detach().abs().cpu()
    magnitude[~torch.tensor(alive)] = -1.0  # removed adapters never come back
    keep = torch.zeros(len(alive), dtype=torch.bool)
    total = 0
    for i in torch.sort(magnitude, descending=True, stable=True).indices.tolist():
        if magnitude[i] <= 0 or total + costs[i] > budget:
            break
        keep[i] = True
        total += costs[i]
    return keep


def keep_mask(
    gates: torch.Tensor, alive: list[bool], k: int, costs: list[int], budget: int | None
) -> torch.Tensor:
    """What one thresholding keeps: the top ``k`` by |w|, or with a ``budget`` the largest |w| that fit it."""
    if budget is None:
        return top_k_mask(gates, alive, k)
    return budget_mask(gates, alive, costs, budget)


def cut_record(
    event: str,
    step: int,
    scheduled_step: int,
    keys: list[str],
    decided_on: list[float],
    alive: list[bool],
    keep: list[bool],
    costs: list[int],
) -> dict[str, Any]:
    """What a cut chose and from what: the gates it was decided on (``decided_on``: after the step's gate update,
    before any thresholding) of the adapters it ``keep``s, the largest gate of those it removed from the ``alive``
    ones, the kept adapters' parameters (``costs``), and whether the gates decided at all: ``kept_all_equal`` (more
    than one adapter kept, every gate the same) or ``tie`` (the smallest kept |w| equals the largest removed one),
    either of which means the candidate order chose, not the gates."""
    kept = {key: w for key, w, k in zip(keys, decided_on, keep) if k}
    removed = [(key, w) for key, w, a, k in zip(keys, decided_on, alive, keep) if a and not k]
    largest_removed = max(removed, key=lambda item: abs(item[1]), default=None)
    smallest_kept = min((abs(w) for w in kept.values()), default=None)
    return {
        "event": event,
        "step": step,
        "scheduled_step": scheduled_step,
        "kept": kept,
        "kept_params": sum(c for c, k in zip(costs, keep) if k),
        "largest_removed": list(largest_removed) if largest_removed is not None else None,
        "kept_all_equal": len(kept) > 1 and len(set(kept.values())) == 1,
        "tie": largest_removed is not None and smallest_kept == abs(largest_removed[1]),
    }

"""Successive halving's rounds: when each ends and how many candidates survive it.

With ``n`` candidates and ``eta``, round ``r`` keeps ``ceil(n_{r-1} / eta)`` until one is left. Round ``r`` ends at
optimizer step ``s_r = s_1 * eta**(r-1)`` (Hyperband's geometric rounds: a candidate that survives longer has
earned a longer look). The losers' steps are the race's overhead: ``sum_r dropped_r * s_r``; ``s_1`` is the
largest first round whose overhead fits ``budget * max_steps``.

No round ends inside the learning-rate warm-up: compared there, on SmolLM2 the candidates' losses ranked them
against the order their own runs ended in (RESULTS.md, "Race"). When the budget cannot pay for rounds after the
warm-up with ``eta``, fewer rounds (a larger ``eta``, down to one round that keeps one candidate) are run; when
not even one round fits, ``InputError`` says what would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from litgpt_plop.errors import InputError

MIN_FIRST_ROUND = 2  # LitGPT's first optimizer step has learning rate 0: after it every candidate is where it started


@dataclass(frozen=True)
class RaceSchedule:
    """The rounds of one race.

    Args:
        ends: the optimizer step at which each round ends (strictly increasing).
        survivors: how many candidates each round keeps (the last keeps one).
    """

    ends: tuple[int, ...]
    survivors: tuple[int, ...]

    def overhead_steps(self, candidates: int) -> int:
        """The steps trained by candidates that lose."""
        alive, total = candidates, 0
        for end, kept in zip(self.ends, self.survivors):
            total += (alive - kept) * end
            alive = kept
        return total


def survivors(candidates: int, eta: int) -> tuple[int, ...]:
    """How many candidates each round keeps, down to one."""
    kept, alive = [], candidates
    while alive > 1:
        alive = math.ceil(alive / eta)
        kept.append(alive)
    return tuple(kept)


def race_schedule(candidates: int, max_steps: int, budget: float, eta: int, warmup_steps: int = 0) -> RaceSchedule:
    """The rounds for ``candidates`` placements in a run of ``max_steps`` optimizer steps, spending at most
    ``budget * max_steps`` steps on the losers, the first round ending after the ``warmup_steps`` of the learning-rate
    warm-up (and after ``MIN_FIRST_ROUND`` steps)."""
    earliest = max(MIN_FIRST_ROUND, warmup_steps + 1)
    for rate in range(eta, max(eta, candidates) + 1):  # a larger eta: fewer rounds, cheaper
        kept = survivors(candidates, rate)
        dropped = [alive - k for alive, k in zip((candidates, *kept), kept)]
        first = math.floor(budget * max_steps / sum(d * rate**r for r, d in enumerate(dropped)))
        if earliest <= first and earliest < max_steps:
            # the last round's losers train s_R <= budget * max_steps < max_steps steps: every round ends before the run
            return RaceSchedule(tuple(first * rate**r for r in range(len(kept))), kept)
    needed = (candidates - 1) * earliest
    what = (
        f"--race.budget {budget} pays for {math.floor(budget * max_steps)} steps on candidates that lose, but comparing"
        f" {candidates} candidates after the {warmup_steps}-step learning-rate warm-up takes at least {needed}"
        f" ({needed / max_steps:.2f} of the {max_steps}-step run)"
    )
    if needed >= max_steps:
        raise InputError(f"{what}: race fewer --race.candidates, shorten --train.lr_warmup_steps or train longer")
    raise InputError(
        f"{what}: raise --race.budget to {math.ceil(100 * needed / max_steps) / 100}, race fewer --race.candidates,"
        " shorten --train.lr_warmup_steps or train longer"
    )

"""Successive halving's rounds: when each ends and how many candidates survive it.

With ``n`` candidates and ``eta``, round ``r`` keeps ``ceil(n_{r-1} / eta)`` until one is left. Round ``r`` ends at
optimizer step ``s_r = s_1 * eta**(r-1)`` (Hyperband's geometric rounds: a candidate that survives longer has
earned a longer look). The losers' steps are the race's overhead: ``sum_r dropped_r * s_r``; ``s_1`` is the
largest first round whose overhead fits ``budget * max_steps``, and at least ``MIN_FIRST_ROUND`` steps: LitGPT's
first optimizer step has learning rate 0, so after it every candidate is where it started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_FIRST_ROUND = 2


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


def race_schedule(candidates: int, max_steps: int, budget: float, eta: int) -> RaceSchedule:
    """The rounds for ``candidates`` placements in a run of ``max_steps`` optimizer steps, spending about
    ``budget * max_steps`` steps on the losers. Rounds that would end at or after the run's end are merged into
    one that ends one step before it (the winner needs a step of its own to be the run's)."""
    kept = survivors(candidates, eta)
    dropped = [alive - k for alive, k in zip((candidates, *kept), kept)]
    weight = sum(d * eta**r for r, d in enumerate(dropped))
    first = max(MIN_FIRST_ROUND, math.floor(budget * max_steps / weight))
    ends, rounds_kept = [], []
    for r, k in enumerate(kept):
        end = min(first * eta**r, max_steps - 1)
        if ends and end <= ends[-1]:  # clipped: this round ends where the last did, so it is that round
            rounds_kept[-1] = k
            continue
        ends.append(end)
        rounds_kept.append(k)
    return RaceSchedule(tuple(ends), tuple(rounds_kept))

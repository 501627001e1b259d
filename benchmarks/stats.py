"""The statistics the benchmarks report: exact sign test, paired item counts, rank agreement, means and ratios.

Plain Python (no numpy/scipy), exact where an exact answer exists.
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Mapping, Sequence


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: the chance of a split at least this uneven if either side were equally likely
    (ties are left out before counting). 1.0 for no wins and no losses."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_counts(a: Sequence[float], b: Sequence[float], right: float = 1.0) -> tuple[int, int]:
    """Item by item over two score lists of the same items: (wins, losses) of ``a`` against ``b``, where a win is
    an item ``a`` scored exactly ``right`` and ``b`` did not, a loss the other way round (partial credit is not
    right). Items past the shorter list are not compared."""
    wins = losses = 0
    for x, y in zip(a, b):
        wins += x == right and y != right
        losses += y == right and x != right
    return wins, losses


def kendall_tau(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Kendall's tau-b between two scorings of the same keys: +1 the same order, -1 the reverse. A pair tied in
    both counts for neither side; a pair tied in one only enters that side's tie count. 1.0 when every pair is
    tied in both."""
    keys = sorted(a)
    if keys != sorted(b):
        raise ValueError(f"Kendall's tau compares scorings of the same keys, got {keys} and {sorted(b)}")
    concordant = discordant = ties_a = ties_b = 0
    for i, k in enumerate(keys):
        for other in keys[i + 1 :]:
            da, db = a[k] - a[other], b[k] - b[other]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denominator if denominator else 1.0


def mean_std(xs: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation); None for what too few values cannot give."""
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN when ``b`` is 0."""
    return a / b if b else float("nan")


def median_ratio(a: Iterable[float], b: Iterable[float]) -> float:
    """The median of the pairwise ratios ``a_i / b_i``: measurements taken side by side are compared with each
    other, so a change of the machine's load between pairs cancels out."""
    return statistics.median(ratio(x, y) for x, y in zip(a, b))

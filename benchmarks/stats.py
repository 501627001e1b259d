"""The statistics the benchmarks report: exact sign test, paired item counts, rank agreement, means and ratios,
and how much of a spread over seeds the placement explains.

Plain Python (no numpy/scipy), exact where an exact answer exists.
"""

from __future__ import annotations

import itertools
import math
import random
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


def placement_share(table: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Two-way analysis of variance without replication: ``table`` maps each placement to its values, one per seed
    in the same seed order. Seeds are blocks (the candidates of one seed share batches, order and initial
    draws), so a shift every placement of a seed shares is taken out before comparing placements.

    Returns the sums of squares of placement, seed and residual, the F ratio of placement, and partial omega
    squared: the share of placement-plus-noise variance that the placement explains, estimated without the
    upward bias of the plain ratio (it can fall below 0, where it is reported as is)."""
    names = list(table)
    k, n = len(names), len(table[names[0]])
    if k < 2 or n < 2 or any(len(table[name]) != n for name in names):
        raise ValueError(f"need at least 2 placements with the same number (at least 2) of seeds, got {[len(table[m]) for m in names]}")
    grand = statistics.fmean(v for name in names for v in table[name])
    ss_total = sum((v - grand) ** 2 for name in names for v in table[name])
    ss_placement = n * sum((statistics.fmean(table[name]) - grand) ** 2 for name in names)
    ss_seed = k * sum((statistics.fmean(table[name][j] for name in names) - grand) ** 2 for j in range(n))
    ss_residual = max(ss_total - ss_placement - ss_seed, 0.0)
    df_placement, df_residual = k - 1, (k - 1) * (n - 1)
    ms_placement, ms_residual = ss_placement / df_placement, ss_residual / df_residual
    f_ratio = ms_placement / ms_residual if ms_residual else math.inf
    denominator = df_placement * ms_placement + (k * n - df_placement) * ms_residual
    omega2 = df_placement * (ms_placement - ms_residual) / denominator if denominator else 0.0
    return {"ss_placement": ss_placement, "ss_seed": ss_seed, "ss_residual": ss_residual, "f": f_ratio, "omega2": omega2}


def placement_permutation_p(table: Mapping[str, Sequence[float]], permutations: int = 10000, seed: int = 0) -> float:
    """The chance that the placements' labels, shuffled within each seed, explain at least as much as they do:
    the share of within-seed relabellings whose placement sum of squares reaches the observed one. Exact
    (every relabelling, the observed one among them) when there are at most ``permutations`` of them, else that
    many drawn at random with a fixed seed, plus the observed one, so that a drawn p is never 0. Within a seed,
    the total and the seed's sum of squares do not change, so the placement sum of squares orders relabellings
    as F does."""
    names = list(table)
    k, n = len(names), len(table[names[0]])
    columns = [[table[name][j] for name in names] for j in range(n)]

    def ss(arrangement: Sequence[Sequence[float]]) -> float:
        rows = [statistics.fmean(column[i] for column in arrangement) for i in range(k)]
        grand = statistics.fmean(rows)
        return sum((r - grand) ** 2 for r in rows)

    observed = ss(columns) * (1 - 1e-12)
    exact = math.factorial(k) ** (n - 1) <= permutations
    # the first seed's order can stay fixed: relabelling every seed alike leaves the sum of squares unchanged
    if exact:
        draws = itertools.product(itertools.permutations(range(k)), repeat=n - 1)
    else:
        rng = random.Random(seed)
        draws = ([rng.sample(range(k), k) for _ in range(n - 1)] for _ in range(permutations))
    hits = total = 0 if exact else 1  # drawn: the observed labelling counts as one of them
    for orders in draws:
        arrangement = [columns[0]] + [[column[i] for i in order] for column, order in zip(columns[1:], orders)]
        hits += ss(arrangement) >= observed
        total += 1
    return hits / total

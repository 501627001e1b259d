"""What ``benchmarks.summarize`` says about a task's runs: the method groups it compares, numbers as table cells,
the quality, cost, paired and rescored tables, the generated statements and the checks.

Everything here turns rows of ``benchmarks.placement_quality`` (and ``benchmarks.rescore``) into Markdown lines;
nothing reads or writes files except ``item_scores``, which falls back on a run's ``eval.jsonl``.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from typing import Any

from benchmarks.common import REPO_ROOT
from benchmarks.quality_grid import CALIBRATED, EXTRA_METHODS, FIXED, METHODS, WEIGHTLORA, WEIGHTS
from benchmarks.stats import mean_std, paired_counts, sign_test
from litgpt_plop.selection.methods import get_method

ORDER = EXTRA_METHODS + METHODS  # the order of the tables: the grid's
# automatic placement: calibrated or learned, except the inverse ablation (it is a baseline)
AUTOMATIC = tuple(m for m in CALIBRATED + WEIGHTLORA if not get_method(m).inverse)
# the baselines the automatic methods are compared with item by item: the presets, the inverse ablation and the
# data-free choice (kappa: what the calibrated methods' task prompts add is measured against it)
PAIRED_BASELINES = FIXED + tuple(m for m in CALIBRATED if get_method(m).inverse) + WEIGHTS
UNMATCHED = ("base", "all@r0")  # benchmark-only: the pretrained model, and `all` at r0 (more parameters)


# ---- numbers as table cells --------------------------------------------------------------------------------


def values(rows: list[dict], key: str) -> list[float]:
    """The ``key`` of every row that recorded one (a failed or older row may lack it), as floats."""
    return [float(r[key]) for r in rows if r.get(key) is not None]


def fmt(xs: list[float], digits: int = 3, scale: float = 1.0, suffix: str = "") -> str:
    """A table cell ``mean ± sample std`` of ``xs`` times ``scale``; the mean alone for one value, ``n/a`` for none."""
    m, s = mean_std([x * scale for x in xs])
    if m is None:
        return "n/a"
    text = f"{m:.{digits}f}"
    if s is not None:
        text += f" ± {s:.{digits}f}"
    return text + suffix


def fmt_params(xs: list[float]) -> str:
    """Trainable parameters: the count when every seed trained the same, else the mean and the range (``random``)."""
    if not xs:
        return "n/a"
    lo, hi = min(xs), max(xs)
    return f"{lo:,.0f}" if lo == hi else f"{statistics.fmean(xs):,.0f} ({lo:,.0f}-{hi:,.0f})"


def signed_pct(xs: list[float]) -> str:
    """Deviations from the budget as signed percentages: one value, or the range over the seeds."""
    if not xs:
        return ""
    lo, hi = min(xs), max(xs)
    return f"{100 * lo:+.1f}%" if lo == hi else f"{100 * lo:+.1f}% to {100 * hi:+.1f}%"


def method_order(methods: set[str]) -> list[str]:
    """``methods`` in the grid's order, so every table lists them alike; unknown names last, alphabetically."""
    return sorted(methods, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))


def placement_text(rows: list[dict]) -> str:
    """Where a method's runs put their adapters (kinds x layers, sites, ranks); a count when the seeds differ a lot."""
    texts = set()
    for r in rows:
        if not r.get("kinds"):
            continue
        ranks = r.get("ranks") or [r.get("rank")]
        rank = "/".join(str(x) for x in ranks)
        texts.add(f"{', '.join(r['kinds'])} × {r.get('n_layers')} layers ({r.get('n_sites')} sites, r={rank})")
    if not texts:
        return ""
    return "; ".join(sorted(texts)) if len(texts) <= 2 else f"{len(texts)} different placements over the seeds"


# ---- a task's tables ---------------------------------------------------------------------------------------


def quality_table(methods: dict[str, list[dict]]) -> list[str]:
    """One task's quality table: per method, mean ± std over seeds of accuracy, mean score and validation loss,
    beside what it trained (parameters, their distance from the budget, rank or K, placement)."""
    out = [
        "Quality (mean ± sample std over seeds; n = seeds):",
        "",
        "| method | n | accuracy (%) | mean score | val loss | trainable params | vs budget | rank (K) | placement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in method_order(set(methods)):
        rs = methods[method]
        dev = values(rs, "params_vs_budget")
        rank = "/".join(sorted({str(r.get("rank")) for r in rs if r.get("rank") is not None}))
        if any(r.get("k") for r in rs):
            rank += f" (K={rs[0]['k']})"
        out.append(
            f"| {method} | {len(rs)} | {fmt(values(rs, 'accuracy'), 1, 100)} | {fmt(values(rs, 'mean_score'), 3)}"
            f" | {fmt(values(rs, 'val_loss'), 3)} | {fmt_params(values(rs, 'trainable_params'))}"
            f" | {signed_pct(dev)} | {rank} | {placement_text(rs)} |"
        )
    return out + [""]


def cost_table(methods: dict[str, list[dict]]) -> list[str]:
    """One task's cost table: per method, mean ± std over seeds of calibration seconds, step time, peak RSS, the
    phases' seconds and the CPU share each run got (low: the machine was shared, its timings are inflated)."""
    out = [
        "Cost (mean ± sample std over seeds):",
        "",
        "| method | n | calibration (s) | median step (s) | peak RSS (MB) | finetune (s) | eval (s) | run wall (s) | CPU s / wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in method_order(set(methods)):
        rs = methods[method]
        out.append(
            f"| {method} | {len(rs)} | {fmt(values(rs, 'calibration_s'), 1)} | {fmt(values(rs, 'median_step_s'), 2)}"
            f" | {fmt(values(rs, 'peak_rss_mb'), 0)} | {fmt(values(rs, 'finetune_s'), 0)} | {fmt(values(rs, 'eval_s'), 0)}"
            f" | {fmt(values(rs, 'wall_s'), 0)} | {fmt(values(rs, 'cpu_per_wall'), 2)} |"
        )
    return out + [""]


def item_scores(row: dict[str, Any]) -> list[float] | None:
    """The task score of every held-out item, in order: from the row, else from the run's ``eval.jsonl``."""
    if row.get("item_scores") is not None:
        return [float(x) for x in row["item_scores"]]
    path = REPO_ROOT / row["run_dir"] / "eval.jsonl" if row.get("run_dir") else None
    if path is None or not path.is_file():
        return None
    scores = [float(json.loads(line)["score"]) for line in path.read_text().splitlines() if line.strip()]
    if not scores or abs(sum(x == 1.0 for x in scores) / len(scores) - float(row.get("accuracy", -1))) > 1e-9:
        return None  # the run directory holds another run (a rerun of the same method and seed)
    return scores


def paired_table(methods: dict[str, list[dict]]) -> list[str]:
    """Item-level paired comparison of each automatic method with each fixed baseline at matched parameters.

    The runs of a task share their held-out items and the seed pairs their initialisation and batch order, so
    the same (seed, item) can be compared directly: count the items only one of the two methods got right,
    pooled over the seeds both have, and test the split with a sign test.
    """
    scores: dict[str, dict[Any, list[float]]] = {}
    for method, rows in methods.items():
        for row in rows:
            items = item_scores(row)
            if items is not None:
                scores.setdefault(method, {})[row.get("seed")] = items
    automatic = [m for m in method_order(set(scores)) if m in AUTOMATIC]
    baselines = [m for m in method_order(set(scores)) if m in PAIRED_BASELINES]
    if not automatic or not baselines:
        return []
    tests = len(automatic) * len(baselines)
    out = [
        "Paired, item by item (same held-out items, same seeds): each cell is `+wins / -losses (p)` of the row's"
        " method against the column's, where a win is an item the row's method answered exactly right and the"
        " column's did not, pooled over the seeds both ran; p is the exact two-sided sign test on wins vs losses."
        f" {tests} comparisons: at p < 0.05 about {0.05 * tests:.1f} would come out 'significant' by chance alone"
        f" (Bonferroni: p < {0.05 / tests:.4f}).",
        "",
        "| method | " + " | ".join(f"vs {b}" for b in baselines) + " |",
        "|---|" + "---|" * len(baselines),
    ]
    for a in automatic:
        cells = []
        for b in baselines:
            seeds = sorted(set(scores[a]) & set(scores[b]), key=str)
            wins = losses = 0
            for seed in seeds:
                w, l = paired_counts(scores[a][seed], scores[b][seed])
                wins, losses = wins + w, losses + l
            if not seeds:
                cells.append("n/a")
                continue
            p = sign_test(wins, losses)
            cells.append(f"+{wins} / -{losses} ({p:.2f}), {len(seeds)} seeds" if p >= 0.01 else f"+{wins} / -{losses} ({p:.4f}), {len(seeds)} seeds")
        out.append(f"| {a} | " + " | ".join(cells) + " |")
    return out + [""]


def rescored_section(task: str, methods: dict[str, list[dict]], rescored: dict[tuple, dict], eval_items: int) -> list[str]:
    """The same trained runs on more held-out items (``benchmarks.rescore``): accuracy table, findings, paired table."""
    larger: dict[str, list[dict]] = defaultdict(list)
    for method, rows in methods.items():
        for row in rows:
            r = rescored.get((task, method, row.get("seed")))
            if r is not None:
                larger[method].append(r)
    if not larger:
        return []
    counts = sorted({r["items"] for rows in larger.values() for r in rows})
    n_items = counts[0] if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    agree = sum(r["agree_first"] for rows in larger.values() for r in rows)
    compared = sum(r["compared_first"] for rows in larger.values() for r in rows)
    missing = sum(len(rows) for rows in methods.values()) - sum(len(rows) for rows in larger.values())
    out = [
        f"#### {task} on {n_items} held-out items",
        "",
        f"The same trained adapters answering the first {n_items} held-out items of the task (the {eval_items} above"
        " first, then further ones that are neither training items nor repeats), from the adapters the runs saved"
        f" (`benchmarks/rescore.py`, no retraining). Check: on the first {eval_items} items, {agree} of {compared}"
        " answers are right or wrong exactly as the run's own scoring had them."
        + (f" {missing} run(s) are not rescored yet." if missing else ""),
        "",
        f"| method | n | accuracy on {n_items} items (%) | mean score | accuracy on the first {eval_items} (%) |",
        "|---|---|---|---|---|",
    ]
    for method in method_order(set(larger)):
        rs = larger[method]
        out.append(
            f"| {method} | {len(rs)} | {fmt(values(rs, 'accuracy'), 1, 100)} | {fmt(values(rs, 'mean_score'), 3)}"
            f" | {fmt(values(rs, 'run_accuracy'), 1, 100)} |"
        )
    items = counts[0] if len(counts) == 1 else None
    out += ["", *[f"- {line}" for line in findings(task, larger, items)], ""]
    return out + paired_table(larger)


# ---- what the data says ------------------------------------------------------------------------------------


def compare(a: list[float], b: list[float]) -> tuple[float, str]:
    """(difference of means, whether it is larger than the spread: the two mean ± std intervals do not overlap)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    diff = ma - mb
    if sa is None or sb is None:
        return diff, "spread unknown (fewer than 2 seeds)"
    spread = sa + sb
    if abs(diff) > spread:
        return diff, f"larger than the spread (|Δ| > std₁ + std₂ = {100 * spread:.1f} pts)"
    return diff, f"within the spread (|Δ| ≤ std₁ + std₂ = {100 * spread:.1f} pts)"


def findings(task: str, methods: dict[str, list[dict]], eval_items: int | None) -> list[str]:
    """Mechanical statements about one task's runs: which matched method had the highest and lowest mean accuracy,
    how far the next one is and whether that is larger than the spread over seeds, ``plop`` against each other
    method, the lowest validation loss. Descriptions of the tables, never an interpretation."""
    lines = []
    acc = {m: values(rows, "accuracy") for m, rows in methods.items() if values(rows, "accuracy")}
    matched = {m: a for m, a in acc.items() if m not in UNMATCHED}
    if eval_items:
        lines.append(f"One held-out item is {100 / eval_items:.1f} accuracy points ({eval_items} items).")
    if "base" in acc:
        lines.append(f"Pretrained model (no finetuning): {100 * statistics.fmean(acc['base']):.1f}%.")
    if not matched:
        return lines + ["No finetuned runs at matched parameters yet."]
    ranked = sorted(matched, key=lambda m: -statistics.fmean(matched[m]))
    best = ranked[0]
    top = [m for m in ranked if statistics.fmean(matched[m]) == statistics.fmean(matched[best])]
    best_text = ", ".join(f"`{m}`" for m in top)
    lines.append(
        f"Highest mean accuracy at matched parameters: {best_text} with {fmt(matched[best], 1, 100, '%')}"
        f" (n={len(matched[best])})" + (" (a tie)" if len(top) > 1 else "") + "."
    )
    rest = [m for m in ranked if m not in top]
    if rest:
        runner = rest[0]
        diff, verdict = compare(matched[best], matched[runner])
        lines.append(
            f"Next: `{runner}` with {fmt(matched[runner], 1, 100, '%')}; difference {100 * diff:+.1f} pts, {verdict}."
        )
    lowest = ranked[-1]
    if lowest not in top:
        lines.append(f"Lowest mean accuracy at matched parameters: `{lowest}` with {fmt(matched[lowest], 1, 100, '%')}.")
    if "all@r0" in acc:
        lines.append(f"`all@r0` (unmatched, more parameters): {fmt(acc['all@r0'], 1, 100, '%')}.")
    if "plop" in matched:
        pros = []
        for other in method_order(set(matched) - {"plop"}):
            diff, verdict = compare(matched["plop"], matched[other])
            pros.append(f"`{other}` {100 * diff:+.1f} pts ({verdict.split(' (')[0]})")
        if pros:
            lines.append("`plop` minus each other matched method, mean accuracy: " + "; ".join(pros) + ".")
    vl = {m: values(rows, "val_loss") for m, rows in methods.items() if m not in UNMATCHED and values(rows, "val_loss")}
    if vl:
        lowest_vl = min(vl, key=lambda m: statistics.fmean(vl[m]))
        ranked_vl = sorted(vl, key=lambda m: statistics.fmean(vl[m]))
        text = f"Lowest mean validation loss at matched parameters: `{lowest_vl}` ({fmt(vl[lowest_vl], 3)})"
        if len(ranked_vl) > 1:
            diff, verdict = compare(vl[ranked_vl[1]], vl[lowest_vl])
            text += f"; next `{ranked_vl[1]}` ({fmt(vl[ranked_vl[1]], 3)}), {verdict.replace(' pts', '').replace('= ', '= 0.01 x ')}"
        lines.append(text + ".")
    return lines


def checks(latest: dict[tuple, dict]) -> list[str]:
    """What a reader must know before trusting a row: parameters far from the budget, a finetune that chose other
    sites than the plan its rank was set from, runs that shared the machine (their timings are inflated)."""
    lines = []
    off = [
        (k, r["params_vs_budget"]) for k, r in latest.items()
        if r.get("params_vs_budget") is not None and r["method"] not in UNMATCHED and abs(r["params_vs_budget"]) > 0.10
    ]  # fmt: skip
    for (task, method, seed), dev in sorted(off):
        lines.append(f"{task} `{method}` seed {seed}: trainable parameters {dev:+.1%} from the budget (more than 10%).")
    for (task, method, seed), r in sorted(latest.items(), key=lambda kv: str(kv[0])):
        if r.get("sites_match_plan") is False:
            lines.append(f"{task} `{method}` seed {seed}: the finetune chose other sites than the plan its rank was set from.")
    # A harness process runs one job at a time, so the grid's own load is about (processes x threads), at most
    # the core count as the documented commands run it: a 1-minute load average clearly above the core count at
    # the start or the end of a run means other work shared the machine.
    busy = [
        r for r in latest.values()
        if r.get("machine", {}).get("usable_cpus")
        and max((r.get("loadavg_before") or [0])[0], (r.get("loadavg_after") or [0])[0]) > r["machine"]["usable_cpus"] + 0.5
    ]  # fmt: skip
    if busy:
        lines.append(
            f"Timing caveat: {len(busy)} of {len(latest)} runs started or ended with a 1-minute load average above the"
            " number of cores plus 0.5: other processes shared the machine, so step times, calibration seconds and"
            " wall times of those runs are inflated and not comparable between methods (accuracy and loss are not"
            " affected). The `CPU s / wall s` column shows how much CPU each run got."
        )
    return lines

"""Summarize ``benchmarks.placement_quality``'s JSON lines into ``benchmarks/RESULTS.md`` and a plot.

Writes one section of RESULTS.md, between ``<!-- placement_quality:begin -->`` and ``<!-- placement_quality:end -->``
(the rest of the file, e.g. other benchmarks' sections, is left alone; the section is appended when absent):

* the set-up (settings, the budget and how each method's rank was matched to it),
* per task, mean +- sample standard deviation over seeds of: held-out exact-match accuracy, mean task score,
  final validation loss, trainable parameters, calibration seconds, median training-step seconds, peak RSS, wall,
* per task, where ``benchmarks.rescore`` has scored the same runs on more held-out items: their accuracy, the findings
  and the paired comparison on those items,
* a PNG plot of accuracy against trainable parameters (one point per method: mean +- std; faint: each seed),
* "What the data says": generated statements only (which method had the highest mean, by how much, and whether
  that difference is larger than the spread over seeds), never an interpretation,
* "What the numbers do and do not show": a placeholder for the writer; once edited, later runs of this script
  keep it as it is,
* the exact commands, the machine, the commit.

Only the newest ``ok`` row of each (task, method, seed) of one settings hash (``config_id``; default: the one
of the newest row) is used; failed runs without a later success are listed.

    python -m benchmarks.summarize                       # results.jsonl -> benchmarks/RESULTS.md
    python -m benchmarks.summarize --smoke               # smoke.jsonl -> benchmarks/results/placement_quality/SMOKE.md
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, command_line, read_jsonl, save_figure, write_text
from benchmarks.placement_quality import CALIBRATED, EXTRA_METHODS, FIXED, METHODS, RESULTS_DIR, WEIGHTLORA, WEIGHTS
from benchmarks.stats import mean_std, paired_counts, sign_test
from litgpt_plop.selection.methods import get_method

BEGIN, END = "<!-- placement_quality:begin -->", "<!-- placement_quality:end -->"
NOTES_BEGIN, NOTES_END = "<!-- placement_quality:notes:begin -->", "<!-- placement_quality:notes:end -->"
NOTES_PLACEHOLDER = (
    "_To be written by whoever ran the grid, from the tables above: what the numbers support, what they do not"
    " (e.g. differences inside the spread over seeds, one model, two tasks, short CPU runs, three `random`"
    " draws), and what would settle it. Until then, nothing here is a conclusion._"
)
ORDER = EXTRA_METHODS + METHODS  # the order of the tables: the grid's
# automatic placement: calibrated or learned, except the inverse ablation (it is a baseline)
AUTOMATIC = tuple(m for m in CALIBRATED + WEIGHTLORA if not get_method(m).inverse)
# the baselines the automatic methods are compared with item by item: the presets, the inverse ablation and the
# data-free choice (kappa: what the calibrated methods' task prompts add is measured against it)
PAIRED_BASELINES = FIXED + tuple(m for m in CALIBRATED if get_method(m).inverse) + WEIGHTS
UNMATCHED = ("base", "all@r0")  # benchmark-only: the pretrained model, and `all` at r0 (more parameters)


# ---- reading -----------------------------------------------------------------------------------------------


def load_rows(path: Path) -> list[dict[str, Any]]:
    def warn(number: int) -> None:
        print(f"warning: {path}:{number} is not JSON (a run killed while writing?); skipped", file=sys.stderr)

    return read_jsonl(path, on_bad_line=warn)


def select(rows: list[dict[str, Any]], config_id: str | None) -> tuple[str, dict, list[dict], list[str]]:
    """(config_id, {(task, method, seed): newest ok row}, failed rows not superseded, other config ids)."""
    if not rows:
        raise SystemExit("No rows in the results file")
    config_id = config_id or rows[-1]["config_id"]
    others = sorted({r["config_id"] for r in rows} - {config_id})
    latest: dict[tuple, dict] = {}
    failed: dict[tuple, dict] = {}
    for row in rows:
        if row["config_id"] != config_id:
            continue
        key = (row["task"], row["method"], row.get("seed"))
        if row.get("status") == "ok":
            latest[key] = row
            failed.pop(key, None)
        elif key not in latest:
            failed[key] = row
    if not latest and not failed:
        raise SystemExit(f"No rows with config_id {config_id}")
    return config_id, latest, list(failed.values()), others


def rescored_rows(path: Path | None, config_id: str, latest: dict[tuple, dict]) -> dict[tuple, dict]:
    """(task, method, seed) -> ``benchmarks.rescore``'s row for exactly the run in ``latest`` (the same start time),
    the one with the most items where there are several."""
    if path is None or not path.is_file():
        return {}
    out: dict[tuple, dict] = {}
    for row in load_rows(path):
        key = (row["task"], row["method"], row.get("seed"))
        run = latest.get(key)
        if row["config_id"] != config_id or run is None or row.get("run_started") != run.get("started"):
            continue  # another settings hash, or a run trained again since it was rescored
        if key not in out or row["items"] >= out[key]["items"]:
            out[key] = row
    return out


# ---- numbers -----------------------------------------------------------------------------------------------


def values(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) is not None]


def fmt(xs: list[float], digits: int = 3, scale: float = 1.0, suffix: str = "") -> str:
    m, s = mean_std([x * scale for x in xs])
    if m is None:
        return "n/a"
    text = f"{m:.{digits}f}"
    if s is not None:
        text += f" ± {s:.{digits}f}"
    return text + suffix


def fmt_params(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    lo, hi = min(xs), max(xs)
    return f"{lo:,.0f}" if lo == hi else f"{statistics.fmean(xs):,.0f} ({lo:,.0f}-{hi:,.0f})"


def signed_pct(xs: list[float]) -> str:
    if not xs:
        return ""
    lo, hi = min(xs), max(xs)
    return f"{100 * lo:+.1f}%" if lo == hi else f"{100 * lo:+.1f}% to {100 * hi:+.1f}%"


def method_order(methods: set[str]) -> list[str]:
    return sorted(methods, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))


def placement_text(rows: list[dict]) -> str:
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


# ---- the plot ----------------------------------------------------------------------------------------------


def plot(by_task: dict[str, dict[str, list[dict]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    # a task is plotted once it has a finetuned run (the pretrained model alone has no parameter count)
    tasks = sorted(t for t in by_task if any(values(rows, "trainable_params") for rows in by_task[t].values()))
    if not tasks:
        return
    fig, axes = plt.subplots(2, len(tasks), figsize=(6.5 * len(tasks), 9.5), squeeze=False)
    palette = list(plt.get_cmap("tab10").colors) + ["#000000", "#8c564b88", "#e7298a"]
    colors = {m: palette[i % len(palette)] for i, m in enumerate(m for m in ORDER if m != "base")}
    for ax, task in zip(axes[1], tasks):
        # the same means by method: at matched parameters the points above sit almost on one vertical line
        methods = by_task[task]
        names = [m for m in method_order(set(methods) - {"base"}) if values(methods[m], "accuracy")]
        for x, method in enumerate(names):
            ys = [100 * y for y in values(methods[method], "accuracy")]
            marker = "*" if method in AUTOMATIC else ("s" if method in UNMATCHED else "o")
            color = colors.get(method, "#555555")
            ax.scatter([x] * len(ys), ys, color=color, alpha=0.3, s=18, marker=marker)
            my, sy = mean_std(ys)
            ax.errorbar(x, my, yerr=sy or 0, color=color, marker=marker, ms=10 if marker == "*" else 7, capsize=3, ls="none")
        if "base" in methods and values(methods["base"], "accuracy"):
            ax.axhline(100 * statistics.fmean(values(methods["base"], "accuracy")), color="grey", ls="--", lw=1)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("held-out exact-match accuracy (%)")
        ax.set_title(f"{task}: by method (mean ± std over seeds)")
        ax.grid(True, axis="y", alpha=0.3)
    for ax, task in zip(axes[0], tasks):
        methods = by_task[task]
        if "base" in methods:
            base = values(methods["base"], "accuracy")
            if base:
                ax.axhline(100 * statistics.fmean(base), color="grey", ls="--", lw=1, label="base (no finetuning)")
        for method in method_order(set(methods) - {"base"}):
            rows = methods[method]
            xs, ys = values(rows, "trainable_params"), values(rows, "accuracy")
            if not xs or not ys:
                continue
            marker = "*" if method in AUTOMATIC else ("s" if method in UNMATCHED else "o")
            color = colors.get(method, "#555555")
            ax.scatter(xs, [100 * y for y in ys], color=color, alpha=0.3, s=18, marker=marker)
            my, sy = mean_std([100 * y for y in ys])
            ax.errorbar(
                statistics.fmean(xs), my, yerr=sy or 0, color=color, marker=marker, ms=10 if marker == "*" else 7,
                capsize=3, ls="none", label=f"{method} (n={len(ys)})",
            )  # fmt: skip
        xs_all = [x for rows in methods.values() for x in values(rows, "trainable_params")]
        ys_all = [100 * y for rows in methods.values() for y in values(rows, "accuracy")]
        ax.set_xscale("log")
        if xs_all:
            ax.set_xlim(min(xs_all) / 1.6, max(xs_all) * 1.6)
        ax.set_ylim(-3, min(103, max([10.0] + ys_all) + 8))
        millions = FuncFormatter(lambda x, _pos: f"{x / 1e6:.2g}M")
        ax.xaxis.set_major_formatter(millions)
        ax.xaxis.set_minor_formatter(millions)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel("held-out exact-match accuracy (%)")
        ax.set_title(task)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


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


def checks(latest: dict[tuple, dict]) -> list[str]:
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


# ---- RESULTS.md --------------------------------------------------------------------------------------------


def rel(path: Path, start: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(start.resolve()))
    except ValueError:
        import os

        return os.path.relpath(Path(path).resolve(), start.resolve())


def section(
    config_id: str, latest: dict, failed: list[dict], others: list[str], plot_path: Path, md_path: Path,
    results_path: Path, summarize_command: str, notes: str, rescored: dict[tuple, dict] | None = None,
) -> str:  # fmt: skip
    rows = list(latest.values())
    by_task: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for (task, method, _seed), row in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] if kv[0][2] is not None else -1)):
        by_task[task][method].append(row)
    settings = next(r["settings"] for r in rows + failed if r.get("settings"))
    smoke = any(r.get("smoke") for r in rows + failed)
    out = [BEGIN, "", "## Placement quality: does automatic placement beat the usual choices?", ""]
    if smoke:
        out += [
            "> **SMOKE RUN.** Tiny settings (a few steps, a handful of held-out items, one seed) that only check that",
            "> the harness and this summary work end to end. These numbers are not evidence about placement.",
            "",
        ]
    out += [
        f"Generated by `benchmarks/summarize.py` from `{rel(results_path, REPO_ROOT)}` (settings hash `{config_id}`;"
        f" {len(rows)} successful runs). Harness: `benchmarks/placement_quality.py` (its docstring has every detail).",
        "",
        "### Set-up",
        "",
        f"- Model: SmolLM2-135M-Instruct (the embedded checkpoint), fp32 on CPU, LoRA dropout {settings['lora_dropout']}.",
        f"- Training per run: {settings['steps']} optimizer steps of {settings['micro_batch']} examples"
        f" ({settings['steps'] * settings['micro_batch']} examples from {settings['train_size']} training items), AdamW lr"
        f" {settings['lr']:g} (no weight decay), {settings['lr_warmup_steps']} warm-up step(s) then cosine; one fresh subprocess per run.",
        f"- Held-out: the same {settings['eval_items']} items for every run of a task (validation loss and greedy exact-match accuracy"
        f" with the task's scorer, at most {settings['max_new_tokens']} new tokens); data seed {settings['data_seed']}.",
        f"- Calibration (plop, plop-inverse, cka, plop+cka): {settings['calibration_samples']} training prompts; CKA ratio {settings['cka_ratio']}.",
        "- Seeds change LoRA initialisation, dropout and the order of the training batches, and `random`'s kinds (a new draw of 3 kinds per seed, its rank matched to each draw).",
        f"- Parameter budget: `{settings['reference']}` at rank r0 = {settings['rank']}; every other method's rank is the integer whose"
        f" trainable-parameter count is closest to it (alpha {'= 2 r, the same scale alpha/r for all' if settings['alpha_rule'] == 'ratio' else 'fixed at 2 r0'});"
        " WeightLoRA(+) keeps K adapters at r0 with K = budget / mean adapter size; `all@r0` is the unmatched reference.",
        "",
    ]
    for task in sorted(by_task):
        methods = by_task[task]
        sample = next((r for ms in methods.values() for r in ms if r.get("budget_params")), None) or next(
            r for ms in methods.values() for r in ms
        )
        budget = sample.get("budget_params")
        out += [f"### {task}", ""]
        if sample.get("task_config"):
            out += [f"Task config: `{json.dumps(sample['task_config'])}`." + (f" Budget: {budget:,} trainable parameters ({sample.get('reference')})." if budget else ""), ""]
        elif budget:
            out += [f"Task config: reasoning-gym defaults. Budget: {budget:,} trainable parameters ({sample.get('reference')}).", ""]
        out += [
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
        out += [
            "",
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
        out.append("")
        out += paired_table(methods)
        out += rescored_section(task, methods, rescored or {}, settings["eval_items"])
    out += [
        "### Accuracy against trainable parameters",
        "",
        f"![accuracy vs trainable parameters]({rel(plot_path, md_path.parent)})",
        "",
        "Each point: a method's mean over seeds ± std (stars: automatic placement; squares: unmatched references);"
        " faint points: single seeds; dashed line: the pretrained model.",
        "",
        "### What the data says (generated)",
        "",
        "Mechanical statements from the tables; \"larger than the spread\" means the two mean ± std intervals do not"
        " overlap. With a few seeds this is a description, not a significance test.",
        "",
    ]
    eval_items = settings.get("eval_items")
    for task in sorted(by_task):
        out += [f"**{task}**", ""] + [f"- {line}" for line in findings(task, by_task[task], eval_items)] + [""]
    problems = checks(latest)
    if failed:
        problems += [
            f"{r['task']} `{r['method']}` seed {r.get('seed')}: {r.get('status')} (exit {r.get('returncode')}), log `{r.get('log')}`."
            for r in failed
        ]
    if others:
        problems.append(f"The results file also holds runs with other settings ({', '.join(others)}), not shown here.")
    if problems:
        out += ["**Checks**", ""] + [f"- {p}" for p in problems] + [""]
    out += ["### What the numbers do and do not show", "", NOTES_BEGIN, notes, NOTES_END, ""]
    commands = []
    for r in rows + failed + list((rescored or {}).values()):
        if r.get("command") and module_command(r["command"]) not in commands:
            commands.append(module_command(r["command"]))
    out += ["### Commands", "", "```bash"] + commands + [summarize_command, "```", ""]
    machines = []
    for r in rows:
        m = r.get("machine")
        if m and m not in machines:
            machines.append(m)
    out += ["### Machine", ""]
    for m in machines:
        out.append(
            f"- CPU: {m.get('cpu')}, {m.get('usable_cpus')} usable of {m.get('logical_cpus')} logical cores,"
            f" {m.get('mem_total_gb')} GB RAM; torch {m.get('torch')} ({m.get('torch_threads')} threads), litgpt"
            f" {m.get('litgpt')}, lightning {m.get('lightning')}, Python {m.get('python')}; {m.get('platform')}."
        )
    loads = [r["loadavg_before"][0] for r in rows if r.get("loadavg_before")]
    if loads:
        out.append(f"- 1-minute load average when runs started: {min(loads):.1f} to {max(loads):.1f} (shared machine).")
    commits = sorted({r.get("git_commit") for r in rows if r.get("git_commit")})
    if commits:
        out.append(f"- Commit: {', '.join(f'`{c}`' for c in commits)}.")
    starts = sorted(r["started"] for r in rows if r.get("started"))
    if starts:
        out.append(f"- Runs from {starts[0]} to {starts[-1]}; total run wall time {sum(values(rows, 'wall_s')) / 3600:.1f} h.")
    out += ["", END]
    return "\n".join(out) + "\n"


def module_command(command: str) -> str:
    """A recorded command as it runs today: ``python benchmarks/<script>.py ARGS`` (how runs before the scripts
    became the ``benchmarks`` package recorded themselves) is ``python -m benchmarks.<script> ARGS``."""
    return re.sub(r"^python benchmarks/(\w+)\.py(?=\s|$)", r"python -m benchmarks.\1", command)


def existing_notes(text: str) -> str | None:
    match = re.search(re.escape(NOTES_BEGIN) + r"\n(.*?)\n?" + re.escape(NOTES_END), text, re.S)
    if match and match.group(1).strip() and match.group(1).strip() != NOTES_PLACEHOLDER:
        return match.group(1).strip("\n")
    return None


def write_section(md_path: Path, build) -> None:
    text = md_path.read_text() if md_path.is_file() else ""
    block = build(existing_notes(text) or NOTES_PLACEHOLDER)
    if BEGIN in text and END in text:
        start, end = text.index(BEGIN), text.index(END) + len(END)
        new = text[:start] + block.rstrip("\n") + text[end:]
    elif text:
        new = text.rstrip("\n") + "\n\n" + block
    else:
        new = "# Benchmark results\n\n" + block
    write_text(md_path, new)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.summarize", description="Summarize benchmarks.placement_quality's JSONL into RESULTS.md and a plot.")
    p.add_argument("--smoke", action="store_true", help="default to the smoke files (smoke.jsonl -> results/placement_quality/SMOKE.md)")
    p.add_argument("--results", type=Path, default=None, help="JSONL file (default benchmarks/results/placement_quality/results.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="Markdown file whose section is (re)written (default benchmarks/RESULTS.md)")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default benchmarks/results/placement_quality/accuracy_vs_params.png)")
    p.add_argument("--config_id", default=None, help="which settings hash to summarize (default: the newest row's)")
    p.add_argument("--rescore", type=Path, default=None, help="benchmarks.rescore's JSONL (default: rescore.jsonl beside the results, if there)")
    args = p.parse_args(argv)
    results = args.results or RESULTS_DIR / ("smoke.jsonl" if args.smoke else "results.jsonl")
    md_path = args.out or (RESULTS_DIR / "SMOKE.md" if args.smoke else REPO_ROOT / "benchmarks" / "RESULTS.md")
    plot_path = args.plot or RESULTS_DIR / ("smoke_accuracy_vs_params.png" if args.smoke else "accuracy_vs_params.png")
    config_id, latest, failed, others = select(load_rows(results), args.config_id)
    rescored = rescored_rows(args.rescore or results.with_name("rescore.jsonl"), config_id, latest)

    # Plot the larger evaluation where every run shown has one with the same number of items.
    counts = {r["items"] for r in rescored.values()}
    plot_rescored = bool(rescored) and len(rescored) == len(latest) and len(counts) == 1
    by_task: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for key, row in latest.items():
        task, method, _seed = key
        by_task[task][method].append({**row, "accuracy": rescored[key]["accuracy"]} if plot_rescored else row)
    smoke = any(r.get("smoke") for r in latest.values())
    if plot_rescored:
        items = f"{counts.pop()} held-out items"
    else:
        items = f"{next(iter(latest.values()))['settings']['eval_items']} held-out items" if latest else ""
    title = f"Placement quality{' (SMOKE: not evidence)' if smoke else ''}: SmolLM2-135M-Instruct, settings {config_id}, {items}"
    if latest:
        plot(by_task, plot_path, title)
    command = command_line("benchmarks.summarize", argv)
    write_section(
        md_path,
        lambda notes: section(config_id, latest, failed, others, plot_path, md_path, results, command, notes, rescored),
    )
    print(f"wrote {md_path} and {plot_path} ({len(latest)} runs, settings {config_id})")


if __name__ == "__main__":
    main()

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
import os
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, command_line, read_jsonl
from benchmarks.quality_grid import RESULTS_DIR
from benchmarks.results_md import notes_between, write_section
from benchmarks.summary_plot import plot
from benchmarks.summary_tables import checks, cost_table, findings, paired_table, quality_table, rescored_section, values

BEGIN, END = "<!-- placement_quality:begin -->", "<!-- placement_quality:end -->"
NOTES_BEGIN, NOTES_END = "<!-- placement_quality:notes:begin -->", "<!-- placement_quality:notes:end -->"
NOTES_PLACEHOLDER = (
    "_To be written by whoever ran the grid, from the tables above: what the numbers support, what they do not"
    " (e.g. differences inside the spread over seeds, one model, two tasks, short CPU runs, three `random`"
    " draws), and what would settle it. Until then, nothing here is a conclusion._"
)
ByTask = dict[str, dict[str, list[dict]]]  # task -> method -> its rows (one per seed)


# ---- reading -----------------------------------------------------------------------------------------------


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file; a line that is not JSON (a run killed while writing) is skipped with a warning."""

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


def by_task_and_method(latest: dict[tuple, dict]) -> ByTask:
    """The rows grouped by task and method, each method's in seed order (``base``, without a seed, first)."""
    by_task: ByTask = defaultdict(lambda: defaultdict(list))
    for (task, method, _seed), row in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] if kv[0][2] is not None else -1)):
        by_task[task][method].append(row)
    return by_task


# ---- the section of RESULTS.md -----------------------------------------------------------------------------


def rel(path: Path, start: Path) -> str:
    """``path`` relative to ``start``, with ``..`` where it lies outside it (a link that works from the Markdown)."""
    try:
        return str(Path(path).resolve().relative_to(start.resolve()))
    except ValueError:
        return os.path.relpath(Path(path).resolve(), start.resolve())


def setup_lines(config_id: str, rows: list[dict], settings: dict[str, Any], smoke: bool, results_path: Path) -> list[str]:
    """The section's title, a warning for a smoke run, where it came from, and the set-up every run shared."""
    out = [BEGIN, "", "## Placement quality: does automatic placement beat the usual choices?", ""]
    if smoke:
        out += [
            "> **SMOKE RUN.** Tiny settings (a few steps, a handful of held-out items, one seed) that only check that",
            "> the harness and this summary work end to end. These numbers are not evidence about placement.",
            "",
        ]
    return out + [
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


def task_lines(task: str, methods: dict[str, list[dict]], rescored: dict[tuple, dict], eval_items: int) -> list[str]:
    """One task's part: its config and budget, the quality and cost tables, the paired comparison and, where
    ``benchmarks.rescore`` scored the runs on more items, that evaluation."""
    sample = next((r for ms in methods.values() for r in ms if r.get("budget_params")), None) or next(
        r for ms in methods.values() for r in ms
    )
    budget = sample.get("budget_params")
    out = [f"### {task}", ""]
    if sample.get("task_config"):
        out += [f"Task config: `{json.dumps(sample['task_config'])}`." + (f" Budget: {budget:,} trainable parameters ({sample.get('reference')})." if budget else ""), ""]
    elif budget:
        out += [f"Task config: reasoning-gym defaults. Budget: {budget:,} trainable parameters ({sample.get('reference')}).", ""]
    out += quality_table(methods) + cost_table(methods)
    return out + paired_table(methods) + rescored_section(task, methods, rescored, eval_items)


def findings_lines(by_task: ByTask, plot_path: Path, md_path: Path, eval_items: int | None) -> list[str]:
    """The figure, and the generated statements about every task."""
    out = [
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
    for task in sorted(by_task):
        out += [f"**{task}**", ""] + [f"- {line}" for line in findings(task, by_task[task], eval_items)] + [""]
    return out


def problem_lines(latest: dict[tuple, dict], failed: list[dict], others: list[str]) -> list[str]:
    """The checks, the failed runs without a later success, and other settings in the file; nothing when clean."""
    problems = checks(latest)
    problems += [
        f"{r['task']} `{r['method']}` seed {r.get('seed')}: {r.get('status')} (exit {r.get('returncode')}), log `{r.get('log')}`."
        for r in failed
    ]
    if others:
        problems.append(f"The results file also holds runs with other settings ({', '.join(others)}), not shown here.")
    return (["**Checks**", ""] + [f"- {p}" for p in problems] + [""]) if problems else []


def module_command(command: str) -> str:
    """A recorded command as it runs today: ``python benchmarks/<script>.py ARGS`` (how runs before the scripts
    became the ``benchmarks`` package recorded themselves) is ``python -m benchmarks.<script> ARGS``."""
    return re.sub(r"^python benchmarks/(\w+)\.py(?=\s|$)", r"python -m benchmarks.\1", command)


def command_lines(recorded: list[dict], summarize_command: str) -> list[str]:
    """Every distinct command the rows recorded, in order, then this summary's: how to produce it all again."""
    commands: list[str] = []
    for r in recorded:
        if r.get("command") and module_command(r["command"]) not in commands:
            commands.append(module_command(r["command"]))
    return ["### Commands", "", "```bash"] + commands + [summarize_command, "```", ""]


def machine_lines(rows: list[dict]) -> list[str]:
    """The machines the runs ran on, how loaded they were, the commits and when the runs ran."""
    machines = []
    for r in rows:
        m = r.get("machine")
        if m and m not in machines:
            machines.append(m)
    out = ["### Machine", ""]
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
    return out


def section(
    config_id: str, latest: dict, failed: list[dict], others: list[str], plot_path: Path, md_path: Path,
    results_path: Path, summarize_command: str, notes: str, rescored: dict[tuple, dict] | None = None,
) -> str:  # fmt: skip
    """The whole placement-quality section of RESULTS.md, from its begin marker to its end marker."""
    rows = list(latest.values())
    by_task = by_task_and_method(latest)
    settings = next(r["settings"] for r in rows + failed if r.get("settings"))
    smoke = any(r.get("smoke") for r in rows + failed)
    out = setup_lines(config_id, rows, settings, smoke, results_path)
    for task in sorted(by_task):
        out += task_lines(task, by_task[task], rescored or {}, settings["eval_items"])
    out += findings_lines(by_task, plot_path, md_path, settings.get("eval_items"))
    out += problem_lines(latest, failed, others)
    out += ["### What the numbers do and do not show", "", NOTES_BEGIN, notes, NOTES_END, ""]
    out += command_lines(rows + failed + list((rescored or {}).values()), summarize_command)
    out += machine_lines(rows)
    out += ["", END]
    return "\n".join(out) + "\n"


def existing_notes(text: str) -> str | None:
    """The notes a person wrote into the section (not the placeholder), kept when the section is written again."""
    notes = notes_between(text, NOTES_BEGIN, NOTES_END)
    return notes if notes is not None and notes.strip() != NOTES_PLACEHOLDER else None


# ---- the command line --------------------------------------------------------------------------------------


def plot_rows(latest: dict[tuple, dict], rescored: dict[tuple, dict], config_id: str) -> tuple[ByTask, str]:
    """The rows the figure shows, and its title. It shows the larger evaluation where every run shown has one
    with the same number of items, else each run's own."""
    counts = {r["items"] for r in rescored.values()}
    plot_rescored = bool(rescored) and len(rescored) == len(latest) and len(counts) == 1
    by_task: ByTask = defaultdict(lambda: defaultdict(list))
    for key, row in latest.items():
        task, method, _seed = key
        by_task[task][method].append({**row, "accuracy": rescored[key]["accuracy"]} if plot_rescored else row)
    smoke = any(r.get("smoke") for r in latest.values())
    if plot_rescored:
        items = f"{counts.pop()} held-out items"
    else:
        items = f"{next(iter(latest.values()))['settings']['eval_items']} held-out items" if latest else ""
    title = f"Placement quality{' (SMOKE: not evidence)' if smoke else ''}: SmolLM2-135M-Instruct, settings {config_id}, {items}"
    return by_task, title


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Which results to summarize and where the section and the figure go."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.summarize", description="Summarize benchmarks.placement_quality's JSONL into RESULTS.md and a plot.")
    p.add_argument("--smoke", action="store_true", help="default to the smoke files (smoke.jsonl -> results/placement_quality/SMOKE.md)")
    p.add_argument("--results", type=Path, default=None, help="JSONL file (default benchmarks/results/placement_quality/results.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="Markdown file whose section is (re)written (default benchmarks/RESULTS.md)")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default benchmarks/results/placement_quality/accuracy_vs_params.png)")
    p.add_argument("--config_id", default=None, help="which settings hash to summarize (default: the newest row's)")
    p.add_argument("--rescore", type=Path, default=None, help="benchmarks.rescore's JSONL (default: rescore.jsonl beside the results, if there)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Read the rows, draw the figure and (re)write the section, keeping the notes a person wrote into it."""
    args = parse_args(argv)
    results = args.results or RESULTS_DIR / ("smoke.jsonl" if args.smoke else "results.jsonl")
    md_path = args.out or (RESULTS_DIR / "SMOKE.md" if args.smoke else REPO_ROOT / "benchmarks" / "RESULTS.md")
    plot_path = args.plot or RESULTS_DIR / ("smoke_accuracy_vs_params.png" if args.smoke else "accuracy_vs_params.png")
    config_id, latest, failed, others = select(load_rows(results), args.config_id)
    rescored = rescored_rows(args.rescore or results.with_name("rescore.jsonl"), config_id, latest)
    if latest:
        by_task, title = plot_rows(latest, rescored, config_id)
        plot(by_task, plot_path, title)
    command = command_line("benchmarks.summarize", argv)
    notes = existing_notes(md_path.read_text() if md_path.is_file() else "") or NOTES_PLACEHOLDER
    block = section(config_id, latest, failed, others, plot_path, md_path, results, command, notes, rescored)
    write_section(md_path, BEGIN, END, block)
    print(f"wrote {md_path} and {plot_path} ({len(latest)} runs, settings {config_id})")


if __name__ == "__main__":
    main()

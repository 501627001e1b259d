"""The race against the placements it chooses among: ``benchmarks/RESULTS.md``'s "Race" section.

Reads the placement-quality grid's rows (``benchmarks.placement_quality --methods race`` next to the fixed and
calibrated placements of the same settings) and, where the adapters were rescored on more held-out items
(``benchmarks.rescore``), those. For every task: the race's accuracy next to each candidate's own run; for every
race: its rounds, its winner, the candidate whose own run ended with the lowest validation loss, how well the
first round's validation losses ranked the candidates' final ones (Kendall's tau), and its overhead in steps and
in wall time (its finetune against its winner's own finetune, side by side in the same grid).

Every candidate of a race trains exactly as its own run (docs/methods.md section 5), so the race's adapter is its
winner's own run's adapter: the check column says whether the race and that run answered every held-out item
alike.

    python -m benchmarks.race_results          # -> the "Race" section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import benchmark_parser, read_jsonl
from benchmarks.quality_grid import RESULTS_DIR
from benchmarks.results_md import notes_between, write_section
from benchmarks.stats import kendall_tau

BEGIN, END = "<!-- race:begin -->", "<!-- race:end -->"
NOTES_BEGIN, NOTES_END = "<!-- race:notes:begin -->", "<!-- race:notes:end -->"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def latest_rows(path: Path) -> dict[tuple, dict[str, Any]]:
    """(config_id, task, method, seed) -> the newest ok row."""
    rows: dict[tuple, dict[str, Any]] = {}
    for row in read_jsonl(path):
        if row.get("status") == "ok":
            rows[(row["config_id"], row["task"], row["method"], row.get("seed"))] = row
    return rows


def rescored(path: Path) -> dict[tuple, dict[str, Any]]:
    """(config_id, task, method, seed, run_started) -> the rescoring with the most items."""
    out: dict[tuple, dict[str, Any]] = {}
    for row in read_jsonl(path):
        key = (row["config_id"], row["task"], row["method"], row.get("seed"), row.get("run_started"))
        if key not in out or row["items"] >= out[key]["items"]:
            out[key] = row
    return out


def scored(row: dict[str, Any], rescores: dict[tuple, dict[str, Any]]) -> tuple[float, int, list[float] | None]:
    """(accuracy, items, item scores) of a run: on the rescored items where there are, else the run's own."""
    again = rescores.get((row["config_id"], row["task"], row["method"], row.get("seed"), row.get("started")))
    if again is not None:
        return again["accuracy"], again["items"], again.get("item_scores")
    return row["accuracy"], row["eval_items"], row.get("item_scores")


def race_facts(race: dict[str, Any], rows: dict[tuple, dict[str, Any]], rescores: dict[tuple, dict[str, Any]]) -> dict[str, Any]:
    """One race against its candidates' own runs (same settings, task and seed)."""
    record = race["race"]
    own = {c["name"]: rows.get((race["config_id"], race["task"], c["name"], race["seed"])) for c in record["candidates"]}
    own = {name: row for name, row in own.items() if row is not None}
    final_loss = {name: row["val_loss"] for name, row in own.items()}
    first = record["rounds"][0]["val_loss"]
    common = sorted(set(first) & set(final_loss))
    winner = record["winner"]
    accuracy, items, _ = scored(race, rescores)
    winner_row = own.get(winner)
    facts = {
        "seed": race["seed"], "winner": winner, "accuracy": accuracy, "items": items,
        "best_final_loss": min(final_loss, key=final_loss.get) if final_loss else None,
        "best_accuracy": max(own, key=lambda n: scored(own[n], rescores)[0]) if own else None,
        "tau_first_round": kendall_tau({n: first[n] for n in common}, {n: final_loss[n] for n in common}) if len(common) > 1 else None,
        "overhead_steps": record["overhead_steps"], "steps": race["settings"]["steps"],
        "wall_ratio": race["finetune_s"] / winner_row["finetune_s"] if winner_row else None,
        # on the race's own held-out items (its first ``eval_items``), which every run of the grid answered
        "same_answers": winner_row.get("item_scores") == race.get("item_scores") if winner_row else None,
        "rounds": record["rounds"],
    }  # fmt: skip
    return facts


def accuracy_table(task_rows: dict[str, list[dict[str, Any]]], rescores: dict[tuple, dict[str, Any]]) -> list[str]:
    out = ["| placement | seeds | accuracy (%, mean ± standard error) | items |", "|---|---|---|---|"]
    for method in sorted(task_rows, key=lambda m: (m != "race", m)):
        values = [scored(row, rescores) for row in task_rows[method]]
        accuracies = [100 * a for a, _, _ in values]
        spread = f" ± {statistics.stdev(accuracies) / len(accuracies) ** 0.5:.1f}" if len(accuracies) > 1 else ""
        items = sorted({n for _, n, _ in values})
        name = f"**{method}**" if method == "race" else method
        out.append(f"| {name} | {len(values)} | {statistics.fmean(accuracies):.1f}{spread} | {'/'.join(map(str, items))} |")
    return out


def race_table(facts: list[dict[str, Any]]) -> list[str]:
    out = [
        "| seed | rounds (step: kept) | winner | lowest final val loss | most accurate | tau, round 1 vs final | overhead steps | finetune time vs the winner's own | same answers as the winner's own run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in facts:
        rounds = "; ".join(f"{r['step']}: {', '.join(r['kept'])}" for r in f["rounds"])
        tau = "-" if f["tau_first_round"] is None else f"{f['tau_first_round']:+.2f}"
        wall = "-" if f["wall_ratio"] is None else f"{f['wall_ratio']:.2f}x"
        same = {None: "-", True: "yes", False: "no"}[f["same_answers"]]
        overhead = f"{f['overhead_steps']} ({f['overhead_steps'] / f['steps']:.0%})"
        out.append(f"| {f['seed']} | {rounds} | {f['winner']} | {f['best_final_loss']} | {f['best_accuracy']} | {tau} | {overhead} | {wall} | {same} |")
    return out


def commits_line(task_rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Where the race and its candidates' own runs ran different code, a line that says so: their numbers are then
    not bit for bit comparable, and the last column compares across the versions."""
    commits = {kind: sorted({str(row.get("git_commit"))[:7] for method, rows in task_rows.items() for row in rows
                             if (method == "race") == (kind == "race")}) for kind in ("race", "own")}  # fmt: skip
    if commits["race"] == commits["own"]:
        return []
    return [f"The race ran at commit(s) {', '.join(commits['race'])}, its candidates' own runs at"
            f" {', '.join(commits['own'])}: not the same code, so their numbers are not bit for bit comparable.", ""]


def section(rows: dict[tuple, dict[str, Any]], rescores: dict[tuple, dict[str, Any]], command: str, notes: str | None = None) -> str:
    """The "Race" section: for every (settings, task) with race rows, the accuracy table and the races, then the
    ``notes`` a person wrote about them (kept from the section as it was)."""
    races = [row for row in rows.values() if row["method"] == "race" and row.get("race")]
    out = [BEGIN, "", "## Race: choosing the placement by training the candidates", "", f"Generated by `{command}` from the"
           " placement-quality grid's rows (`benchmarks/results/placement_quality/`); docs/methods.md section 5 has"
           " the rule.", ""]  # fmt: skip
    by_task: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for race in sorted(races, key=lambda r: (r["task"], r["seed"])):
        by_task[(race["config_id"], race["task"])].append(race)
    for (config_id, task), task_races in by_task.items():
        settings = task_races[0]["settings"]
        names = {c["name"] for race in task_races for c in race["race"]["candidates"]}
        seeds = {race["seed"] for race in task_races}
        task_rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for (cid, t, method, seed), row in sorted(rows.items(), key=lambda kv: str(kv[0])):
            if cid == config_id and t == task and seed in seeds and (method in names or method == "race"):
                task_rows[method].append(row)
        facts = [race_facts(race, rows, rescores) for race in task_races]
        out += [f"### {task} ({settings['steps']} steps, warm-up {settings['lr_warmup_steps']}, settings `{config_id}`)", ""]
        out += accuracy_table(task_rows, rescores) + [""] + race_table(facts) + [""] + commits_line(task_rows)
    out += ["### What the races show", "", NOTES_BEGIN, notes or "(not written yet)", NOTES_END, "", END, ""]
    return "\n".join(out)


def rewrite_section(module: str, doc: str, argv: list[str] | None, section_of: Callable[..., str],
                    markers: tuple[str, str, str, str], before: str | None = None) -> None:  # fmt: skip
    """A script that writes its section of RESULTS.md from the grid's rows: ``section_of(rows, rescores, command,
    notes)`` between the ``markers`` (begin, end, notes begin, notes end), keeping the notes a person wrote there."""
    begin, end, notes_begin, notes_end = markers
    parser = benchmark_parser(module, doc)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "results.jsonl")
    parser.add_argument("--rescore", type=Path, default=RESULTS_DIR / "rescore.jsonl")
    parser.add_argument("--md", type=Path, default=RESULTS_MD)
    args = parser.parse_args(argv)
    notes = notes_between(args.md.read_text(), notes_begin, notes_end) if args.md.is_file() else None
    block = section_of(latest_rows(args.results), rescored(args.rescore), f"python -m {module}", notes)
    write_section(args.md, begin, end, block, before=before)
    print(block)


def main(argv: list[str] | None = None) -> None:
    rewrite_section("benchmarks.race_results", __doc__, argv, section, (BEGIN, END, NOTES_BEGIN, NOTES_END))


if __name__ == "__main__":
    main()

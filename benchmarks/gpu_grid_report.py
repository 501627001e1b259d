"""``gpu_grid.json`` and ``gpu_grid.md`` from the GPU grid's rows: per task, each placement's mean and standard error
over seeds, paired item-by-item tests against the best fixed placement and against ``plop-inverse`` with Holm's
correction for the number of comparisons, and the race against its candidates' own runs.

The paired test: every placement answered the same held-out items; an item's score is averaged over the seeds
both placements ran, and an exact two-sided sign test counts the items where one placement does better than the
other (ties left out). Accuracy tasks: higher is better; the free-text task's answer NLL: lower is better. Holm's
step-down correction runs over all the comparisons of one task. Plain Python, like ``benchmarks.stats``.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.stats import kendall_tau, sign_test

FIXED = ("attention", "mlp", "all", "qv")  # the usual choices: the best of them is the bar
INVERSE = "plop-inverse"  # PLoP's opposite choice: what a score that means something must beat
RUN_FIELDS = ("task", "method", "seed", "eval_items", "accuracy", "nll", "item_scores", "trainable_params", "wall_s",
              "val_loss", "val_curve", "rank", "median_step_s", "cuda_peak_mib", "finetune_s")  # fmt: skip


def latest_ok(rows: list[dict[str, Any]], config_id: str | None) -> dict[tuple, dict[str, Any]]:
    """(task, method, seed) -> the newest ok row of ``config_id`` (of any, when None)."""
    out: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        if row.get("status") == "ok" and (config_id is None or row.get("config_id") == config_id):
            out[(row["task"], row["method"], row.get("seed"))] = row
    return out


def score_of(row: dict[str, Any]) -> float:
    return row["accuracy"] if row.get("accuracy") is not None else row["nll"]


def lower_is_better(rows: list[dict[str, Any]]) -> bool:
    return any(r.get("accuracy") is None and r.get("nll") is not None for r in rows)


def mean_se(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None)


def paired(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], lower: bool) -> dict[str, Any] | None:
    """Item-by-item over the seeds both ran: wins (items where ``a`` does better), losses, and the sign test."""
    seeds = sorted(set(a) & set(b))
    lists = [(a[s].get("item_scores"), b[s].get("item_scores")) for s in seeds]
    lists = [(x, y) for x, y in lists if x and y]
    if not lists:
        return None
    n = min(min(len(x), len(y)) for x, y in lists)
    wins = losses = 0
    for i in range(n):
        diff = statistics.fmean(x[i] for x, _ in lists) - statistics.fmean(y[i] for _, y in lists)
        diff = -diff if lower else diff
        wins += diff > 1e-12
        losses += diff < -1e-12
    return {"seeds": len(lists), "items": n, "wins": wins, "losses": losses, "p": sign_test(wins, losses)}


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given."""
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def task_summary(by_method: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """One task: per placement its mean ± SE, and its paired tests against the references, Holm-adjusted."""
    all_rows = [row for runs in by_method.values() for row in runs.values()]
    lower = lower_is_better(all_rows)
    means = {m: mean_se([score_of(r) for r in runs.values()]) for m, runs in by_method.items()}
    fixed = [m for m in FIXED if m in means]
    best_fixed = (min if lower else max)(fixed, key=lambda m: means[m][0]) if fixed else None
    tests = []
    for method in by_method:
        for reference in (best_fixed, INVERSE):
            if reference in by_method and reference != method:
                result = paired(by_method[method], by_method[reference], lower)
                if result is not None:
                    tests.append({"method": method, "reference": reference, **result})
    for test, adjusted in zip(tests, holm([t["p"] for t in tests])):
        test["p_holm"] = adjusted
    methods = {m: {"seeds": len(runs), "mean": means[m][0], "se": means[m][1],
                   "trainable_params": statistics.fmean(r["trainable_params"] for r in runs.values())}
               for m, runs in by_method.items()}  # fmt: skip
    return {"metric": "answer NLL (lower is better)" if lower else "accuracy", "best_fixed": best_fixed, "methods": methods, "tests": tests}


def race_summary(task: str, latest: dict[tuple, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each race of a task against its candidates' own runs of the same seed: did it keep the placement whose own
    run ended with the lowest validation loss, how early losses ranked them, what it cost."""
    out = []
    for (t, method, seed), race in sorted(latest.items(), key=lambda item: str(item[0])):
        if t != task or method != "race" or not race.get("race"):
            continue
        record = race["race"]
        own = {c["name"]: latest.get((task, c["name"], seed)) for c in record["candidates"]}
        final = {name: row["val_loss"] for name, row in own.items() if row and row.get("val_loss") is not None}
        first = record["rounds"][0]["val_loss"] if record["rounds"] else {}
        common = sorted(set(first) & set(final))
        winner_row = own.get(record["winner"])
        out.append({
            "seed": seed, "winner": record["winner"], "best_final_loss": min(final, key=final.get) if final else None,
            "tau_first_round": kendall_tau({n: first[n] for n in common}, {n: final[n] for n in common}) if len(common) > 1 else None,
            "overhead_steps": record["overhead_steps"], "steps": race["settings"]["steps"],
            "wall_ratio": race["finetune_s"] / winner_row["finetune_s"] if winner_row and winner_row.get("finetune_s") else None,
            "score": score_of(race), "winner_own_score": score_of(winner_row) if winner_row else None,
        })  # fmt: skip
    return out


def build(rows: list[dict[str, Any]], status: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The JSON record (status, device, every ok run, per-task summaries, races) and its Markdown."""
    config_id = (status.get("grid") or {}).get("config_id")
    latest = latest_ok(rows, config_id)
    tasks = list(dict.fromkeys(task for task, _, _ in latest))
    summaries, races = {}, {}
    for task in tasks:
        by_method: dict[str, dict[int, dict[str, Any]]] = {}
        for (t, method, seed), row in latest.items():
            if t == task:
                by_method.setdefault(method, {})[seed] = row
        summaries[task] = task_summary(by_method)
        races[task] = race_summary(task, latest)
    runs = [{**{k: row.get(k) for k in RUN_FIELDS}, "steps": (row.get("settings") or {}).get("steps")} for row in latest.values()]
    data = {**{k: v for k, v in status.items() if k != "steps"}, "step_seconds": status.get("steps"),
            "runs": runs, "summary": summaries, "race": races, "failed_runs": sum(r.get("status") != "ok" for r in rows)}  # fmt: skip
    return data, markdown(data)


def _pct_or_nll(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if metric.startswith("answer") else f"{100 * value:.1f}"


def task_lines(task: str, summary: dict[str, Any]) -> list[str]:
    metric = summary["metric"]
    unit = "answer NLL, nats/token" if metric.startswith("answer") else "accuracy, %"
    lines = [f"### {task} ({unit}; best fixed placement: {summary['best_fixed']})", "",
             "| placement | seeds | mean ± SE | trainable params | vs best fixed: better / worse items, p (Holm) | vs plop-inverse: better / worse items, p (Holm) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    by_pair = {(t["method"], t["reference"]): t for t in summary["tests"]}
    order = sorted(summary["methods"], key=lambda m: summary["methods"][m]["mean"], reverse=not metric.startswith("answer"))
    for method in order:
        m = summary["methods"][method]
        spread = "" if m["se"] is None else f" ± {_pct_or_nll(m['se'], metric)}"
        cells = []
        for reference in (summary["best_fixed"], INVERSE):
            t = by_pair.get((method, reference))
            cells.append("-" if t is None else f"{t['wins']} / {t['losses']}, p = {t['p_holm']:.3g}")
        lines.append(f"| {method} | {m['seeds']} | {_pct_or_nll(m['mean'], metric)}{spread} | {m['trainable_params']:,.0f} | {cells[0]} | {cells[1]} |")
    return lines + [""]


def race_lines(task: str, races: list[dict[str, Any]]) -> list[str]:
    if not races:
        return []
    lines = [f"Race on {task}:", "", "| seed | winner | lowest final val loss of its candidates' own runs | tau, round 1 vs final | overhead steps | finetune time vs the winner's own | race score | winner's own score |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in races:
        tau = "-" if r["tau_first_round"] is None else f"{r['tau_first_round']:+.2f}"
        wall = "-" if r["wall_ratio"] is None else f"{r['wall_ratio']:.2f}x"
        own = "-" if r["winner_own_score"] is None else f"{r['winner_own_score']:.3f}"
        lines.append(f"| {r['seed']} | {r['winner']} | {r['best_final_loss']} | {tau} | {r['overhead_steps']} ({r['overhead_steps'] / r['steps']:.0%}) | {wall} | {r['score']:.3f} | {own} |")
    hits = sum(r["winner"] == r["best_final_loss"] for r in races)
    return lines + ["", f"The race kept the placement with the lowest final validation loss in {hits} of {len(races)} races.", ""]


def markdown(data: dict[str, Any]) -> str:
    grid = data.get("grid") or {}
    settings = grid.get("settings") or {}
    lines = ["# GPU placement grid", "",
             f"Status: {data.get('status')}. Device: {data.get('gpu_name') or data.get('device')}; {len(data['runs'])} runs finished,"
             f" {data.get('failed_runs', 0)} failed rows, {data.get('not_started', 0)} not started; {data.get('elapsed_s')} s.",
             f"Command: `{data.get('command')}`. Commit: {data.get('git_commit')}.",
             f"Settings: {settings.get('steps')} steps, micro batch {settings.get('micro_batch')}, lr {settings.get('lr')}, rank r0"
             f" {settings.get('rank')} (every placement matched to {settings.get('reference')}'s parameters at r0), {settings.get('eval_items')}"
             f" held-out items per task; runs at once: {(data.get('parallel') or {}).get('runs_at_once')}, median run"
             f" {(data.get('parallel') or {}).get('median_run_s')} s; the runs not finished would take about"
             f" {(data.get('parallel') or {}).get('projected_s_left')} s more.", ""]  # fmt: skip
    for task, summary in data["summary"].items():
        lines += task_lines(task, summary) + race_lines(task, data["race"].get(task, []))
    return "\n".join(lines)

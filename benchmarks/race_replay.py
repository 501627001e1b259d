"""What a race would have chosen at any round length, replayed from its candidates' own runs.

Every candidate of a race trains exactly as its own run does (docs/methods.md section 5: same initial adapters,
batches, schedule and random stream), and a run of the placement-quality grid with ``--val_interval N`` records
its validation loss every N optimizer steps without changing its training
(``benchmarks.quality_worker.observing_validations``). So a race whose rounds end on that grid can be replayed
from the runs alone, for every round length at once, instead of being run once per budget. Two things come out,
for every task and seed where every candidate has such a run:

* how well the validation loss at step s ranks the candidates as their final validation loss does (Kendall's tau,
  and whether the best at s is the best at the end), for every recorded s: the race's one assumption;
* the replayed races: successive halving with ``eta`` (the race's default 2, and one round that keeps one, what
  a small budget falls back to), the first round ending at each recorded step after the warm-up, later rounds
  ``eta`` times longer, as ``litgpt_plop.race.schedule`` lays them out; per first round, the steps spent on
  losers, the winners, how often the winner is the candidate whose run ended with the lowest validation loss or
  was the most accurate, and the winner's accuracy next to the best fixed placement's.

The candidates are the race's defaults (``plop``, ``attention``, ``mlp``, ``all``, ``qv``, plus ``kappa`` and
``cka`` where their sites differ from PLoP's, as the race drops them).

    python -m benchmarks.placement_quality --tasks basic_arithmetic --steps 200 --train_size 1600 --val_interval 5 \\
        --threads 1 --methods plop attention mlp all qv cka kappa
    python -m benchmarks.race_replay        # -> the "Race, replayed" section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from benchmarks.gpu_grid_report import task_summary
from benchmarks.race_results import rewrite_section, scored
from benchmarks.stats import kendall_tau, placement_permutation_p, placement_share
from litgpt_plop.race.args import DEFAULT_CANDIDATES, OPTIONAL_CANDIDATES
from litgpt_plop.race.schedule import survivors

BEGIN, END = "<!-- race-replay:begin -->", "<!-- race-replay:end -->"
NOTES_BEGIN, NOTES_END = "<!-- race-replay:notes:begin -->", "<!-- race-replay:notes:end -->"
BEFORE = "<!-- race:begin -->"  # placed before the races that ran


def replay(curves: dict[str, dict[int, float]], first: int, eta: int) -> dict[str, Any] | None:
    """Successive halving over recorded validation curves (candidate -> step -> loss, in the candidates' order):
    rounds end at ``first * eta**r``, each keeps the ``survivors`` with the lowest loss (ties keep the candidates'
    order, as the race does). None where a round's step was not recorded for a candidate still in the race."""
    alive = list(curves)
    rounds, overhead = [], 0
    for r, keep in enumerate(survivors(len(alive), eta)):
        step = first * eta**r
        if any(step not in curves[name] for name in alive):
            return None
        ranked = sorted(alive, key=lambda name: curves[name][step])[:keep]
        overhead += (len(alive) - keep) * step
        rounds.append({"step": step, "kept": ranked})
        alive = ranked
    return {"winner": alive[0], "rounds": rounds, "overhead_steps": overhead}


def placement_of(row: dict[str, Any]) -> tuple:
    """What a run adapted, as its row records it: the kinds and how many layers (the grid's rows keep no site
    list; every method of the grid adapts its kinds on the same layers, all or CKA's)."""
    return tuple(row["kinds"]), row["n_layers"]


def candidates_of(runs: dict[str, dict[str, Any]]) -> list[str]:
    """The race's default candidates among ``runs`` (method -> row), ``kappa`` and ``cka`` only where their
    placement differs from PLoP's."""
    names = [n for n in DEFAULT_CANDIDATES if n in runs]
    plop = placement_of(runs["plop"]) if "plop" in runs else None
    names += [n for n in OPTIONAL_CANDIDATES if n in runs and placement_of(runs[n]) != plop]
    return names


def curve(row: dict[str, Any]) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in row.get("val_curve") or []}


def seed_facts(runs: dict[str, dict[str, Any]], rescores: dict[tuple, dict[str, Any]], etas: tuple[int, ...]) -> dict[str, Any]:
    """One seed of one task: the candidates' curves, taus and replayed races."""
    names = candidates_of(runs)
    curves = {n: curve(runs[n]) for n in names}
    final = {n: runs[n]["val_loss"] for n in names}
    scores = {n: scored(runs[n], rescores) for n in names}
    accuracy = {n: scores[n][0] for n in names}
    item_scores = {n: scores[n][2] for n in names}
    steps = sorted(set.intersection(*(set(c) for c in curves.values())))
    best_final = min(final, key=final.get)
    taus = {s: kendall_tau({n: curves[n][s] for n in names}, final) for s in steps}
    best_at = {s: min(names, key=lambda n: curves[n][s]) for s in steps}
    settings = runs[names[0]]["settings"]
    races = {}
    for eta in etas:
        for first in steps:
            if first <= settings["lr_warmup_steps"]:
                continue  # the race's rule: no round ends inside the warm-up
            race = replay(curves, first, eta)
            # rounds that end before the run, on losers no more steps than the run has
            if race is not None and race["rounds"][-1]["step"] < settings["steps"] and race["overhead_steps"] <= settings["steps"]:
                races[(eta, first)] = race
    return {"names": names, "steps": settings["steps"], "curves": curves, "final": final, "accuracy": accuracy, "item_scores": item_scores, "best_final": best_final,
            "most_accurate": max(accuracy, key=accuracy.get), "taus": taus, "best_at": best_at, "races": races}  # fmt: skip


def mean_se(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:+.2f} ± {statistics.stdev(values) / len(values) ** 0.5:.2f}" if len(values) > 1 else f"{mean:+.2f}"


def pct(values: list[float]) -> str:
    values = [100 * v for v in values]
    spread = f" ± {statistics.stdev(values) / len(values) ** 0.5:.1f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.1f}{spread}"


def against_usual_choice(facts: list[dict[str, Any]]) -> tuple[str | None, dict[str, str]]:
    """Each candidate against the most accurate of the usual choices (``attention``, ``mlp``, ``all``, ``qv``),
    item by item: the GPU grid's paired test (``benchmarks.gpu_grid_report.task_summary``: an item's score averaged
    over the seeds, an exact sign test, Holm's correction over the task's comparisons). Every seed answered the
    same held-out items. The best usual choice, and per candidate "better / worse items, p"."""
    by_method = {n: {i: {"accuracy": f["accuracy"][n], "item_scores": f["item_scores"][n], "trainable_params": 0}
                     for i, f in enumerate(facts)} for n in facts[0]["names"]}  # fmt: skip
    summary = task_summary(by_method)
    cells = {t["method"]: f"{t['wins']} / {t['losses']}, p = {t['p_holm']:.3g}" for t in summary["tests"] if t["reference"] == summary["best_fixed"]}
    return summary["best_fixed"], cells


def placement_effect(facts: list[dict[str, Any]]) -> list[str]:
    """Whether the placement, rather than the seed's luck, sets validation loss at a step and accuracy at the end:
    two-way analysis of variance over seeds (``benchmarks.stats.placement_share``). A race can only find at
    step s what the placement already decides at s."""
    if len(facts) < 2:
        return []
    names = facts[0]["names"]
    steps = sorted(set.intersection(*(set(f["taus"]) for f in facts)))
    out = ["", "How much of the spread the placement explains, seeds as blocks (partial omega squared: 0 = nothing beyond"
               " chance, 1 = all; p: the share of relabellings of the placements within each seed, all or 10,000 drawn,"
               " that explain as much):", "", "| at | placement's share (omega squared) | p | seed's share of the total |", "|---|---|---|---|"]  # fmt: skip
    rows = [(f"val loss, step {s}", {n: [f["curves"][n][s] for f in facts] for n in names}) for s in steps if s <= 30 or s % 20 == 0]
    rows.append(("final val loss", {n: [f["final"][n] for f in facts] for n in names}))
    rows.append(("held-out accuracy", {n: [f["accuracy"][n] for f in facts] for n in names}))
    for label, table in rows:
        share = placement_share(table)
        total = share["ss_placement"] + share["ss_seed"] + share["ss_residual"]
        seed_share = f"{share['ss_seed'] / total:.2f}" if total else "-"
        p = placement_permutation_p(table)
        out.append(f"| {label} | {share['omega2']:+.2f} | {f'{p:.3f}' if p >= 0.001 else '< 0.001'} | {seed_share} |")
    return out


def task_block(task: str, config_id: str, seeds: dict[int, dict[str, Any]], waiting: dict[int, list[str]] | None = None) -> list[str]:
    """One task's tables from the seeds where every candidate ran; ``waiting``: the other seeds and what they lack."""
    facts = list(seeds.values())
    lacking = "; ".join(f"seed {seed} lacks {', '.join(missing)}" for seed, missing in sorted((waiting or {}).items()))
    if not facts:
        return [f"### {task} (settings `{config_id}`)", "", f"No seed has run every candidate yet: {lacking}.", ""]
    names = facts[0]["names"]
    run_steps = facts[0]["steps"]
    settings_steps = sorted({s for f in facts for s in f["taus"]})
    out = [f"### {task} (settings `{config_id}`, seeds {', '.join(map(str, seeds))}; candidates {', '.join(names)})", ""]
    if waiting:
        out += [f"Not counted until their candidates have all run: {lacking}.", ""]
    usual, paired = against_usual_choice(facts)
    out += ["| placement | accuracy (%, mean ± standard error over seeds) | final val loss (mean) |"
            f" vs `{usual}`, the best usual choice: better / worse items, p (Holm) |", "|---|---|---|---|"]  # fmt: skip
    for n in sorted(names, key=lambda n: -statistics.fmean(f["accuracy"][n] for f in facts)):
        out.append(f"| {n} | {pct([f['accuracy'][n] for f in facts])} | {statistics.fmean(f['final'][n] for f in facts):.3f} | {paired.get(n, '-')} |")
    out += ["", "How validation loss at a step ranks the candidates as their final validation loss does:", "",
            "| step | Kendall's tau with the final order (mean ± standard error over seeds) | best then is best at the end |",
            "|---|---|---|"]  # fmt: skip
    for step in settings_steps:
        taus = [f["taus"][step] for f in facts if step in f["taus"]]
        agree = sum(f["best_at"][step] == f["best_final"] for f in facts if step in f["best_at"])
        out.append(f"| {step} | {mean_se(taus)} | {agree}/{len(taus)} |")
    out += placement_effect(facts)
    best_fixed = max(names, key=lambda n: statistics.fmean(f["accuracy"][n] for f in facts))
    out += ["", f"Replayed races (best fixed placement by mean accuracy: `{best_fixed}`, {pct([f['accuracy'][best_fixed] for f in facts])}%):", "",
            "| eta | rounds end at | steps on losers (of the run) | winners by seed | winner has the lowest final val loss |"
            " winner is the most accurate | race accuracy (%) |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = sorted({k for f in facts for k in f["races"]})
    for eta, first in keys:
        played = [(f, f["races"][(eta, first)]) for f in facts if (eta, first) in f["races"]]
        race = played[0][1]
        ends = ", ".join(str(r["step"]) for r in race["rounds"])
        winners = ", ".join(r["winner"] for _, r in played)
        lowest = sum(r["winner"] == f["best_final"] for f, r in played)
        accurate = sum(f["accuracy"][r["winner"]] == f["accuracy"][f["most_accurate"]] for f, r in played)
        accuracy = pct([f["accuracy"][r["winner"]] for f, r in played])
        overhead = race["overhead_steps"]
        out.append(f"| {eta} | {ends} | {overhead} ({overhead / run_steps:.0%}) | {winners} | {lowest}/{len(played)} |"
                   f" {accurate}/{len(played)} | {accuracy} |")  # fmt: skip
    return out + [""]


def section(rows: dict[tuple, dict[str, Any]], rescores: dict[tuple, dict[str, Any]], command: str,
            notes: str | None = None, etas: tuple[int, ...] = (2,)) -> str:  # fmt: skip
    """The "Race, replayed" section: every (settings, task) whose runs have validation curves, seeds where every
    candidate ran."""
    grouped: dict[tuple, dict[int, dict[str, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for (config_id, task, method, seed), row in rows.items():
        if len(row.get("val_curve") or []) > 1 and method != "race":
            grouped[(config_id, task)][seed][method] = row
    out = [BEGIN, "", "## Race, replayed: does early validation loss pick the placement that ends best?", "",
           f"Generated by `{command}` from the placement-quality grid's runs with validation curves"
           " (`--val_interval`); how the replay works is in `benchmarks/race_replay.py`.", ""]  # fmt: skip
    if not grouped:
        out += ["No runs with validation curves yet.", ""]
    for (config_id, task), by_seed in sorted(grouped.items(), key=lambda kv: kv[0][1]):
        # the seeds with the most candidates count; a seed still missing some waits (its race would be another race)
        names = {seed: candidates_of(runs) for seed, runs in by_seed.items() if "plop" in runs}
        full = max(names.values(), key=len, default=[])
        if len(full) < 2:
            continue
        full = [*full, *(n for n in DEFAULT_CANDIDATES if n not in full)]  # no seed counts before every default candidate ran
        one_round = len(full)  # eta = the number of candidates: one round that keeps one
        facts = {seed: seed_facts(by_seed[seed], rescores, tuple(dict.fromkeys((*etas, one_round))))
                 for seed in sorted(by_seed) if names.get(seed) == full}  # fmt: skip
        # a seed with every run but another candidate list: its kappa or cka placed PLoP's sites, or differently
        waiting = {seed: [n for n in full if n not in by_seed[seed]] or ["the other seeds' candidate list (kappa or cka placed differently)"]
                   for seed in by_seed if seed not in facts}  # fmt: skip
        out += task_block(task, config_id, facts, waiting)
    out += ["### What the replays show", "", NOTES_BEGIN, notes or "(not written yet)", NOTES_END, "", END, ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    rewrite_section("benchmarks.race_replay", __doc__, argv, section, (BEGIN, END, NOTES_BEGIN, NOTES_END), before=BEFORE)


if __name__ == "__main__":
    main()

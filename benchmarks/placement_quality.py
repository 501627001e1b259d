"""Evidence for the issue "does automatic placement beat the usual choices": a placement x task x seed grid.

Finetunes SmolLM2-135M-Instruct (the embedded checkpoint) with ``litgpt_plop.commands.finetune.setup`` once per
(task, method, seed), each run in a fresh subprocess (its peak RSS is measured with ``os.wait4``, and a crash or
timeout in one run is recorded and does not stop the grid), then scores held-out items with greedy generation.
Results are appended as JSON lines to ``--out``; a rerun skips every (task, method, seed, settings) already
recorded as ``ok`` (failed runs are retried), so the grid can be stopped and resumed at any time.
``python -m benchmarks.summarize`` turns the file into ``benchmarks/RESULTS.md`` and a plot.

Methods (``--methods``): the ``litgpt-plop finetune --plugin`` of the same name, all candidates = every linear
but the head (7 kinds x 30 layers on SmolLM2-135M):

    qv, attention, mlp, all, random      fixed kinds on every layer
    plop, plop-inverse                   3 kinds chosen by calibration (lowest / highest NFN), every layer
    cka                                  every kind on half the layers (--cka.ratio 0.5), chosen by calibration
    plop+cka                             PLoP's 3 kinds on CKA's half of the layers
    kappa                                3 kinds with the lowest condition number, every layer (weights only, no data)
    weightlora, weightlora+              K gated adapters learned during a warm-up (a quarter of the steps)
    all@r0                               ``all`` at the reference rank r0: the unmatched "everything" reference
    base                                 no finetuning: the pretrained model's accuracy (once per task, no seed)

Matching trainable parameters (docs/methods.md section 1: "at matched trainable-parameter counts (rank adjusted)")
------------------------------------------------------------------------------------------------------------------
* The budget B of a task is what ``--reference`` costs at rank r0 (``--rank``, default 8). Default reference:
  ``plop``, PLoP's default decision (its 3 lowest-NFN kinds on all 30 layers) at r0, as in the paper, where PLoP
  runs at its usual rank and the baselines are rank-adjusted to it. B therefore depends on the task (PLoP may
  choose other kinds for another task's prompts). ``--reference qv`` instead uses LitGPT's default (q and v at r0:
  460,800 parameters on SmolLM2-135M, the same for every task); then PLoP too is rank-adjusted.
* A method that puts one rank r on a known set of sites costs P(r) = r * P1, P1 = sum over its sites of
  (d_in + d_out). Its rank is the integer r >= 1 whose P(r) is closest to B: r = max(1, round(B / P1)).
* The sites of ``plop``, ``plop-inverse`` and ``plop+cka`` come from calibration (and ``kappa``'s from the
  weights), so they are learned first:
  before the first run of a task, ``litgpt_plop.plan.plan`` (what ``litgpt-plop plan`` runs; ~10 s per method
  for basic_arithmetic on an idle machine, longer for gsm_symbolic's longer prompts) is run once per task
  (cached in the run directory) in a subprocess for those methods with exactly the calibration settings the finetune uses, and the
  rank is set from the sites it chose. ``--plop.budget`` is NOT used: it keeps rank r0 and changes the number of
  kinds (greedily, so it undershoots by up to one kind), which is a different method from the paper's
  "3 kinds, rank adjusted". After each run the harness checks that the finetune chose the same sites as the plan
  (``sites_match_plan``) and records the parameters the run really trained.
* ``cka``: every kind on round(0.5 * 30) = 15 layers: P1 known without calibration. ``random``: the finetune
  draws its 3 kinds with ``preset("random", seed=--seed)``, so each seed has its own draw (on SmolLM2: seed 0
  key, value, mlp_fc_1; seed 1 projection, mlp_fc_2, mlp_proj; seed 2 key, value, projection); the harness makes the
  same draw and matches the rank per seed.
* ``weightlora`` / ``weightlora+``: rank r0 (WeightLoRA+ grows the survivors to 4 r0 itself), K =
  round(B / (r0 * mean P1 of one candidate adapter)), so K adapters of average size cost about B. Which adapters
  survive (and so the exact count) is decided while training; the recorded count is the final placement's.
  WeightLoRA+ starts with the same K and keeps K // 4 at rank 4 r0 (the same budget).
* ``lora_alpha`` follows the rank, alpha = r * (16 / r0) (``--alpha_rule ratio``), so every method has the
  same LoRA scale alpha / r = 2 and rank adjustment changes capacity, not the step size; ``--alpha_rule fixed``
  keeps alpha = 16 for every rank instead.

Per run (one JSON line): held-out exact-match accuracy (greedy, the task's own scorer, the prompt style the
checkpoint was trained with: ``litgpt_plop.commands.demo.accuracy``'s procedure, plus the mean partial-credit score),
final validation loss (on the same held-out items), trainable parameters (the final ``placement.json``; for
WeightLoRA also the gated count during the warm-up, from ``metrics.csv``), the rank, the budget, calibration
seconds (``placement.json``'s calibration record), median training-step time (``metrics.csv`` ``iter_time``), the
run's peak RSS (``os.wait4`` of the subprocess: model load, calibration, training, merge and evaluation) and the
peak at the end of finetuning (before evaluation), wall times, the machine's load average before and after.

Seeds: ``--seeds`` changes ``finetune``'s seed (LoRA initialisation, dropout) and the order of the training
batches (the shuffling seed of the same training items). The training items, the held-out items and the
calibration prompts stay the same, so every run of a task is scored on the same questions. ``random``'s kinds
change with the seed too (see above).

Resuming: a (task, method, seed) counts as done only if its newest ``ok`` row ran the rank (and, for the fixed
kinds, the kinds) that the matching asks for now; a row recorded with another rank is run again and the new row
supersedes it (``benchmarks.summarize`` uses the newest ``ok`` row of each run). After a fix in a method,
``--rerun METHOD --rerun_before TIME`` runs that method's rows started before TIME again.

Sizing (defaults, per run on 2 idle CPU cores): micro batch = global batch = 8, 100 optimizer steps (800
training examples, one pass over ``--train_size 800``), lr 2e-3 AdamW with 10 warm-up steps then cosine, 40
held-out items (validation loss and accuracy), 16 new tokens at most, 64 calibration prompts. basic_arithmetic
(~45 tokens per example): ~2.5 s/step -> ~4 min of training + ~1 min calibration/merge + ~1-2 min evaluation,
about 7 minutes; chain_sum's prompts are about as long. Full default grid (basic_arithmetic and
chain_sum): 2 tasks x 12 methods x 3 seeds = 72 runs + 2 base evaluations: roughly 8-9 hours. gsm_symbolic
(``--tasks gsm_symbolic``; ~100 tokens, up to ~190) is about 2-3x slower per run, 10-15 minutes.

What RESULTS.md reports was run at half that length, two harness processes side by side with one torch thread
each (about 4-6 minutes per run on 2 cores, 2 runs at a time):

    python -m benchmarks.placement_quality --tasks basic_arithmetic chain_sum --steps 50 --train_size 400 --threads 1 \
        --methods base qv attention mlp all random all@r0 &
    python -m benchmarks.placement_quality --tasks basic_arithmetic chain_sum --steps 50 --train_size 400 --threads 1 \
        --methods plop plop-inverse cka plop+cka weightlora weightlora+      # start once the first has planned
    python -m benchmarks.rescore --items 200         # the same trained runs on 200 held-out items (no training)
    python -m benchmarks.summarize

    # the full grid (resumable; Ctrl-C and rerun the same command to continue)
    python -m benchmarks.placement_quality
    python -m benchmarks.summarize                       # -> benchmarks/RESULTS.md + plot

    # a smoke check of the harness (base, qv and plop, 1 seed, 5 steps, 8 items: minutes, numbers mean nothing)
    python -m benchmarks.placement_quality --smoke
    python -m benchmarks.summarize --smoke

    # only print the parameter matching (runs the three cheap PLoP/CKA plans per task, no training)
    python -m benchmarks.placement_quality --dry_run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DEFAULT_CHECKPOINT,
    REPO_ROOT,
    append_jsonl,
    call_worker,
    command_line,
    git_commit,
    log_tail,
    machine,
    write_json,
)
from benchmarks.quality_grid import (
    EXTRA_METHODS,
    FULL,
    METHODS,
    PLANNED,
    RACE,
    REFERENCES,
    RESULTS_DIR,
    SMOKE,
    TASK_CONFIGS,
    WEIGHTLORA,
    Settings,
    entry_for,
    is_done,
    is_stale,
    matching,
    print_matching,
    recorded_rows,
    settings_for,
)

WORKER = "benchmarks.quality_worker"  # the module that runs one job in its own process


@dataclasses.dataclass
class Grid:
    """One invocation of the grid: what it runs, where its rows and run directories go, the matching per task,
    and what every row records about where it came from."""

    args: argparse.Namespace
    settings: Settings
    tasks: list[str]
    methods: list[str]
    seeds: list[int]
    out: Path
    work_dir: Path
    command: str
    machine: dict[str, Any]
    commit: str | None
    matches: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def config_id(self) -> str:
        """The settings hash: part of every row's key and of the run directories' path."""
        return self.settings.config_id()

    @property
    def finetuned(self) -> list[str]:
        """The methods that train (all but ``base``), and so need the matching."""
        return [m for m in self.methods if m != "base"]


# ---- one job in its own process ----------------------------------------------------------------------------


def run_job(spec: dict[str, Any], run_dir: Path, timeout: float, quiet: bool) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Run one job of ``benchmarks.quality_worker`` on ``spec`` in a fresh interpreter, its output in
    ``run_dir/log.txt`` (or the console) and its report in ``run_dir/result.json``. Returns (the report, or None
    when the job failed, timed out or wrote none; the process facts every row records)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "log.txt"
    result, run = call_worker(
        WORKER, spec, report=run_dir / "result.json", log=log_path if quiet else None, console=not quiet, timeout=timeout
    )
    facts: dict[str, Any] = {
        "returncode": run.returncode,
        "timed_out": run.timed_out,
        "wall_s": round(run.wall_s, 2),
        "peak_rss_mb": round(run.peak_rss_mib, 1),
        "cpu_user_s": round(run.cpu_user_s, 1),
        "cpu_sys_s": round(run.cpu_sys_s, 1),
        "cpu_per_wall": round(run.cpu_per_wall, 2),
        "log": str(log_path.relative_to(REPO_ROOT)) if log_path.is_relative_to(REPO_ROOT) else str(log_path),
    }
    if run.ok and result is not None:
        return result, facts
    if not quiet:
        facts["error_tail"] = "(see the console)"
    elif log_path.is_file():
        facts["error_tail"] = log_tail(log_path)
    return None, facts


def base_spec(task: str, settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """What every job of a task shares: the checkpoint, the data, the scoring and calibration settings."""
    return {
        "checkpoint_dir": str(args.checkpoint_dir),
        "task": task,
        "task_config": TASK_CONFIGS.get(task),
        "train_size": settings.train_size,
        "val_size": settings.eval_items,
        "data_seed": settings.data_seed,
        "eval_items": settings.eval_items,
        "max_new_tokens": settings.max_new_tokens,
        "calibration_samples": settings.calibration_samples,
        "cka_ratio": settings.cka_ratio,
        "rank": settings.rank,
        "threads": args.threads,
        "eval_batch": getattr(args, "eval_batch", None),
    }


def load_plans(task: str, settings: Settings, args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """The PLoP / PLoP^-1 / PLoP+CKA / kappa decisions of a task (cached in the work directory)."""
    path = work_dir / task / "plans.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if all(method in cached for method in PLANNED):  # a cache from before a method was added is planned again
            return cached
    print(f"== {task}: planning {', '.join(PLANNED)} to learn their sites (calibration only)", flush=True)
    run_dir = work_dir / task / "plans"
    spec = {**base_spec(task, settings, args), "mode": "plan", "methods": list(PLANNED), "run_dir": str(run_dir)}
    result, facts = run_job(spec, run_dir, args.timeout, args.quiet)
    if result is None:
        raise RuntimeError(f"Planning {task} failed (exit {facts['returncode']}); log: {facts['log']}\n{facts.get('error_tail', '')}")
    result = {method: result[method] for method in PLANNED}
    write_json(path, result)
    return result


def plans_cache(work_dir: Path, task: str) -> dict[str, Any]:
    """A task's plans as ``load_plans`` cached them: what a finished run's sites are checked against."""
    return json.loads((work_dir / task / "plans.json").read_text())


# ---- the command line --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The grid's options; every one left out takes the full grid's default (or the smoke profile's)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.placement_quality",
        description=(
            "Placement-quality grid: finetune SmolLM2-135M-Instruct on reasoning-gym tasks with each LoRA placement at"
            " matched trainable parameters, over seeds; one subprocess per run; results as JSON lines (resumable)."
            " See the module docstring for how parameters are matched."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__[__doc__.index("    # the full grid"):],
    )
    p.add_argument("--tasks", nargs="+", default=None, help=f"reasoning-gym tasks (default: {FULL['tasks']}; smoke: {SMOKE['tasks']})")
    p.add_argument(
        "--methods", nargs="+", default=None, choices=list(METHODS) + list(EXTRA_METHODS), metavar="METHOD",
        help=f"placements to run, from {list(METHODS) + list(EXTRA_METHODS)} (default: all of them; smoke: {SMOKE['methods']})",
    )  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: 0 1 2; smoke: 0)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 100; smoke 5)")
    p.add_argument("--micro_batch", type=int, default=None, help="examples per step (= global batch; default 8)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 2e-3)")
    p.add_argument("--rank", type=int, default=None, help="reference rank r0 (default 8)")
    p.add_argument("--reference", choices=REFERENCES, default=None, help="what sets the budget: plop (default) or qv at r0")
    p.add_argument("--alpha_rule", choices=("ratio", "fixed"), default=None, help="ratio (default): alpha = 2 r; fixed: alpha = 2 r0")
    p.add_argument("--eval_items", type=int, default=None, help="held-out items for accuracy and val loss (default 40; smoke 8)")
    p.add_argument("--train_size", type=int, default=None, help="training items (default 800; smoke 64)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="generation budget per answer (default 16)")
    p.add_argument("--val_interval", type=int, default=None, help="also validate every N optimizer steps: the run's validation curve, for benchmarks.race_replay (default 0: only at the end)")
    p.add_argument("--calibration_samples", type=int, default=None, help="calibration prompts (default 64; smoke 16)")
    p.add_argument("--out", type=Path, default=None, help="JSONL results file (default benchmarks/results/placement_quality/results.jsonl; smoke: smoke.jsonl)")
    p.add_argument("--work_dir", type=Path, default=None, help="run directories (default benchmarks/results/placement_quality/runs/<full|smoke>)")
    p.add_argument("--checkpoint_dir", type=Path, default=DEFAULT_CHECKPOINT, help="LitGPT checkpoint to finetune (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--smoke", action="store_true", help="tiny settings to check the harness end to end (numbers mean nothing)")
    p.add_argument("--dry_run", action="store_true", help="plan and print the parameter matching, train nothing")
    p.add_argument("--no_retry_failed", action="store_true", help="also skip runs recorded as failed")
    p.add_argument("--rerun", nargs="+", default=[], metavar="METHOD", help="run these methods again where their newest ok row started before --rerun_before (after a fix in the method; the new row supersedes)")
    p.add_argument("--rerun_before", default=None, metavar="TIME", help="local time as the rows record it, e.g. 2026-11-23T02:12:00 (needed with --rerun)")
    p.add_argument("--keep_checkpoints", action="store_true", help="keep each run's merged lit_model.pth (~0.5 GB each)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed and recorded as failed (default 3600)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's choice)")
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=True, help="send each run's output to its log.txt (default) or to the console")
    return p.parse_args(argv)


def make_grid(args: argparse.Namespace, argv: list[str] | None) -> Grid:
    """The grid this invocation runs: its tasks, methods and seeds, and where results and run directories go
    (run directories under the settings hash, so runs of other settings never overwrite each other)."""
    settings = settings_for(vars(args), args.smoke)
    profile = SMOKE if args.smoke else FULL
    name = "smoke" if args.smoke else "full"
    out = args.out or RESULTS_DIR / ("smoke.jsonl" if args.smoke else "results.jsonl")
    work_root = args.work_dir or RESULTS_DIR / "runs"
    if args.work_dir is None:
        work_root.mkdir(parents=True, exist_ok=True)
        (work_root / ".gitignore").write_text("*\n")  # run directories are bulky scratch, never committed
    grid = Grid(
        args=args,
        settings=settings,
        tasks=args.tasks or profile["tasks"],
        methods=args.methods or profile["methods"],
        seeds=args.seeds if args.seeds is not None else profile["seeds"],
        out=out,
        work_dir=(work_root / name / settings.config_id()).resolve(),
        command=command_line("benchmarks.placement_quality", argv),
        machine=machine(),
        commit=git_commit(),
    )
    for task in grid.tasks:
        if task not in TASK_CONFIGS:
            print(f"note: {task!r} has no preset config here; using reasoning-gym's defaults", flush=True)
    print(f"placement_quality: config {grid.config_id} ({name}); results -> {out}; runs -> {grid.work_dir}", flush=True)
    print(f"settings: {json.dumps(dataclasses.asdict(settings))}", flush=True)
    return grid


# ---- the grid ----------------------------------------------------------------------------------------------


def plan_and_match(grid: Grid) -> None:
    """Plan each task's calibrated methods (cached) and match every method's rank to the task's budget."""
    if not grid.finetuned:
        return
    for task in grid.tasks:
        plans = load_plans(task, grid.settings, grid.args, grid.work_dir)
        grid.matches[task] = matching(task, grid.settings, plans, grid.args.checkpoint_dir, grid.seeds)
        print_matching(grid.matches[task], grid.finetuned)


def pending_jobs(grid: Grid) -> list[tuple[str, str, int | None]]:
    """The (task, method, seed) jobs still to run, seed-major: a grid stopped early still has every task x method
    for the first seeds. A job is done when its newest recorded row ran what the matching asks for now."""
    recorded = recorded_rows(grid.out, include_failed=grid.args.no_retry_failed)
    jobs: list[tuple[str, str, int | None]] = [(task, "base", None) for task in grid.tasks if "base" in grid.methods]
    jobs += [(task, method, seed) for seed in grid.seeds for task in grid.tasks for method in grid.finetuned]
    if grid.args.rerun and not grid.args.rerun_before:
        raise SystemExit("--rerun needs --rerun_before TIME: the rows started before it are run again")
    todo = []
    for task, method, seed in jobs:
        row = recorded.get((grid.config_id, task, method, seed))
        wanted = None if method == "base" else entry_for(grid.matches[task], method, seed)
        if not is_done(row, method, wanted) or is_stale(row, method, grid.args.rerun, grid.args.rerun_before):
            todo.append((task, method, seed))
    print(f"\n{len(jobs)} runs, {len(jobs) - len(todo)} already done in {grid.out}, {len(todo)} to go", flush=True)
    return todo


def job_spec(grid: Grid, task: str, method: str, seed: int | None, run_dir: Path) -> dict[str, Any]:
    """What the worker is to do for one job: the task's shared spec, and for a finetune its matched rank, alpha
    (and K), its seeds and the training settings."""
    settings, args = grid.settings, grid.args
    spec = {**base_spec(task, settings, args), "mode": "base" if method == "base" else "finetune"}
    if method != "base":
        m = entry_for(grid.matches[task], method, seed)
        spec.update(
            plugin=m["plugin"], rank=m["rank"], alpha=m["alpha"], seed=seed, shuffle_seed=settings.data_seed + 1000 * (seed + 1),
            steps=settings.steps, micro_batch=settings.micro_batch, lr=settings.lr, lr_warmup_steps=settings.lr_warmup_steps,
            max_seq_length=settings.max_seq_length, lora_dropout=settings.lora_dropout, keep_checkpoints=args.keep_checkpoints,
            val_interval=settings.val_interval,
        )  # fmt: skip
        if method in WEIGHTLORA:
            spec.update(k=m["k"], warmup_steps=m["warmup_steps"])
        if method in RACE:
            spec["reference"] = settings.reference
    spec["run_dir"] = str(run_dir)
    return spec


def job_row(grid: Grid, task: str, method: str, seed: int | None) -> dict[str, Any]:
    """A job's row before it runs: its key, its settings and, for a finetune, what the matching predicts."""
    row: dict[str, Any] = {
        "config_id": grid.config_id,
        "task": task,
        "method": method,
        "seed": seed,
        "smoke": grid.settings.smoke,
        "settings": dataclasses.asdict(grid.settings),
        "task_config": TASK_CONFIGS.get(task),
    }
    if method != "base":
        match = grid.matches[task]
        m = entry_for(match, method, seed)
        row.update(
            plugin=m["plugin"], rank=m["rank"], alpha=m["alpha"], k=m.get("k"), budget_params=match["budget"],
            reference=f"{match['reference']}@r{match['rank0']}", expected_params=m["expected_params"],
        )  # fmt: skip
    return row


def run_dir_of(grid: Grid, task: str, method: str, seed: int | None) -> Path:
    """A job's run directory: ``<work_dir>/<task>/<method>/seed<N>`` (``base`` instead of ``seed<N>`` for the
    pretrained model), with ``+`` and ``@`` spelled out in the method's name."""
    return grid.work_dir / task / method.replace("+", "_plus").replace("@", "_at_") / ("base" if seed is None else f"seed{seed}")


def job_label(index: int, total: int, task: str, method: str, seed: int | None, spec: dict[str, Any]) -> str:
    """The console line that announces a job: its place in the queue, and for a finetune its rank (and K)."""
    label = f"[{index}/{total}] {task} {method}" + ("" if seed is None else f" seed {seed}")
    if method != "base":
        label += f" (rank {spec['rank']}{', K ' + str(spec['k']) if 'k' in spec else ''})"
    return label


def run_one(grid: Grid, index: int, total: int, task: str, method: str, seed: int | None) -> None:
    """Run one job in a fresh run directory and append its row (also for a failure or a timeout)."""
    run_dir = run_dir_of(grid, task, method, seed)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    spec = job_spec(grid, task, method, seed, run_dir)
    row = job_row(grid, task, method, seed)
    print(f"{job_label(index, total, task, method, seed, spec)} ...", flush=True)
    load_before = os.getloadavg()
    started = time.time()
    result, facts = run_job(spec, run_dir, grid.args.timeout, grid.args.quiet)
    row.update(
        status="ok" if result is not None else ("timeout" if facts["timed_out"] else "failed"),
        **(result or {}),
        **facts,
        loadavg_before=[round(x, 2) for x in load_before],
        loadavg_after=[round(x, 2) for x in os.getloadavg()],
        started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        machine=grid.machine,
        git_commit=grid.commit,
        command=grid.command,
        run_dir=str(run_dir.relative_to(REPO_ROOT)) if run_dir.is_relative_to(REPO_ROOT) else str(run_dir),
    )
    if result is not None and method in PLANNED:
        plan_sites = sorted(map(tuple, plans_cache(grid.work_dir, task)[method]["sites"]))
        row["sites_match_plan"] = sorted(map(tuple, result["sites"])) == plan_sites
    if result is not None and method != "base":
        row["params_vs_budget"] = round(row["trainable_params"] / row["budget_params"] - 1, 4)
    row.pop("sites", None)
    append_jsonl(grid.out, row)
    print_outcome(row, method, facts, ok=result is not None)


def print_outcome(row: dict[str, Any], method: str, facts: dict[str, Any], ok: bool) -> None:
    """The console lines after a job: its numbers, or how it failed and the end of its log."""
    if not ok:
        print(f"    {row['status']} (exit {facts['returncode']}) after {facts['wall_s']:.0f}s; log: {facts['log']}", flush=True)
        for line in (facts.get("error_tail") or "").strip().splitlines()[-5:]:
            print(f"    | {line}", flush=True)
        return
    score = f"acc {row['accuracy']:.3f}" if row.get("accuracy") is not None else f"answer NLL {row['nll']:.3f}"
    parts = [f"{score} ({row['eval_items']} items)"]
    if method != "base":
        parts += [
            f"val loss {row['val_loss']:.3f}" if row.get("val_loss") is not None else "val loss n/a",
            f"params {row['trainable_params']:,} ({row['params_vs_budget']:+.1%} vs budget)",
            f"step {row['median_step_s']:.2f}s" if row.get("median_step_s") else "step n/a",
        ]
        if row.get("calibration_s") is not None:
            parts.append(f"calibration {row['calibration_s']:.1f}s")
        if row.get("sites_match_plan") is False:
            parts.append("SITES DIFFER FROM THE PLAN")
    parts += [f"peak RSS {row['peak_rss_mb']:.0f} MB", f"{row['wall_s']:.0f}s"]
    print("    " + ", ".join(parts), flush=True)


def main(argv: list[str] | None = None) -> None:
    """Plan and match every task, then run each job not yet recorded, appending one row per job."""
    args = parse_args(argv)
    grid = make_grid(args, argv)
    plan_and_match(grid)
    if args.dry_run:
        return
    todo = pending_jobs(grid)
    for index, (task, method, seed) in enumerate(todo, 1):
        run_one(grid, index, len(todo), task, method, seed)
    print(f"\ndone; summarize with: python -m benchmarks.summarize{' --smoke' if args.smoke else ''} --results {grid.out}", flush=True)


if __name__ == "__main__":
    main()

"""What a calibration pass costs, relative to a plain no-grad forward over the same batches.

On SmolLM2-135M-Instruct with reasoning-gym prompts (the model's chat style), for PLoP, CKA (``last`` and
``tokens`` pooling) and PLoP+CKA:

* wall time of ``plan_placement`` (the pass, the scores, the selection) / wall time of a plain forward.
  Measured in this process, all modes alternating (the order rotates every repetition), median per mode:
  a shared machine's load drifts, so only ratios taken side by side mean anything.
* peak memory / the plain forward's peak. Each measurement runs in a fresh subprocess (freed memory that
  malloc keeps for reuse would hide later peaks in a shared process): it loads the model, makes its weights
  resident, resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5, falling back to a 1 ms
  sampling thread where that is not allowed), runs the pass, and reads ``VmHWM``. Two figures: the peak RSS
  of the process (model included), and the increase of RSS over the level just before the pass (what the
  pass itself adds).

Two forward baselines: ``forward`` is the plain model call (it computes the vocabulary-sized logits);
``forward_blocks`` stops before ``ln_f`` as the calibration pass does (same compute as the pass without the
hooks): the fair floor, which the time goals refer to (issue #17): PLoP and PLoP+CKA <= 1.10x, CKA over all
tokens <= 1.15x, CKA on the last token <= 1.10x a blocks-only forward. Memory goal: <= 1.10x the plain forward.

The 4-bit case (QLoRA): the model's block linears in NF4 (bitsandbytes' CPU kernels, fp32 compute, as
``litgpt-plop finetune --quantize bnb.nf4`` runs on CPU): PLoP's peak against the 4-bit inference forward over
the same batches (goal <= 1.05x) and against a 4-bit LoRA training step (LoRA on PLoP's kinds, AdamW) on the
largest batches (it must stay below).

Growth: the same memory and time measurements at several prompt counts (one run each).

    python -m benchmarks.calibration_overhead                       # full run, writes benchmarks/results/
    python -m benchmarks.calibration_overhead --sizes --skip_4bit --reps 1 --num_prompts 32   # a quick look
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from benchmarks.calibration_passes import (
    FORWARDS,
    METHODS,
    MODES,
    batches_of,
    finish,
    load_model,
    make_scorers,
    run_forward,
    run_method,
    run_train_steps,
    token_ids,
)
from benchmarks.common import RESULTS_ROOT, PeakRss, answer_worker, benchmark_parser, json_worker, machine, write_results
from benchmarks.stats import median_ratio, ratio

# time / forward_blocks, per method (issue #17)
TIME_GOALS = {"plop": 1.10, "cka_last": 1.10, "cka_tokens": 1.15, "plop+cka": 1.10}
MEMORY_GOAL, MEMORY_GOAL_4BIT = 1.10, 1.05
Log = Callable[[str], None]


# ---- memory: one measurement per fresh process --------------------------------------------------------------


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process: ``spec`` has mode, checkpoint_dir, num_prompts, batch_size,
    quantize, and for ``train`` the kinds and the number of largest batches."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    checkpoint_dir = Path(spec["checkpoint_dir"])
    ids = token_ids(checkpoint_dir, spec["num_prompts"])
    batches = batches_of(ids, spec["batch_size"])
    if spec.get("largest_batches"):
        batches = sorted(batches, key=lambda b: b.input_ids.numel(), reverse=True)[: spec["largest_batches"]]
    model = load_model(checkpoint_dir, spec.get("quantize"))
    mode = spec["mode"]
    with PeakRss() as rss:
        if mode in FORWARDS:
            run_forward(model, batches, blocks_only=mode == "forward_blocks")
        elif mode == "train":
            run_train_steps(model, batches, spec["kinds"])
        else:
            placement = run_method(model, ids, mode, spec["batch_size"])
    kinds = placement.kinds if mode in METHODS else None
    return {
        "kinds": kinds,
        **{k: v for k, v in spec.items() if k != "report"},  # the protocol's, not the measurement's
        "seconds": rss.seconds,
        **rss.figures(),
        "tokens": int(sum(int(b.mask.sum()) for b in batches)),
        "batches": len(batches),
    }


def median_runs(runs: list[dict]) -> dict:
    """One record from repeated measurements: medians of the figures, the runs kept under ``runs``."""
    merged = dict(runs[0])
    for key in ("seconds", "peak_rss_mib", "baseline_rss_mib", "increase_mib", "peak_anon_mib"):  # anon: owned memory
        merged[key] = statistics.median(r.get(key) or 0.0 for r in runs)
    merged["runs"] = [{k: r.get(k) for k in ("seconds", "peak_rss_mib", "baseline_rss_mib", "increase_mib", "peak_anon_mib")} for r in runs]
    return merged


def measure_memory(specs: dict[str, dict], reps: int, log: Log, label: str = "") -> dict[str, dict]:
    """Each spec in a fresh subprocess, ``reps`` rounds (all specs once per round, order alternating)."""
    runs: dict[str, list[dict]] = {name: [] for name in specs}
    for rep in range(reps):
        names = list(specs) if rep % 2 == 0 else list(reversed(specs))
        for name in names:
            r = in_subprocess(specs[name])
            runs[name].append(r)
            log(f"  {label}{name:15s} peak {r['peak_rss_mib']:8.1f} MiB  +{r['increase_mib']:7.1f} MiB over"
                f" {r['baseline_rss_mib']:.1f}  ({r['seconds']:.1f} s)")
    return {name: median_runs(r) for name, r in runs.items()}


def in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    """``worker`` on ``spec`` in a fresh process, with the spec's threads and malloc setting."""
    return json_worker(
        "benchmarks.calibration_overhead",
        spec,
        f"measurement {spec}",
        threads=spec.get("threads"),
        malloc_mmap_threshold=spec.get("malloc_mmap_threshold"),
    )



# ---- time: every mode side by side in this process ----------------------------------------------------------


def measure_time(args: argparse.Namespace, log: Log) -> tuple[dict, dict, dict, list[str]]:
    """Wall time of every mode on ``args.num_prompts`` prompts, ``args.reps`` times.

    After an unmeasured warm-up pass over every batch in every mode, interleaved batch by batch: for each batch,
    every mode runs on it back to back (the order rotates), so a
    change in the machine's load hits every mode alike. A method's batch is one ``calibrate`` call on its
    scorers (hooks registered and removed each time: a few ms per call, so this slightly overstates the
    pass); after the last batch its scores and selection are computed (``finish``), as in ``plan_placement``.
    Per repetition a mode's time is the sum over batches plus that final step; reported: medians over
    repetitions, the median of the per-repetition ratios, and the median over all (repetition, batch) pairs of
    the per-batch ratio (the pass alone, robust to a load change in the middle of a repetition).
    """
    from litgpt_plop.scoring.calibration import calibrate

    ids = token_ids(args.checkpoint_dir, args.num_prompts)
    batches = batches_of(ids, args.batch_size)
    model = load_model(args.checkpoint_dir, None)
    # warm-up, not measured: every batch once in every mode (thread pools, kernel caches, and the allocator
    # grown to every batch shape: a first repetition measured cold ran up to 10% slower in some modes)
    warm = {mode: make_scorers(model, mode) for mode in METHODS}
    for batch in batches:
        for mode in MODES:
            if mode in FORWARDS:
                run_forward(model, [batch], blocks_only=mode == "forward_blocks")
            else:
                calibrate(model, [batch], warm[mode], progress=False, reduce=False)
    del warm
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    finish_samples: dict[str, list[float]] = {mode: [] for mode in METHODS}
    batch_samples: dict[str, list[float]] = {mode: [] for mode in MODES}  # every (rep, batch), in the same order
    plop_kinds: list[str] = []
    for rep in range(args.reps):
        totals = dict.fromkeys(MODES, 0.0)
        scorers = {mode: make_scorers(model, mode) for mode in METHODS}
        for i, batch in enumerate(batches):
            shift = (i + rep) % len(MODES)
            order = MODES[shift:] + MODES[:shift]
            for mode in order if (i + rep) % 2 == 0 else reversed(order):
                start = time.perf_counter()
                if mode in FORWARDS:
                    run_forward(model, [batch], blocks_only=mode == "forward_blocks")
                else:
                    calibrate(model, [batch], scorers[mode], progress=False, reduce=False)
                batch_samples[mode].append(time.perf_counter() - start)
                totals[mode] += batch_samples[mode][-1]
        for mode in METHODS:
            start = time.perf_counter()
            placement = finish(model, mode, scorers[mode])
            finish_samples[mode].append(time.perf_counter() - start)
            totals[mode] += finish_samples[mode][-1]
            if mode == "plop":
                plop_kinds = placement.kinds
        for mode in MODES:
            samples[mode].append(totals[mode])
        log(f"  time rep {rep + 1}/{args.reps}: " + ", ".join(f"{m} {t:.2f} s" for m, t in totals.items()))
    del model
    gc.collect()
    return samples, finish_samples, batch_samples, plop_kinds


# ---- the run ------------------------------------------------------------------------------------------------


@dataclass
class Figures:
    """What one run measured: times per mode (per repetition, the scores-and-selection step, per batch), PLoP's
    kinds, and the memory figures of the main table, the growth table and the 4-bit case."""

    time_samples: dict[str, list[float]]
    finish_samples: dict[str, list[float]]
    batch_samples: dict[str, list[float]]
    plop_kinds: list[str]
    memory: dict[str, dict] = field(default_factory=dict)
    growth: dict[int, dict[str, dict]] = field(default_factory=dict)
    four_bit: dict[str, dict] = field(default_factory=dict)

    @property
    def time_median(self) -> dict[str, float]:
        return {mode: statistics.median(v) for mode, v in self.time_samples.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser("benchmarks.calibration_overhead", __doc__)
    parser.add_argument("--num_prompts", type=int, default=128, help="calibration prompts for the main table (default: %(default)s)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[32, 64, 128, 256], help="prompt counts for the growth table; none to skip (default: %(default)s)")
    parser.add_argument("--growth_modes", nargs="*", default=["forward_blocks", "plop+cka"], choices=MODES, help="modes measured at every size (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=1, help="repetitions of the interleaved time measurement (default: %(default)s; every batch is already"
                        " measured side by side in all modes)")
    parser.add_argument("--mem_reps", type=int, default=1, help="fresh-process repetitions per memory figure, median (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=8, help="calibration batch size (default: %(default)s)")
    parser.add_argument("--train_batches", type=int, default=2, help="largest batches the 4-bit training step runs on (default: %(default)s)")
    parser.add_argument("--skip_4bit", action="store_true", help="skip the 4-bit (QLoRA) measurements")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0: torch's own choice. On a 2-core machine shared with other jobs, 2 threads made every"
                        " forward and step 5-20x slower (OpenMP threads waiting on each other while the cores are busy), so 1 is"
                        " the default (default: %(default)s)")
    parser.add_argument("--malloc_mmap_threshold", type=int, default=0, help="glibc MALLOC_MMAP_THRESHOLD_ for the memory subprocesses (bytes; 0: glibc's"
                        " dynamic default). A fixed threshold (e.g. 65536) makes large blocks go back to the system when freed,"
                        " so RSS follows the memory actually held instead of what malloc keeps for reuse (default: %(default)s)")
    parser.add_argument("--tag", default="", help="suffix of the result files: calibration_overhead_<tag>.{json,md}")
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT, help="directory for calibration_overhead.{json,md} (default: %(default)s)")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    return parser


def measure_times(args: argparse.Namespace, log: Log) -> Figures:
    """The interleaved time measurement (``measure_time``), or nan figures with ``--reps 0``."""
    if args.reps > 0:
        log(f"Time: {len(MODES)} modes x {args.reps} interleaved repetitions on {args.num_prompts} prompts")
        return Figures(*measure_time(args, log))
    log("Time: skipped (--reps 0)")
    nan = float("nan")
    return Figures({m: [nan] for m in MODES}, {m: [nan] for m in METHODS}, {m: [nan] for m in MODES}, [])


def measure_memories(args: argparse.Namespace, figures: Figures, log: Log) -> None:
    """The memory figures, each in a fresh process: every mode at ``--num_prompts``, the growth modes at every
    size, and (unless ``--skip_4bit``) the 4-bit forward, PLoP and a training step on PLoP's kinds."""
    common = dict(
        checkpoint_dir=str(args.checkpoint_dir),
        batch_size=args.batch_size,
        threads=args.threads,
        malloc_mmap_threshold=args.malloc_mmap_threshold,
    )
    log("Memory: one fresh subprocess per measurement")
    memory = measure_memory({m: {**common, "mode": m, "num_prompts": args.num_prompts} for m in MODES}, args.mem_reps, log)
    figures.memory = memory
    for size in args.sizes:
        if size == args.num_prompts:
            figures.growth[size] = {m: memory[m] for m in args.growth_modes}
            continue
        specs = {m: {**common, "mode": m, "num_prompts": size} for m in args.growth_modes}
        figures.growth[size] = measure_memory(specs, 1, log, label=f"growth n={size:4d} ")

    figures.plop_kinds = figures.plop_kinds or memory["plop"]["kinds"]
    if not args.skip_4bit:
        log(f"4-bit (NF4, CPU): PLoP's kinds for the training step: {figures.plop_kinds}")
        specs = {m: {**common, "mode": m, "num_prompts": args.num_prompts, "quantize": "bnb.nf4"} for m in ("forward", "forward_blocks", "plop", "train")}
        specs["train"].update(kinds=figures.plop_kinds, largest_batches=args.train_batches)
        figures.four_bit = measure_memory(specs, args.mem_reps, log, label="4-bit ")


# ---- the report ---------------------------------------------------------------------------------------------


def table_rows(figures: Figures) -> list[dict[str, Any]]:
    """The main table: per method, its time and memory against both forward baselines."""
    time_samples, batch_samples, memory = figures.time_samples, figures.batch_samples, figures.memory
    rows = []
    for mode in METHODS:
        rows.append(
            {
                "mode": mode,
                "time_s": figures.time_median[mode],
                "finish_s": statistics.median(figures.finish_samples[mode]),
                "time_vs_forward": median_ratio(time_samples[mode], time_samples["forward"]),
                "time_vs_forward_blocks": median_ratio(time_samples[mode], time_samples["forward_blocks"]),
                "batch_time_vs_forward": median_ratio(batch_samples[mode], batch_samples["forward"]),
                "batch_time_vs_forward_blocks": median_ratio(batch_samples[mode], batch_samples["forward_blocks"]),
                "peak_vs_forward": ratio(memory[mode]["peak_rss_mib"], memory["forward"]["peak_rss_mib"]),
                "peak_vs_forward_blocks": ratio(memory[mode]["peak_rss_mib"], memory["forward_blocks"]["peak_rss_mib"]),
                "increase_mib": memory[mode]["increase_mib"], "peak_anon_mib": memory[mode]["peak_anon_mib"],
                "increase_vs_forward": ratio(memory[mode]["increase_mib"], memory["forward"]["increase_mib"]),
                "increase_vs_forward_blocks": ratio(memory[mode]["increase_mib"], memory["forward_blocks"]["increase_mib"]),
            }
        )
    return rows


def main_table_md(
    args: argparse.Namespace, figures: Figures, rows: list[dict[str, Any]], host: dict[str, Any], load_start: list[float]
) -> list[str]:
    """The title, the run's setting, the forward baselines and the main table."""
    import torch

    memory, time_samples, time_median = figures.memory, figures.time_samples, figures.time_median
    md = [
        f"# Calibration overhead: {args.checkpoint_dir.name}, {args.num_prompts} reasoning-gym prompts, batch {args.batch_size}",
        "",
        f"Machine: {host['cpu']}, {host['logical_cpus']} CPUs, torch {torch.__version__},"
        f" {torch.get_num_threads()} threads; memory method: {memory['forward']['memory_method']};"
        f" MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold or 'unset (glibc dynamic)'} in the memory subprocesses."
        f" Load average (1/5/15 min) at start {', '.join(f'{x:.1f}' for x in load_start)},"
        f" at end {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {host['logical_cpus']} CPUs.",
        (f"Time: {args.reps} in-process repetitions interleaved batch by batch; ratios are medians of per-repetition ratios."
         if args.reps > 0 else "Time: not measured in this run (--reps 0): the time columns are nan.")
        + f" Memory: one fresh subprocess per figure (median of {args.mem_reps}).",
        "",
        "Baselines: " + ", ".join(
            f"{m} {time_median[m]:.2f} s (runs {', '.join(f'{s:.2f}' for s in time_samples[m])}), peak {memory[m]['peak_rss_mib']:.0f} MiB,"
            f" +{memory[m]['increase_mib']:.1f} MiB" for m in FORWARDS
        ) + ".",
        "",
        "| method | time s (of which scores + selection) | time / forward | time / forward_blocks (goal) |"
        " per-batch time / forward, median | per-batch / forward_blocks, median |"
        f" peak RSS / forward (goal <= {MEMORY_GOAL}) | peak RSS / forward_blocks | peak owned MiB | pass adds MiB | adds / forward's |"
        " adds / forward_blocks' |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['mode']} | {r['time_s']:.2f} ({r['finish_s']:.2f}) | {r['time_vs_forward']:.3f} |"
            f" {r['time_vs_forward_blocks']:.3f} (<= {TIME_GOALS[r['mode']]}: {'met' if r['time_vs_forward_blocks'] <= TIME_GOALS[r['mode']] else 'NOT met'}) |"
            f" {r['batch_time_vs_forward']:.3f} | {r['batch_time_vs_forward_blocks']:.3f} |"
            f" {r['peak_vs_forward']:.3f} | {r['peak_vs_forward_blocks']:.3f} | {r['peak_anon_mib']:.1f} | {r['increase_mib']:.1f} |"
            f" {r['increase_vs_forward']:.2f} | {r['increase_vs_forward_blocks']:.2f} |"
        )
    return md


def growth_md(args: argparse.Namespace, growth: dict[int, dict[str, dict]]) -> list[str]:
    """The growth table; none without sizes or without a forward among the growth modes to divide by."""
    growth_base = next((m for m in ("forward", "forward_blocks") if m in args.growth_modes), None)
    if not growth or not growth_base:
        return []
    methods_grown = [m for m in args.growth_modes if m not in FORWARDS]
    md = ["", "## Growth with the number of prompts (one fresh process per figure; time of that run, not interleaved)", "",
          "| prompts | " + " | ".join(f"{m} adds MiB | {m} s" for m in args.growth_modes) + " | "
          + " | ".join(f"{m} peak / {growth_base} | {m} adds / {growth_base}'s | {m} time / {growth_base}" for m in methods_grown) + " |",
          "|---|" + "---|---|" * len(args.growth_modes) + "---|---|---|" * len(methods_grown)]  # fmt: skip
    for size, by_mode in growth.items():
        cells = [f"{by_mode[m]['increase_mib']:.1f} | {by_mode[m]['seconds']:.1f}" for m in args.growth_modes]
        cells += [
            f"{ratio(by_mode[m]['peak_rss_mib'], by_mode[growth_base]['peak_rss_mib']):.3f} |"
            f" {ratio(by_mode[m]['increase_mib'], by_mode[growth_base]['increase_mib']):.2f} |"
            f" {ratio(by_mode[m]['seconds'], by_mode[growth_base]['seconds']):.3f}"
            for m in args.growth_modes
            if m not in FORWARDS
        ]
        md.append(f"| {size} | " + " | ".join(cells) + " |")
    return md


def four_bit_md(args: argparse.Namespace, four_bit: dict[str, dict], plop_kinds: list[str]) -> list[str]:
    """The 4-bit section; none when it was skipped."""
    if not four_bit:
        return []
    f, fb, p, t = (four_bit[m] for m in ("forward", "forward_blocks", "plop", "train"))
    md = [
        "",
        f"## 4-bit (NF4 on CPU, fp32 compute): {args.num_prompts} prompts; training step: LoRA r=8 on {plop_kinds},"
        f" AdamW, on the {args.train_batches} largest batches",
        "",
        "| | peak RSS MiB | peak owned MiB | adds MiB | time s |",
        "|---|---|---|---|---|",
    ]
    for name, m in (("inference forward", f), ("forward_blocks", fb), ("PLoP calibration", p), ("training step", t)):
        md.append(f"| {name} | {m['peak_rss_mib']:.1f} | {m['peak_anon_mib']:.1f} | {m['increase_mib']:.1f} | {m['seconds']:.1f} |")
    md += [
        "",
        f"- PLoP peak / 4-bit inference forward peak: {ratio(p['peak_rss_mib'], f['peak_rss_mib']):.3f} (goal <= {MEMORY_GOAL_4BIT});"
        f" / forward_blocks: {ratio(p['peak_rss_mib'], fb['peak_rss_mib']):.3f}",
        f"- PLoP adds / forward adds: {ratio(p['increase_mib'], f['increase_mib']):.2f}; / forward_blocks adds:"
        f" {ratio(p['increase_mib'], fb['increase_mib']):.2f}",
        f"- PLoP peak / training-step peak: {ratio(p['peak_rss_mib'], t['peak_rss_mib']):.3f} (must be < 1);"
        f" adds / training step adds: {ratio(p['increase_mib'], t['increase_mib']):.2f}",
    ]
    return md


def results_of(
    args: argparse.Namespace, figures: Figures, rows: list[dict[str, Any]], host: dict[str, Any], load_start: list[float]
) -> dict[str, Any]:
    """What the JSON result file holds: the settings, every figure, and the goals."""
    import torch

    return {
        "checkpoint_dir": str(args.checkpoint_dir),
        "num_prompts": args.num_prompts,
        "batch_size": args.batch_size,
        "reps": args.reps,
        "mem_reps": args.mem_reps,
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "threads": torch.get_num_threads(),
        "time_samples_s": figures.time_samples,
        "time_median_s": figures.time_median,
        "finish_samples_s": figures.finish_samples,
        "batch_samples_s": figures.batch_samples,
        "memory": figures.memory,
        "table": rows,
        "growth": {str(k): v for k, v in figures.growth.items()},
        "four_bit": figures.four_bit,
        "plop_kinds": figures.plop_kinds,
        "goals": {"time_vs_forward_blocks": TIME_GOALS, "memory": MEMORY_GOAL, "memory_4bit": MEMORY_GOAL_4BIT},
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
        "machine": host,
    }


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args._worker:
        answer_worker(args._worker, worker)
        return {}

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    host = machine()
    started = time.perf_counter()
    load_start = list(os.getloadavg())  # a shared machine: ratios are side by side, but say how busy it was

    def log(text: str) -> None:
        print(text, flush=True)

    figures = measure_times(args, log)
    measure_memories(args, figures, log)
    rows = table_rows(figures)
    md = main_table_md(args, figures, rows, host, load_start) + growth_md(args, figures.growth)
    md += four_bit_md(args, figures.four_bit, figures.plop_kinds)
    md += ["", f"Total benchmark wall time: {time.perf_counter() - started:.0f} s."]
    text = "\n".join(md)
    print()
    print(text)
    results = results_of(args, figures, rows, host, load_start)
    write_results(args.out, "calibration_overhead" + (f"_{args.tag}" if args.tag else ""), results, text)
    return results


if __name__ == "__main__":
    main()

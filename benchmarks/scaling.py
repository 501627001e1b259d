"""Scaling: what ``litgpt-plop plan`` and a 4-bit finetune cost as the model grows, dense bf16 against NF4.

Models: SmolLM2-135M-Instruct (the real one) and random-weight checkpoints shaped like LitGPT configs (built by
``benchmarks.shaped`` when missing; ``--delete_shaped`` removes them afterwards). Per model, each in a fresh
process, one at a time, in the environment a user runs in: no ``OMP_NUM_THREADS``, no ``MALLOC_*`` (``--threads``
and ``--malloc_mmap_threshold`` set them; every result line records what it ran with, and the table has one line
per model and setting). Memory comes in two figures: peak RSS (everything resident) and peak owned memory
(``RssAnon``, sampled every 10 ms), because much of a dense run's RSS is pages of the memory-mapped checkpoint,
which are clean file pages the kernel reclaims under pressure:

* ``plan-bf16`` / ``plan-nf4``: ``litgpt-plop plan --precision bf16-true [--quantize bnb.nf4] --method plop`` on
  reasoning-gym prompts: wall time, the process's own peak RSS (``VmHWM`` at its end: loading, calibration,
  scores; ``ru_maxrss`` from ``wait4`` is recorded too, but it starts at the launching process's peak) and its
  peak owned memory; with plan's layer-sequential calibration (its default; lines before it had the whole model
  loaded, and record no ``calibration``) or, as ``plan-bf16-whole`` / ``plan-nf4-whole``, ``--sequential false``;
* ``calibration``: in one process on the bf16 model, batches interleaved: a blocks-only forward, the PLoP pass and
  the CKA-over-all-tokens pass; CPU seconds of this thread, ratios to the forward (median of per-batch ratios);
* ``finetune-bf16`` / ``finetune-nf4``: ``litgpt-plop finetune --plugin plop`` for 2 optimizer steps of one
  example (max 128 tokens): the peak RSS of LitGPT's training loop (``PeakRss`` reset when ``fit`` starts,
  ``benchmarks.command_worker``), the process's own peak (``VmHWM``: also loading, calibration
  and the final merge) and peak owned memory, step time.

Every measurement starts with the checkpoint out of the page cache (``evict_page_cache``), as a first run after a
download does: otherwise a command would find in memory the pages the one before it read, and which side of a
comparison ran second would decide part of it.

Resumable: each (model, measurement) is one line of ``results/scaling/results.jsonl`` and is skipped when there
(``--rerun`` repeats it). ``scaling.md`` beside it is written from all lines at the end.

    python -m benchmarks.scaling                                  # 135M, 1B-shaped, 3B-shaped
    python -m benchmarks.scaling --models Llama-3.2-1B --only plan-bf16 plan-nf4 --rerun   # side by side
    python -m benchmarks.scaling --threads 1 --malloc_mmap_threshold 65536    # the setting of the first runs
    python -m benchmarks.scaling --models SmolLM2-135M-Instruct Llama-3.2-1B --only plan-bf16 plan-bf16-whole --rerun
    python -m benchmarks.scaling --models Llama-3.1-8B Llama-3.1-70B@4 --only plan-bf16 forward-bf16 finetune-nf4 --delete_shaped
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.calibration_passes import batches_of, run_forward, token_ids
from benchmarks.command_worker import checked_command, csv_column
from benchmarks.common import (
    DEFAULT_CHECKPOINT,
    REPO_ROOT,
    RESULTS_ROOT,
    append_jsonl,
    answer_worker,
    checked_worker,
    env_label,
    git_commit,
    json_worker,
    machine,
    read_jsonl,
    run_worker,
    worker_env,
    write_text,
)

MODELS = {"SmolLM2-135M-Instruct": DEFAULT_CHECKPOINT, "Llama-3.2-1B": None, "Llama-3.2-3B": None}  # None: shaped
# ``plan-*``: layer-sequential calibration (plan's default); ``plan-*-whole``: the whole model loaded first
# ``forward-bf16``: what a plan is held to, a whole-model blocks-only forward over the same prompts, loading counted
MEASUREMENTS = ("plan-bf16", "plan-nf4", "plan-bf16-whole", "plan-nf4-whole", "forward-bf16", "calibration", "finetune-bf16",
                "finetune-nf4")  # fmt: skip
OUT_DIR = RESULTS_ROOT / "scaling"
WORK_DIR = REPO_ROOT / "out" / "benchmarks" / "scaling"
ENV: dict[str, int] = {}  # the workers' settings (``common.worker_env``): none unless --threads, --malloc_mmap_threshold
LEGACY_ENV = "MALLOC_MMAP_THRESHOLD_=65536, OMP_NUM_THREADS=1"  # what result lines without an "env" ran with


def checkpoint_of(model: str) -> Path:
    """The real checkpoint, or the shaped one, built in a process of its own: this one must stay small, because a
    child's ``ru_maxrss`` starts at its launcher's peak (vfork + exec), and building a 3B checkpoint peaks at 7 GB."""
    from benchmarks.shaped import shaped_dir

    if MODELS.get(model) is not None:
        return Path(MODELS[model])
    run = run_worker("benchmarks.shaped", [model], console=True)
    if not run.ok:
        raise RuntimeError(f"building the {model}-shaped checkpoint failed (exit {run.returncode})")
    return shaped_dir(model)


def cli_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run a ``litgpt-plop`` command line in this process and report its own peak RSS (``VmHWM``)."""
    import sys

    from benchmarks.common import status_kib
    from litgpt_plop.commands.cli import main as cli

    sys.argv = spec["argv"]
    cli()
    return {"vmhwm_mib": status_kib("VmHWM") / 1024}


def data_args(prompts: int) -> list[str]:
    return ["--data", "litgpt_plop.data.ReasoningGym", "--data.train_size", str(prompts), "--data.val_size", "2"]


def measure_plan(checkpoint: Path, quantize: bool, prompts: int, sequential: bool = True) -> dict[str, Any]:
    out = WORK_DIR / "plan"
    args = ["plan", str(checkpoint), "--precision", "bf16-true", "--method", "plop", *data_args(prompts),
            "--calibration.num_samples", str(prompts), "--calibration.progress", "false", "--out_dir", str(out),
            "--sequential", str(sequential).lower()]  # fmt: skip
    if quantize:
        args += ["--quantize", "bnb.nf4"]
    spec = {"argv": ["litgpt-plop", *args]}
    report, run = checked_worker("benchmarks.scaling", spec, "plan", flag="--_cli", **ENV, log=WORK_DIR / "plan.log")
    vmhwm = report["vmhwm_mib"]
    return {"command": "litgpt-plop " + " ".join(args), "calibration": "sequential" if sequential else "whole",
            "wall_s": run.wall_s, "peak_rss_mib": vmhwm,
            "peak_anon_mib": run.peak_anon_mib, "peak_file_mib": run.peak_file_mib,
            "ru_maxrss_mib": run.peak_rss_mib, "cpu_per_wall": run.cpu_per_wall}  # fmt: skip


def measure_finetune(checkpoint: Path, quantize: bool, prompts: int) -> dict[str, Any]:
    out = WORK_DIR / ("finetune-nf4" if quantize else "finetune-bf16")
    shutil.rmtree(out, ignore_errors=True)
    argv = ["litgpt-plop", "finetune", str(checkpoint), "--out_dir", str(out), "--precision", "bf16-true",
            "--plugin", "plop", *data_args(8), "--calibration.num_samples", str(prompts),
            "--train.micro_batch_size", "1", "--train.global_batch_size", "1", "--train.max_steps", "2",
            "--train.max_seq_length", "128", "--train.lr_warmup_steps", "1", "--train.save_interval", "100000",
            "--train.log_interval", "1", "--eval.interval", "100000", "--eval.initial_validation", "false",
            "--eval.final_validation", "false", "--logger_name", "csv", "--seed", "1337"]  # fmt: skip
    if quantize:
        argv += ["--quantize", "bnb.nf4"]
    measured, run = checked_command(argv, "finetune", report=WORK_DIR / "finetune-report.json", **ENV, log=WORK_DIR / "finetune.log")
    steps = csv_column(out, "iter_time")
    shutil.rmtree(out, ignore_errors=True)  # the merged model alone is as large as the checkpoint
    process_peak = max(measured["vmhwm_before_fit_mib"], measured["vmhwm_end_mib"])
    return {"command": " ".join(argv), "wall_s": run.wall_s, "peak_rss_mib": process_peak, "ru_maxrss_mib": run.peak_rss_mib,
            "peak_anon_mib": run.peak_anon_mib, "peak_file_mib": run.peak_file_mib,
            "loop_peak_rss_mib": measured["fit_peak_rss_mib"], "loop_baseline_rss_mib": measured["fit_baseline_rss_mib"],
            "step_s": steps, "cpu_per_wall": run.cpu_per_wall}  # fmt: skip


def forward_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process, as a plan would: load the whole model in bf16 from the memory-mapped checkpoint and run
    the plan's prompts, in the plan's batches, through its blocks (no head), no grad."""
    from litgpt_plop.args import CalibrationArgs
    from litgpt_plop.model.checkpoint import load_checkpoint_model

    checkpoint = Path(spec["checkpoint"])
    batches = batches_of(token_ids(checkpoint, spec["prompts"]), CalibrationArgs().batch_size)
    model = load_checkpoint_model(checkpoint, "bf16-true", device="cpu")
    start = time.perf_counter()
    run_forward(model, batches, blocks_only=True)
    return {"forward_s": time.perf_counter() - start, "batches": len(batches)}


def scaling_worker(spec: dict[str, Any]) -> dict[str, Any]:
    return forward_worker(spec) if spec.get("mode") == "forward" else calibration_worker(spec)


def measure_forward(checkpoint: Path, prompts: int) -> dict[str, Any]:
    spec = {"mode": "forward", "checkpoint": str(checkpoint), "prompts": prompts}
    report, run = checked_worker("benchmarks.scaling", spec, "whole-model forward", **ENV, log=WORK_DIR / "forward.log")
    return {"command": f"python -m benchmarks.scaling (whole-model blocks-only forward, {prompts} prompts)", "wall_s": run.wall_s,
            "forward_s": report["forward_s"], "peak_rss_mib": run.peak_vmrss_mib, "peak_anon_mib": run.peak_anon_mib,
            "peak_file_mib": run.peak_file_mib, "cpu_per_wall": run.cpu_per_wall}  # fmt: skip


def calibration_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: blocks-only forward, PLoP pass and tokens-CKA pass, interleaved batch by batch."""
    import torch

    from litgpt_plop.scoring.calibration import calibrate
    from litgpt_plop.model.checkpoint import load_checkpoint_model
    from litgpt_plop.selection.placement import model_kinds
    from litgpt_plop.scoring.cka import CkaScorer
    from litgpt_plop.scoring.plop import PlopScorer

    torch.set_num_threads(1)
    checkpoint = Path(spec["checkpoint"])
    batches = batches_of(token_ids(checkpoint, spec["prompts"]), spec["batch_size"])
    model = load_checkpoint_model(checkpoint, "bf16-true", device="cpu")
    layers = list(range(model.config.n_layer))
    make = {
        "plop": lambda: [PlopScorer(model, model_kinds(model.config), layers)],
        "cka_tokens": lambda: [CkaScorer(model, layers, "tokens")],
    }
    seconds: dict[str, list[float]] = {"forward_blocks": [], "plop": [], "cka_tokens": []}
    run_forward(model, batches[:1], blocks_only=True)  # warm-up
    for rep in range(spec["reps"]):
        for i, batch in enumerate(batches):
            order = list(seconds) if (i + rep) % 2 == 0 else list(reversed(seconds))
            for mode in order:
                start = time.thread_time()
                if mode == "forward_blocks":
                    run_forward(model, [batch], blocks_only=True)
                else:
                    calibrate(model, [batch], make[mode](), progress=False, reduce=False)
                seconds[mode].append(time.thread_time() - start)
    forward = seconds["forward_blocks"]
    return {
        "tokens": int(sum(int(b.mask.sum()) for b in batches)),
        "batches": len(batches),
        "forward_blocks_cpu_s": sum(forward) / spec["reps"],
        **{f"{m}_vs_forward_blocks": statistics.median(a / b for a, b in zip(seconds[m], forward)) for m in make},
    }


def measure_calibration(checkpoint: Path, prompts: int, reps: int) -> dict[str, Any]:
    spec = {"checkpoint": str(checkpoint), "prompts": prompts, "batch_size": 8, "reps": reps}
    return json_worker("benchmarks.scaling", spec, "calibration measurement", **ENV)


def model_figures(model: str) -> dict[str, Any]:
    """Parameter counts from the config: blocks' linears (what 4-bit quantizes), embedding, head, the rest."""
    import torch
    from litgpt.model import GPT

    from benchmarks.shaped import config_of

    with torch.device("meta"):
        gpt = GPT(config_of(model))
    linears = sum(m.weight.numel() for m in gpt.transformer.h.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in gpt.parameters())
    c = gpt.config
    return {"n_layer": c.n_layer, "n_embd": c.n_embd, "intermediate_size": c.intermediate_size,
            "vocab": c.padded_vocab_size, "params": total, "block_linear_params": linears}  # fmt: skip


def row_env(row: dict[str, Any]) -> str:
    """The setting a result line was measured with (``common.env_label``)."""
    return row.get("env", LEGACY_ENV)


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: one line per model and setting, from the latest result line of each measurement."""
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        latest[(row["model"], row_env(row), row["measurement"])] = row
    lines_of = list(dict.fromkeys((row["model"], row_env(row)) for row in rows))

    def get(line: tuple[str, str], measurement: str, key: str, fmt: str = "{:.0f}") -> str:
        row = latest.get((*line, measurement))
        value = None if row is None else row["result"].get(key)
        if isinstance(value, list):
            value = statistics.median(value) if value else None
        return "-" if value is None else fmt.format(value)

    def pair(line: tuple[str, str], kind: str, key: str, with_ratio: bool = True) -> str:
        a, b = (latest.get((*line, f"{kind}-{v}")) for v in ("bf16", "nf4"))
        ratio = "-" if a is None or b is None or not b["result"].get(key) or not a["result"].get(key) \
            else f"{b['result'][key] / a['result'][key]:.2f}"  # fmt: skip
        return f"{get(line, f'{kind}-bf16', key)} / {get(line, f'{kind}-nf4', key)}" + (f" ({ratio})" if with_ratio else "")

    lines = [
        "| model | setting | params (block linears) | layers x width | plan s bf16 / nf4 | calibration / blocks-only forward: PLoP, CKA tokens |"
        " plan peak RSS MiB bf16 / nf4 (ratio) | plan peak owned MiB bf16 / nf4 (ratio) |"
        " finetune loop peak MiB bf16 / nf4 (ratio) | finetune process peak MiB bf16 / nf4 | finetune process peak owned MiB bf16 / nf4 |"
        " step s bf16 / nf4 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for line in lines_of:
        figures = next(r["figures"] for r in rows if r["model"] == line[0])
        lines.append(
            f"| {line[0]} | {line[1]} | {figures['params'] / 1e9:.2f} B ({figures['block_linear_params'] / 1e9:.2f} B) |"
            f" {figures['n_layer']} x {figures['n_embd']} | {pair(line, 'plan', 'wall_s', False)} |"
            f" {get(line, 'calibration', 'plop_vs_forward_blocks', '{:.3f}')}, {get(line, 'calibration', 'cka_tokens_vs_forward_blocks', '{:.3f}')} |"
            f" {pair(line, 'plan', 'peak_rss_mib')} | {pair(line, 'plan', 'peak_anon_mib')} |"
            f" {pair(line, 'finetune', 'loop_peak_rss_mib')} | {pair(line, 'finetune', 'peak_rss_mib', False)} |"
            f" {pair(line, 'finetune', 'peak_anon_mib', False)} |"
            f" {get(line, 'finetune-bf16', 'step_s', '{:.1f}')} / {get(line, 'finetune-nf4', 'step_s', '{:.1f}')} |"
        )
    return "\n".join(lines)


def cached_mib(files: list[Path]) -> float | None:
    """How much of ``files`` is in the page cache (util-linux ``fincore``), or None where it cannot be read."""
    if not files or shutil.which("fincore") is None:
        return None
    result = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, files)],
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        return None
    return sum(int(line) for line in result.stdout.split()) / 2**20


def evict_page_cache(checkpoint: Path) -> dict[str, float | None]:
    """Drop the checkpoint's files from the page cache (``POSIX_FADV_DONTNEED`` releases clean pages that no
    process maps; a file just written is written back first); how much of them was cached before and is after,
    in MiB."""
    files = [f for f in Path(checkpoint).iterdir() if f.is_file()]
    before = cached_mib(files)
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return {"cached_before_mib": before, "cached_after_mib": cached_mib(files)}


def measure(model: str, measurement: str, checkpoint: Path, args: argparse.Namespace) -> dict[str, Any]:
    kind, _, variant = measurement.partition("-")
    if kind == "plan":
        return measure_plan(checkpoint, variant.startswith("nf4"), args.prompts, sequential=not variant.endswith("-whole"))
    if kind == "finetune":
        return measure_finetune(checkpoint, variant == "nf4", args.prompts)
    if kind == "forward":
        return measure_forward(checkpoint, args.prompts)
    return measure_calibration(checkpoint, args.calibration_prompts, args.reps)


def side_by_side(rows: list[dict[str, Any]], model: str, setting: str) -> str | None:
    """The plan's bf16 and nf4 memory figures of one model and setting on one line, or None without both."""
    latest = {r["measurement"]: r["result"] for r in rows if r["model"] == model and row_env(r) == setting}
    if "plan-bf16" not in latest or "plan-nf4" not in latest:
        return None
    a, b = latest["plan-bf16"], latest["plan-nf4"]
    owned = (f"; peak owned {a['peak_anon_mib']:.0f} / {b['peak_anon_mib']:.0f} MiB ({b['peak_anon_mib'] / a['peak_anon_mib']:.2f})"
             if a.get("peak_anon_mib") and b.get("peak_anon_mib") else "")  # fmt: skip
    return (f"{model} plan, bf16 / nf4 ({setting}): peak RSS {a['peak_rss_mib']:.0f} / {b['peak_rss_mib']:.0f} MiB"
            f" ({b['peak_rss_mib'] / a['peak_rss_mib']:.2f}){owned}")  # fmt: skip


def sequential_vs_whole(rows: list[dict[str, Any]], model: str, setting: str) -> list[str]:
    """Per precision, the plan's wall time and peaks with the layer-sequential and the whole-model calibration."""
    latest = {r["measurement"]: r["result"] for r in rows if r["model"] == model and row_env(r) == setting}
    lines = []
    for variant in ("bf16", "nf4"):
        s, w = latest.get(f"plan-{variant}"), latest.get(f"plan-{variant}-whole")
        if s is None or w is None or s.get("calibration") != "sequential":
            continue
        lines.append(
            f"{model} plan {variant}, sequential / whole ({setting}): wall {s['wall_s']:.1f} / {w['wall_s']:.1f} s;"
            f" peak RSS {s['peak_rss_mib']:.0f} / {w['peak_rss_mib']:.0f} MiB; peak owned (RssAnon)"
            f" {s['peak_anon_mib']:.0f} / {w['peak_anon_mib']:.0f} MiB; peak mapped (RssFile)"
            f" {s['peak_file_mib']:.0f} / {w['peak_file_mib']:.0f} MiB"
        )
    plan, forward = latest.get("plan-bf16"), latest.get("forward-bf16")
    if plan is not None and forward is not None:
        lines.append(f"{model} plan bf16 / whole-model blocks-only forward, loading included ({setting}): wall {plan['wall_s']:.1f} /"
                     f" {forward['wall_s']:.1f} s ({plan['wall_s'] / forward['wall_s']:.2f}x); peak RSS {plan['peak_rss_mib']:.0f} /"
                     f" {forward['peak_rss_mib']:.0f} MiB")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="LitGPT config names (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS), help="measurements to run")
    parser.add_argument("--prompts", type=int, default=16, help="calibration prompts per plan and finetune (default: %(default)s)")
    parser.add_argument("--calibration_prompts", type=int, default=32, help="prompts of the calibration timing (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=1, help="repetitions of the calibration timing (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the workers (0: unset, as a user runs; default: %(default)s)")
    parser.add_argument("--malloc_mmap_threshold", type=int, default=0, help="glibc MALLOC_MMAP_THRESHOLD_ of the workers (bytes; 0: unset,"
                        " as a user runs; a fixed threshold hands large freed blocks back at once; default: %(default)s)")  # fmt: skip
    parser.add_argument("--rerun", action="store_true", help="measure again what results.jsonl already has (for this setting)")
    parser.add_argument("--delete_shaped", action="store_true", help="delete each shaped checkpoint after its measurements")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="results directory (default: %(default)s)")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_cli", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        answer_worker(args._worker, scaling_worker)
        return
    if args._cli:
        answer_worker(args._cli, cli_child)
        return
    ENV.update(threads=args.threads, malloc_mmap_threshold=args.malloc_mmap_threshold)
    setting = env_label(worker_env(**ENV))
    results = args.out / "results.jsonl"
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    done = {(r["model"], row_env(r), r["measurement"]) for r in read_jsonl(results)}
    host, commit = machine(), git_commit()
    for model in args.models:
        todo = [m for m in args.only if args.rerun or (model, setting, m) not in done]
        if not todo:
            continue
        checkpoint, figures = checkpoint_of(model), model_figures(model)
        for measurement in todo:
            load = os.getloadavg()
            print(f"{model} {measurement} ({setting}; load {load[0]:.1f}) ...", flush=True)
            page_cache = evict_page_cache(checkpoint)
            result = {**measure(model, measurement, checkpoint, args), "page_cache": page_cache}
            print(f"  {json.dumps({k: v for k, v in result.items() if k != 'command'})}", flush=True)
            append_jsonl(results, {"model": model, "measurement": measurement, "env": setting, "result": result,
                                   "figures": figures, "load_before": list(load), "load_after": list(os.getloadavg()),
                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": commit, "machine": host})  # fmt: skip
        line = side_by_side(read_jsonl(results), model, setting)
        for line in ([line] if line else []) + sequential_vs_whole(read_jsonl(results), model, setting):
            print(line, flush=True)
        if args.delete_shaped and MODELS.get(model, None) is None:
            from benchmarks.shaped import delete

            delete(model)
    rows = read_jsonl(results)
    text = "\n".join(["# Scaling: plan and 4-bit finetune, dense bf16 against NF4", "",
                      "Setting: the workers' OMP_NUM_THREADS and MALLOC_* variables (`default`: none, as a user runs).",
                      "Peak owned: the peak of RssAnon, memory the process owns; the rest of its RSS is pages of mapped files"
                      " (the memory-mapped checkpoint), which the kernel reclaims under pressure.", "", table(rows), "",
                      "Commands:", ""] + sorted({f"- `{r['result']['command']}`" for r in rows if "command" in r["result"]}))  # fmt: skip
    write_text(args.out / "scaling.md", text)
    print("\n" + text)


if __name__ == "__main__":
    main()

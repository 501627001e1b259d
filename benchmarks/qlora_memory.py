"""QLoRA memory and step time: ``litgpt-plop finetune --plugin plop --quantize bnb.nf4`` against LitGPT's q,v default.

Every run is a real finetune on SmolLM2-135M-Instruct (reasoning-gym ``basic_arithmetic``, the same data, seed,
steps and micro-batch in every run), each in its own process.

On CPU Lightning refuses ``litgpt finetune_lora --quantize`` ("Bitsandbytes is only supported on CUDA GPUs"),
so the comparison is our CPU 4-bit path against itself and the dense baseline:

* ``plop-nf4``:  ``litgpt-plop finetune --plugin plop --quantize bnb.nf4`` (calibrates on the 4-bit model,
  LoRA on PLoP's kinds);
* ``qv-nf4``:    ``litgpt-plop finetune --plugin qv --quantize bnb.nf4`` (the same LitGPT loop, LoRA on q,v as
  ``finetune_lora``'s default);
* ``none-dense``: ``litgpt-plop finetune --plugin none`` without quantization (trains exactly what
  ``litgpt finetune_lora`` trains with its default flags; tests/test_cli.py checks that loss for loss).

On a CUDA machine (detected) the runs are ``litgpt finetune_lora --quantize bnb.nf4`` itself (q,v default),
``litgpt-plop finetune --plugin plop --quantize bnb.nf4`` and ``--plugin qv``, in bf16-true.

Figures per run:
* process peak RSS (``os.wait4`` on the child: its own ``ru_maxrss``): the whole run, so loading (the CPU 4-bit
  path quantizes each block linear as it loads from the memory-mapped checkpoint, ``litgpt_plop.model.checkpoint``),
  calibration, training and the final merge (LitGPT's ``merge_lora``, which loads the dense model);
* process peak owned memory (``RssAnon`` of the child, sampled every 10 ms): the same run without the pages of
  memory-mapped files (the checkpoint), which the kernel reclaims under pressure;
* peak RSS during LitGPT's training loop only, over the RSS just before it (the kernel's peak counter is reset
  when ``fit`` starts: ``/proc/self/clear_refs``), measured inside the child;
* on CUDA: ``torch.cuda.max_memory_allocated`` over the whole run and over the training loop, and the GPU's name;
* step time: median of ``iter_time`` in the CSV log (one micro-batch = one step here).

    python -m benchmarks.qlora_memory                  # CPU: ~10 steps per run, writes benchmarks/results/
    python -m benchmarks.qlora_memory --max_steps 4 --out /tmp/q
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
from pathlib import Path
from typing import Any, Callable

from benchmarks.command_worker import checked_command, csv_column
from benchmarks.common import REPO_ROOT, RESULTS_ROOT, benchmark_parser, machine, write_results


def command(kind: str, args, out_dir: Path, cuda: bool) -> list[str]:
    """The command line of one run."""
    common = [
        str(args.checkpoint_dir),
        "--out_dir", str(out_dir),
        "--precision", "bf16-true" if cuda else "32-true",
        "--data", "litgpt_plop.data.ReasoningGym",
        "--data.train_size", str(args.train_size),
        "--data.val_size", "4",
        "--train.micro_batch_size", str(args.micro_batch_size),
        "--train.global_batch_size", str(args.micro_batch_size),
        "--train.max_steps", str(args.max_steps),
        "--train.max_seq_length", "256",
        "--train.lr_warmup_steps", "2",
        "--train.save_interval", "100000",
        "--train.log_interval", "1",
        "--eval.interval", "100000",
        "--eval.initial_validation", "false",
        "--eval.final_validation", "false",
        "--logger_name", "csv",
        "--seed", "1337",
    ]  # fmt: skip
    plugin = ["--calibration.num_samples", str(args.calibration_samples)]
    if kind == "litgpt-nf4":
        return ["litgpt", "finetune_lora", *common, "--quantize", "bnb.nf4"]
    if kind == "plop-nf4":
        return ["litgpt-plop", "finetune", *common, "--plugin", "plop", "--quantize", "bnb.nf4", *plugin]
    if kind == "qv-nf4":
        return ["litgpt-plop", "finetune", *common, "--plugin", "qv", "--quantize", "bnb.nf4"]
    if kind == "none-dense":
        return ["litgpt-plop", "finetune", *common, "--plugin", "none"]
    raise ValueError(kind)


def run(kind: str, args: argparse.Namespace, cuda: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """One finetune under ``benchmarks.command_worker`` in its own process: its figures, or ``RuntimeError`` with
    the end of its log."""
    out_dir = args.work_dir / kind
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh CSV log (LitGPT's logger would add a version_N)
    log_file = args.work_dir / f"{kind}.log"
    argv = command(kind, args, out_dir, cuda)
    measured, process = checked_command(
        argv,
        kind,
        report=args.work_dir / f"{kind}.json",
        threads=args.threads,
        malloc_mmap_threshold=args.malloc_mmap_threshold,
        log=log_file,
    )
    seconds = process.wall_s
    measured = {k: v for k, v in measured.items() if k != "argv"}  # the result has it as "command"
    iter_times = csv_column(out_dir, "iter_time")
    losses = csv_column(out_dir, "loss")
    trainable = csv_column(out_dir, "trainable_params")
    placement_file = out_dir / "placement.json"
    kinds = json.loads(placement_file.read_text()).get("flags") if placement_file.is_file() else None
    result = {
        "kind": kind,
        "command": " ".join(argv),
        "wall_s": seconds,
        "process_peak_rss_mib": process.peak_rss_mib,
        "process_peak_anon_mib": process.peak_anon_mib,
        **measured,
        "fit_adds_rss_mib": measured.get("fit_peak_rss_mib", 0.0) - measured.get("fit_baseline_rss_mib", 0.0),
        "median_iter_time_s": statistics.median(iter_times) if iter_times else None,
        "median_iter_time_after_first_s": statistics.median(iter_times[1:]) if len(iter_times) > 1 else None,
        "iters": len(iter_times),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "trainable_params": int(trainable[0]) if trainable else None,
        "placement_flags": kinds,
    }
    log(
        f"  {kind:11s} process peak {result['process_peak_rss_mib']:7.1f} MiB | training loop peak"
        f" {measured.get('fit_peak_rss_mib', float('nan')):7.1f} MiB (+{result['fit_adds_rss_mib']:.1f})"
        f" | step {result['median_iter_time_s'] or float('nan'):.3f} s | {seconds:.0f} s wall"
    )
    return result


def markdown(results: dict, args: argparse.Namespace, device: str, cuda: bool) -> str:
    """The report's table and ratios."""
    md = [
        f"# QLoRA memory and step time: {args.checkpoint_dir.name} on {device}",
        "",
        f"{args.max_steps} steps, micro-batch {args.micro_batch_size}, reasoning-gym basic_arithmetic ({args.train_size}"
        f" items), max_seq_length 256, precision {'bf16-true' if cuda else '32-true'}; PLoP calibrates on"
        f" {args.calibration_samples} prompts. One process per run, OMP_NUM_THREADS={args.threads or 'unset'},"
        f" MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold or 'unset (glibc dynamic)'}.",
        "",
        "| run | trainable params | process peak RSS MiB | process peak owned MiB | training-loop peak RSS MiB | loop adds MiB |"
        + (" CUDA peak whole run MiB | CUDA peak training loop MiB |" if cuda else "")
        + " median step s | loss first -> last | wall s |",
        "|---|---|---|---|---|---|" + ("---|---|" if cuda else "") + "---|---|---|",
    ]
    for kind, r in results.items():
        cells = [
            kind,
            f"{r['trainable_params']:,}" if r["trainable_params"] else "?",
            f"{r['process_peak_rss_mib']:.1f}",
            f"{r['process_peak_anon_mib']:.1f}" if r.get("process_peak_anon_mib") else "?",
            f"{r.get('fit_peak_rss_mib', float('nan')):.1f}",
            f"{r['fit_adds_rss_mib']:.1f}",
        ]
        if cuda:
            cells += [f"{r.get('peak_cuda_whole_run_mib', float('nan')):.1f}", f"{r.get('fit_peak_cuda_mib', float('nan')):.1f}"]
        cells += [
            f"{r['median_iter_time_s']:.3f}" if r["median_iter_time_s"] is not None else "?",
            f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" if r["first_loss"] is not None else "?",
            f"{r['wall_s']:.0f}",
        ]
        md.append("| " + " | ".join(cells) + " |")
    base = "litgpt-nf4" if cuda and "litgpt-nf4" in results else ("qv-nf4" if "qv-nf4" in results else None)
    if base and "plop-nf4" in results:
        p, b = results["plop-nf4"], results[base]
        md += ["", f"plop-nf4 / {base}: process peak {p['process_peak_rss_mib'] / b['process_peak_rss_mib']:.3f},"
               f" training-loop peak {p['fit_peak_rss_mib'] / b['fit_peak_rss_mib']:.3f},"
               f" step time {p['median_iter_time_s'] / b['median_iter_time_s']:.3f}"
               + (f", CUDA peak (loop) {p['fit_peak_cuda_mib'] / b['fit_peak_cuda_mib']:.3f}" if cuda else "")]  # fmt: skip
    if "none-dense" in results and "plop-nf4" in results:
        p, d = results["plop-nf4"], results["none-dense"]
        md += [f"plop-nf4 / none-dense: process peak {p['process_peak_rss_mib'] / d['process_peak_rss_mib']:.3f},"
               f" training-loop peak {p['fit_peak_rss_mib'] / d['fit_peak_rss_mib']:.3f},"
               f" step time {p['median_iter_time_s'] / d['median_iter_time_s']:.3f}"]  # fmt: skip
    md += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in results.values()]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser("benchmarks.qlora_memory", __doc__)
    parser.add_argument("--max_steps", type=int, default=10, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--micro_batch_size", type=int, default=2, help="micro-batch = global batch (default: %(default)s)")
    parser.add_argument("--train_size", type=int, default=64, help="training items (default: %(default)s)")
    parser.add_argument("--calibration_samples", type=int, default=32, help="PLoP calibration prompts (default: %(default)s)")
    parser.add_argument("--runs", nargs="*", default=None, help="which runs (default: CPU: plop-nf4 qv-nf4 none-dense; CUDA: litgpt-nf4 plop-nf4 qv-nf4)")
    parser.add_argument("--work_dir", type=Path, default=REPO_ROOT / "out" / "benchmarks" / "qlora_memory", help="finetune outputs and logs (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT, help="directory for qlora_memory.{json,md} (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run; 0: leave it unset. On a 2-core machine shared with other jobs a LoRA"
                        " step took 30 s with 2 threads and 1.3 s with 1 (OpenMP threads waiting on each other), so 1 is the default"
                        " (default: %(default)s)")
    parser.add_argument("--malloc_mmap_threshold", type=int, default=0, help="glibc MALLOC_MMAP_THRESHOLD_ of every run (bytes; 0: glibc's dynamic default)."
                        " A fixed threshold (e.g. 65536) returns large freed blocks to the system, so RSS follows the memory actually"
                        " held rather than what malloc keeps for reuse"
                        " (default: %(default)s)")
    parser.add_argument("--tag", default="", help="suffix of the result files: qlora_memory_<tag>.{json,md}")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    runs = args.runs or (["litgpt-nf4", "plop-nf4", "qv-nf4"] if cuda else ["plop-nf4", "qv-nf4", "none-dense"])
    args.work_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"

    def log(text: str) -> None:
        print(text, flush=True)

    log(f"{device}: {', '.join(runs)}; {args.max_steps} steps, micro-batch {args.micro_batch_size}")
    results = {kind: run(kind, args, cuda, log) for kind in runs}

    text = markdown(results, args, device, cuda)
    print()
    print(text)
    payload = {
        "device": device, "cuda": cuda, "threads": args.threads, "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "machine": machine(), "runs": results,
    }  # fmt: skip
    write_results(args.out, "qlora_memory" + (f"_{args.tag}" if args.tag else ""), payload, text)
    return results


if __name__ == "__main__":
    main()

"""What a placement costs to train: LoRA training-step time and peak memory per placement, relative to ``all``.

The placements are the ones the placement-quality grid (``benchmarks.placement_quality``) trains on one task,
with the same parameter matching: every method's rank is the one whose trainable-parameter count is closest
to PLoP's at rank 8 (``all`` gets rank 4), plus ``all@r8``, every linear at rank 8 (what "all-linear, r=8"
costs). PLoP, PLoP^-1, CKA and PLoP+CKA are decided here by a calibration pass on the task's prompts, exactly as
``litgpt-plop plan`` decides them. Extra placements (e.g. the final ``placement.json`` of a WeightLoRA run)
can be added with ``--placement NAME=PATH``.

* Step time: one model per placement, all sharing the checkpoint's (memory-mapped) base weights; each timed
  step is a LitGPT LoRA training step (forward with ``lm_head_chunk_size=128``, chunked cross-entropy,
  backward, AdamW step) on the same batch of 8 training examples. Placements take turns, one step each per
  round, the order rotating every round; the figure is the median over rounds. A shared machine's load
  drifts, so only these side-by-side ratios mean anything.
* Peak memory: each placement in a fresh subprocess (memory that malloc keeps after one placement would hide
  the next one's peak): load the model, make its weights resident, apply the placement, reset the kernel's
  peak-RSS counter, run ``--mem_steps`` training steps on the largest batches, read the peak. Three figures: the
  process's peak RSS (model included), its peak owned memory (``RssAnon``: without the pages of the memory-mapped
  checkpoint) and what the training steps added over the RSS just before them (activations, gradients, optimizer
  state). The memory subprocesses run with ``MALLOC_MMAP_THRESHOLD_=65536`` by default, which the report states:
  the "added" figures need it (with glibc's dynamic threshold what malloc keeps made them non-monotone in the
  adapter count); ``--malloc_mmap_threshold 0`` measures in a user's default environment.

The cost of the calibration pass itself (time and memory relative to a plain forward, as the number of
calibration prompts grows) is measured by ``benchmarks.calibration_overhead``; both scripts write to
``benchmarks/results/``.

    python -m benchmarks.overhead                                  # writes benchmarks/results/overhead.{json,md}
    python -m benchmarks.overhead --rounds 3 --mem_steps 1         # a quick look
    python -m benchmarks.overhead --placement weightlora=path/to/final/placement.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from benchmarks.calibration_passes import load_model
from benchmarks.common import (
    RESULTS_ROOT,
    PeakRss,
    answer_worker,
    benchmark_parser,
    command_line,
    git_commit,
    json_worker,
    machine,
    write_results,
)
from benchmarks.quality_grid import CALIBRATED, FIXED, TASK_CONFIGS, closest_rank
from benchmarks.stats import median_ratio

REFERENCE, REFERENCE_RANK = "plop", 8  # the budget: PLoP's decision at rank 8, as in the placement-quality grid


# ---- placements -------------------------------------------------------------------------------------------


def task_data(task: str, train_size: int):
    from litgpt_plop.data import ReasoningGym

    return ReasoningGym(task=task, task_config=TASK_CONFIGS.get(task), train_size=train_size, val_size=8, seed=42)


def decide_placements(model, tokenizer, task: str, calibration_samples: int, cka_ratio: float) -> dict[str, dict]:
    """name -> placement dict (``Placement.to_dict``) of every grid method, rank-matched to PLoP at rank 8."""
    from litgpt_plop.args import CalibrationArgs, CkaArgs
    from litgpt_plop.scoring.prompts import tokenize_prompts
    from litgpt_plop.selection.placement import Placement, model_kinds, preset
    from litgpt_plop.decide import plan_placement

    config = model.config
    prompts = task_data(task, calibration_samples).prompts("train", tokenizer)
    ids = tokenize_prompts(prompts, tokenizer)
    shapes: dict[str, tuple[list[str], list[int]]] = {}
    for method in FIXED:  # as finetune decides them: every kind but the head is a candidate; random's seed 42
        kinds = preset(method, config, rank=1, candidates=list(model_kinds(config)), seed=42).kinds
        shapes[method] = (kinds, list(range(config.n_layer)))
    for method in CALIBRATED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CKA's degenerate-layer warning is in the placement's scores
            placement = plan_placement(
                model,
                ids,
                method=method,
                cka=CkaArgs(ratio=cka_ratio),
                calibration=CalibrationArgs(num_samples=len(ids), batch_size=8, progress=False),
            )
        shapes[method] = (placement.kinds, placement.layers)

    def p1(kinds: list[str], layers: list[int]) -> int:
        return Placement.from_kinds(config, kinds, layers=layers, rank=1).trainable_params(config)

    budget = REFERENCE_RANK * p1(*shapes[REFERENCE])
    placements = {}
    for method, (kinds, layers) in shapes.items():
        rank = closest_rank(budget, p1(kinds, layers))
        placements[method] = Placement.from_kinds(config, kinds, layers=layers, rank=rank, lora_alpha=2 * rank, method=method)
    all_kinds, all_layers = shapes["all"]
    placements["all@r8"] = Placement.from_kinds(config, all_kinds, all_layers, rank=8, lora_alpha=16, method="all")
    return {name: p.to_dict(config) for name, p in placements.items()}


# ---- one training step ------------------------------------------------------------------------------------


def training_batches(tokenizer, task: str, count: int, batch_size: int = 8) -> list[dict]:
    """The first ``count`` training batches of the task, as LitGPT's finetuning collates them."""
    data = task_data(task, train_size=count * batch_size)
    data.connect(tokenizer=tokenizer, batch_size=batch_size, max_seq_length=256)
    data.setup()
    loader = data.train_dataloader()
    return [batch for _, batch in zip(range(count), loader)]


def load_resident_model(checkpoint_dir: Path):
    """The checkpoint's plain GPT with every weight copied out of the memory-mapped file (for memory figures)."""
    return load_model(checkpoint_dir, quantize=None)


def adapted(model, placement: dict):
    import torch

    from litgpt_plop.model.adapt import apply_placement
    from litgpt_plop.selection.placement import Placement

    gpt = apply_placement(model, Placement.from_dict(placement))
    gpt.train()
    optimizer = torch.optim.AdamW([p for p in gpt.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    return gpt, optimizer


def train_step(gpt, optimizer, batch: dict) -> float:
    """One step as ``litgpt.finetune.lora.fit`` takes it (no gradient accumulation)."""
    from litgpt.utils import chunked_cross_entropy

    logits = gpt(batch["input_ids"], lm_head_chunk_size=128)
    logits[-1] = logits[-1][..., :-1, :]  # shift the targets: predict token t + 1 from tokens <= t
    loss = chunked_cross_entropy(logits, batch["labels"][..., 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


# ---- measurements -----------------------------------------------------------------------------------------


def measure_time(checkpoint_dir: Path, placements: dict[str, dict], batch: dict, rounds: int, warmup: int, log) -> dict:
    """Median step seconds per placement, placements taking turns (one step each per round)."""
    from litgpt_plop.model.checkpoint import load_checkpoint_model

    models = {}
    for name, placement in placements.items():
        models[name] = adapted(load_checkpoint_model(checkpoint_dir), placement)  # base weights: the shared mmap
    names = list(placements)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            gpt, optimizer = models[name]
            start = time.perf_counter()
            train_step(gpt, optimizer, batch)
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                seconds[name].append(elapsed)
        if round_index >= warmup:
            log(f"  round {round_index - warmup + 1}/{rounds}: " + ", ".join(f"{n} {seconds[n][-1]:.2f}s" for n in names))
    return {name: {"median_step_s": statistics.median(s), "steps_s": s} for name, s in seconds.items()}


def memory_worker(spec: dict) -> dict:
    """In a fresh process: one placement's peak memory over ``mem_steps`` training steps."""
    import torch

    from litgpt.tokenizer import Tokenizer

    torch.set_num_threads(spec["threads"])
    checkpoint_dir = Path(spec["checkpoint_dir"])
    tokenizer = Tokenizer(checkpoint_dir)
    batches = training_batches(tokenizer, spec["task"], spec["batches_pool"])
    batches = sorted(batches, key=lambda b: b["input_ids"].numel(), reverse=True)[: spec["mem_steps"]]
    gpt, optimizer = adapted(load_resident_model(checkpoint_dir), spec["placement"])
    with PeakRss() as rss:
        for batch in batches:
            train_step(gpt, optimizer, batch)
    return {
        **rss.figures(),
        "tokens_per_batch": [int(b["input_ids"].numel()) for b in batches],
    }


def measure_memory(spec: dict, placements: dict[str, dict], log) -> dict:
    results = {}
    for name, placement in placements.items():
        results[name] = json_worker(
            "benchmarks.overhead",
            {**spec, "placement": placement},
            f"memory measurement of {name}",
            threads=spec["threads"],
            malloc_mmap_threshold=spec["malloc_mmap_threshold"],
        )
        r = results[name]
        log(f"  {name:13s} peak {r['peak_rss_mib']:8.1f} MiB  +{r['increase_mib']:7.1f} MiB over {r['baseline_rss_mib']:.1f}")
    return results


# ---- the report -------------------------------------------------------------------------------------------


def describe(placement: dict) -> str:
    from litgpt_plop.selection.placement import Placement

    sites = placement["sites"]
    kinds = Placement.from_dict(placement).kinds  # in LitGPT's order
    layers = sorted({s["layer"] for s in sites})
    ranks = sorted({s["rank"] for s in sites})
    rank = f"r={ranks[0]}" if len(ranks) == 1 else f"r={ranks[0]}..{ranks[-1]}"
    return f"{', '.join(kinds)} on {len(layers)} layers ({len(sites)} sites, {rank})"


def markdown(report: dict) -> str:
    rows = report["placements"]
    ref, ref8 = rows["all"], rows["all@r8"]
    lines = [
        "# Training cost per placement",
        "",
        f"Generated by `{report['command']}` ({report['date']}); see the script's docstring for the method.",
        "",
        f"SmolLM2-135M-Instruct, fp32 on CPU, {report['threads']} torch thread(s), task `{report['task']}`, LoRA training steps"
        f" on batches of 8 training examples. Step time: median of {report['rounds']} interleaved rounds on one batch"
        f" of {report['time_batch_tokens']} tokens (8 x {report['time_batch_tokens'] // 8}). Memory: a fresh process per"
        f" placement, {report['mem_steps']} step(s) on the largest batches; `added` is what the steps added over the"
        " RSS before them (activations, gradients, AdamW state)"
        + (f". Memory measured with glibc MALLOC_MMAP_THRESHOLD_={report['malloc_mmap_threshold']} (not a user's default),"
           " so that freed blocks go back to the system and each peak is what the steps hold."
           if report.get("malloc_mmap_threshold") else ", in the default environment (no MALLOC_* variable)."),
        "",
        "Budget: PLoP's decision at rank 8; every other placement has the rank whose parameter count is closest"
        " (as in the placement-quality grid); `all@r8` is every linear at rank 8, unmatched.",
        "",
        "`step / all, per round` is the ratio of the two steps taken in the same round: its median and range show"
        " how much of a difference is noise.",
        "",
        "| placement | where | trainable params | step (s) | step / all | step / all, per round: median [min, max] | step / all@r8 | peak RSS (MiB) | peak owned (MiB) | added (MiB) | added / all | added / all@r8 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        per_round = [a / b for a, b in zip(r["steps_s"], ref["steps_s"])]
        lines.append(
            f"| {name} | {r['where']} | {r['trainable_params']:,} | {r['median_step_s']:.3f}"
            f" | {r['median_step_s'] / ref['median_step_s']:.3f}"
            f" | {median_ratio(r['steps_s'], ref['steps_s']):.3f} [{min(per_round):.2f}, {max(per_round):.2f}]"
            f" | {r['median_step_s'] / ref8['median_step_s']:.3f}"
            f" | {r['peak_rss_mib']:.0f} | {r.get('peak_anon_mib') or float('nan'):.0f} | {r['increase_mib']:.0f} | {r['increase_mib'] / ref['increase_mib']:.3f}"
            f" | {r['increase_mib'] / ref8['increase_mib']:.3f} |"
        )
    m = report["machine"]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['usable_cpus']} usable cores, torch {m['torch']}, Python {m['python']};"
        f" 1-minute load average {report['loadavg_before'][0]:.2f} before, {report['loadavg_after'][0]:.2f} after"
        f" ({'shared: other processes ran beside it' if max(report['loadavg_before'][0], report['loadavg_after'][0]) > m['usable_cpus'] * 0.5 + 0.5 else 'mostly idle'}).",
        f"Commit: `{report['git_commit']}`.",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser("benchmarks.overhead", __doc__)
    parser.add_argument("--task", default="basic_arithmetic", help="reasoning-gym task for calibration and training batches (default: %(default)s)")
    parser.add_argument("--calibration_samples", type=int, default=64, help="calibration prompts (default: %(default)s)")
    parser.add_argument("--cka_ratio", type=float, default=0.5, help="fraction of layers CKA keeps (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds, every placement once per round (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: %(default)s)")
    parser.add_argument("--mem_steps", type=int, default=2, help="training steps per memory measurement (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--malloc_mmap_threshold", type=int, default=65536, help="glibc MALLOC_MMAP_THRESHOLD_ for the memory subprocesses, so freed blocks go back to the system and each peak is what the step holds"
                        " (bytes; 0: glibc's adaptive default, whose retained memory made peaks non-monotone in the adapter count; default: %(default)s)")
    parser.add_argument("--placement", action="append", default=[], metavar="NAME=PATH", help="an extra placement.json to measure (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT, help="directory for overhead.{json,md} (default: %(default)s)")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    return parser


def placements_to_measure(args: argparse.Namespace, tokenizer: Any, log: Callable[[str], None]) -> dict[str, dict]:
    """The grid's placements decided on the task's prompts (``decide_placements``), then the ``--placement`` ones."""
    from litgpt_plop.model.checkpoint import load_checkpoint_model
    from litgpt_plop.selection.placement import Placement

    model = load_checkpoint_model(args.checkpoint_dir)
    log(f"deciding placements on {args.calibration_samples} {args.task} prompts ...")
    placements = decide_placements(model, tokenizer, args.task, args.calibration_samples, args.cka_ratio)
    del model
    for item in args.placement:
        name, _, path = item.partition("=")
        if not name or not path:
            raise SystemExit(f"--placement expects NAME=PATH, got {item!r}")
        placements[name] = Placement.load(Path(path)).to_dict()
    return placements


def placement_rows(checkpoint_dir: Path, placements: dict[str, dict], times: dict, memory: dict) -> dict[str, dict]:
    """One report row per placement: where it puts LoRA, its trainable parameters, its step time and memory."""
    from litgpt import Config

    from litgpt_plop.selection.placement import Placement

    config = Config.from_file(checkpoint_dir / "model_config.yaml")
    rows = {}
    for name, placement in placements.items():
        rows[name] = {
            "where": describe(placement),
            "trainable_params": Placement.from_dict(placement).trainable_params(config),
            **times[name],
            **memory[name],
            "placement": placement,
        }
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args._worker:
        answer_worker(args._worker, memory_worker)
        return {}

    import torch
    from litgpt.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    command = command_line("benchmarks.overhead", argv)
    log = lambda text: print(text, flush=True)  # noqa: E731
    loadavg_before = os.getloadavg()
    tokenizer = Tokenizer(args.checkpoint_dir)
    placements = placements_to_measure(args, tokenizer, log)

    batches = training_batches(tokenizer, args.task, count=8)
    batch = sorted(batches, key=lambda b: b["input_ids"].numel())[len(batches) // 2]  # a typical (median) batch
    log(f"step time: {len(placements)} placements, {args.warmup} + {args.rounds} rounds, batch {tuple(batch['input_ids'].shape)}")
    times = measure_time(args.checkpoint_dir, placements, batch, args.rounds, args.warmup, log)
    log(f"peak memory: one fresh process per placement, {args.mem_steps} step(s) on the largest batches")
    spec = {"checkpoint_dir": str(args.checkpoint_dir), "task": args.task, "batches_pool": 8, "mem_steps": args.mem_steps, "threads": args.threads,
            "malloc_mmap_threshold": args.malloc_mmap_threshold}
    memory = measure_memory(spec, placements, log)

    report = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "task": args.task,
        "threads": args.threads,
        "rounds": args.rounds,
        "mem_steps": args.mem_steps,
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "time_batch_tokens": int(batch["input_ids"].numel()),
        "loadavg_before": list(loadavg_before),
        "loadavg_after": list(os.getloadavg()),
        "machine": machine(),
        "git_commit": git_commit(),
        "placements": placement_rows(args.checkpoint_dir, placements, times, memory),
    }
    text = markdown(report)
    write_results(args.out, "overhead", report, text)
    print("\n" + text)
    return report


if __name__ == "__main__":
    main()

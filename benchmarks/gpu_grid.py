"""The placement question at statistical power: the quality grid on a lent GPU, in one command.

On the GPU machine (``shared/offline-assets.md``: one H100 or H200, 16 cores, no registry, at most 10 minutes a
command), after the calls that bring SmolLM2's weights in parts (``benchmarks.gpu_weights``; ``python -m
benchmarks.gpu_weights calls`` prints every call, this one last)::

    python -m benchmarks.gpu_grid --kit wheelkit --store .gpu_store --out $OUT        # carry: wheelkit + the last part

1. installs the wheel kit (``benchmarks.gpu_kit``) and lays this project's packages beside it;
2. joins the stored parts of the GGUF, checking each part and the whole file against their SHA-256, and rebuilds
   the real SmolLM2-135M-Instruct checkpoint from it (``python -m litgpt_plop.prepare --gguf``);
3. runs ``benchmarks.placement_quality``'s grid (the same plans, parameter matching, worker and rows) on it:
   every placement of ``METHODS`` on every task of ``TASKS`` for every seed, 400 optimizer steps, 500 held-out
   items per task, the same items for every placement, each run also validated every 20 steps without changing
   its training (its validation curve: ``benchmarks.race_replay`` replays the race at every round length from
   them); seed-major, so a grid cut short still holds whole seeds;
4. several runs at once, each in its own process on the one GPU: as many as the CPU cores allow (one core
   drives a run) and the device's memory holds, at first at a guessed size per run, then at the largest
   reserved memory measured so far; no run is started that the remaining budget cannot finish at the median
   run time measured so far;
5. after every run writes ``gpu_grid.json`` and ``gpu_grid.md`` (``benchmarks.gpu_grid_report``) and the rows
   (``runs.jsonl``) to ``--out``; a second call with the rows of the first in ``--out`` runs only what is missing.

On CPU, ``--dry-run`` goes through the same steps at a tiny size: the parts of the real GGUF stored and joined,
the checkpoint rebuilt from them, then the grid on a tiny random model with SmolLM2's tokenizer (2 tasks, one
scored by accuracy and one by answer likelihood, 2 placements, 2 steps), 2 runs at once.

    python -m benchmarks.gpu_grid --dry-run --out /tmp/gpu_grid_dry
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import copy
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_CHECKPOINT, REPO_ROOT, RESULTS_ROOT, command_line, read_jsonl, write_results
from benchmarks.gpu_check import Budget, Check, child_environment, dry_kit_step, install_step
from benchmarks.gpu_weights import MANIFEST, STORE_DIR, assemble, split, store

MODULE = "benchmarks.gpu_grid"
TASKS = ("basic_arithmetic", "chain_sum", "letter_counting", "chatterbot_qa")
METHODS = ("plop", "plop-inverse", "kappa", "cka", "attention", "mlp", "all", "qv", "weightlora", "race")
CHECKPOINT_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the folder name selects LitGPT's config and prompt style
ROWS = "runs.jsonl"
# What one run is guessed to hold on the device until one has been measured (a 135M model in fp32 with its
# optimizer state, activations of 8 x 256 tokens, the CUDA context), and the share of the device the runs may fill.
FIRST_GUESS_MIB = 6144
CONTEXT_MIB = 600
DEVICE_SHARE = 0.85
FIRST_RUN_GUESS_S = 90.0

# val_interval: every run's validation curve, from which benchmarks.race_replay replays the race at every round length
GPU = {"tasks": list(TASKS), "methods": list(METHODS), "seeds": [0, 1, 2, 3, 4], "steps": 400, "eval_items": 500,
       "train_size": 2000, "calibration_samples": 64, "eval_batch": 100, "val_interval": 20}  # fmt: skip
DRY = {"tasks": ["basic_arithmetic", "chatterbot_qa"], "methods": ["qv", "plop"], "seeds": [0], "steps": 2, "eval_items": 8,
       "train_size": 24, "calibration_samples": 8, "eval_batch": 8, "parallel": 2, "val_interval": 1}  # fmt: skip
# The tiny model of the dry run: SmolLM2's layout (and tokenizer), two small blocks.
DRY_CONFIG = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_query_groups": 2, "head_size": 16, "intermediate_size": 128}


class GridCheck(Check):
    """``gpu_check``'s step record and deadline; what it saves after every step is the grid's results."""

    def save(self) -> None:
        from benchmarks.gpu_grid_report import build

        self.results["elapsed_s"] = round(time.time() - self.start, 1)
        data, markdown = build(read_jsonl(self.out / ROWS), self.results)
        write_results(self.out, "gpu_grid", data, markdown, quiet=True)


@dataclasses.dataclass
class Pool:
    """How many runs go at once: capped by the cores (``cpu_cap``) and by the device memory (``device_mib``,
    None on CPU) at the largest reserved memory measured so far."""

    cpu_cap: int
    device_mib: float | None
    per_run_mib: float = FIRST_GUESS_MIB

    def size(self, rows: list[dict[str, Any]]) -> int:
        measured = [r["cuda_peak_mib"] for r in rows if r.get("cuda_peak_mib")]
        if measured:
            self.per_run_mib = max(measured) + CONTEXT_MIB
        if self.device_mib is None:
            return self.cpu_cap
        return max(1, min(self.cpu_cap, int(DEVICE_SHARE * self.device_mib // self.per_run_mib)))


def grid_argv(options: dict[str, Any], checkpoint_dir: Path, out: Path, work_dir: Path, timeout: float) -> list[str]:
    """``benchmarks.placement_quality``'s command line for this grid."""
    argv = ["--tasks", *options["tasks"], "--methods", *options["methods"], "--seeds", *map(str, options["seeds"])]
    for name in ("steps", "eval_items", "train_size", "calibration_samples", "val_interval"):
        argv += [f"--{name}", str(options[name])]
    argv += ["--checkpoint_dir", str(checkpoint_dir), "--out", str(out), "--work_dir", str(work_dir)]
    return argv + ["--threads", "1", "--timeout", str(int(timeout))]


def device_facts(site: Path) -> dict[str, Any]:
    """The device the runs get, as a child process sees it: ``cuda`` with its name and memory, or ``cpu``."""
    code = (
        "import json, torch\n"
        "cuda = torch.cuda.is_available()\n"
        "print(json.dumps({'device': 'cuda' if cuda else 'cpu', 'torch': torch.__version__,\n"
        "  'gpu_name': torch.cuda.get_device_name(0) if cuda else None,\n"
        "  'device_mib': torch.cuda.get_device_properties(0).total_memory / 2**20 if cuda else None}))"
    )
    with child_environment(site):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"could not query the device:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def rebuild_checkpoint(site: Path, gguf: Path, checkpoint_dir: Path, timeout: float) -> float:
    """``python -m litgpt_plop.prepare`` from the joined GGUF, in the kit's environment; its seconds."""
    t = time.perf_counter()
    with child_environment(site):
        result = subprocess.run([sys.executable, "-m", "litgpt_plop.prepare", "--checkpoint_dir", str(checkpoint_dir), "--gguf", str(gguf)],
                                capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"rebuilding the checkpoint failed:\n{result.stdout[-1500:]}{result.stderr[-2000:]}")
    return time.perf_counter() - t


def tiny_checkpoint(site: Path, tokenizer_dir: Path, checkpoint_dir: Path) -> None:
    """The dry run's model: random weights in SmolLM2's layout (``DRY_CONFIG``) with its tokenizer files."""
    code = (
        "import json, shutil, sys, torch\nfrom pathlib import Path\nfrom litgpt import GPT, Config\n"
        "from litgpt.utils import save_config\n"
        "out, tok, over = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])\n"
        f"config = Config.from_name('SmolLM2-135M-Instruct', **over)\ntorch.manual_seed(0)\n"
        "out.mkdir(parents=True, exist_ok=True)\ntorch.save(GPT(config).state_dict(), out / 'lit_model.pth')\n"
        "save_config(config, out)\n"
        "for name in ('tokenizer.json', 'tokenizer_config.json', 'generation_config.json'): shutil.copy2(tok / name, out / name)\n"
    )
    with child_environment(site):
        result = subprocess.run([sys.executable, "-c", code, str(checkpoint_dir), str(tokenizer_dir), json.dumps(DRY_CONFIG)],
                                capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"building the dry run's model failed:\n{result.stderr[-2000:]}")


def run_grid(check: Check, site: Path, options: dict[str, Any], checkpoint_dir: Path, work: Path, device: dict[str, Any]) -> None:
    """Plan and match every task, then run the pending jobs several at once until done or out of budget,
    rewriting the results after every run."""
    sys.path.insert(0, str(site))  # the parent plans the matching with the kit's litgpt
    from benchmarks import placement_quality as pq

    rows_file = check.out / ROWS
    argv = grid_argv(options, checkpoint_dir, rows_file, work / "runs", timeout=max(60.0, check.left()))
    with child_environment(site):
        grid = pq.make_grid(pq.parse_args(argv), argv)
        grid.args.eval_batch = options["eval_batch"]
        t = time.perf_counter()
        with futures.ThreadPoolExecutor(len(grid.tasks)) as planners:  # plans of the tasks side by side
            list(planners.map(lambda task: pq.load_plans(task, grid.settings, grid.args, grid.work_dir), grid.tasks))
        pq.plan_and_match(grid)  # the plans are cached now: this only matches
        check.step("plan", time.perf_counter() - t)
        todo = pq.pending_jobs(grid)
        pool = Pool(cpu_cap=options.get("parallel") or max(1, (os.cpu_count() or 2) - 2), device_mib=device.get("device_mib"))
        check.results["grid"] = {"settings": dataclasses.asdict(grid.settings), "config_id": grid.config_id, "jobs": len(todo)}
        run_jobs(check, grid, todo, pool, options)


def run_jobs(check: Check, grid: Any, todo: list[tuple], pool: Pool, options: dict[str, Any]) -> None:
    """The job queue: keep ``pool.size`` runs going, start none the budget cannot finish, and rewrite the results
    after each one."""
    from benchmarks import placement_quality as pq

    total, started, running = len(todo), 0, {}
    with futures.ThreadPoolExecutor(pool.cpu_cap) as executor:
        while todo or running:
            rows = read_jsonl(check.out / ROWS)
            walls = [r["wall_s"] for r in rows if r.get("status") == "ok" and r.get("config_id") == grid.config_id]
            expected = statistics.median(walls) if walls else FIRST_RUN_GUESS_S
            while todo and len(running) < pool.size(rows) and check.left() > expected:
                job = todo.pop(0)
                started += 1
                one = dataclasses.replace(grid, args=copy.copy(grid.args))
                one.args.timeout = max(30.0, check.left())
                running[executor.submit(pq.run_one, one, started, total, *job)] = job
            if not running:
                break
            done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in done:
                running.pop(future)
                future.result()
            at_once = pool.size(read_jsonl(check.out / ROWS))
            check.results["parallel"] = {"runs_at_once": at_once, "per_run_mib": round(pool.per_run_mib), "cpu_cap": pool.cpu_cap,
                                         "device_mib": pool.device_mib, "median_run_s": round(expected, 1),
                                         # what the jobs not yet started would take at this pace: a second call's size
                                         "projected_s_left": round((len(todo) + len(running)) * expected / at_once)}  # fmt: skip
            check.results["not_started"] = len(todo)
            check.save()


def weights_step(check: Check, args: argparse.Namespace, work: Path) -> Path:
    """The stored parts joined into the GGUF (the dry run first splits and stores the real one itself)."""
    t = time.perf_counter()
    if args.dry_run:
        from benchmarks.gpu_weights import locate_gguf

        parts = work / "parts"
        manifest = split(locate_gguf(), parts, room=40 * 2**20, last_room=20 * 2**20)
        for part in manifest["parts"]:
            store(parts / part["file"], args.store)
    gguf = assemble(Path(args.store), work / "SmolLM2-135M-Instruct.gguf")
    check.step("weights", time.perf_counter() - t, {"gguf_bytes": gguf.stat().st_size, "manifest": str(Path(args.store) / MANIFEST)})
    return gguf


def main_steps(check: Check, args: argparse.Namespace, options: dict[str, Any], work: Path) -> None:
    site = work / "site"
    if args.dry_run:  # this project's packages staged; the kit (if any) checked, and installed only for its own Python
        args.tokenizer_dir = DEFAULT_CHECKPOINT
        site, _ = dry_kit_step(check, args, work)
    else:
        install_step(check, args.kit, site)
    gguf = weights_step(check, args, work)
    checkpoint_dir = work / "checkpoints" / CHECKPOINT_NAME
    check.step("rebuild_checkpoint", rebuild_checkpoint(site, gguf, checkpoint_dir, timeout=300))
    device = device_facts(site)
    check.results.update(device=device["device"], gpu_name=device["gpu_name"], device_mib=device["device_mib"], torch=device["torch"])
    if device["device"] != "cuda" and not args.dry_run:
        raise RuntimeError("no CUDA device: this is the GPU grid (on CPU, use --dry-run)")
    if args.dry_run:
        tiny = work / "tiny" / CHECKPOINT_NAME
        tiny_checkpoint(site, checkpoint_dir, tiny)
        checkpoint_dir = tiny
    run_grid(check, site, options, checkpoint_dir, work, device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--kit", default="wheelkit", help="the wheel kit folder, or 'none' (the dry run's default) to use this environment")
    parser.add_argument("--store", type=Path, default=STORE_DIR, help="where the calls stored the GGUF's parts (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT, help="gpu_grid.json / .md, runs.jsonl and logs (default: %(default)s)")
    parser.add_argument("--work_dir", type=Path, default=Path(tempfile.gettempdir()) / "gpu_grid", help="kit, checkpoints, run directories (default: %(default)s)")
    parser.add_argument("--budget_s", type=float, default=480.0, help="no run starts that would end past these seconds (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help=f"seeds (default: {GPU['seeds']})")
    parser.add_argument("--tasks", nargs="+", default=None, help=f"tasks (default: {GPU['tasks']})")
    parser.add_argument("--methods", nargs="+", default=None, help=f"placements (default: {GPU['methods']})")
    parser.add_argument("--parallel", type=int, default=None, help="runs at once (default: from the cores and the device memory)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="the same steps on CPU at a tiny size")
    args = parser.parse_args(argv)
    options = {**(DRY if args.dry_run else GPU)}
    options.update({k: v for k, v in (("seeds", args.seeds), ("tasks", args.tasks), ("methods", args.methods), ("parallel", args.parallel)) if v})
    args.kit = None if args.kit == "none" else Path(args.kit).resolve()
    if args.kit is None and not args.dry_run:
        parser.error("the GPU grid needs --kit (the wheel kit of `make gpu-kit`)")
    work = Path(args.work_dir)
    if args.dry_run:
        shutil.rmtree(work, ignore_errors=True)
        args.store = work / "store"
    check = GridCheck(args.out, "gpu_grid", Budget(total_s=args.budget_s), command_line(MODULE, argv))
    check.results["options"] = options
    try:
        main_steps(check, args, options, work)
        check.results["status"] = "complete" if not check.results.get("not_started") else "out of time"
    except (RuntimeError, OSError, ValueError) as error:
        check.results["status"] = f"failed: {error}"[:4000]
    finally:
        check.save()
        if args.dry_run:
            shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_grid: {check.results['status']}; results in {args.out}")
    return 0 if check.results["status"] in ("complete", "out of time") else 1


if __name__ == "__main__":
    sys.exit(main())

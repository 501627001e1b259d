"""The GPU check, one command: QLoRA through Lightning's bitsandbytes precision, ``litgpt-plop finetune`` against
``litgpt finetune_lora``, and the GPU-only tests, on a machine that reaches no registry and no model hub.

On the GPU machine (issue #18; ``shared/offline-assets.md``), from the repository root of the carried tree:

    python -m benchmarks.gpu_check --kit wheelkit --out $OUT        # carry: ["wheelkit"]
    python -m benchmarks.gpu_check --kit wheelkit --out $OUT --plan_only   # steps 1, 2 and 5: gpu_check_plan.*

1. installs the kit's wheels (``benchmarks.gpu_kit``) with ``pip install --no-index --no-deps --target`` and
   lays this project's packages beside them from the source tree;
2. checks the environment (``benchmarks.gpu_prepare``: versions, the GPU, the bitsandbytes library that loads and a 4-bit matmul on CUDA),
   parses every finetune command line with the commands' own parsers, and builds random-weight bf16 LitGPT
   checkpoints shaped like Llama-3.2-1B and SmolLM2-135M with SmolLM2's tokenizer (memory and speed do not
   depend on the weights' values);
3. for each shape, in separate processes, the same data, steps and seed: ``litgpt finetune_lora --quantize
   bnb.nf4 --precision bf16-true`` (LitGPT's default q,v), ``litgpt-plop finetune --plugin qv`` (the same
   placement through the plugin) and ``--plugin plop``, each under ``benchmarks.command_worker`` (CUDA peak
   allocated memory over the whole run and the training loop, device memory in use, step time, parameters);
4. runs the GPU-only tests;
5. last, builds a Llama-3.1-8B-shaped checkpoint (16 GB) and runs ``litgpt-plop plan`` on it under the same worker:
   the device memory of a plan that brings one block at a time onto the GPU (issue #28);
6. writes ``gpu_check.json`` and ``gpu_check.md`` (``benchmarks.gpu_check_report``) to ``--out`` after every step, so that a timeout still
   returns every figure measured so far. Every subprocess has a timeout inside ``--budget_s``.

On CPU, ``--dry-run`` checks all of that which needs no GPU: the kit (complete, bitsandbytes slimmed, under the
carry limit, and pip accepts every wheel for the GPU machine's Python), the same environment check and command
parsing in the same subprocess (the plan's command line too), the checkpoints' shapes on the meta device and
the SmolLM2-135M one built for real, and that pytest collects the GPU-only tests; it writes ``gpu_check_dry_run.json``.

    python -m benchmarks.gpu_check --dry-run                          # CPU: kit, commands, checkpoints
    python -m benchmarks.gpu_check --dry-run --kit none               # without a kit: the rest only
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from benchmarks.command_worker import csv_column, run_command
from benchmarks.common import REPO_ROOT, RESULTS_ROOT, command_line, git_commit, json_worker, log_tail, machine, run_worker, write_results
from benchmarks.gpu_check_report import DEVICE_CARRY, done_criteria, junit_counts, markdown, ratios
from benchmarks.gpu_kit import DEFAULT_KIT, TOKENIZER, KitError, check_kit, install_kit, load_manifest, stage_package
from benchmarks.gpu_prepare import CPU_SHAPE, KINDS, PLAN_SHAPE, SHAPES, Settings, finetune_argv, plan_argv

MODULE = "benchmarks.gpu_check"
RATIO_SHAPE = "Llama-3.2-1B"  # the shape the ratio is taken on (the larger model)
GPU_TESTS = (
    "tests/test_callbacks.py::test_bitsandbytes_precision_calibrates_on_the_4bit_model",
    "tests/test_gpu_qlora.py",
)
# The device tool's limits: one command line of at most 2,000 characters, at most 8 carried paths.
DEVICE_COMMAND_LIMIT = 2000
DEVICE_COMMAND = "python -m benchmarks.gpu_check --kit wheelkit --out $OUT"
TOKENIZER_ENV = "GPU_CHECK_TOKENIZER_DIR"  # tests/test_gpu_qlora.py reads the kit's tokenizer from here


@dataclasses.dataclass(frozen=True)
class Budget:
    """Seconds: the whole check, and the longest any one step may take (each is cut to what is left)."""

    total_s: float = 540.0
    install_s: float = 90.0
    prepare_s: float = 120.0
    run_s: dict[str, float] = dataclasses.field(default_factory=lambda: {"Llama-3.2-1B": 120.0, "SmolLM2-135M": 75.0})
    tests_s: float = 150.0
    plan_s: float = 200.0  # building the 8B shape (16 GB written) and planning it
    # a step is not started with less than this left: it could not finish and would only push the end out
    min_start_s: float = 20.0


# ---- the parent: steps, each in its own process, under a deadline -------------------------------------------


@contextlib.contextmanager
def child_environment(site: Path, extra: dict[str, str] | None = None) -> Iterator[None]:
    """Workers see the installed kit and the staged packages first, then the source tree (``benchmarks``).

    ``PYTHONSAFEPATH`` keeps Python from putting the working directory (the repository root, where
    ``run_worker`` starts them) first on ``sys.path``: there ``litgpt_plop`` lacks its ``callbacks`` subpackage,
    which ``pyproject.toml`` maps from another folder and only the staged copy has.
    """
    values = {"PYTHONPATH": os.pathsep.join([str(site), str(REPO_ROOT)]), "PYTHONSAFEPATH": "1", **(extra or {})}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_finetune(kind: str, label: str, checkpoint_dir: Path, settings: Settings, work: Path, logs: Path,
                 timeout: float, quantize: str | None = "bnb.nf4", precision: str = "bf16-true") -> dict[str, Any]:  # fmt: skip
    """One finetune under ``benchmarks.command_worker`` in its own process; its figures, also when it failed or
    timed out (then with the end of its log). Its output directory is removed afterwards (a merged 1B model is
    3 GB); its report stays in ``logs``."""
    name = f"{label}-{kind}"
    out_dir = work / "runs" / name
    shutil.rmtree(out_dir, ignore_errors=True)
    log = logs / f"{name}.log"
    argv = finetune_argv(kind, checkpoint_dir, out_dir, settings, quantize, precision)
    measured, process = run_command(argv, report=logs / f"{name}.json", log=log, timeout=timeout)
    measured = measured or {}
    iter_times = csv_column(out_dir, "iter_time")
    losses = csv_column(out_dir, "loss")
    placement_file = out_dir / "placement.json"
    placement = json.loads(placement_file.read_text()) if placement_file.is_file() else None
    result = {
        "kind": kind, "shape": label,
        "command": shlex.join(["python", "-m", "litgpt" if argv[0] == "litgpt" else "litgpt_plop", *argv[1:]]),
        "ok": process.ok and measured.get("completed", False), "returncode": process.returncode,
        "timed_out": process.timed_out, "wall_s": round(process.wall_s, 1), "process_peak_rss_mib": process.peak_rss_mib,
        **{k: v for k, v in measured.items() if k != "argv"},
        "iters": len(iter_times),
        # the first steps include CUDA's and bitsandbytes' warm-up
        "median_step_s": statistics.median(iter_times[3:]) if len(iter_times) > 3 else None,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "placement": None if placement is None else {"kinds": sorted({s["kind"] for s in placement["sites"]}),
                                                     "sites": len(placement["sites"]),
                                                     "trainable_params": placement["trainable_params"]},
    }  # fmt: skip
    if not result["ok"]:
        result["log_tail"] = log_tail(log)
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def run_pytest(args: list[str], xml_file: Path, log: Path, timeout: float) -> dict[str, Any]:
    process = run_worker(
        "pytest", [*args, "-p", "no:cacheprovider", "-q", "-rA", f"--junitxml={xml_file}"], log=log, timeout=timeout
    )
    counts = junit_counts(xml_file)
    counts.update(returncode=process.returncode, timed_out=process.timed_out, seconds=round(process.wall_s, 1))
    if process.returncode not in (0, 5) or process.timed_out:
        counts["log_tail"] = log_tail(log)
    return counts


class Check:
    """The state of one check: the results so far, written after every step, and the deadline."""

    def __init__(self, out: Path, stem: str, budget: Budget, command: str) -> None:
        self.out, self.stem, self.budget = Path(out), stem, budget
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs = self.out / "logs"
        self.logs.mkdir(exist_ok=True)
        self.start = time.time()
        self.results: dict[str, Any] = {
            "status": "running", "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": git_commit(), "budget_s": budget.total_s, "steps": {},
        }  # fmt: skip

    def left(self) -> float:
        return self.budget.total_s - (time.time() - self.start)

    def timeout(self, wanted: float) -> float | None:
        """Seconds a step may take: ``wanted``, cut to what is left; None when too little is left to start it."""
        left = self.left()
        return None if left < self.budget.min_start_s else min(wanted, left)

    def step(self, name: str, seconds: float, detail: Any = "ok") -> None:
        self.results["steps"][name] = {"seconds": round(seconds, 1), "result": detail}
        self.save()

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.time() - self.start, 1)
        write_results(self.out, self.stem, self.results, markdown(self.results), quiet=True)


# ---- the steps ----------------------------------------------------------------------------------------------


def prepare_spec(tokenizer_dir: Path, checkpoints: dict[str, Path], build: list[str], work: Path, settings: Settings) -> dict[str, Any]:
    """What the prepare worker (``benchmarks.gpu_prepare``) gets: the tokenizer, where each shape's checkpoint goes,
    which to build for real, and every finetune command line to parse."""
    commands = {f"{label}-{kind}": finetune_argv(kind, path, work / "runs" / f"{label}-{kind}", settings)
                for label, path in checkpoints.items() if label in SHAPES for kind in KINDS}  # fmt: skip
    if PLAN_SHAPE in checkpoints:
        commands[f"plan-{PLAN_SHAPE}"] = plan_argv(checkpoints[PLAN_SHAPE], work / "runs" / f"plan-{PLAN_SHAPE}")
    return {"tokenizer_dir": str(tokenizer_dir), "checkpoints": {k: str(v) for k, v in checkpoints.items()},
            "build": build, "commands": commands}  # fmt: skip


def prepare_in_worker(check: Check, site: Path, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run the prepare worker with the child environment; its report (kept in ``logs/prepare.json``), or a
    ``RuntimeError`` with the end of its log."""
    with child_environment(site):
        return json_worker("benchmarks.gpu_prepare", spec, "prepare", report=check.logs / "prepare.json",
                           log=check.logs / "prepare.log", timeout=timeout)  # fmt: skip


def install_step(check: Check, kit: Path, site: Path) -> None:
    """Install the kit's wheels into ``site`` and lay this project's packages beside them."""
    t = time.perf_counter()
    figures = check_kit(kit, repo_root=None)
    installed = install_kit(kit, site)
    staged = stage_package(site)
    check.results["kit"] = {**figures, **installed, "staged": staged}
    check.step("install", time.perf_counter() - t)


def tests_step(check: Check, site: Path, tokenizer_dir: Path) -> None:
    """The GPU-only tests, with the kit's tokenizer; recorded as skipped when too little time is left."""
    timeout = check.timeout(check.budget.tests_s)
    if timeout is None:
        check.results["gpu_tests"] = {"skipped_for_time": True, "passed": 0, "failed": 0, "skipped": 0, "errors": 0}
        return
    t = time.perf_counter()
    with child_environment(site, {TOKENIZER_ENV: str(tokenizer_dir.resolve())}):
        check.results["gpu_tests"] = run_pytest([str(REPO_ROOT / test) for test in GPU_TESTS], check.logs / "gpu_tests.xml",
                                                check.logs / "gpu_tests.log", timeout)  # fmt: skip
    check.step("gpu_tests", time.perf_counter() - t)


def finetune_step(check: Check, site: Path, label: str, kind: str, checkpoint_dir: Path, settings: Settings, work: Path) -> None:
    """One finetune (``run_finetune``), and the plugin-to-LitGPT ratios once it is on ``RATIO_SHAPE``; recorded as
    skipped when too little time is left."""
    qlora = check.results["qlora"]
    runs = qlora["runs"].setdefault(label, {})
    timeout = check.timeout(check.budget.run_s[label])
    if timeout is None:
        runs[kind] = {"kind": kind, "ok": False, "skipped_for_time": True}
        return
    t = time.perf_counter()
    with child_environment(site):
        runs[kind] = run_finetune(kind, label, checkpoint_dir, settings, work, check.logs, timeout)
    if label == RATIO_SHAPE:
        qlora.update(ratios(runs))
    check.step(f"{label}-{kind}", time.perf_counter() - t)


def plan_step(check: Check, site: Path, tokenizer_dir: Path, work: Path, shape: str = PLAN_SHAPE) -> None:
    """Build the ``shape`` checkpoint (``benchmarks.gpu_prepare``'s worker) and run ``litgpt-plop plan`` on it under
    ``benchmarks.command_worker``: the device memory of the block-by-block plan (CUDA peak allocated and device
    memory in use over the whole command), its peak RSS and time. Recorded as skipped when too little time is
    left; the checkpoint and the plan's output are removed afterwards."""
    timeout = check.timeout(check.budget.plan_s)
    if timeout is None:
        check.results["plan"] = {"shape": shape, "ok": False, "skipped_for_time": True}
        return
    t = time.perf_counter()
    checkpoint_dir, out_dir = work / "checkpoints" / shape, work / "runs" / f"plan-{shape}"
    result: dict[str, Any] = {"shape": shape}
    try:
        spec = {"tokenizer_dir": str(tokenizer_dir), "checkpoints": {shape: str(checkpoint_dir)}, "build": [shape], "commands": {}}
        with child_environment(site):
            built = json_worker("benchmarks.gpu_prepare", spec, "build the plan's checkpoint", report=check.logs / "plan_build.json",
                                log=check.logs / "plan_build.log", timeout=timeout)  # fmt: skip
        result["checkpoint"] = built["checkpoints"][shape]
        left = timeout - (time.perf_counter() - t)
        if left < check.budget.min_start_s:
            result.update(ok=False, skipped_for_time=True)
            return
        argv = plan_argv(checkpoint_dir, out_dir)
        with child_environment(site):
            measured, process = run_command(argv, report=check.logs / "plan.json", log=check.logs / "plan.log", timeout=left)
        measured = measured or {}
        placement_file = out_dir / "placement.json"
        placement = json.loads(placement_file.read_text()) if placement_file.is_file() else None
        result.update({
            "command": shlex.join(["python", "-m", "litgpt_plop", *argv[1:]]),
            "ok": process.ok and measured.get("completed", False), "returncode": process.returncode,
            "timed_out": process.timed_out, "wall_s": round(process.wall_s, 1), "process_peak_rss_mib": process.peak_rss_mib,
            **{k: v for k, v in measured.items() if k != "argv"},
            "placement_kinds": None if placement is None else sorted({s["kind"] for s in placement["sites"]}),
        })  # fmt: skip
        if not result["ok"]:
            result["log_tail"] = log_tail(check.logs / "plan.log")
    except RuntimeError as error:  # the build failed or timed out: recorded, the check goes on
        result.update(ok=False, error=str(error)[:2000])
    finally:
        check.results["plan"] = result
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        check.step(f"plan-{shape}", time.perf_counter() - t)


def measure_in_order(check: Check, site: Path, tokenizer_dir: Path, checkpoints: dict[str, Path], settings: Settings, work: Path) -> None:
    """The issue's figure first (LitGPT and the plugin's qv on the 1B shape), then the tests, then the rest: what a
    run cut short by its budget misses matters least."""
    check.results["qlora"] = {"model": RATIO_SHAPE, "settings": dataclasses.asdict(settings), "runs": {}}
    order = [(RATIO_SHAPE, "litgpt"), (RATIO_SHAPE, "plugin-qv"), ("tests", ""), (RATIO_SHAPE, "plugin-plop")]
    order += [(label, kind) for label in SHAPES if label != RATIO_SHAPE for kind in KINDS]
    for label, kind in order:
        if label == "tests":
            tests_step(check, site, tokenizer_dir)
        else:
            finetune_step(check, site, label, kind, checkpoints[label], settings, work)
    plan_step(check, site, tokenizer_dir, work)  # last: issue #28's figure, not this check's own


def gpu_run(args: argparse.Namespace) -> dict[str, Any]:
    """The check on the GPU machine (see the module docstring)."""
    budget, settings = Budget(total_s=args.budget_s, prepare_s=args.prepare_s), Settings(steps=args.steps)
    # the plan alone writes gpu_check_plan.*, beside (not over) the last full check's files
    check = Check(args.out, "gpu_check_plan" if args.plan_only else "gpu_check", budget, command_line(MODULE, None))
    results = check.results
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    site = work / "site"
    try:
        install_step(check, args.kit, site)
        checkpoints = {label: work / "checkpoints" / label for label in (*SHAPES, PLAN_SHAPE)}  # the plan's: meta until its step
        tokenizer_dir = Path(args.kit) / TOKENIZER
        t = time.perf_counter()
        spec = prepare_spec(tokenizer_dir, checkpoints, [] if args.plan_only else list(SHAPES), work, settings)
        env = prepare_in_worker(check, site, spec, check.timeout(budget.prepare_s) or budget.min_start_s)
        results.update(device=env["device"], gpu_name=env.get("gpu_name"), environment=env, machine=machine())
        check.step("prepare", time.perf_counter() - t)
        if env["device"] != "cuda":
            raise RuntimeError("no CUDA device: this is the GPU check (on CPU, use --dry-run)")
        if args.plan_only:
            plan_step(check, site, tokenizer_dir, work)
        else:
            measure_in_order(check, site, tokenizer_dir, checkpoints, settings, work)
        results["status"] = "complete"
    except (KitError, RuntimeError, OSError) as error:
        results["status"] = f"failed: {error}"[:4000]
    finally:
        results["done_criteria"] = done_criteria(results)
        check.save()
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        shutil.rmtree(work / "runs", ignore_errors=True)
    return results


# ---- the dry run --------------------------------------------------------------------------------------------


def dry_kit_step(check: Check, args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The kit checked and pip's acceptance of its wheels for the GPU machine's Python (a real install only when
    this is that Python), and this project's packages staged: the site the workers see and the tokenizer."""
    t = time.perf_counter()
    site = work / "site"
    if args.kit is None:
        check.results["kit"] = {"checked": False, "reason": "no kit given (--kit none)"}
        tokenizer_dir = Path(args.tokenizer_dir)
    else:
        kit = check_kit(args.kit)
        manifest = load_manifest(args.kit)
        same_python = platform.python_version().startswith(manifest["python_version"] + ".")
        installed = install_kit(args.kit, work / "kit_install", for_target_platform=not same_python)
        check.results["kit"] = {"checked": True, **kit, "pip_accepts": installed}
        if same_python:
            site = work / "kit_install"
        tokenizer_dir = Path(args.kit) / TOKENIZER
    check.results["staged"] = stage_package(site)
    check.step("kit", time.perf_counter() - t)
    return site, tokenizer_dir


def collect_step(check: Check, site: Path, tokenizer_dir: Path) -> list[str]:
    """Whether pytest collects the GPU-only tests in the workers' environment: the problems found."""
    t = time.perf_counter()
    with child_environment(site, {TOKENIZER_ENV: str(tokenizer_dir.resolve())}):
        process = run_worker("pytest", ["--collect-only", "-q", "-p", "no:cacheprovider", *[str(REPO_ROOT / t) for t in GPU_TESTS]],
                             timeout=180)  # fmt: skip
    collected = [line for line in process.stdout.splitlines() if "::" in line]
    check.results["gpu_tests_collected"] = collected
    problems = []
    if process.returncode != 0 or not collected or not any(GPU_TESTS[0].split("::")[1] in c for c in collected):
        problems.append(f"pytest did not collect the GPU-only tests:\n{process.stdout[-1500:]}{process.stderr[-1500:]}")
    check.step("collect_gpu_tests", time.perf_counter() - t)
    return problems


def dry_run(args: argparse.Namespace) -> dict[str, Any]:
    """What can be checked on CPU (see the module docstring)."""
    settings = Settings(steps=args.steps)
    check = Check(args.out, "gpu_check_dry_run", Budget(total_s=args.budget_s), command_line(MODULE, None))
    results = check.results
    results["device_command"] = {"command": DEVICE_COMMAND, "carry": DEVICE_CARRY,
                                 "length_ok": len(DEVICE_COMMAND) <= DEVICE_COMMAND_LIMIT}  # fmt: skip
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    problems = []
    try:
        site, tokenizer_dir = dry_kit_step(check, args, work)
        checkpoints = {label: work / "checkpoints" / label for label in (*SHAPES, PLAN_SHAPE)}
        t = time.perf_counter()
        spec = prepare_spec(tokenizer_dir, checkpoints, [CPU_SHAPE], work, settings)
        results["prepare"] = prepare_in_worker(check, site, spec, check.timeout(Budget().prepare_s) or 60)
        check.step("prepare", time.perf_counter() - t)
        if not (Path(results["prepare"]["checkpoints"][CPU_SHAPE]["path"]) / "lit_model.pth").is_file():
            problems.append(f"{CPU_SHAPE}: checkpoint not written")
        problems += collect_step(check, site, tokenizer_dir)
        if not results["device_command"]["length_ok"]:
            problems.append("the device command is too long")
        results["status"] = "ok" if not problems else "problems: " + "; ".join(problems)
    except (KitError, RuntimeError, OSError) as error:
        results["status"] = f"failed: {error}"[:4000]
    finally:
        check.save()
        shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--kit", default=str(DEFAULT_KIT), help="the wheel kit folder, or 'none' for a dry run without one (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT, help="where gpu_check.json / .md (or gpu_check_dry_run.*) and logs/ go (default: %(default)s)")
    parser.add_argument("--work_dir", type=Path, default=Path(tempfile.gettempdir()) / "gpu_check", help="the installed kit, checkpoints and run outputs; removed at the end (default: %(default)s)")
    parser.add_argument("--tokenizer_dir", type=Path, default=REPO_ROOT / "checkpoints" / "HuggingFaceTB" / "SmolLM2-135M-Instruct",
                        help="SmolLM2's tokenizer files for a dry run without a kit (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=Settings.steps, help="optimizer steps per finetune (default: %(default)s)")
    parser.add_argument("--budget_s", type=float, default=Budget.total_s, help="the whole check's seconds; no step starts past them (default: %(default)s)")
    parser.add_argument("--prepare_s", type=float, default=Budget.prepare_s,
                        help="the longest the environment check and checkpoint building may take (default: %(default)s; building the 1B"
                        " checkpoint on a CPU to rehearse takes longer)")
    parser.add_argument("--plan_only", action="store_true",
                        help="only the environment check and the 8B-shaped plan's device memory (a shorter call, for a GPU session"
                        " whose time goes mostly to the quality grid); writes gpu_check_plan.*")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="check on CPU what can be checked without a GPU")
    args = parser.parse_args(argv)
    args.kit = None if args.kit == "none" else Path(args.kit).resolve()
    if args.dry_run:
        results = dry_run(args)
        print(json.dumps({k: results[k] for k in ("status", "kit", "steps") if k in results}, indent=2))
        return 0 if results["status"] == "ok" else 1
    if args.kit is None:
        parser.error("the GPU check needs --kit")
    results = gpu_run(args)
    print(markdown(results))
    return 0 if results["status"] == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())

"""The GPU check, one command: QLoRA through Lightning's bitsandbytes precision, ``litgpt-plop finetune`` against
``litgpt finetune_lora``, and the GPU-only tests, on a machine that reaches no registry and no model hub.

On the GPU machine (issue #18; ``shared/offline-assets.md``), from the repository root of the carried tree:

    python -m benchmarks.gpu_check --kit wheelkit --out $OUT        # carry: ["wheelkit"]

1. installs the kit's wheels (``benchmarks.gpu_kit``) with ``pip install --no-index --no-deps --target`` and
   lays this project's packages beside them from the source tree;
2. checks the environment (versions, the GPU, the bitsandbytes library that loads and a 4-bit matmul on CUDA),
   parses every finetune command line with the commands' own parsers, and builds random-weight bf16 LitGPT
   checkpoints shaped like Llama-3.2-1B and SmolLM2-135M with SmolLM2's tokenizer (memory and speed do not
   depend on the weights' values);
3. for each shape, in separate processes, the same data, steps and seed: ``litgpt finetune_lora --quantize
   bnb.nf4 --precision bf16-true`` (LitGPT's default q,v), ``litgpt-plop finetune --plugin qv`` (the same
   placement through the plugin) and ``--plugin plop``, each under ``benchmarks.gpu_worker`` (CUDA peak
   allocated memory over the whole run and the training loop, device memory in use, step time, parameters);
4. runs the GPU-only tests;
5. writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out`` after every step, so that a timeout still
   returns every figure measured so far. Every subprocess has a timeout inside ``--budget_s``.

On CPU, ``--dry-run`` checks all of that which needs no GPU: the kit (complete, bitsandbytes slimmed, under the
carry limit, and pip accepts every wheel for the GPU machine's Python), the same environment check and command
parsing in the same subprocess, both checkpoints' shapes on the meta device and the SmolLM2-135M one built for
real, and that pytest collects the GPU-only tests; it writes ``gpu_check_dry_run.json``.

    python -m benchmarks.gpu_check --dry-run                          # CPU: kit, commands, checkpoints
    python -m benchmarks.gpu_check --dry-run --kit none               # without a kit: the rest only
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator

from benchmarks.common import REPO_ROOT, RESULTS_ROOT, git_commit, machine, run_worker, write_json, write_text
from benchmarks.gpu_kit import (
    DEFAULT_KIT,
    TOKENIZER,
    TOKENIZER_FILES,
    KitError,
    check_kit,
    install_kit,
    load_manifest,
    stage_package,
)

# label -> LitGPT config name. The ratio the issue asks for is taken on the first (the larger model).
SHAPES: dict[str, str] = {"Llama-3.2-1B": "Llama-3.2-1B", "SmolLM2-135M": "SmolLM2-135M"}
RATIO_SHAPE = "Llama-3.2-1B"
CPU_SHAPE = "SmolLM2-135M"  # small enough for a dry run to build for real on CPU (326 MB in bf16)
KINDS = ("litgpt", "plugin-qv", "plugin-plop")
PEAK_RATIO_LIMIT = 1.02
GPU_TESTS = (
    "tests/test_callbacks.py::test_bitsandbytes_precision_calibrates_on_the_4bit_model",
    "tests/test_gpu_qlora.py",
)
# The device tool's limits: one command line of at most 2,000 characters, at most 8 carried paths.
DEVICE_COMMAND_LIMIT = 2000
DEVICE_COMMAND = "python -m benchmarks.gpu_check --kit wheelkit --out $OUT"
DEVICE_CARRY = ["wheelkit"]
TOKENIZER_ENV = "GPU_CHECK_TOKENIZER_DIR"  # tests/test_gpu_qlora.py reads the kit's tokenizer from here


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every finetune run gets: the same data, steps, batch and seed."""

    steps: int = 20
    micro_batch_size: int = 4
    train_size: int = 64
    val_size: int = 8
    max_seq_length: int = 256
    calibration_samples: int = 32
    seed: int = 1337


@dataclasses.dataclass(frozen=True)
class Budget:
    """Seconds: the whole check, and the longest any one step may take (each is cut to what is left)."""

    total_s: float = 400.0
    install_s: float = 90.0
    prepare_s: float = 120.0
    run_s: dict[str, float] = dataclasses.field(default_factory=lambda: {"Llama-3.2-1B": 120.0, "SmolLM2-135M": 75.0})
    tests_s: float = 150.0
    # a step is not started with less than this left: it could not finish and would only push the end out
    min_start_s: float = 20.0


def finetune_argv(
    kind: str, checkpoint_dir: Path, out_dir: Path, settings: Settings, quantize: str | None = "bnb.nf4",
    precision: str = "bf16-true",
) -> list[str]:  # fmt: skip
    """The command line of one run (``litgpt ...`` or ``litgpt-plop ...``, as ``benchmarks.gpu_worker`` takes it).

    Every run trains the same micro-batches: reasoning-gym items in Alpaca's prompt style (not the one LitGPT
    would pick per model, so both shapes see the same tokens), no periodic save, no validation beyond the two
    batches LitGPT's loop always checks first, one CSV row per step.
    """
    s = settings
    common = [
        str(checkpoint_dir), "--out_dir", str(out_dir), "--precision", precision,
        "--data", "litgpt_plop.data.ReasoningGym", "--data.train_size", str(s.train_size),
        "--data.val_size", str(s.val_size), "--data.prompt_style", "alpaca",
        "--train.micro_batch_size", str(s.micro_batch_size), "--train.global_batch_size", str(s.micro_batch_size),
        "--train.max_steps", str(s.steps), "--train.max_seq_length", str(s.max_seq_length),
        "--train.lr_warmup_steps", "2", "--train.save_interval", "100000", "--train.log_interval", "1",
        "--eval.interval", "100000", "--eval.initial_validation", "false", "--eval.final_validation", "false",
        "--logger_name", "csv", "--seed", str(s.seed),
    ]  # fmt: skip
    if quantize:
        common += ["--quantize", quantize]
    if kind == "litgpt":
        return ["litgpt", "finetune_lora", *common]  # LitGPT's defaults: LoRA on query and value, rank 8
    if kind.startswith("plugin-"):  # plugin-qv, plugin-plop, ... (plugin-none: the tests)
        method = kind.removeprefix("plugin-")
        calibration = ["--calibration.num_samples", str(s.calibration_samples)] if method.startswith("plop") else []
        return ["litgpt-plop", "finetune", *common, "--plugin", method, *calibration]
    raise ValueError(f"unknown run kind {kind!r}: 'litgpt' or 'plugin-<method>'")


# ---- the subprocess that prepares: environment, command parsing, checkpoints -------------------------------


def parse_command(argv: list[str]) -> dict[str, Any]:
    """Parse a ``litgpt`` / ``litgpt-plop`` command line with that command's own jsonargparse parser (the same
    process-wide settings as its entry point) and instantiate its classes, without running it."""
    from jsonargparse import CLI, capture_parser, set_config_read_mode, set_docstring_parse_options

    set_docstring_parse_options(attribute_docstrings=True)
    set_config_read_mode(urls_enabled=True)
    if argv[0] == "litgpt":
        from litgpt.__main__ import PARSER_DATA as commands
    else:
        from litgpt_plop.commands.cli import parser_data

        commands = parser_data()
    parser = capture_parser(lambda: CLI(commands, args=argv[1:]))
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            cfg = parser.parse_args(argv[1:])
    except SystemExit:  # jsonargparse prints the usage and exits on a bad command line
        lines = errors.getvalue().strip().splitlines() or ["(no message)"]
        raise ValueError(f"`{shlex.join(argv[:2])} ...` does not parse: {lines[-1]}") from None
    init = parser.instantiate_classes(cfg)
    subcommand = cfg["subcommand"]
    data = init[subcommand].get("data")
    return {"subcommand": subcommand, "data": type(data).__name__, "quantize": cfg[subcommand].get("quantize")}


def build_random_checkpoint(config_name: str, checkpoint_dir: Path, tokenizer_dir: Path, device: str, real: bool) -> dict[str, Any]:
    """A LitGPT checkpoint shaped like ``config_name`` with random bf16 weights (N(0, 0.02); norm scales 1, biases
    0, so activations keep their scale) and SmolLM2's tokenizer files. ``real=False``: the shape only (meta
    device), nothing written."""
    import torch
    from litgpt import GPT, Config
    from litgpt.utils import save_config

    start = time.perf_counter()
    config = Config.from_name(config_name)
    with torch.device("meta"):
        model = GPT(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    figures: dict[str, Any] = {
        "config": config_name, "params": params, "bf16_bytes": 2 * params, "n_layer": config.n_layer,
        "n_embd": config.n_embd, "padded_vocab_size": config.padded_vocab_size, "built": real,
    }  # fmt: skip
    if not real:
        return figures
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device).manual_seed(0)
    state = {}
    for name, shape in shapes.items():
        tensor = torch.empty(shape, dtype=torch.bfloat16, device=device)
        if len(shape) == 1:
            tensor.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
        state[name] = tensor.cpu()
    torch.save(state, checkpoint_dir / "lit_model.pth")
    save_config(config, checkpoint_dir)
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_dir / name, checkpoint_dir / name)
    figures.update(path=str(checkpoint_dir), file_bytes=(checkpoint_dir / "lit_model.pth").stat().st_size,
                   seconds=round(time.perf_counter() - start, 1))  # fmt: skip
    return figures


def cuda_4bit_probe() -> dict[str, Any]:
    """A bitsandbytes NF4 round trip and a 4-bit linear forward and backward on CUDA in bf16: the kernels of the
    slimmed library, before any finetune depends on them."""
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    weight = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4")
    error = (bnb.functional.dequantize_4bit(packed, state) - weight).abs().mean() / weight.abs().mean()
    layer = bnb.nn.Linear4bit(128, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4")
    layer = layer.cuda()
    x = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().pow(2).sum().backward()
    return {"nf4_relative_error": float(error), "backward_finite": bool(torch.isfinite(x.grad).all())}


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """The prepare subprocess: environment, tokenizer, checkpoints, and every command line parsed."""
    import importlib.metadata as metadata

    import torch

    report: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable}
    for dist in ("torch", "lightning", "litgpt", "bitsandbytes", "jsonargparse", "reasoning-gym", "transformers"):
        try:
            report[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            report[dist] = None
    report["torch_cuda"] = torch.version.cuda
    cuda = torch.cuda.is_available()
    report["device"] = "cuda" if cuda else "cpu"
    if cuda:
        properties = torch.cuda.get_device_properties(0)
        report.update(gpu_name=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                      compute_capability=f"{properties.major}.{properties.minor}")  # fmt: skip
    import bitsandbytes
    import litgpt_plop

    try:  # which native library bitsandbytes loaded (the slimmed kit has the CUDA 13.0 one and the CPU one)
        report["bitsandbytes_library"] = Path(bitsandbytes.cextension.lib._lib._name).name
    except Exception as error:  # noqa: BLE001 - a record, not a requirement
        report["bitsandbytes_library"] = f"unknown ({error!r})"
    report["bitsandbytes_path"] = str(Path(bitsandbytes.__file__).parent)
    report["litgpt_plop_path"] = str(Path(litgpt_plop.__file__).parent)
    import litgpt_plop.callbacks  # noqa: F401  (the package-dir mapping: only an install or the staged copy has it)

    if cuda:
        try:  # recorded, not fatal: the finetunes below show the same failure in full
            report["cuda_4bit"] = cuda_4bit_probe()
        except Exception as error:  # noqa: BLE001
            report["cuda_4bit"] = {"error": repr(error)[:2000]}
    from litgpt.tokenizer import Tokenizer

    tokenizer_dir = Path(spec["tokenizer_dir"])
    report["tokenizer_ids"] = Tokenizer(tokenizer_dir).encode("What is 12 + 30?").tolist()
    device = "cuda" if cuda else "cpu"
    report["checkpoints"] = {
        label: build_random_checkpoint(SHAPES[label], Path(path), tokenizer_dir, device, real=label in spec["build"])
        for label, path in spec["checkpoints"].items()
    }
    report["commands"] = {name: parse_command(argv) for name, argv in spec["commands"].items()}
    return report


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


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def csv_column(out_dir: Path, name: str) -> list[float]:
    """A column of the run's CSV log (LitGPT's ``logs/csv/version_0/metrics.csv``)."""
    files = sorted(out_dir.glob("logs/csv/*/metrics.csv"))
    if not files:
        return []
    with open(files[-1]) as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def run_finetune(kind: str, label: str, checkpoint_dir: Path, settings: Settings, work: Path, logs: Path,
                 timeout: float, quantize: str | None = "bnb.nf4", precision: str = "bf16-true") -> dict[str, Any]:  # fmt: skip
    """One finetune under ``benchmarks.gpu_worker`` in its own process; its figures, also when it failed or timed
    out (then with the end of its log). Its output directory is removed afterwards (a merged 1B model is 3 GB)."""
    name = f"{label}-{kind}"
    out_dir = work / "runs" / name
    shutil.rmtree(out_dir, ignore_errors=True)
    report = logs / f"{name}.json"
    report.unlink(missing_ok=True)
    log = logs / f"{name}.log"
    argv = finetune_argv(kind, checkpoint_dir, out_dir, settings, quantize, precision)
    process = run_worker("benchmarks.gpu_worker", ["--report", str(report), "--", *argv], log=log, timeout=timeout)
    measured = json.loads(report.read_text()) if report.is_file() else {}
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
        result["log_tail"] = tail(log)
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def junit_counts(xml_file: Path) -> dict[str, Any]:
    """passed / failed / skipped / errors and each test's outcome, from pytest's JUnit XML."""
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "tests": []}
    if not xml_file.is_file():
        return counts
    for case in ET.parse(xml_file).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child, name in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            element = case.find(child)
            if element is not None:
                outcome, message = name, (element.get("message") or "")[:500]
                break
        counts[outcome] += 1
        counts["tests"].append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "message": message})
    return counts


def run_pytest(args: list[str], xml_file: Path, log: Path, timeout: float) -> dict[str, Any]:
    process = run_worker(
        "pytest", [*args, "-p", "no:cacheprovider", "-q", "-rA", f"--junitxml={xml_file}"], log=log, timeout=timeout
    )
    counts = junit_counts(xml_file)
    counts.update(returncode=process.returncode, timed_out=process.timed_out, seconds=round(process.wall_s, 1))
    if process.returncode not in (0, 5) or process.timed_out:
        counts["log_tail"] = tail(log)
    return counts


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """plugin ``qv`` / LitGPT on the same shape: CUDA peak allocated (whole run, training loop), device memory in
    use (whole run), step time; and whether the peaks are within ``PEAK_RATIO_LIMIT``."""
    litgpt, plugin = runs.get("litgpt", {}), runs.get("plugin-qv", {})

    def ratio(key: str) -> float | None:
        # a training-loop figure stands once both loops finished (a run killed in its final merge keeps it);
        # a whole-run figure only when both runs completed
        done = (lambda r: "fit_seconds" in r) if key.startswith("fit_") else (lambda r: r.get("ok"))
        a, b = plugin.get(key), litgpt.get(key)
        return round(a / b, 4) if a and b and done(plugin) and done(litgpt) else None

    out = {
        "peak_ratio_plugin_vs_litgpt": ratio("peak_cuda_whole_run_mib"),
        "loop_peak_ratio_plugin_vs_litgpt": ratio("fit_peak_cuda_mib"),
        "device_used_peak_ratio_plugin_vs_litgpt": ratio("device_used_peak_whole_run_mib"),
        "step_time_ratio_plugin_vs_litgpt": ratio("median_step_s"),
    }
    peaks = [out["peak_ratio_plugin_vs_litgpt"], out["loop_peak_ratio_plugin_vs_litgpt"]]
    out["within_limit"] = None if None in peaks else all(r <= PEAK_RATIO_LIMIT for r in peaks)
    out["limit"] = PEAK_RATIO_LIMIT
    return out


def markdown(results: dict[str, Any]) -> str:
    """The figures as a table, for RESULTS.md's CUDA section."""
    lines = [
        f"# GPU check: {results.get('gpu_name') or results.get('device')}",
        "",
        f"Status: {results['status']}. Command: `{results['command']}` (carry {DEVICE_CARRY}).",
    ]
    tests = results.get("gpu_tests")
    if tests:
        lines += ["", f"GPU-only tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped,"
                      f" {tests['errors']} errors."]  # fmt: skip
    qlora = results.get("qlora", {})
    s = qlora.get("settings", {})
    if s:
        lines += ["", f"QLoRA (`--quantize bnb.nf4 --precision bf16-true`): {s['steps']} steps, micro-batch"
                      f" {s['micro_batch_size']}, reasoning-gym basic_arithmetic ({s['train_size']} items, Alpaca prompts),"
                      f" max_seq_length {s['max_seq_length']}, seed {s['seed']}; random-weight checkpoints.",
                  "", "| shape | run | ok | CUDA peak whole run MiB | CUDA peak training loop MiB | device used peak MiB |"
                      " median step s | LoRA params | optimizer updates | wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def cell(value: Any, fmt: str = "{:.1f}") -> str:
        return "?" if value is None else fmt.format(value)

    for label, runs in qlora.get("runs", {}).items():
        for kind, r in runs.items():
            lines.append("| " + " | ".join([
                label, kind, "yes" if r.get("ok") else ("timed out" if r.get("timed_out") else "no"),
                cell(r.get("peak_cuda_whole_run_mib")), cell(r.get("fit_peak_cuda_mib")),
                cell(r.get("device_used_peak_whole_run_mib")), cell(r.get("median_step_s"), "{:.3f}"),
                cell(r.get("lora_params"), "{:,}"), cell(r.get("optimizer_params"), "{:,}"), cell(r.get("wall_s"), "{:.0f}"),
            ]) + " |")  # fmt: skip
    if qlora.get("peak_ratio_plugin_vs_litgpt") is not None or qlora.get("runs"):
        lines += ["", f"On {qlora.get('model')}: plugin qv / LitGPT CUDA peak whole run"
                      f" {qlora.get('peak_ratio_plugin_vs_litgpt')}, training loop {qlora.get('loop_peak_ratio_plugin_vs_litgpt')},"
                      f" device memory in use {qlora.get('device_used_peak_ratio_plugin_vs_litgpt')}, step time"
                      f" {qlora.get('step_time_ratio_plugin_vs_litgpt')} (limit for the peaks: {PEAK_RATIO_LIMIT})."]  # fmt: skip
    return "\n".join(lines)


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
        write_json(self.out / f"{self.stem}.json", self.results)
        write_text(self.out / f"{self.stem}.md", markdown(self.results))


def prepare_in_worker(check: Check, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``prepare`` in a worker with the child environment; its report, or a ``RuntimeError`` with its log."""
    spec_file, report_file, log = check.logs / "prepare_spec.json", check.logs / "prepare.json", check.logs / "prepare.log"
    write_json(spec_file, spec)
    report_file.unlink(missing_ok=True)
    process = run_worker("benchmarks.gpu_check", ["--_prepare", str(spec_file), "--_report", str(report_file)], log=log, timeout=timeout)
    if not process.ok or not report_file.is_file():
        reason = "timed out" if process.timed_out else f"exit {process.returncode}"
        raise RuntimeError(f"prepare {reason}:\n{tail(log)}")
    return json.loads(report_file.read_text())


def all_commands(checkpoints: dict[str, Path], work: Path, settings: Settings) -> dict[str, list[str]]:
    return {f"{label}-{kind}": finetune_argv(kind, path, work / "runs" / f"{label}-{kind}", settings)
            for label, path in checkpoints.items() for kind in KINDS}  # fmt: skip


def gpu_run(args: argparse.Namespace) -> dict[str, Any]:
    """The check on the GPU machine (see the module docstring)."""
    budget, settings = Budget(total_s=args.budget_s, prepare_s=args.prepare_s), Settings(steps=args.steps)
    check = Check(args.out, "gpu_check", budget, shlex.join(["python", "-m", "benchmarks.gpu_check", *sys.argv[1:]]))
    results = check.results
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    site = work / "site"
    try:
        t = time.perf_counter()
        kit = check_kit(args.kit, repo_root=None)
        installed = install_kit(args.kit, site)
        staged = stage_package(site)
        results["kit"] = {**kit, **installed, "staged": staged}
        check.step("install", time.perf_counter() - t)

        checkpoints = {label: work / "checkpoints" / SHAPES[label] for label in SHAPES}
        tokenizer_dir = Path(args.kit) / TOKENIZER
        spec = {"tokenizer_dir": str(tokenizer_dir), "checkpoints": {k: str(v) for k, v in checkpoints.items()},
                "build": list(SHAPES), "commands": all_commands(checkpoints, work, settings)}  # fmt: skip
        t = time.perf_counter()
        with child_environment(site):
            env = prepare_in_worker(check, spec, check.timeout(budget.prepare_s) or budget.min_start_s)
        results.update(device=env["device"], gpu_name=env.get("gpu_name"), environment=env, machine=machine())
        check.step("prepare", time.perf_counter() - t)
        if env["device"] != "cuda":
            raise RuntimeError("no CUDA device: this is the GPU check (on CPU, use --dry-run)")

        qlora = results["qlora"] = {"model": RATIO_SHAPE, "settings": dataclasses.asdict(settings), "runs": {}}
        # The figure first (LitGPT and the plugin's qv on the 1B shape), then the tests, then the rest.
        order = [(RATIO_SHAPE, "litgpt"), (RATIO_SHAPE, "plugin-qv"), ("tests", ""), (RATIO_SHAPE, "plugin-plop")]
        order += [(label, kind) for label in SHAPES if label != RATIO_SHAPE for kind in KINDS]
        for label, kind in order:
            if label == "tests":
                timeout = check.timeout(budget.tests_s)
                if timeout is None:
                    results["gpu_tests"] = {"skipped_for_time": True, "passed": 0, "failed": 0, "skipped": 0, "errors": 0}
                    continue
                t = time.perf_counter()
                with child_environment(site, {TOKENIZER_ENV: str(tokenizer_dir.resolve())}):
                    results["gpu_tests"] = run_pytest([str(REPO_ROOT / test) for test in GPU_TESTS], check.logs / "gpu_tests.xml",
                                                      check.logs / "gpu_tests.log", timeout)  # fmt: skip
                check.step("gpu_tests", time.perf_counter() - t)
                continue
            runs = qlora["runs"].setdefault(label, {})
            timeout = check.timeout(budget.run_s[label])
            if timeout is None:
                runs[kind] = {"kind": kind, "ok": False, "skipped_for_time": True}
                continue
            t = time.perf_counter()
            with child_environment(site):
                runs[kind] = run_finetune(kind, label, checkpoints[label], settings, work, check.logs, timeout)
            if label == RATIO_SHAPE:
                qlora.update(ratios(runs))
            check.step(f"{label}-{kind}", time.perf_counter() - t)
        results["status"] = "complete"
    except (KitError, RuntimeError, OSError) as error:
        results["status"] = f"failed: {error}"[:4000]
    finally:
        tests, qlora = results.get("gpu_tests") or {}, results.get("qlora") or {}
        results["done_criteria"] = {  # issue #18's "Done when", as measured
            "gpu_name": results.get("gpu_name"),
            "gpu_tests_pass": bool(tests.get("passed")) and not tests.get("failed") and not tests.get("errors"),
            "plugin_peak_within_limit": qlora.get("within_limit"),
        }
        check.save()
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        shutil.rmtree(work / "runs", ignore_errors=True)
    return results


def dry_run(args: argparse.Namespace) -> dict[str, Any]:
    """What can be checked on CPU (see the module docstring)."""
    settings = Settings(steps=args.steps)
    check = Check(args.out, "gpu_check_dry_run", Budget(total_s=args.budget_s), shlex.join(["python", "-m", "benchmarks.gpu_check", *sys.argv[1:]]))
    results = check.results
    results["device_command"] = {"command": DEVICE_COMMAND, "carry": DEVICE_CARRY,
                                 "length_ok": len(DEVICE_COMMAND) <= DEVICE_COMMAND_LIMIT}  # fmt: skip
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    site = work / "site"
    problems = []
    try:
        t = time.perf_counter()
        if args.kit is None:
            results["kit"] = {"checked": False, "reason": "no kit given (--kit none)"}
            tokenizer_dir = Path(args.tokenizer_dir)
        else:
            kit = check_kit(args.kit)
            manifest = load_manifest(args.kit)
            # pip installs the wheels for the GPU machine's Python; a real install only when this is that Python
            same_python = platform.python_version().startswith(manifest["python_version"] + ".")
            installed = install_kit(args.kit, work / "kit_install", for_target_platform=not same_python)
            results["kit"] = {"checked": True, **kit, "pip_accepts": installed}
            if same_python:
                site = work / "kit_install"
            tokenizer_dir = Path(args.kit) / TOKENIZER
        staged = stage_package(site)
        results["staged"] = staged
        check.step("kit", time.perf_counter() - t)

        checkpoints = {label: work / "checkpoints" / SHAPES[label] for label in SHAPES}
        spec = {"tokenizer_dir": str(tokenizer_dir), "checkpoints": {k: str(v) for k, v in checkpoints.items()},
                "build": [CPU_SHAPE], "commands": all_commands(checkpoints, work, settings)}  # fmt: skip
        t = time.perf_counter()
        with child_environment(site):
            results["prepare"] = prepare_in_worker(check, spec, check.timeout(Budget().prepare_s) or 60)
        check.step("prepare", time.perf_counter() - t)
        for label in SHAPES:
            built = results["prepare"]["checkpoints"][label]
            if label == CPU_SHAPE and not (Path(built["path"]) / "lit_model.pth").is_file():
                problems.append(f"{label}: checkpoint not written")

        t = time.perf_counter()
        with child_environment(site, {TOKENIZER_ENV: str(tokenizer_dir.resolve())}):
            process = run_worker("pytest", ["--collect-only", "-q", "-p", "no:cacheprovider", *[str(REPO_ROOT / t) for t in GPU_TESTS]],
                                 timeout=180)  # fmt: skip
        collected = [line for line in process.stdout.splitlines() if "::" in line]
        results["gpu_tests_collected"] = collected
        if process.returncode != 0 or not collected or not any(GPU_TESTS[0].split("::")[1] in c for c in collected):
            problems.append(f"pytest did not collect the GPU-only tests:\n{process.stdout[-1500:]}{process.stderr[-1500:]}")
        check.step("collect_gpu_tests", time.perf_counter() - t)
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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0],
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
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="check on CPU what can be checked without a GPU")
    parser.add_argument("--_prepare", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._prepare:
        write_json(args._report, prepare(json.loads(args._prepare.read_text())))
        return 0
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

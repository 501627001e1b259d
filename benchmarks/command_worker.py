"""Run one ``litgpt`` or ``litgpt-plop`` command line in a worker process and report what it used, measured the
same way for both: the process's peak RSS over LitGPT's training loop and over the whole run, and on CUDA the peak
allocated memory over both, the GPU memory in use (sampled), and which parameters require grad and which the
optimizer updates.

The benchmarks start it with ``run_command``, or ``checked_command`` for a run that must succeed
(``benchmarks.common.call_worker``'s protocol: a spec file with the command line and where the report goes)::

    report, run = run_command(["litgpt", "finetune_lora", CHECKPOINT, "--quantize", "bnb.nf4", ...], log=LOG)
    report, run = run_command(["litgpt-plop", "finetune", CHECKPOINT, "--plugin", "qv", ...], timeout=600)

Both commands train with ``litgpt.finetune.lora.fit`` (``litgpt-plop finetune`` calls LitGPT's loop), which is
wrapped here: the kernel's peak-RSS counter (``PeakRss``) and the CUDA peak counter are reset when it starts and
read when it returns, and the model and optimizer it receives are inspected. The report is written when the loop
ends and again when the command ends, so a run killed during its final merge still reports its training figures.

``torch.cuda.max_memory_allocated`` counts only PyTorch's caching allocator. bitsandbytes' paged optimizers
(``PagedAdamW``, what ``litgpt finetune_lora --quantize`` trains with) keep their state in CUDA unified memory,
outside it; the sampled ``torch.cuda.mem_get_info`` figure (device memory in use, every 10 ms) sees that too.
"""

from __future__ import annotations

import argparse
import csv
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import PeakRss, WorkerRun, answer_worker, call_worker, checked_worker, status_kib, write_json

MIB = 2**20
MODULE = "benchmarks.command_worker"


def run_command(argv: list[str], *, report: Path | None = None, **options: Any) -> tuple[dict[str, Any] | None, WorkerRun]:
    """Run the command line ``argv`` under this worker in a fresh process (``call_worker``): its report (None when
    it wrote none) and how the process ended. ``options``: for ``run_worker`` (log, timeout, threads, ...)."""
    return call_worker(MODULE, {"argv": list(argv)}, report=report, **options)


def checked_command(argv: list[str], what: str, *, report: Path | None = None, **options: Any) -> tuple[dict[str, Any], WorkerRun]:
    """``run_command`` for a run that must succeed: ``RuntimeError`` naming ``what`` with the end of its output
    (``benchmarks.common.checked_worker``) when it fails."""
    return checked_worker(MODULE, {"argv": list(argv)}, what, report=report, **options)


def csv_column(out_dir: Path, name: str) -> list[float]:
    """A column of a finetune's CSV log (LitGPT's ``logs/csv/version_N/metrics.csv``, the latest one)."""
    files = sorted(Path(out_dir).glob("logs/csv/*/metrics.csv"))
    if not files:
        return []
    with open(files[-1]) as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


# ---- the worker ---------------------------------------------------------------------------------------------


class DeviceMemorySampler:
    """Peak GPU memory in use (``total - free`` from ``torch.cuda.mem_get_info``), sampled every ``interval`` s
    from a daemon thread; ``mark()`` starts a second peak (the training loop's) without stopping the first."""

    def __init__(self, interval: float = 0.01) -> None:
        import torch

        self.torch = torch
        self.interval = interval
        self.peak = self.section_peak = self.start = self.used()
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def used(self) -> int:
        free, total = self.torch.cuda.mem_get_info()
        return total - free

    def _run(self) -> None:
        while self._running:
            used = self.used()
            self.peak = max(self.peak, used)
            self.section_peak = max(self.section_peak, used)
            time.sleep(self.interval)

    def mark(self) -> None:
        self.section_peak = self.used()

    def stop(self) -> None:
        self._running = False
        self._thread.join()


def parameter_figures(model: Any, optimizer: Any) -> dict[str, Any]:
    """Which parameters are LoRA's, which require grad and which the optimizer updates (a parameter it holds that
    requires grad), with the non-LoRA ones by name: under bitsandbytes precision LitGPT swaps the token embedding
    for a ``StableEmbedding`` after freezing, so "requires grad" alone does not say what trains."""
    module = getattr(model, "module", model)  # Fabric's wrapper prefixes every name
    names = {id(p): name for name, p in module.named_parameters()}
    lora = {name: p.numel() for name, p in module.named_parameters() if "lora_" in name}
    requires_grad = {name: p.numel() for name, p in module.named_parameters() if p.requires_grad}
    updated = {names.get(id(p), "?"): p.numel() for group in optimizer.param_groups for p in group["params"] if p.requires_grad}
    return {
        "lora_params": sum(lora.values()),
        "requires_grad_params": sum(requires_grad.values()),
        "optimizer_params": sum(updated.values()),
        "optimizer_class": type(getattr(optimizer, "optimizer", optimizer)).__name__,
        "non_lora_requires_grad": {n: c for n, c in requires_grad.items() if "lora_" not in n},
        "non_lora_in_optimizer": {n: c for n, c in updated.items() if "lora_" not in n},
    }


class CudaFigures:
    """The CUDA side of a run: peak allocated and reserved memory (PyTorch's counters, reset when the training loop
    starts) and the device memory in use (``DeviceMemorySampler``), each over the loop and over the whole run."""

    def __init__(self, measured: dict[str, Any]) -> None:
        import torch

        self.torch, self.measured = torch, measured
        measured["gpu"] = torch.cuda.get_device_name()
        self.sampler = DeviceMemorySampler()

    def loop_starts(self) -> None:
        cuda, measured = self.torch.cuda, self.measured
        cuda.synchronize()
        measured["fit_baseline_cuda_mib"] = cuda.memory_allocated() / MIB
        measured["peak_cuda_before_fit_mib"] = cuda.max_memory_allocated() / MIB
        measured["max_reserved_before_fit_mib"] = cuda.max_memory_reserved() / MIB
        cuda.reset_peak_memory_stats()
        self.sampler.mark()

    def loop_ended(self) -> None:
        cuda, measured = self.torch.cuda, self.measured
        cuda.synchronize()
        measured["fit_peak_cuda_mib"] = cuda.max_memory_allocated() / MIB
        measured["fit_max_reserved_mib"] = cuda.max_memory_reserved() / MIB
        measured["fit_device_used_peak_mib"] = self.sampler.section_peak / MIB

    def run_ended(self) -> None:
        """The whole run's peaks: the larger of the counters' before the loop reset them and at the end."""
        cuda, measured = self.torch.cuda, self.measured
        cuda.synchronize()
        self.sampler.stop()
        before_allocated = measured.get("peak_cuda_before_fit_mib", 0.0)
        before_reserved = measured.get("max_reserved_before_fit_mib", 0.0)
        measured["peak_cuda_whole_run_mib"] = max(before_allocated, cuda.max_memory_allocated() / MIB)
        measured["max_reserved_whole_run_mib"] = max(before_reserved, cuda.max_memory_reserved() / MIB)
        measured["device_used_at_start_mib"] = self.sampler.start / MIB
        measured["device_used_peak_whole_run_mib"] = self.sampler.peak / MIB


def measured_fit(fit: Callable[..., Any], measured: dict[str, Any], cuda: CudaFigures | None, report: Path) -> Callable[..., Any]:
    """``fit`` wrapped to measure the training loop into ``measured`` and write it to ``report`` when it returns."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        measured.update(parameter_figures(kwargs["model"], kwargs["optimizer"]))
        if cuda is not None:
            cuda.loop_starts()
        # the process's own peak so far: PeakRss resets the kernel's counter (ru_maxrss from wait4 is no substitute:
        # after a vfork + exec it starts at the launching process's peak)
        measured["vmhwm_before_fit_mib"] = status_kib("VmHWM") / 1024
        rss = PeakRss()
        try:
            with rss:
                return fit(*args, **kwargs)
        finally:
            figures = rss.figures()
            measured.update(
                fit_seconds=rss.seconds,
                fit_rss_method=rss.method,
                fit_baseline_rss_mib=figures["baseline_rss_mib"],
                fit_peak_rss_mib=figures["peak_rss_mib"],
                fit_peak_anon_mib=figures["peak_anon_mib"],
            )
            if cuda is not None:
                cuda.loop_ended()
            write_json(report, measured)

    return wrapper


def command_main(program: str) -> Callable[[], Any]:
    """The entry point of ``litgpt`` or ``litgpt-plop``."""
    if program == "litgpt":
        from litgpt.__main__ import main
    elif program == "litgpt-plop":
        from litgpt_plop.commands.cli import main
    else:
        raise ValueError(f"not a litgpt or litgpt-plop command line: {program!r}")
    return main


def measure_command(argv: list[str], report: Path) -> tuple[dict[str, Any], int]:
    """Run the command line ``argv`` (``litgpt ...`` or ``litgpt-plop ...``) in this process, measuring its training
    loop: the report and the command's exit code. A failure is reported (``error``, ``completed`` false), not raised."""
    import litgpt.finetune.lora as litgpt_lora
    import torch

    measured: dict[str, Any] = {"argv": argv, "cuda": torch.cuda.is_available(), "completed": False}
    cuda = CudaFigures(measured) if measured["cuda"] else None
    litgpt_lora.fit = measured_fit(litgpt_lora.fit, measured, cuda, report)
    sys.argv = list(argv)
    code = 0
    try:
        command_main(argv[0])()
        measured["completed"] = True
    except BaseException as error:  # noqa: BLE001 - reported, then the exit code says it failed
        measured["error"] = "".join(traceback.format_exception_only(type(error), error)).strip()[-2000:]
        code = error.code if isinstance(error, SystemExit) and isinstance(error.code, int) else 1
        traceback.print_exc()
    finally:
        measured["vmhwm_end_mib"] = status_kib("VmHWM") / 1024  # the peak since fit started, or since exec
        if cuda is not None:
            cuda.run_ended()
    return measured, code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--_worker", type=Path, required=True, help="the spec file (``run_command`` writes it)")
    args = parser.parse_args(argv)
    exit_code = 0

    def work(spec: dict[str, Any]) -> dict[str, Any]:
        nonlocal exit_code
        measured, exit_code = measure_command(spec["argv"], Path(spec["report"]))
        return measured

    answer_worker(args._worker, work)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())

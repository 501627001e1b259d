"""Run one ``litgpt`` or ``litgpt-plop`` command line in this process and report what it used, measured the same
way for both: CUDA peak allocated memory over the whole run and over LitGPT's training loop, the GPU memory in
use (sampled), and which parameters require grad and which the optimizer updates.

    python -m benchmarks.gpu_worker --report run.json -- litgpt finetune_lora CHECKPOINT --quantize bnb.nf4 ...
    python -m benchmarks.gpu_worker --report run.json -- litgpt-plop finetune CHECKPOINT --plugin qv ...

Both commands train with ``litgpt.finetune.lora.fit`` (``litgpt-plop finetune`` calls LitGPT's loop), which is
wrapped here: the CUDA peak counter is reset when it starts and read when it returns, and the model and optimizer
it receives are inspected. The report is written when the loop ends and again when the command ends, so a run
killed during its final merge still reports its training figures.

``torch.cuda.max_memory_allocated`` counts only PyTorch's caching allocator. bitsandbytes' paged optimizers
(``PagedAdamW``, what ``litgpt finetune_lora --quantize`` trains with) keep their state in CUDA unified memory,
outside it; the sampled ``torch.cuda.mem_get_info`` figure (device memory in use, every 10 ms) sees that too.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import write_json

MIB = 2**20


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


def run(argv: list[str], report: Path) -> int:
    """Run the command line ``argv`` (``litgpt ...`` or ``litgpt-plop ...``) and write the report; its exit code."""
    import torch
    import litgpt.finetune.lora as litgpt_lora

    cuda = torch.cuda.is_available()
    measured: dict[str, Any] = {"argv": argv, "cuda": cuda, "completed": False}
    if cuda:
        measured["gpu"] = torch.cuda.get_device_name()
    sampler = DeviceMemorySampler() if cuda else None
    fit = litgpt_lora.fit

    def measured_fit(*args: Any, **kwargs: Any) -> Any:
        measured.update(parameter_figures(kwargs["model"], kwargs["optimizer"]))
        if cuda:
            torch.cuda.synchronize()
            measured["fit_baseline_cuda_mib"] = torch.cuda.memory_allocated() / MIB
            measured["peak_cuda_before_fit_mib"] = torch.cuda.max_memory_allocated() / MIB
            measured["max_reserved_before_fit_mib"] = torch.cuda.max_memory_reserved() / MIB
            torch.cuda.reset_peak_memory_stats()
            sampler.mark()
        start = time.perf_counter()
        try:
            return fit(*args, **kwargs)
        finally:
            if cuda:
                torch.cuda.synchronize()
                measured["fit_peak_cuda_mib"] = torch.cuda.max_memory_allocated() / MIB
                measured["fit_max_reserved_mib"] = torch.cuda.max_memory_reserved() / MIB
                measured["fit_device_used_peak_mib"] = sampler.section_peak / MIB
            measured["fit_seconds"] = time.perf_counter() - start
            write_json(report, measured)

    litgpt_lora.fit = measured_fit
    sys.argv = list(argv)
    code = 0
    try:
        if argv[0] == "litgpt":
            from litgpt.__main__ import main
        elif argv[0] == "litgpt-plop":
            from litgpt_plop.commands.cli import main
        else:
            raise ValueError(f"not a litgpt or litgpt-plop command line: {argv[:2]}")
        main()
        measured["completed"] = True
    except BaseException as error:  # noqa: BLE001 - reported, then the exit code says it failed
        measured["error"] = "".join(traceback.format_exception_only(type(error), error)).strip()[-2000:]
        code = error.code if isinstance(error, SystemExit) and isinstance(error.code, int) else 1
        traceback.print_exc()
    finally:
        if cuda:
            torch.cuda.synchronize()
            sampler.stop()
            measured["peak_cuda_whole_run_mib"] = max(
                measured.get("peak_cuda_before_fit_mib", 0.0), torch.cuda.max_memory_allocated() / MIB
            )
            measured["max_reserved_whole_run_mib"] = max(
                measured.get("max_reserved_before_fit_mib", 0.0), torch.cuda.max_memory_reserved() / MIB
            )
            measured["device_used_at_start_mib"] = sampler.start / MIB
            measured["device_used_peak_whole_run_mib"] = sampler.peak / MIB
        write_json(report, measured)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, required=True, help="where the JSON report goes")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- litgpt|litgpt-plop SUBCOMMAND ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return run(command, args.report)


if __name__ == "__main__":
    sys.exit(main())

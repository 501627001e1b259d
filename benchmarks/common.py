"""What the benchmark scripts share: where things are, a measurement in a fresh worker process, peak memory, the
machine and commit a result came from, and result files written so that a reader never sees half of one.

Only the standard library and ``litgpt_plop.atomic`` are imported here, so a script's ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from litgpt_plop.atomic import write_bytes_atomic, write_text_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
STATUS_SAMPLE_S = 0.01  # how often a worker's /proc/<pid>/status is sampled for its memory peaks
DEFAULT_CHECKPOINT = REPO_ROOT / "checkpoints" / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"

# ---- worker processes -------------------------------------------------------------------------------------


def worker_env(threads: int | None = None, malloc_mmap_threshold: int | None = None) -> dict[str, str]:
    """This process's environment for a worker, with ``OMP_NUM_THREADS=threads`` (bitsandbytes' CPU kernels read
    it too) and glibc's ``MALLOC_MMAP_THRESHOLD_`` (bytes: large freed blocks go back to the system, so RSS follows
    the memory actually held) where given; 0 or None leaves a variable as it is. Memory figures are meant to be
    what a user gets, so the benchmarks set neither by default (``env_label`` names what a worker ran with)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(malloc_mmap_threshold)
    return env


def env_label(env: dict[str, str]) -> str:
    """The ``OMP_NUM_THREADS`` and ``MALLOC_*`` settings of ``env`` (e.g. ``worker_env``'s), for labelling a figure:
    ``"default"`` when it has none."""
    settings = [f"{k}={v}" for k, v in sorted(env.items()) if k == "OMP_NUM_THREADS" or k.startswith("MALLOC_")]
    return ", ".join(settings) or "default"


@dataclass
class WorkerRun:
    """How a worker process ended, and what ``os.wait4`` says it used.

    Args:
        returncode: the exit status (negative: killed by that signal).
        timed_out: killed for running past its timeout.
        wall_s: seconds from start to exit.
        peak_rss_mib: the worker's peak resident memory over its whole life (``ru_maxrss``).
        cpu_user_s, cpu_sys_s: its CPU seconds.
        stdout, stderr: its output when captured (empty when it went to a log file or the console).
        peak_anon_mib, peak_file_mib: the peaks of its ``RssAnon`` (memory it owns) and ``RssFile`` (pages of
            mapped files, e.g. a memory-mapped checkpoint: clean, the kernel reclaims them under pressure), sampled
            from ``/proc/<pid>/status`` every 10 ms (``STATUS_SAMPLE_S``); None where there is no ``/proc``.
        peak_vmrss_mib: the peak of its ``VmRSS``, sampled alike: unlike ``peak_rss_mib`` it does not start at the
            launching process's peak (``ru_maxrss`` is inherited across the vfork + exec that starts a worker).
    """

    returncode: int
    timed_out: bool
    wall_s: float
    peak_rss_mib: float
    cpu_user_s: float
    cpu_sys_s: float
    stdout: str = ""
    stderr: str = ""
    peak_anon_mib: float | None = None
    peak_file_mib: float | None = None
    peak_vmrss_mib: float | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def cpu_per_wall(self) -> float:
        """CPU seconds per wall second: about the thread count on an idle machine; far lower means it was starved."""
        return (self.cpu_user_s + self.cpu_sys_s) / max(self.wall_s, 1e-9)


def run_worker(
    module: str,
    args: Sequence[str],
    *,
    threads: int | None = None,
    malloc_mmap_threshold: int | None = None,
    log: Path | None = None,
    console: bool = False,
    timeout: float | None = None,
) -> WorkerRun:
    """Run ``python -m <module> <args>`` in a fresh interpreter from the repository root and wait for it.

    Each measurement gets its own process because memory that malloc keeps after one measurement would hide the
    next one's peak, and a crash or a hang stays in that process. The worker runs in its own process group: a
    ``timeout`` (seconds) kills that group and nothing else, and so does an interrupt of this process.

    Args:
        module: the worker's module, e.g. ``benchmarks.overhead``.
        args: its command-line arguments.
        threads, malloc_mmap_threshold: its environment (``worker_env``).
        log: write its stdout and stderr together to this file.
        console: let its output through to this console (without ``log``). Neither: capture it.
        timeout: seconds before it is killed; None waits for ever.
    """
    env = worker_env(threads, malloc_mmap_threshold)
    with contextlib.ExitStack() as stack:
        if log is not None:
            stdout, stderr = stack.enter_context(open(log, "wb")), subprocess.STDOUT
        elif console:
            stdout = stderr = None
        else:
            stdout, stderr = stack.enter_context(tempfile.TemporaryFile()), stack.enter_context(tempfile.TemporaryFile())
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        timed_out = False
        peaks: dict[str, int] = {}
        try:
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                for field, kib in read_status_kib(process.pid, ("VmRSS", "RssAnon", "RssFile")).items():
                    peaks[field] = max(peaks.get(field, 0), kib)
                if timeout is not None and time.perf_counter() - start > timeout:
                    timed_out = True
                    os.killpg(process.pid, signal.SIGKILL)
                    _, status, usage = os.wait4(process.pid, 0)
                    break
                time.sleep(STATUS_SAMPLE_S)
        except BaseException:  # an interrupt here must not leave the worker running on its own
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.wait4(process.pid, 0)
            raise
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        run = WorkerRun(
            returncode=process.returncode,
            timed_out=timed_out,
            wall_s=time.perf_counter() - start,
            peak_rss_mib=usage.ru_maxrss / 1024,  # Linux: KiB
            cpu_user_s=usage.ru_utime,
            cpu_sys_s=usage.ru_stime,
            peak_anon_mib=peaks["RssAnon"] / 1024 if "RssAnon" in peaks else None,
            peak_file_mib=peaks["RssFile"] / 1024 if "RssFile" in peaks else None,
            peak_vmrss_mib=peaks["VmRSS"] / 1024 if "VmRSS" in peaks else None,
        )
        if log is None and not console:
            stdout.seek(0)
            stderr.seek(0)
            run.stdout = stdout.read().decode(errors="replace")
            run.stderr = stderr.read().decode(errors="replace")
    return run


def call_worker(
    module: str,
    spec: dict[str, Any],
    *,
    flag: str = "--_worker",
    report: Path | None = None,
    **options: Any,
) -> tuple[dict[str, Any] | None, WorkerRun]:
    """The benchmarks' one worker protocol, parent side: run ``python -m <module> <flag> SPEC_FILE`` in a fresh
    interpreter (``run_worker``: its time, peak memory and exit) and read the JSON report it wrote.

    The spec travels as a file with ``"report"`` (where the worker writes its JSON) added, so a worker's stdout
    stays free for its own log. Returns (the report, or None when the worker wrote none; a worker may write a
    partial report before failing, which is returned too) and the ``WorkerRun``.

    Args:
        module: the worker's module, e.g. ``benchmarks.overhead``.
        spec: what the worker is to do; must be JSON.
        flag: the worker's command-line flag that takes the spec file.
        report: where the report goes (kept afterwards); None: a temporary file.
        options: for ``run_worker`` (threads, malloc_mmap_threshold, log, console, timeout).
    """
    with tempfile.TemporaryDirectory(prefix="benchmark-worker-") as tmp:
        report = Path(report) if report is not None else Path(tmp) / "report.json"
        report.unlink(missing_ok=True)
        spec_file = Path(tmp) / "spec.json"
        write_json(spec_file, {**spec, "report": str(report)})
        run = run_worker(module, [flag, str(spec_file)], **options)
        result = json.loads(report.read_text()) if report.is_file() else None
    return result, run


def checked_worker(
    module: str, spec: dict[str, Any], what: str, flag: str = "--_worker", **options: Any
) -> tuple[dict[str, Any], WorkerRun]:
    """``call_worker`` for a worker that must succeed: its report and ``WorkerRun``, or ``RuntimeError`` naming
    ``what`` with the end of its output (its log file's, named too, when ``options`` has one)."""
    result, run = call_worker(module, spec, flag=flag, **options)
    if run.ok and result is not None:
        return result, run
    reason = "timed out" if run.timed_out else f"exit {run.returncode}" if not run.ok else "no report"
    log = options.get("log")
    if log is not None:
        raise RuntimeError(f"{what} failed ({reason}); see {log}:\n{log_tail(Path(log))}")
    raise RuntimeError(f"{what} failed ({reason}):\n{run.stderr[-3000:]}")


def json_worker(module: str, spec: dict[str, Any], what: str, flag: str = "--_worker", **options: Any) -> dict[str, Any]:
    """``checked_worker`` when only the report matters."""
    return checked_worker(module, spec, what, flag, **options)[0]


def answer_worker(spec_file: str | Path, work: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The worker side of ``call_worker``: run ``work`` on the spec read from ``spec_file`` and write what it returns
    as the report (atomically). A worker that reports as it goes writes ``spec["report"]`` itself with
    ``write_json``; its return value is the last word."""
    spec = json.loads(Path(spec_file).read_text())
    write_json(Path(spec["report"]), work(spec))


def log_tail(path: Path, chars: int = 3000) -> str:
    """The end of a worker's log file; empty when it cannot be read."""
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def benchmark_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """A script's argument parser: run as ``python -m <module>``, the first paragraph of its docstring ``doc`` as
    description and the rest (how to run it) as epilog, and ``--checkpoint_dir`` (default: the embedded
    SmolLM2-135M-Instruct)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1] if "\n\n" in doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint_dir", type=Path, default=DEFAULT_CHECKPOINT, help="LitGPT checkpoint (default: %(default)s)")
    return parser


# ---- peak memory ------------------------------------------------------------------------------------------


def status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``RssAnon``, ...)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def read_status_kib(pid: int | str = "self", fields: Sequence[str] = ("VmRSS", "RssAnon", "RssFile")) -> dict[str, int]:
    """The ``kB`` ``fields`` of ``/proc/<pid>/status`` that it has; empty where it cannot be read (no ``/proc``, the
    process gone). ``RssAnon`` is memory the process owns, ``RssFile`` pages of files it maps (reclaimable)."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in fields:
                    found[name] = int(value.split()[0])
    except (OSError, ValueError):
        return {}
    return found


def self_peak_rss_mib() -> float:
    """This process's peak RSS since it started (``getrusage``; never reset)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class PeakRss:
    """Peak RSS of this process over a ``with`` block: the kernel's own high-water mark after resetting it
    (``/proc/self/clear_refs`` = 5, Linux >= 4.0) where that is allowed, else sampling ``VmRSS`` every 1 ms; and the
    peak of the memory it owns (``RssAnon``, without the pages of mapped files such as a memory-mapped checkpoint),
    sampled every 1 ms.

    After the block: ``baseline`` (KiB, the RSS when it started), ``peak`` (KiB), ``anon_baseline`` and
    ``anon_peak`` (KiB; None without ``/proc``), ``seconds``, ``method``.
    """

    def __enter__(self) -> "PeakRss":
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "sampling every 1 ms"
        self.baseline = status_kib("VmRSS")
        self.anon_baseline = read_status_kib("self", ("RssAnon",)).get("RssAnon")
        self._sampled, self.anon_peak = self.baseline, self.anon_baseline
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while self._running:
            status = read_status_kib("self", ("VmRSS", "RssAnon"))
            self._sampled = max(self._sampled, status.get("VmRSS", 0))
            if self.anon_peak is not None and "RssAnon" in status:
                self.anon_peak = max(self.anon_peak, status["RssAnon"])
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start
        self._running = False
        self._thread.join()
        self.peak = self._sampled if self.method.startswith("sampling") else status_kib("VmHWM")

    def figures(self) -> dict[str, Any]:
        """The figures in MiB, as the result files record them."""
        owned = self.anon_peak is not None
        return {
            "peak_rss_mib": self.peak / 1024,
            "baseline_rss_mib": self.baseline / 1024,
            "increase_mib": (self.peak - self.baseline) / 1024,
            "peak_anon_mib": self.anon_peak / 1024 if owned else None,
            "baseline_anon_mib": self.anon_baseline / 1024 if owned else None,
            "anon_increase_mib": (self.anon_peak - self.anon_baseline) / 1024 if owned else None,
            "memory_method": self.method,
        }


# ---- where a result came from -----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """The CPU, cores, memory and library versions, for the record next to a result."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        from importlib.metadata import version

        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), litgpt=version("litgpt"))
    except Exception:  # noqa: BLE001 - informational only
        pass
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        info["mem_total_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def git_commit() -> str | None:
    """The checked-out commit, with ``+dirty`` when tracked files have changes; None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """How to run this again: ``python -m <module>`` and the arguments (``sys.argv`` when ``argv`` is None)."""
    import shlex

    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


# ---- result files -----------------------------------------------------------------------------------------


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``litgpt_plop.atomic``), ending it with a newline."""
    write_text_atomic(Path(path), text if text.endswith("\n") else text + "\n")


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2))


def write_results(out_dir: Path, stem: str, data: Any, markdown: str, quiet: bool = False) -> tuple[Path, Path]:
    """A benchmark's two result files, ``<stem>.json`` and ``<stem>.md`` in ``out_dir``, each written atomically;
    says where unless ``quiet`` (a script that rewrites them after every step)."""
    out_dir = Path(out_dir)
    paths = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_json(paths[0], data)
    write_text(paths[1], markdown)
    if not quiet:
        print(f"\nWrote {paths[0]} and {paths[1]}")
    return paths


def save_figure(fig: Any, path: Path, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG, atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    write_bytes_atomic(Path(path), buffer.getvalue())


_APPEND_LOCK = threading.Lock()


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk: a kill loses at most the line being written. Threads of one
    process (the GPU grid's runs) append one at a time, so their lines never interleave."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _APPEND_LOCK, open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path, on_bad_line: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` (none if it does not exist). A line that is not JSON (cut short by a kill) is
    skipped, after calling ``on_bad_line(line_number)`` when given."""
    path = Path(path)
    rows = []
    if not path.is_file():
        return rows
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if on_bad_line is not None:
                on_bad_line(number)
    return rows

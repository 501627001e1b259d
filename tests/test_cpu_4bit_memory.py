"""What the CPU 4-bit path owns, without any ``MALLOC_*`` variable (``litgpt_plop.memory``).

* ``release_free_memory`` hands back what glibc's malloc keeps: many medium-size tensors allocated on several
  threads (each may get an arena of its own) and freed between small ones that stay leave holes that stay
  resident; after the call they are gone. Without the call they stay: the test checks that first, so it measures
  something.
* a 4-bit load of a small checkpoint owns about its 4-bit weights and no more: the holes its quantization
  temporaries left are handed back. The same load with the hand-back made a no-op owns more than the bound.
* the benchmarks' workers report their peak owned memory beside RSS, and the scaling table pairs bf16 and nf4
  figures of the same setting (``MALLOC_*``, ``OMP_NUM_THREADS``) only.

Each runs in a fresh interpreter with ``MALLOC_*`` removed from its environment, so that what malloc keeps does
not depend on what the test session did before, and ``RssAnon`` (``/proc/<pid>/status``) is memory the process
owns: a memory-mapped checkpoint's pages are ``RssFile``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import tiny_config, write_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20



def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (AttributeError, ValueError, OSError):
        return False


glibc_linux = pytest.mark.skipif(not _glibc(), reason="malloc_trim and RssAnon: glibc on Linux")

ANON = """
def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
"""


def run_child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (``MALLOC_*`` and ``OMP_*`` unset) and return the JSON it printed last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "OMP_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-c", ANON + textwrap.dedent(code)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_release_free_memory_is_a_no_op_answer_where_there_is_no_glibc(monkeypatch):
    import litgpt_plop.memory as memory

    memory._malloc_trim.cache_clear()
    monkeypatch.setattr(sys, "platform", "darwin")
    try:
        assert memory.release_free_memory() is False
    finally:
        memory._malloc_trim.cache_clear()


@glibc_linux
def test_release_free_memory_hands_back_what_malloc_keeps_from_several_threads():
    result = run_child(
        """
        import json, threading, torch
        from litgpt_plop.memory import release_free_memory

        THREADS, COUNT, SIZE = 4, 48, 1 << 20  # 4 x 48 tensors of 1 MiB
        # A freed mmapped block raises glibc's mmap threshold to its size: blocks of 1 MiB then come from the
        # heaps (what a model's quantization does after its first large temporary).
        torch.ones(24 << 20, dtype=torch.uint8)
        start = anon()
        kept = [[] for _ in range(THREADS)]

        def work(i):
            big = []
            for _ in range(COUNT):
                big.append(torch.ones(SIZE, dtype=torch.uint8))
                kept[i].append(torch.ones(64))  # a small tensor that stays, after each large one
            del big  # holes between the small ones

        threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        freed = anon()
        released = release_free_memory()
        print(json.dumps({"start": start, "freed": freed, "after": anon(), "released": released,
                          "allocated": THREADS * COUNT * SIZE}))
        """
    )
    allocated = result["allocated"]
    assert result["released"] is True
    kept_by_malloc = result["freed"] - result["start"]
    assert kept_by_malloc > allocated / 2, f"malloc kept only {kept_by_malloc / MIB:.0f} MiB: {result}"
    assert result["after"] - result["start"] < allocated / 8, result


@glibc_linux
@pytest.mark.parametrize("trim", [True, False], ids=["with-release", "without-release"])
def test_a_4bit_load_owns_its_4bit_weights_and_little_more(tmp_path, trim):
    """8 layers 512 wide with a 2048-wide MLP (25 M block-linear parameters, 100 MB in float32): quantizing it in
    this fresh process leaves holes of several times the 4-bit weights' size unless they are handed back. Without
    ``release_free_memory`` (its calls made no-ops) the same load owns more than the bound: this test can fail."""
    config = tiny_config(n_layer=8, n_embd=512, n_head=8, intermediate_size=2048, vocab_size=64, block_size=32)
    checkpoint = write_checkpoint(tmp_path / "ckpt", config)
    result = run_child(
        f"""
        import json, torch
        import bitsandbytes  # imported by the first quantization otherwise: its own memory is not the load's
        import litgpt_plop.model.quantize
        from litgpt_plop.model.checkpoint import load_checkpoint_model

        if not {trim}:
            litgpt_plop.model.quantize.release_free_memory = lambda: False
        torch.set_num_threads(2)
        start = anon()
        model = load_checkpoint_model({str(checkpoint)!r}, "bf16-true", "bnb.nf4", device="cpu")
        owned = anon() - start
        quantized = 0
        for module in model.modules():
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if state is not None:
                quantized += module.weight.data.nbytes + state.absmax.nbytes
                quantized += state.state2.absmax.nbytes + state.state2.code.nbytes if state.nested else 0
        print(json.dumps({{"owned": owned, "quantized": quantized}}))
        """
    )
    bound = result["quantized"] + 8 * MIB  # plus the modules' and quantization states' own small objects
    if trim:
        assert result["owned"] < bound, {k: v / MIB for k, v in result.items()}
    else:
        assert result["owned"] > bound, f"without release the load should exceed the bound: {result}"


# ---- the benchmarks report owned memory beside RSS, and the setting they ran with --------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/<pid>/status")
def test_worker_reports_its_peak_owned_memory_in_the_default_environment():
    from benchmarks.common import env_label, run_worker, worker_env

    run = run_worker("timeit", ["-n", "1", "-r", "1", "b = b'x' * (200 << 20); import time; time.sleep(0.3)"])
    assert run.ok, run.stderr
    assert 190 < run.peak_anon_mib < 400, run  # the 200 MiB it filled, and the interpreter
    assert run.peak_file_mib is not None
    clean = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS" and not k.startswith("MALLOC_")}
    assert env_label(clean) == "default"
    assert env_label(worker_env(1, 65536)) == "MALLOC_MMAP_THRESHOLD_=65536, OMP_NUM_THREADS=1"


def test_scaling_table_pairs_bf16_and_nf4_of_the_same_setting_only():
    from benchmarks.scaling import LEGACY_ENV, side_by_side, table

    figures = {"params": 1.5e9, "block_linear_params": 0.97e9, "n_layer": 16, "n_embd": 2048}

    def row(measurement: str, env: str | None, peak: float, anon: float | None) -> dict:
        result = {"wall_s": 1.0, "peak_rss_mib": peak, **({"peak_anon_mib": anon} if anon else {})}
        line = {"model": "m", "measurement": measurement, "figures": figures, "result": result}
        return {**line, "env": env} if env else line

    rows = [row("plan-bf16", None, 2569, None), row("plan-nf4", None, 1268, None),  # lines from before "env"
            row("plan-bf16", "default", 2600, 580), row("plan-nf4", "default", 1300, 1100)]  # fmt: skip
    text = table(rows)
    assert f"| m | {LEGACY_ENV} |" in text and "| 2569 / 1268 (0.49) | - / - (-) |" in text
    assert "| m | default |" in text and "| 2600 / 1300 (0.50) | 580 / 1100 (1.90) |" in text
    assert side_by_side(rows, "m", "default") == (
        "m plan, bf16 / nf4 (default): peak RSS 2600 / 1300 MiB (0.50); peak owned 580 / 1100 MiB (1.90)"
    )

"""A run killed (SIGKILL) at any moment of its end phase leaves ``final/`` whole: the previous run's or the new one's.

Real runs of ``litgpt-plop finetune`` in subprocesses, killed while they write: the only thing looked at from
outside is the file system, as a user would see it after a crash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from litgpt.scripts.merge_lora import merge_lora

from helpers import tiny_config, write_checkpoint
from litgpt_plop.atomic import replace_directory
from litgpt_plop.model.export import load_adapter
from litgpt_plop.selection.placement import Placement

FINAL_FILES = {
    "lit_model.pth.lora", "lit_model.pth", "placement.json", "report.md", "scores.png", "hyperparameters.yaml",
    "model_config.yaml", "prompt_style.yaml", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
}  # fmt: skip


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory, smollm2_checkpoint) -> Path:
    """A small random model whose merged weights take long enough to write that a kill can land inside."""
    # 256 wide with SmolLM2's vocabulary: merged weights large enough that writing them takes a while
    config = tiny_config(name="wide-llama", n_embd=256, head_size=64, vocab_size=49152, block_size=128)
    return write_checkpoint(tmp_path_factory.mktemp("checkpoints") / "wide-llama", config, tokenizer_from=smollm2_checkpoint)


def finetune_command(checkpoint_dir: Path, out_dir: Path, seed: int) -> list[str]:
    return [
        sys.executable, "-m", "litgpt_plop", "finetune", str(checkpoint_dir), "--out_dir", str(out_dir),
        "--plugin", "qv", "--precision", "32-true", "--seed", str(seed),
        "--data", "litgpt_plop.data.ReasoningGym", "--data.train_size", "16", "--data.val_size", "4",
        "--data.prompt_style", "alpaca", "--train.global_batch_size", "4", "--train.micro_batch_size", "4",
        "--train.lr_warmup_steps", "1", "--train.max_steps", "2", "--train.max_seq_length", "64",
        "--train.save_interval", "null", "--eval.initial_validation", "false", "--eval.final_validation", "false",
        "--logger_name", "csv",
    ]  # fmt: skip


def snapshot(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def check_whole(final: Path, checkpoint_dir: Path, tmp_path: Path) -> int:
    """``final/`` holds one complete run: every file, the flags of its placement, and the merged weights that its
    adapter gives. Returns the run's seed."""
    assert {p.name for p in final.iterdir()} == FINAL_FILES
    hparams = yaml.safe_load((final / "hyperparameters.yaml").read_text())
    placement = Placement.load(final / "placement.json")
    assert {k: hparams[k] for k in placement.flags()} == placement.flags()
    load_adapter(checkpoint_dir, final)  # the adapter file and placement.json belong together
    # the merged model is the merge of this adapter: merge again from the adapter alone and compare
    again = tmp_path / f"merge-{time.monotonic_ns()}"
    shutil.copytree(final, again, ignore=shutil.ignore_patterns("lit_model.pth"))
    merge_lora(checkpoint_dir=again, pretrained_checkpoint_dir=checkpoint_dir)
    merged, expected = torch.load(final / "lit_model.pth"), torch.load(again / "lit_model.pth")
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in merged)
    shutil.rmtree(again)
    return hparams["seed"]


def staging_entries(out_dir: Path) -> list[Path]:
    return [p for p in out_dir.glob(".final.*")]


def kill_when(command: list[str], moment: str, timeout: float = 240.0) -> bool:
    """Start the run, SIGKILL it at ``moment`` of its final save; True if the kill came before the run ended."""
    out_dir = Path(command[command.index("--out_dir") + 1])
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        staged = staging_entries(out_dir)
        names = {p.name for s in staged for p in s.iterdir()} if staged else set()
        if (moment == "staging" and staged) or (moment in names):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.0005)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"the run did not reach {moment!r} in {timeout:.0f}s")
    return False


def test_a_run_killed_during_its_final_save_leaves_final_whole(wide_checkpoint: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    first = subprocess.run(finetune_command(wide_checkpoint, out_dir, seed=1), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    final = out_dir / "final"
    assert check_whole(final, wide_checkpoint, tmp_path) == 1
    before = snapshot(final)

    # Moments of the save: the staging directory exists; the adapter, the hyperparameters, the merged weights
    # (being written by merge_lora) have appeared in it.
    killed_inside = 0
    for seed, moment in enumerate(("staging", "lit_model.pth.lora", "hyperparameters.yaml", "lit_model.pth"), start=2):
        killed_inside += kill_when(finetune_command(wide_checkpoint, out_dir, seed), moment)
        seen = check_whole(final, wide_checkpoint, tmp_path)
        assert seen in (1, seed) or snapshot(final) == before, f"final/ after a kill at {moment!r} is neither run"
        if snapshot(final) != before:
            assert seen == seed  # a new final/ is only ever the complete new run
            before = snapshot(final)
    assert killed_inside >= 3, "too few kills landed inside the save to test anything"

    last = subprocess.run(finetune_command(wide_checkpoint, out_dir, seed=9), capture_output=True, text=True)
    assert last.returncode == 0, last.stderr[-3000:]
    assert check_whole(final, wide_checkpoint, tmp_path) == 9
    assert staging_entries(out_dir) == []  # the killed runs' staging directories were cleaned up
    generate = subprocess.run(
        [sys.executable, "-m", "litgpt", "generate", str(final), "--prompt", "1 + 1 =", "--max_new_tokens", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert generate.returncode == 0, generate.stderr[-3000:]


def test_replace_directory_keeps_the_old_version_until_the_new_one_is_complete(tmp_path: Path) -> None:
    target = tmp_path / "final"
    replace_directory(target, lambda d: (d / "a").write_text("old"))

    def fail(staging: Path) -> None:
        (staging / "a").write_text("new")
        raise RuntimeError("killed halfway")

    with pytest.raises(RuntimeError):
        replace_directory(target, fail)
    assert snapshot(target) == {"a": hashlib.sha256(b"old").hexdigest()}
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no staging directory left behind
    replace_directory(target, lambda d: (d / "b").write_text("new"))
    assert [p.name for p in target.iterdir()] == ["b"]


def test_a_version_parked_by_a_killed_fallback_swap_is_put_back(tmp_path: Path) -> None:
    """Where the atomic exchange is missing, the swap is two renames; a kill between them leaves only the parked
    previous version, which the next write puts back before it starts. A dead writer's staging directory goes."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    target = tmp_path / "final"
    parked = tmp_path / f".final.old-{pid}-0000abcd"
    parked.mkdir()
    (parked / "a").write_text("previous")
    (tmp_path / f".final.staging-{pid}-0000abcd").mkdir()

    def check(staging: Path) -> None:
        assert (target / "a").read_text() == "previous"  # put back before the new version is built
        (staging / "a").write_text("new")

    replace_directory(target, check)
    assert (target / "a").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]

"""The GPU grid (``benchmarks.gpu_grid``): the weights' parts and their device calls, the free-text task's split and
score, the report's statistics, and the dry run on CPU end to end."""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_grid_report import build, holm, paired
from benchmarks.gpu_weights import MANIFEST, PartsError, assemble, device_calls, part_sizes, split, store
from benchmarks.qa_task import ChatterbotQA, answer_nll, corpus_pairs, split_by_question

REPO_ROOT = Path(__file__).resolve().parent.parent

DEVICE_COMMAND_LIMIT, DEVICE_CARRY_LIMIT = 2000, 8  # the device tool's limits on one call


def test_parts_are_sized_from_the_end():
    """The last part leaves room for the kit; the earlier ones fill a call."""
    assert part_sizes(100, room=40, last_room=25) == [40, 35, 25]
    assert part_sizes(10, room=40, last_room=25) == [10]
    with pytest.raises(PartsError):
        part_sizes(100, room=40, last_room=0)


def test_split_store_assemble_round_trip_and_damage(tmp_path):
    data = random.Random(0).randbytes(10_000)
    source = tmp_path / "model.gguf"
    source.write_bytes(data)
    parts = tmp_path / "repo" / "gpu_parts"
    manifest = split(source, parts, room=4000, last_room=1500)
    assert [p["bytes"] for p in manifest["parts"]] == [4000, 4000, 500, 1500]
    store_dir = tmp_path / "store"
    store(parts / "part-1", store_dir)
    with pytest.raises(PartsError, match="lacks"):
        assemble(store_dir, tmp_path / "joined.gguf")
    for part in manifest["parts"]:
        store(parts / part["file"], store_dir)
    joined = assemble(store_dir, tmp_path / "joined.gguf")
    assert joined.read_bytes() == data
    # a part damaged in transit is refused when stored, and when joined
    damaged = bytearray((parts / "part-2").read_bytes())
    damaged[7] ^= 1
    (parts / "part-2").write_bytes(bytes(damaged))
    with pytest.raises(PartsError, match="part-2 does not match"):
        store(parts / "part-2", tmp_path / "other_store")
    (store_dir / "part-2").write_bytes(bytes(damaged))
    with pytest.raises(PartsError, match="does not match"):
        assemble(store_dir, tmp_path / "joined-again.gguf")
    assert not (tmp_path / "joined-again.gguf").exists() and not list(tmp_path.glob(".joined-again*"))


def test_device_calls_fit_the_device_tool_and_store_their_parts(tmp_path):
    """Every call fits one device command; running the calls' store commands in order leaves every part stored."""
    root = tmp_path / "repo"
    source = tmp_path / "model.gguf"
    source.write_bytes(random.Random(1).randbytes(3000))
    split(source, root / "gpu_parts", room=1200, last_room=700)
    calls = device_calls(root=root, grid_args="--seeds 0 1")
    assert len(calls) == len(json.loads((root / "gpu_parts" / MANIFEST).read_text())["parts"]) == 3
    assert all(len(c["command"]) <= DEVICE_COMMAND_LIMIT and len(c["carry"]) <= DEVICE_CARRY_LIMIT for c in calls)
    assert "wheelkit" in calls[-1]["carry"] and all("wheelkit" not in c["carry"] for c in calls[:-1])
    assert "benchmarks.gpu_grid --kit wheelkit --store .gpu_store --out $OUT --seeds 0 1" in calls[-1]["command"]
    for call in calls:  # the store half of each call, here
        store_command = call["command"].split(" && ")[0]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        result = subprocess.run(shlex.split(store_command.replace("python", sys.executable, 1)), cwd=root, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    assert assemble(root / ".gpu_store", tmp_path / "joined").read_bytes() == source.read_bytes()


def test_qa_split_never_trains_on_a_held_out_question():
    pairs = corpus_pairs()
    assert len(pairs) > 2000
    splits = split_by_question(pairs, val_size=500, train_size=10_000, seed=42)
    assert len(splits["val"]) == 500
    assert not {q for q, _ in splits["val"]} & {q for q, _ in splits["train"]}
    assert len(splits["train"]) > 1500
    assert split_by_question(pairs, 500, 10_000, seed=42) == splits  # the same items for every placement


def test_answer_nll_is_the_finetunes_validation_loss_per_item(smollm2_checkpoint):
    """One item at a time, the score is LitGPT's own loss on the shifted, prompt-masked tokens (a score without
    the shift, or counting the prompt, would differ)."""
    from litgpt import GPT, Config
    from litgpt.tokenizer import Tokenizer
    from litgpt.utils import chunked_cross_entropy

    torch.manual_seed(0)
    model = GPT(Config.from_name("SmolLM2-135M-Instruct", n_layer=1, n_embd=32, n_head=2, n_query_groups=1, head_size=16, intermediate_size=64))
    data = ChatterbotQA(val_size=6, train_size=10, seed=3)
    data.connect(tokenizer=Tokenizer(smollm2_checkpoint), batch_size=1, max_seq_length=64)
    data.setup()
    scores = answer_nll(model, data, num_items=6, batch_size=4)  # batched with padding
    for i, score in enumerate(scores):
        item = data.test_dataset[i]
        logits = model(item["input_ids"][None])
        expected = chunked_cross_entropy(logits[..., :-1, :], item["labels"][None, 1:])
        assert score == pytest.approx(expected.item(), rel=1e-5)


def test_report_counts_items_and_corrects_for_comparisons():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    a = {0: {"item_scores": [1, 1, 0, 1]}, 1: {"item_scores": [1, 0, 0, 1]}}
    b = {0: {"item_scores": [0, 1, 0, 1]}, 1: {"item_scores": [0, 1, 1, 1]}}
    # per item, seed means: a = [1, .5, 0, 1], b = [0, 1, .5, 1] -> a better on item 0, worse on 1 and 2
    assert paired(a, b, lower=False) == {"seeds": 2, "items": 4, "wins": 1, "losses": 2, "p": 1.0}
    assert paired(a, b, lower=True)["wins"] == 2  # for an NLL, lower is better
    rows = [{"status": "ok", "config_id": "c", "task": "t", "method": m, "seed": s, "accuracy": acc, "item_scores": items,
             "trainable_params": 100, "settings": {"steps": 4}} for m, s, acc, items in
            [("qv", 0, 0.5, [1, 0]), ("qv", 1, 1.0, [1, 1]), ("plop", 0, 0.0, [0, 0]), ("plop", 1, 0.5, [0, 1]), ("all", 0, 0.0, [0, 0])]]  # fmt: skip
    data, markdown = build(rows, {"grid": {"config_id": "c"}, "status": "complete"})
    summary = data["summary"]["t"]
    assert summary["best_fixed"] == "qv" and summary["methods"]["qv"]["mean"] == 0.75 and summary["methods"]["qv"]["se"] == 0.25
    assert {(t["method"], t["reference"]) for t in summary["tests"]} == {("plop", "qv"), ("all", "qv")}
    assert "| qv | 2 | 75.0 ± 25.0 |" in markdown


def test_dry_run_goes_through_every_step_on_cpu(tmp_path, smollm2_checkpoint):
    """Parts stored and joined, the real checkpoint rebuilt from them, the plans, two placements trained at once
    on the free-text task and scored by answer likelihood, the results written."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "benchmarks.gpu_grid", "--dry-run", "--kit", "none", "--out", str(out),
               "--work_dir", str(tmp_path / "work"), "--tasks", "chatterbot_qa"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "gpu_grid.json").read_text())
    assert data["status"] == "complete" and data["parallel"]["runs_at_once"] == 2
    assert set(data["step_seconds"]) >= {"weights", "rebuild_checkpoint", "plan"}
    runs = {r["method"]: r for r in data["runs"]}
    assert set(runs) == {"qv", "plop"}
    for run in runs.values():
        assert run["accuracy"] is None and len(run["item_scores"]) == run["eval_items"] == 8
        assert run["nll"] == pytest.approx(sum(run["item_scores"]) / 8) and run["trainable_params"] > 0
        assert [step for step, _ in run["val_curve"]] == [1, 2]  # validated every step: what race_replay reads
    assert "### chatterbot_qa (answer NLL" in (out / "gpu_grid.md").read_text()
    assert not (tmp_path / "work").exists()

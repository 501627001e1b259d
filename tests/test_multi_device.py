"""Several devices: `litgpt-plop finetune --devices 2` (and `litgpt finetune --plugin ... --devices 2`) as two CPU
processes under DDP (gloo), against one process with the same global batch; `WeightLoRACallback` under DDP in a
Trainer; the refusal of quantization with several devices.

The two-process runs are subprocesses: Fabric's DDP launcher re-runs the command line once per further device.
CUDA is hidden from them, so they run on CPU on any machine; the GPU case is marked and skipped without 2 GPUs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import litgpt.lora
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from litgpt.args import TrainArgs
from litgpt.lora import merge_lora_weights
from torch.utils.data import DataLoader

from litgpt_plop.callbacks import WeightLoRACallback
from litgpt_plop.model.devices import placement_digest
from litgpt_plop.errors import InputError
from litgpt_plop.selection.placement import LORA_FLAGS, Placement
from litgpt_plop.weightlora import WeightLoRAArgs

from helpers import LAUNCH_VARIABLES, LitLLM, logged_metric, tiny_config, tiny_run, trainer

BIN = Path(sys.executable).parent
# 4 training items, a global batch of 4 in micro-batches of 1: every optimizer step sees the whole training set,
# in any order, on one device (4 accumulated micro-batches) as on two (2 each); the loss of a step is then the same.
# LoRA dropout 0: no random draws that differ between the two layouts. 2 validation items, all validated: the
# mean of the two ranks' val losses is the one-device val loss.
COMMON = [
    "--precision", "32-true", "--lora_dropout", "0", "--seed", "7",
    "--data", "litgpt_plop.data.ReasoningGym", "--data.train_size", "4", "--data.val_size", "2",
    "--data.prompt_style", "alpaca",
    "--train.global_batch_size", "4", "--train.micro_batch_size", "1", "--train.lr_warmup_steps", "1",
    "--train.epochs", "20", "--train.max_seq_length", "96", "--train.save_interval", "3", "--train.log_interval", "1",
    "--eval.interval", "1", "--eval.max_iters", "2", "--eval.max_new_tokens", "1", "--eval.initial_validation", "false",
]  # fmt: skip
PLUGIN_OPTIONS = {
    # both calibrated scorers in one run: PLoP's per-prompt rows and CKA's pooled rows, gathered over the ranks
    "plop+cka": ["--train.max_steps", "4", "--calibration.num_samples", "4", "--calibration.batch_size", "1",
                 "--plop.num_kinds", "2"],
    # three candidates, rounds ending at steps 2 and 4: the adapters are swapped under DDP between candidates
    "race": ["--train.max_steps", "8", "--race.candidates", "[qv, mlp, all]", "--race.reference", "qv", "--race.budget", "0.75"],
    # two rounds (halve K, double the ranks) and the cut: adapters leave and are replaced mid-run
    "weightlora+": ["--train.max_steps", "7", "--weightlora.k", "8", "--weightlora.warmup_steps", "5"],
}  # fmt: skip
# Not anchored: the ranks share one stdout, and another rank's line may land inside a long line of rank 0's.
RANK_LINE = re.compile(r"\[rank (\d)/(\d)\] (placement|final placement): (\d+) adapters, placement ([0-9a-f]{16})")


def run_finetune(command: str, checkpoint: Path, out_dir: Path, plugin: str, devices: int, cpu: bool = True):
    # a launch of its own, whatever the shell that runs the tests has set (conftest clears what tests leave behind)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes (gloo) even on a machine with GPUs
    args = [str(BIN / command), "finetune", str(checkpoint), "--out_dir", str(out_dir), "--plugin", plugin,
            "--devices", str(devices), *COMMON, *PLUGIN_OPTIONS.get(plugin, ["--train.max_steps", "2"])]  # fmt: skip
    if not cpu:
        args += ["--precision", "bf16-true"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def rank_reports(stdout: str) -> dict[str, dict[int, tuple[int, str]]]:
    """``{"placement" | "final placement": {rank: (adapters, digest)}}`` from the lines every rank prints."""
    reports: dict[str, dict[int, tuple[int, str]]] = {}
    for rank, world, when, adapters, digest in RANK_LINE.findall(stdout):
        assert world == "2"
        reports.setdefault(when, {})[int(rank)] = (int(adapters), digest)
    return reports


def lora_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return state.get("model", state)


def check_only_rank_zero_wrote(result: subprocess.CompletedProcess, out_dir: Path) -> None:
    saved = "Saved the adapter, the merged model and the placement report"
    assert result.stdout.count(saved) == 1, result.stdout[-3000:]
    assert len(list(out_dir.glob("logs/csv/*"))) == 1  # one logger version: rank 1 created no log directory
    assert not list(out_dir.rglob("*staging*"))  # no second writer's leftovers


def check_loads_in_stock_litgpt(checkpoint: Path, final: Path) -> None:
    """Stock LitGPT's LoRA model, built from the run's hyperparameters.yaml as ``litgpt merge_lora`` does, takes the
    base weights and the adapter strictly, and merged gives the merged model the run wrote."""
    hparams = yaml.safe_load((final / "hyperparameters.yaml").read_text())
    config = litgpt.lora.Config.from_file(
        final / "model_config.yaml", lora_r=hparams["lora_r"], lora_alpha=hparams["lora_alpha"],
        lora_dropout=hparams["lora_dropout"], **{flag: hparams[flag] for flag in LORA_FLAGS},
    )  # fmt: skip
    model = litgpt.lora.GPT(config)
    state = torch.load(checkpoint / "lit_model.pth", weights_only=True)
    state.update(lora_state(final / "lit_model.pth.lora"))
    model.load_state_dict(state, strict=True)
    merge_lora_weights(model)
    merged = torch.load(final / "lit_model.pth", weights_only=True)
    # what `litgpt merge_lora` saves: the plain model's names
    ours = {k.replace("linear.", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert ours.keys() == merged.keys()
    for name, value in merged.items():
        torch.testing.assert_close(ours[name], value, atol=1e-6, rtol=1e-5, msg=name)


# plop, cka and weightlora alone take the same paths as these two (their scorers' and their gates' reductions); the
# scorers' reductions are also checked one by one against one process in test_calibration and test_scorer_metrics
@pytest.mark.parametrize("plugin", ["plop+cka", "weightlora+"])
def test_two_cpu_processes_train_what_one_process_trains(tiny_checkpoint, tmp_path, plugin):
    run_finetune("litgpt-plop", tiny_checkpoint, tmp_path / "one", plugin, devices=1)
    two = run_finetune("litgpt-plop", tiny_checkpoint, tmp_path / "two", plugin, devices=2)

    # both ranks report the same placement, before training and at the end, and it is the one rank 0 wrote
    reports = rank_reports(two.stdout)
    assert set(reports) == {"placement", "final placement"}, two.stdout[-3000:]
    for when, by_rank in reports.items():
        assert sorted(by_rank) == [0, 1] and by_rank[0] == by_rank[1], (when, two.stdout[-3000:])
    written = Placement.load(tmp_path / "two" / "final" / "placement.json")
    assert reports["final placement"][0] == (len(written.sites), placement_digest(written))
    alone = Placement.load(tmp_path / "one" / "final" / "placement.json")
    assert written.sites == alone.sites
    if plugin == "plop+cka":  # each rank calibrated on 2 of the 4 prompts; the gathered statistics are everyone's
        assert written.calibration["samples"] == alone.calibration["samples"] == 4
        assert [written.calibration["world_size"], alone.calibration["world_size"]] == [2, 1]
        assert written.scores.nfn_per_site == pytest.approx(alone.scores.nfn_per_site, rel=1e-5)
        assert len(written.scores.cka_per_layer) == 2 and len({s.layer for s in written.sites}) == 1
        assert written.scores.cka_per_layer == pytest.approx(alone.scores.cka_per_layer, rel=1e-5)
    if plugin == "weightlora+":  # rounds grew the survivors: 8 -> 4 -> 2 adapters, rank 8 -> 32
        assert [len(written.sites), written.max_rank] == [2, 32]

    # the same global batch: the same losses step for step, and the same trained adapters
    val_one, val_two = logged_metric(tmp_path / "one", "val_loss"), logged_metric(tmp_path / "two", "val_loss")
    steps = int(PLUGIN_OPTIONS[plugin][1])
    assert len(val_one) == len(val_two) == steps + 1  # one per step, and the final validation
    assert val_two == pytest.approx(val_one, rel=1e-6, abs=1e-6)
    assert max(abs(a - b) for a, b in zip(val_one, val_two)) < 1e-5
    adapters_one = lora_state(tmp_path / "one" / "final" / "lit_model.pth.lora")
    adapters_two = lora_state(tmp_path / "two" / "final" / "lit_model.pth.lora")
    assert adapters_one.keys() == adapters_two.keys()
    for name, value in adapters_one.items():
        torch.testing.assert_close(adapters_two[name], value, atol=1e-6, rtol=1e-4, msg=name)
    assert any(torch.count_nonzero(v) for k, v in adapters_two.items() if "lora_B" in k)  # they did train

    check_only_rank_zero_wrote(two, tmp_path / "two")
    check_loads_in_stock_litgpt(tiny_checkpoint, tmp_path / "two" / "final")


@pytest.mark.parametrize("plugin", ["qv", "none"])
def test_litgpt_command_relaunches_with_the_plugin(tiny_checkpoint, tmp_path, plugin):
    """``litgpt finetune --plugin``: the DDP launcher re-runs ``litgpt ...``, whose hook routes it to the plugin;
    ``none`` (LitGPT's own flags, here its default q and v) trains on several devices too."""
    out_dir = tmp_path / plugin
    result = run_finetune("litgpt", tiny_checkpoint, out_dir, plugin, devices=2)
    reports = rank_reports(result.stdout)
    assert reports["final placement"][0] == reports["final placement"][1]
    assert Placement.load(out_dir / "final" / "placement.json").kinds == ["query", "value"]
    check_only_rank_zero_wrote(result, out_dir)


def test_quantize_with_several_devices_is_refused_before_anything_loads(tiny_checkpoint, tmp_path):
    with pytest.raises(InputError, match=r"--quantize bnb.nf4 runs on one device only.*--devices 2 --num_nodes 1"):
        tiny_run(tiny_checkpoint, tmp_path / "q", quantize="bnb.nf4", devices=2)
    with pytest.raises(InputError, match=r"--quantize bnb.nf4 .*--devices 1 --num_nodes 2"):
        tiny_run(tiny_checkpoint, tmp_path / "q", quantize="bnb.nf4", num_nodes=2)
    small = TrainArgs(global_batch_size=2, micro_batch_size=2, lr_warmup_steps=1, epochs=1, max_steps=3)
    with pytest.raises(InputError, match=r"--train.global_batch_size 2 is smaller than one --train.micro_batch_size"):
        tiny_run(tiny_checkpoint, tmp_path / "q", devices=2, train=small)
    assert not (tmp_path / "q").exists()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus(tiny_checkpoint, tmp_path):
    result = run_finetune("litgpt-plop", tiny_checkpoint, tmp_path / "gpu", "weightlora+", devices=2, cpu=False)
    reports = rank_reports(result.stdout)
    assert reports["final placement"][0] == reports["final placement"][1]
    check_loads_in_stock_litgpt(tiny_checkpoint, tmp_path / "gpu" / "final")


# ---- WeightLoRACallback in a Trainer ---------------------------------------------------------------------------

VOCAB = 128


def token_loader(batch_size: int) -> DataLoader:
    """4 sequences of one length: a batch of 4 is all of them, and so are two batches of 2 on two ranks, in whatever
    order DDP's sampler shuffles them (the mean loss of two half batches of one length is the whole batch's)."""
    starts = torch.randint(0, VOCAB, (4, 1), generator=torch.Generator().manual_seed(0))
    return DataLoader((starts + 3 * torch.arange(17)) % VOCAB, batch_size=batch_size)


class RecordAdapters(Callback):
    """Each rank writes its placement, losses and adapter weights at the end of fit."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        callback = next(c for c in trainer.callbacks if isinstance(c, WeightLoRACallback))
        sites = [[s.layer, s.kind, s.rank] for s in callback.placement.sites]
        adapters = {k: v.detach().cpu() for k, v in pl_module.model.state_dict().items() if "lora_" in k}
        torch.save({"sites": sites, "adapters": adapters}, self.out_dir / f"rank{trainer.global_rank}.pt")


def test_weightlora_callback_under_ddp_matches_one_device(tmp_path):
    args = WeightLoRAArgs(k=3, warmup_steps=3)
    results = {}
    for name, options in {"one": dict(devices=1), "ddp": dict(devices=2, strategy="ddp_spawn")}.items():
        out_dir = tmp_path / name
        out_dir.mkdir()
        callback = WeightLoRACallback(args, candidates="all", lora_r=2, out_dir=out_dir)
        torch.manual_seed(0)
        module = LitLLM(tiny_config(vocab_size=VOCAB), lr=1e-2)
        # the same global batch of 4: 4 on one device, 2 on each of two
        loader = token_loader(4 if name == "one" else 2)
        trainer(out_dir, [callback, RecordAdapters(out_dir)], max_steps=5, **options).fit(module, loader)
        results[name] = [torch.load(path, weights_only=False) for path in sorted(out_dir.glob("rank*.pt"))]
    (one,), (rank0, rank1) = results["one"], results["ddp"]
    assert len(rank0["sites"]) == 3 and rank0["sites"] == rank1["sites"] == one["sites"]
    assert rank0["adapters"].keys() == one["adapters"].keys()
    for key, value in one["adapters"].items():
        torch.testing.assert_close(rank0["adapters"][key], rank1["adapters"][key], atol=0, rtol=0, msg=key)
        torch.testing.assert_close(rank0["adapters"][key], value, atol=1e-5, rtol=1e-4, msg=key)
    written = json.loads((tmp_path / "ddp" / "placement.json").read_text())
    assert [[s["layer"], s["kind"], s["rank"]] for s in written["sites"]] == rank0["sites"]

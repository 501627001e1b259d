"""`litgpt-plop`: passthrough to LitGPT, `plan`, `finetune --plugin ...`, the configs, and bad input."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import CLI, capture_parser
from litgpt import Config
from litgpt.args import TrainArgs

from litgpt_plop.args import CalibrationArgs, CkaArgs, PlopArgs
from litgpt_plop.commands.finetune import setup as finetune
from litgpt_plop.selection.placement import Placement, Scores

from helpers import logged_metric, tiny_run

# tiny_checkpoint (conftest.py): a tiny random LLaMA-style model with SmolLM2's tokenizer.
REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def run_litgpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "litgpt", *args], capture_output=True, text=True, timeout=300)


def test_finetune_plop_end_to_end(tiny_checkpoint, tmp_path):
    out_dir = tmp_path / "plop"
    # log_interval 10 > max_steps: the logged metrics reach the CSV only if the run flushes its loggers at the end
    train = TrainArgs(save_interval=2, log_interval=10, global_batch_size=4, micro_batch_size=4, lr_warmup_steps=1,
                      epochs=1, max_steps=3, max_seq_length=96)  # fmt: skip
    tiny_run(
        tiny_checkpoint,
        out_dir,
        plugin="plop",
        train=train,
        calibration=CalibrationArgs(num_samples=16, batch_size=8),
        plop=PlopArgs(num_kinds=2),
    )
    final = out_dir / "final"
    for name in ("lit_model.pth.lora", "lit_model.pth", "hyperparameters.yaml", "placement.json", "report.md", "scores.png"):
        assert (final / name).is_file(), name
    for name in ("placement.json", "report.md", "scores.png"):
        assert (out_dir / name).is_file(), name

    placement = json.loads((final / "placement.json").read_text())
    assert placement["method"] == "plop"
    assert len({s["kind"] for s in placement["sites"]}) == 2
    assert logged_metric(out_dir, "trainable_params") == [placement["trainable_params"]]
    hparams = yaml.safe_load((final / "hyperparameters.yaml").read_text())
    for flag, value in placement["flags"].items():
        assert hparams[flag] == value, flag

    # a periodic checkpoint, saved from inside LitGPT's loop, is a stock LoRA checkpoint too
    step_dir = out_dir / "step-000002"
    assert (step_dir / "placement.json").is_file()
    merged = run_litgpt("merge_lora", str(step_dir))
    assert merged.returncode == 0, merged.stderr[-2000:]
    generated = run_litgpt("generate", str(final), "--prompt", "What is 1+1?", "--max_new_tokens", "4")
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert "What is 1+1?" in generated.stdout


def lora_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    state_dict = torch.load(path, weights_only=True)
    return {k: tuple(v.shape) for k, v in state_dict.get("model", state_dict).items()}


def test_plugin_none_trains_what_litgpt_finetune_lora_trains(tiny_checkpoint, tmp_path):
    tiny_run(tiny_checkpoint, tmp_path / "none", plugin="none", lora_mlp=True)
    stock = run_litgpt(
        "finetune_lora", str(tiny_checkpoint), "--out_dir", str(tmp_path / "stock"), "--precision", "32-true",
        "--lora_mlp", "true", "--data", "litgpt_plop.data.ReasoningGym", "--data.train_size", "32",
        "--data.val_size", "8", "--data.prompt_style", "alpaca", "--train.save_interval", "2",
        "--train.log_interval", "1", "--train.global_batch_size", "4", "--train.micro_batch_size", "4",
        "--train.lr_warmup_steps", "1", "--train.epochs", "1", "--train.max_steps", "3", "--train.max_seq_length", "96",
        "--eval.interval", "100", "--eval.max_iters", "2", "--eval.max_new_tokens", "4",
        "--eval.initial_validation", "false", "--seed", "7",
    )  # fmt: skip
    assert stock.returncode == 0, stock.stderr[-3000:]
    ours = lora_shapes(tmp_path / "none" / "final" / "lit_model.pth.lora")
    theirs = lora_shapes(tmp_path / "stock" / "final" / "lit_model.pth.lora")
    assert ours == theirs
    placement = Placement.load(tmp_path / "none" / "final" / "placement.json")
    assert placement.kinds == ["query", "value", "mlp_fc_1", "mlp_fc_2", "mlp_proj"]
    # same flags, same seed, same data, same loop: the same training, step for step
    assert logged_metric(tmp_path / "none", "loss") == pytest.approx(logged_metric(tmp_path / "stock", "loss"), rel=1e-5)


def test_passthrough_subcommand_behaves_like_litgpt(tiny_checkpoint):
    args = ["generate", str(tiny_checkpoint), "--prompt", "Hello", "--max_new_tokens", "5"]
    ours = subprocess.run([sys.executable, "-m", "litgpt_plop", *args], capture_output=True, text=True, timeout=300)
    theirs = run_litgpt(*args)
    assert ours.returncode == theirs.returncode == 0, ours.stderr[-2000:]
    # the arguments echoed and the generated text (seeded) are identical; only timing lines differ
    def same_part(stdout: str) -> list[str]:
        return [line for line in stdout.splitlines() if "sec" not in line and "Memory used" not in line]

    assert any(line.startswith("Hello") for line in same_part(ours.stdout))
    assert same_part(ours.stdout) == same_part(theirs.stdout)


@pytest.mark.parametrize("config_file", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config_file):
    parser = capture_parser(lambda: CLI(finetune, args=["--config", str(config_file)]))
    cfg = parser.parse_args(["--config", str(config_file)])
    assert cfg.plugin in ("plop", "cka", "plop+cka", "race")
    assert parser.instantiate_classes(cfg).data is not None


def test_configs_exist():
    names = {c.name for c in CONFIGS}
    assert "demo-cpu.yaml" in names and len(names) >= 5


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(plugin="plopp"), ValueError, r"Unknown plugin 'plopp'; choose one of \[.*'plop'.*'none'\]"),
        (dict(plugin="none", plop=PlopArgs(num_kinds=2)), ValueError, r"--plop.\* does not apply to --plugin 'none'"),
        (dict(plugin="qv", calibration=CalibrationArgs(num_samples=16)), ValueError, r"--calibration.\* does not apply to --plugin 'qv'"),
        (dict(calibration=CalibrationArgs(file=Path("/nonexistent/prompts.txt"))), ValueError, "does not exist"),
        (dict(quantize="bnb.int8-training"), ValueError, "needs a CUDA GPU. On CPU, 4-bit works"),
        (dict(train=TrainArgs(lr_warmup_steps=3, max_steps=3)), ValueError, r"--train.lr_warmup_steps \(3\) must be smaller"),
        (dict(train=TrainArgs(lr_warmup_steps=0, max_steps=3)), ValueError, "--train.lr_warmup_steps must be at least 1"),
    ],
)
def test_bad_input(tiny_checkpoint, tmp_path, kwargs, error, match):
    if kwargs.get("quantize") and torch.cuda.is_available():
        pytest.skip("a CUDA machine can run it")
    with pytest.raises(error, match=match):
        tiny_run(tiny_checkpoint, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out" / "final").exists()


def test_empty_calibration_file(tiny_checkpoint, tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="is empty"):
        tiny_run(tiny_checkpoint, tmp_path / "out", calibration=CalibrationArgs(file=empty))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="is not a LitGPT checkpoint directory"):
        finetune(checkpoint_dir=tmp_path, out_dir=tmp_path / "out")


@pytest.mark.parametrize("plugin", ["weightlora", "weightlora+"])
def test_finetune_weightlora_keeps_k_adapters(tiny_checkpoint, tmp_path, plugin):
    from litgpt_plop.weightlora import WeightLoRAArgs

    out_dir = tmp_path / plugin
    train = TrainArgs(save_interval=None, log_interval=1, global_batch_size=4, micro_batch_size=4, lr_warmup_steps=1,
                      epochs=1, max_steps=5, max_seq_length=96)  # fmt: skip
    tiny_run(tiny_checkpoint, out_dir, plugin=plugin, train=train, weightlora=WeightLoRAArgs(k=8, warmup_steps=4 if plugin == "weightlora" else 5))
    placement = Placement.load(out_dir / "final" / "placement.json")
    assert placement.method == plugin
    # 2 layers x 7 kinds = 14 candidates at rank 8; WeightLoRA keeps 8, WeightLoRA+ halves twice to 2 at rank 32
    assert [len(placement.sites), placement.max_rank] == ([8, 8] if plugin == "weightlora" else [2, 32])
    assert (out_dir / "gates.png").is_file() and (out_dir / "gates.json").is_file()
    assert "gates.png" in (out_dir / "report.md").read_text()
    merged = run_litgpt("generate", str(out_dir / "final"), "--prompt", "2+2=", "--max_new_tokens", "2")
    assert merged.returncode == 0, merged.stderr[-2000:]


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    questions = [f"What is {a} plus {b}?" for a in range(4) for b in range(5)]
    path.write_text("".join(json.dumps({"instruction": q}) + "\n" for q in questions))
    return path


@pytest.mark.parametrize("method", ["plop", "cka", "plop+cka", "qv"])
def test_plan_writes_the_placement_and_its_report(tiny_checkpoint, tmp_path, prompts_file, capsys, method):
    from litgpt_plop.commands.plan import plan

    out_dir = tmp_path / "plan"
    # each method gets the options it reads (plan refuses the others)
    options = {
        "calibration": CalibrationArgs(file=prompts_file, num_samples=16, batch_size=4) if method != "qv" else CalibrationArgs(),
        "cka": CkaArgs(pooling="tokens") if "cka" in method else CkaArgs(),
    }
    placement = plan(tiny_checkpoint, method=method, out_dir=out_dir, **options)
    assert sorted(p.name for p in out_dir.iterdir()) == ["placement.json", "report.md", "scores.png"]
    saved = json.loads((out_dir / "placement.json").read_text())
    assert {"schema_version", "method", "model", "sites", "flags", "trainable_params", "scores"} <= saved.keys()
    assert saved["schema_version"] == 2 and set(saved["scores"]) == {f.name for f in dataclasses.fields(Scores)}
    assert saved["method"] == method and saved["model"] == "tiny-llama"
    assert saved["trainable_params"] == placement.trainable_params(Config.from_file(tiny_checkpoint / "model_config.yaml"))
    assert Placement.load(out_dir / "placement.json").sites == placement.sites
    if method != "qv":
        assert saved["calibration"]["samples"] == 16 and saved["calibration"]["tokens"] > 16
    if "plop" in method:
        assert len(saved["scores"]["nfn_per_kind"]) == 7 and len(saved["scores"]["nfn_per_site"]) == 14
        assert len(saved["scores"]["nfn_per_layer"]) == 2
    if "cka" in method:
        assert len(saved["scores"]["cka_per_layer"]) == 2 and saved["scores"]["cka"]["ratio"] == 0.5
    printed = capsys.readouterr().out
    assert "Trainable parameters" in printed and str(out_dir) in printed


def test_plan_bad_input(tiny_checkpoint, tmp_path, prompts_file):
    from litgpt_plop.selection.placement import PlacementError
    from litgpt_plop.commands.plan import plan

    calibration = CalibrationArgs(file=prompts_file, num_samples=8, batch_size=4)
    with pytest.raises(ValueError, match=r"Unknown method 'plp'; choose one of"):
        plan(tiny_checkpoint, method="plp", out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="is not a LitGPT checkpoint directory"):
        plan(tmp_path, out_dir=tmp_path / "b")
    with pytest.raises(PlacementError, match="budget"):
        plan(tiny_checkpoint, out_dir=tmp_path / "c", calibration=calibration, plop=PlopArgs(budget=10))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        plan(tiny_checkpoint, out_dir=tmp_path / "d", calibration=CalibrationArgs(file=empty))
    assert not any((tmp_path / name).exists() for name in "acd")


def test_random_plugin_draws_with_the_run_seed(tiny_checkpoint):
    from litgpt_plop.args import CalibrationArgs as Cal
    from litgpt_plop.model.checkpoint import load_checkpoint_model
    from litgpt_plop.decide import decide_placement

    model = load_checkpoint_model(tiny_checkpoint)
    kinds = ["query", "key", "value", "projection", "mlp_fc_1", "mlp_fc_2", "mlp_proj"]
    draws = {
        tuple(decide_placement(model, "random", None, kinds, 8, 16, calibration=Cal(), seed=s).kinds)
        for s in range(6)
    }
    assert len(draws) > 1 and all(len(d) == 3 for d in draws)

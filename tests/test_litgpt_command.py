"""`litgpt finetune --plugin plop`: LitGPT's own `litgpt` console script reaching the plugin once it is installed.

Every case runs the installed package in a fresh subprocess, through the real `litgpt` console script of this
environment (which imports `litgpt.__main__` as a module, unlike `python -m litgpt`). "Stock" is LitGPT's `main`
in a process whose import hook was taken off `sys.meta_path` before `litgpt.__main__` loaded: LitGPT exactly as
it is without this package.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from litgpt_plop.commands.litgpt_command import supported_litgpt
from litgpt_plop.commands.litgpt_hook import DISABLE_VARIABLE

BIN = Path(sys.executable).parent
LITGPT = BIN / "litgpt"
LITGPT_PLOP = BIN / "litgpt-plop"
# LitGPT's `main` with the hook removed first: the reference for "stock".
STOCK_LITGPT = [
    sys.executable,
    "-c",
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != 'LitgptPlopFinder'];"
    " sys.argv[0] = 'litgpt'; from litgpt.__main__ import main; main()",
]
# Three optimizer steps of 4 reasoning-gym items in fp32 (as tests/test_cli.py), a checkpoint at step 2.
TINY_FINETUNE = [
    "--precision", "32-true", "--data", "litgpt_plop.data.ReasoningGym", "--data.train_size", "32",
    "--data.val_size", "8", "--data.prompt_style", "alpaca", "--train.save_interval", "2", "--train.log_interval", "1",
    "--train.global_batch_size", "4", "--train.micro_batch_size", "4", "--train.lr_warmup_steps", "1",
    "--train.epochs", "1", "--train.max_steps", "3", "--train.max_seq_length", "96", "--eval.interval", "100",
    "--eval.max_iters", "2", "--eval.max_new_tokens", "4", "--eval.initial_validation", "false", "--seed", "7",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_llama(tiny_checkpoint) -> Path:
    """The shared tiny random LLaMA-style checkpoint (conftest), where the real model is not needed."""
    return tiny_checkpoint


def run(command: list, cwd: Path, disable: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    """``command`` in a fresh process, the hook on (or switched off with ``disable``), whatever the caller's env."""
    assert LITGPT.is_file(), f"no `litgpt` console script beside {sys.executable}"
    env = {k: v for k, v in os.environ.items() if k != DISABLE_VARIABLE}
    if disable:
        env[DISABLE_VARIABLE] = "1"
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def adapter(path: Path) -> dict[str, torch.Tensor]:
    state_dict = torch.load(path, weights_only=True)
    return state_dict.get("model", state_dict)


def assert_same_adapters(ours: Path, theirs: Path) -> None:
    a, b = adapter(ours), adapter(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def files_under(directory: Path) -> list[str]:
    """The files a run wrote, relative, without its logs (their names carry versions and times)."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and "logs" not in p.parts)


def test_the_pth_file_is_part_of_the_distribution(tmp_path):
    # in a fresh process outside the repository, whose stale egg-info would otherwise answer for the distribution
    script = (
        "import importlib.metadata as m, json;"
        " print(json.dumps([[str(f), str(f.locate())] for f in m.files('litgpt-plop') if f.name.endswith('.pth')]))"
    )
    result = run([sys.executable, "-c", script], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    # listed in RECORD, so `pip uninstall litgpt-plop` removes it; at the root of site-packages, so read at start-up
    (location,) = [where for name, where in json.loads(result.stdout) if name == "litgpt_plop.pth"]
    line = Path(location).read_text()
    assert line.startswith("import ") and "litgpt_plop.commands.litgpt_hook" in line and DISABLE_VARIABLE in line


def test_start_up_loads_the_hook_for_the_litgpt_script_only(tmp_path):
    probe = "import json, sys; print(json.dumps([sorted(sys.modules), [type(f).__name__ for f in sys.meta_path]]))\n"
    for name in ("litgpt", "other"):
        (tmp_path / name).write_text(probe)

    def start_up(name: str, disable: bool = False) -> list:
        return json.loads(run([sys.executable, str(tmp_path / name)], tmp_path, disable=disable).stdout)

    modules_on, finders_on = start_up("litgpt")
    modules_off, finders_off = start_up("litgpt", disable=True)
    modules_other, finders_other = start_up("other")
    # in LitGPT's script the hook is the one difference at start-up: no torch, no litgpt, nothing else imported
    assert set(modules_on) - set(modules_off) == {"litgpt_plop", "litgpt_plop.commands", "litgpt_plop.commands.litgpt_hook"}
    assert finders_on[0] == "LitgptPlopFinder" and finders_on[1:] == finders_off
    assert "LitgptPlopFinder" not in finders_off
    # every other program: not even the hook
    assert modules_other == modules_off and finders_other == finders_off


def test_help_shows_the_plugin_and_the_off_switch_restores_stock_help(tmp_path):
    on = run([LITGPT, "finetune", "--help"], tmp_path)
    off = run([LITGPT, "finetune", "--help"], tmp_path, disable=True)
    stock = run([*STOCK_LITGPT, "finetune", "--help"], tmp_path)
    assert on.returncode == off.returncode == stock.returncode == 0, on.stderr[-2000:] + off.stderr[-2000:]
    for option in ("--plugin PLUGIN", "--lora_r LORA_R", "--plop.num_kinds", "--calibration.file", "--cka.pooling",
                   "--weightlora.k"):  # fmt: skip
        assert option in on.stdout, option
    # the defaults a run without --plugin has are the ones the help gives for it
    assert "Default without --plugin: out/finetune/lora" in " ".join(on.stdout.split())
    assert "--plugin" not in stock.stdout
    assert off.stdout == stock.stdout and off.stderr == stock.stderr


def test_finetune_without_plugin_is_stock_bit_for_bit(tiny_llama, tmp_path):
    ours = run([LITGPT, "finetune", tiny_llama, "--out_dir", "out-hooked", *TINY_FINETUNE], tmp_path)
    assert ours.returncode == 0, ours.stderr[-3000:]
    stock = run([*STOCK_LITGPT, "finetune", tiny_llama, "--out_dir", "out-stock", *TINY_FINETUNE], tmp_path)
    assert stock.returncode == 0, stock.stderr[-3000:]
    assert "litgpt-plop" not in ours.stderr
    hooked_dir, stock_dir = tmp_path / "out-hooked", tmp_path / "out-stock"
    assert files_under(hooked_dir) == files_under(stock_dir)
    assert not (hooked_dir / "placement.json").exists()
    for checkpoint in ("step-000002", "final"):
        assert_same_adapters(hooked_dir / checkpoint / "lit_model.pth.lora", stock_dir / checkpoint / "lit_model.pth.lora")
        hparams = (hooked_dir / checkpoint / "hyperparameters.yaml").read_text()
        assert hparams.replace("out-hooked", "out-stock") == (stock_dir / checkpoint / "hyperparameters.yaml").read_text()
    # LitGPT's defaults: LoRA on query and value only
    hparams = yaml.safe_load((hooked_dir / "final" / "hyperparameters.yaml").read_text())
    assert {k: v for k, v in hparams.items() if k.startswith("lora_") and isinstance(v, bool)} == {
        "lora_query": True, "lora_key": False, "lora_value": True, "lora_projection": False, "lora_mlp": False,
        "lora_head": False,
    }  # fmt: skip


def test_litgpt_finetune_lora_with_plugin_is_litgpt_plop_finetune(tiny_llama, tmp_path):
    plugin = ["--plugin", "plop", "--calibration.num_samples", "8", "--calibration.batch_size", "4", "--plop.num_kinds", "2"]
    litgpt = run([LITGPT, "finetune_lora", tiny_llama, "--out_dir", "out-litgpt", *TINY_FINETUNE, *plugin], tmp_path)
    assert litgpt.returncode == 0, litgpt.stderr[-3000:]
    plop = run([LITGPT_PLOP, "finetune", tiny_llama, "--out_dir", "out-plop", *TINY_FINETUNE, *plugin], tmp_path)
    assert plop.returncode == 0, plop.stderr[-3000:]
    litgpt_dir, plop_dir = tmp_path / "out-litgpt", tmp_path / "out-plop"
    assert files_under(litgpt_dir) == files_under(plop_dir)
    for checkpoint in ("step-000002", "final"):
        assert_same_adapters(litgpt_dir / checkpoint / "lit_model.pth.lora", plop_dir / checkpoint / "lit_model.pth.lora")
        placement = json.loads((litgpt_dir / checkpoint / "placement.json").read_text())
        assert placement["sites"] == json.loads((plop_dir / checkpoint / "placement.json").read_text())["sites"]
        hparams = (litgpt_dir / checkpoint / "hyperparameters.yaml").read_text()
        assert hparams.replace("out-litgpt", "out-plop") == (plop_dir / checkpoint / "hyperparameters.yaml").read_text()
    assert placement["method"] == "plop" and len({site["kind"] for site in placement["sites"]}) == 2


@pytest.mark.slow
def test_litgpt_finetune_plugin_plop_on_the_real_model(smollm2_checkpoint, tmp_path):
    tiny = [
        "--precision", "32-true", "--plugin", "plop", "--data", "litgpt_plop.data.ReasoningGym",
        "--data.train_size", "8", "--data.val_size", "2", "--train.save_interval", "null", "--train.log_interval", "1",
        "--train.global_batch_size", "1", "--train.micro_batch_size", "1", "--train.lr_warmup_steps", "1",
        "--train.epochs", "1", "--train.max_steps", "2", "--train.max_seq_length", "32", "--eval.interval", "100",
        "--eval.max_iters", "1", "--eval.max_new_tokens", "2", "--eval.initial_validation", "false",
        "--eval.final_validation", "false", "--calibration.num_samples", "4", "--calibration.batch_size", "4",
        "--calibration.max_seq_length", "32", "--seed", "7",
    ]  # fmt: skip
    result = run([LITGPT, "finetune", smollm2_checkpoint, "--out_dir", "out", *tiny], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # what `litgpt-plop finetune` writes (README): LitGPT's checkpoint plus the placement and its report
    out_dir = tmp_path / "out"
    for name in ("placement.json", "report.md", "scores.png"):
        assert (out_dir / name).is_file(), name
    for name in ("lit_model.pth.lora", "lit_model.pth", "hyperparameters.yaml", "model_config.yaml", "placement.json",
                 "report.md", "scores.png"):  # fmt: skip
        assert (out_dir / "final" / name).is_file(), name
    placement = json.loads((out_dir / "final" / "placement.json").read_text())
    assert placement["method"] == "plop" and placement["model"] == "SmolLM2-135M-Instruct"
    # the checkpoint describes its placement to stock LitGPT
    hparams = yaml.safe_load((out_dir / "final" / "hyperparameters.yaml").read_text())
    assert hparams["plugin"] == "plop"
    for flag, value in placement["flags"].items():
        assert hparams[flag] == value, flag


def test_finetune_lora_with_a_plugin_key_in_a_config_file(tiny_llama, tmp_path):
    config = {
        "checkpoint_dir": str(tiny_llama), "out_dir": "out", "plugin": "mlp", "precision": "32-true", "seed": 7,
        "data": {"class_path": "litgpt_plop.data.ReasoningGym",
                 "init_args": {"train_size": 32, "val_size": 8, "prompt_style": "alpaca"}},
        "train": {"save_interval": None, "global_batch_size": 4, "micro_batch_size": 4, "lr_warmup_steps": 1,
                  "epochs": 1, "max_steps": 2, "max_seq_length": 96},
        "eval": {"interval": 100, "max_iters": 2, "max_new_tokens": 4, "initial_validation": False},
    }  # fmt: skip
    (tmp_path / "plugin.yaml").write_text(yaml.safe_dump(config))

    result = run([LITGPT, "finetune_lora", "--config", "plugin.yaml"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    placement = json.loads((tmp_path / "out" / "final" / "placement.json").read_text())
    assert placement["method"] == "mlp"
    assert {site["kind"] for site in placement["sites"]} == {"mlp_fc_1", "mlp_fc_2", "mlp_proj"}


def test_a_plugin_option_without_plugin_is_one_line(tiny_llama, tmp_path):
    result = run([LITGPT, "finetune", tiny_llama, "--plop.num_kinds", "2"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "litgpt finetune: --plop.num_kinds needs --plugin (e.g. --plugin plop); without --plugin, `litgpt finetune` is"
        " stock LitGPT"
    ]
    assert not (tmp_path / "out").exists()


def test_an_unexpected_litgpt_cli_runs_stock_and_says_why(tmp_path):
    # A LitGPT whose `finetune` is not LoRA's setup (as another version might have): simulated by pointing the real
    # PARSER_DATA's entry at LitGPT's full finetune before `main` runs.
    # The hook is installed for LitGPT's `litgpt` script only (by its name), so the simulation is a script called that.
    script = tmp_path / "litgpt"
    script.write_text(
        "import litgpt.__main__ as cli, litgpt.finetune.full as full\n"
        "cli.PARSER_DATA['finetune'] = full.setup\n"
        "cli.main()\n"
    )
    result = run([sys.executable, str(script), "finetune", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    version = importlib.metadata.version("litgpt")
    assert result.stderr.strip().splitlines() == [
        f"litgpt-plop: `litgpt finetune --plugin` is not active: litgpt {version}'s CLI does not map finetune to"
        " litgpt.finetune.lora.setup; running stock LitGPT"
    ]
    assert "--plugin" not in result.stdout and "--lora_r" not in result.stdout  # LitGPT's full-finetune help


def test_the_supported_litgpt_range_is_the_declared_dependency():
    supported = supported_litgpt()
    assert supported.contains(importlib.metadata.version("litgpt"))
    assert not supported.contains("0.6.0") and not supported.contains("0.5.12")

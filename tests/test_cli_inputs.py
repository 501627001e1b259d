"""The command line as a user meets it: bad input gets one line naming it, and a run repeats from its own record.

Every case goes through the real entry point (``litgpt_plop.commands.cli.main``, what the ``litgpt-plop`` script runs)
in this process, with ``sys.argv`` set as the shell would set it.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import run_litgpt_plop
from litgpt_plop.commands.cli import main
from litgpt_plop.selection.placement import Placement

TINY_TRAIN = [
    "--data", "litgpt_plop.data.ReasoningGym", "--data.train_size", "16", "--data.val_size", "4",
    "--data.prompt_style", "alpaca", "--train.global_batch_size", "4", "--train.micro_batch_size", "4",
    "--train.lr_warmup_steps", "1", "--train.max_steps", "3", "--train.max_seq_length", "64",
    "--train.save_interval", "null", "--eval.initial_validation", "false", "--eval.final_validation", "false",
    "--precision", "32-true",
]  # fmt: skip


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run ``litgpt-plop ARGS``; its exit code (0 if it returned) and what it wrote to stderr."""
    code, _, err = run_litgpt_plop(monkeypatch, capsys, *args)
    return code, err


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny_checkpoint) -> dict[str, Path]:
    """Checkpoints and files that are wrong in one way each."""
    root = tmp_path_factory.mktemp("broken")
    no_tokenizer = root / "no-tokenizer"
    shutil.copytree(tiny_checkpoint, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    truncated = root / "truncated"
    shutil.copytree(tiny_checkpoint, truncated)
    data = (truncated / "lit_model.pth").read_bytes()
    (truncated / "lit_model.pth").write_bytes(data[: len(data) // 2])
    other_config = root / "other-config"
    shutil.copytree(tiny_checkpoint, other_config)
    config = yaml.safe_load((other_config / "model_config.yaml").read_text())
    (other_config / "model_config.yaml").write_text(yaml.safe_dump({**config, "n_layer": config["n_layer"] + 1}))
    binary = root / "prompts.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    a_file = root / "a-file"
    a_file.write_text("not a directory")
    nonfinite = root / "nonfinite"
    shutil.copytree(tiny_checkpoint, nonfinite)
    weights = torch.load(nonfinite / "lit_model.pth", weights_only=True)
    weights["transformer.h.1.mlp.fc_2.weight"][3, 5] = float("nan")
    torch.save(weights, nonfinite / "lit_model.pth")
    one_prompt = root / "one-prompt.txt"
    one_prompt.write_text("What is 2 + 2?\n")
    return {"no_tokenizer": no_tokenizer, "truncated": truncated, "other_config": other_config, "binary": binary,
            "a_file": a_file, "missing": root / "missing.txt", "nonfinite": nonfinite, "one_prompt": one_prompt}  # fmt: skip


# (command line with placeholders, what the one line must contain)
BAD_INPUTS = {
    "unknown method": (["plan", "{ck}", "--method", "plp"], "Unknown method 'plp'; choose one of"),
    "unknown plugin": (["finetune", "{ck}", "--plugin", "plp"], "Unknown plugin 'plp'"),
    "no tokenizer files": (["plan", "{no_tokenizer}", "--method", "plop"], "tokenizer files"),
    "truncated weights": (["plan", "{truncated}", "--method", "qv"], "is not a complete PyTorch checkpoint"),
    "config does not match the weights": (["finetune", "{other_config}", "--plugin", "qv"], "missing transformer.h.2"),
    "binary calibration file": (["plan", "{ck}", "--calibration.file", "{binary}"], "is not UTF-8 text"),
    "missing calibration file": (["plan", "{ck}", "--calibration.file", "{missing}"], "missing.txt' does not exist"),
    "calibration options of a preset": (["plan", "{ck}", "--method", "qv", "--calibration.file", "{missing}"], "--calibration.* does not apply to --method 'qv'"),
    "plop options of cka": (["finetune", "{ck}", "--plugin", "cka", "--plop.num_kinds", "2"], "e.g. --plugin plop"),
    "weightlora options of plop": (["finetune", "{ck}", "--weightlora.k", "3"], "e.g. --plugin weightlora"),
    "num_samples 0": (["finetune", "{ck}", "--calibration.num_samples", "0"], "--calibration.num_samples` must be positive"),
    "weightlora k 0": (["finetune", "{ck}", "--plugin", "weightlora", "--weightlora.k", "0"], "--weightlora.k` must keep at least 1"),
    "rank 0": (["finetune", "{ck}", "--lora_r", "0"], "--lora_r must be a positive integer"),
    "out_dir is a file": (["finetune", "{ck}", "--out_dir", "{a_file}"], "--out_dir"),
    "out_dir under a file": (["plan", "{ck}", "--method", "qv", "--out_dir", "{a_file}/plan"], "cannot be created"),
    "bad choice": (["plan", "{ck}", "--plop.granularity", "layer"], "--plop.granularity must be one of 'kind', 'site', got 'layer'"),
    "bad choice in finetune": (["finetune", "{ck}", "--plugin", "cka", "--cka.pooling=foo"], "--cka.pooling must be one of 'last', 'tokens', got 'foo'"),
    "not a number": (["finetune", "{ck}", "--train.max_steps", "ten"], "--train.max_steps expects int | None, got 'ten'"),
    "precision of finetune": (["finetune", "{ck}", "--precision", "fp64"], "--precision 'fp64' is not a precision this command takes; choose one of ['transformer-engine'"),
    "precision of plan": (["plan", "{ck}", "--method", "qv", "--precision", "bf16-mixed"], "choose one of ['32-true', 'bf16-true', '16-true']"),
    "precision with --quantize": (["finetune", "{ck}", "--quantize", "bnb.nf4", "--precision", "bf16-mixed"], "choose one of ['32-true', 'bf16-true', '16-true']"),
    "one prompt for plop+cka": (["plan", "{ck}", "--method", "plop+cka", "--calibration.num_samples", "1"], "'plop+cka' needs at least 2 calibration prompts (CKA over last tokens"),
    "a file of one prompt for cka": (["finetune", "{ck}", "--plugin", "cka", "--calibration.file", "{one_prompt}", *TINY_TRAIN], "'cka' needs at least 2 calibration prompts (CKA over last tokens compares prompts with one another), got 1"),
    "non-finite weight, calibrated": (["plan", "{nonfinite}", "--method", "plop", "--calibration.file", "{one_prompt}"], "transformer.h.1.mlp.fc_2.weight (layer 1, mlp.fc_2) has 1 of 2,048 values NaN or infinite"),
    "non-finite weight, kappa": (["plan", "{nonfinite}", "--method", "kappa"], "transformer.h.1.mlp.fc_2.weight (layer 1, mlp.fc_2) has 1 of"),
    "non-finite weight, finetune": (["finetune", "{nonfinite}", "--plugin", "qv"], "the checkpoint is damaged"),
    "quantize on several devices": (["finetune", "{ck}", "--devices", "2", "--quantize", "bnb.nf4"], "--quantize bnb.nf4 runs on one device only"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_it(case, monkeypatch, capsys, tmp_path, tiny_checkpoint, broken):
    out_dir = tmp_path / "out"
    code, _ = run_cli(monkeypatch, capsys, "plan", tiny_checkpoint, "--method", "qv", "--out_dir", out_dir)
    assert code == 0
    before = snapshot(out_dir)
    template, expected = BAD_INPUTS[case]
    places = {"ck": tiny_checkpoint, **broken}
    args = [a.format(**places) for a in template]
    if "--out_dir" not in args:
        args += ["--out_dir", str(out_dir)]
    code, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err
    assert expected in err, err
    assert snapshot(out_dir) == before  # nothing that was there changed


def test_the_traceback_comes_back_on_request(monkeypatch, tiny_checkpoint):
    monkeypatch.setattr(sys, "argv", ["litgpt-plop", "plan", str(tiny_checkpoint), "--method", "plp"])
    monkeypatch.setenv("LITGPT_PLOP_TRACEBACK", "1")
    with pytest.raises(ValueError, match="Unknown method"):
        main()


def test_help_lists_every_option_with_its_default(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["litgpt-plop", "finetune", "--help"])
    with pytest.raises(SystemExit):
        main()
    text = capsys.readouterr().out
    for option in ("--calibration.num_samples", "--plop.num_kinds", "--cka.ratio", "--weightlora.k", "--weightlora.warmup_steps"):
        assert option in text, option
    assert "(type: int, default: 128)" in text  # --calibration.num_samples


def test_a_run_repeats_from_its_own_hyperparameters(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    first = tmp_path / "first"
    args = ["finetune", tiny_checkpoint, "--plugin", "plop", "--plop.num_kinds", "2", "--calibration.num_samples", "8",
            "--lora_key", "false", *TINY_TRAIN]  # fmt: skip
    code, err = run_cli(monkeypatch, capsys, *args, "--out_dir", first)
    assert code == 0, err
    recorded = yaml.safe_load((first / "final" / "hyperparameters.yaml").read_text())
    assert recorded["data"]["init_args"]["train_size"] == 16 and recorded["data"]["init_args"]["prompt_style"] == "alpaca"
    assert {"calibration", "plop"} <= recorded.keys() and not {"cka", "weightlora"} & recorded.keys()
    assert "key" not in recorded["candidate_kinds"]

    again = tmp_path / "again"
    code, err = run_cli(monkeypatch, capsys, "finetune", "--config", first / "final" / "hyperparameters.yaml", "--out_dir", again)
    assert code == 0, err
    placements = [Placement.load(d / "final" / "placement.json") for d in (first, again)]
    assert placements[0].sites == placements[1].sites
    assert placements[0].scores.nfn_per_site == placements[1].scores.nfn_per_site
    adapters = [torch.load(d / "final" / "lit_model.pth.lora")["model"] for d in (first, again)]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])  # the same run, bit for bit


def test_more_kinds_than_candidates_is_reported_as_such(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    out_dir = tmp_path / "plan"
    code, err = run_cli(monkeypatch, capsys, "plan", tiny_checkpoint, "--plop.num_kinds", "100",
                        "--calibration.num_samples", "8", "--out_dir", out_dir, "--data", "litgpt_plop.data.ReasoningGym")  # fmt: skip
    assert code == 0, err
    report = (out_dir / "report.md").read_text()
    assert "asked for 100 kinds, but there are only 7 candidates" in report and "chose the 100 kinds" not in report
    assert len(Placement.load(out_dir / "placement.json").kinds) == 7


def test_the_finite_check_counts_only_what_is_bad(tmp_path):
    """The check clears a chunk by its float32 sum: finite values whose sum overflows must still pass, and an
    infinity hidden among them (or two of opposite signs, whose sum is NaN) must still be found and counted."""
    from litgpt_plop.commands.inputs import check_finite_weights
    from litgpt_plop.errors import InputError
    from litgpt_plop.model.checkpoint import MappedCheckpoint

    def check(values: torch.Tensor) -> None:
        path = tmp_path / "lit_model.pth"
        torch.save({"transformer.h.0.attn.proj.weight": values, "tokens": torch.arange(4)}, path)
        check_finite_weights(MappedCheckpoint(path), chunk=64)

    huge = torch.full((16, 16), 3e38, dtype=torch.float32)  # every chunk's sum overflows to inf
    check(huge)
    check(huge.bfloat16())
    for bad in (float("inf"), float("nan")):
        broken = huge.clone()
        broken[3, 5] = bad
        broken[9, 1] = -bad  # +inf and -inf in different chunks; two NaNs
        with pytest.raises(InputError, match=r"attn.proj.weight \(layer 0, attn.proj\) has 2 of 256 values"):
            check(broken)
    mixed = torch.zeros(256)
    mixed[10], mixed[20] = float("inf"), float("-inf")  # one chunk, sum NaN
    with pytest.raises(InputError, match="has 2 of 256 values"):
        check(mixed)

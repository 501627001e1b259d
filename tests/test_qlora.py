"""QLoRA path: calibrating, placing, training, merging and planning on a bitsandbytes 4-bit base, on CPU.

* The avx512_bf16 repack hazard (offline-assets.md): an eval-mode, no-grad ``Linear4bit`` forward on a CPU with
  avx512_bf16 repacks the weight into a CPU-only layout for good. bitsandbytes 0.50.2 decides it from the
  instance attribute ``support_avx512bf16_for_cpu`` (``Linear4bit.forward``), so setting it True reproduces
  what such a CPU does on any CPU. On this project's CPUs (no avx512_bf16) the forced path does the same damage
  and more: every weight is repacked (``dequantize_4bit`` returns something else), the repacked weight then
  goes through bitsandbytes' CPU gemv kernel, whose outputs here are wrong, and that op has no autograd
  kernel, so every adapter's gradient is wrong (measured: ~100% relative error, layer 0 included). Either way
  the two tests below hold on both kinds of CPU: with the guard nothing changes (bit for bit); without it the
  weights and the training gradients change.
* SmolLM2-135M-Instruct: PLoP's kind ranking and per-kind NFN on NF4 / FP4, with and without double
  quantization, against the full-precision model on the same prompts, in fp32 compute (what the CPU 4-bit
  finetune uses). The bf16-compute comparison runs only where bf16 is fast (CUDA, or a CPU with avx512_bf16):
  here one bf16 batch takes ~14 s against 2.3 s in fp32.
* ``finetune --quantize bnb.nf4 --plugin plop`` end to end on CPU (train, merge, reload dense), and
  ``litgpt-plop plan --quantize bnb.nf4``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import bitsandbytes as bnb
import litgpt
import pytest
import torch
import torch.nn.functional as F
import yaml
from litgpt.args import EvalArgs, TrainArgs
from litgpt.tokenizer import Tokenizer

import litgpt_plop.scoring.calibration as calibration_module
from litgpt_plop.model.adapt import apply_placement
from litgpt_plop.args import CalibrationArgs, PlopArgs
from litgpt_plop.scoring.calibration import run_calibration
from litgpt_plop.data import ReasoningGym
from litgpt_plop.model.export import load_adapter
from litgpt_plop.model.modules import KIND_TO_PATH
from litgpt_plop.selection.placement import Placement, model_kinds
from litgpt_plop.model.checkpoint import load_checkpoint_model
from litgpt_plop.model.quantize import quantize_linears_4bit
from litgpt_plop.scoring.cka import CkaScorer
from litgpt_plop.scoring.plop import PlopScorer
from litgpt_plop.decide import plan_placement

from benchmarks.stats import kendall_tau
from helpers import logged_metric, random_gpt, tiny_config, tiny_run

REPO_ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")

# ---- the repack hazard -------------------------------------------------------------------------------------

VOCAB = 96


def tiny_4bit_lora_model() -> litgpt.lora.GPT:
    """A 2-layer LLaMA-style model, every block linear NF4 on CPU, LoRA (rank 4) on every kind of every layer.

    Output sizes are multiples of 32, as bitsandbytes' CPU repack needs. ``lora_B`` starts random (not LitGPT's
    zero), so that ``lora_A`` gets a gradient as well.
    """
    config = tiny_config(n_layer=2, n_embd=64, vocab_size=VOCAB)
    model = random_gpt(config)
    assert quantize_linears_4bit(model, quant_type="nf4", double_quant=True) == config.n_layer * 5
    placement = Placement.from_kinds(config, model_kinds(config), rank=4, lora_alpha=8)
    gpt = apply_placement(model, placement)
    with torch.no_grad():
        for name, param in gpt.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return gpt


def linears_4bit(model: torch.nn.Module) -> dict[str, bnb.nn.Linear4bit]:
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def dequantized(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each 4-bit weight as bitsandbytes dequantizes it (read straight from bitsandbytes, whatever the layout)."""
    return {
        name: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float().clone()
        for name, m in linears_4bit(model).items()
    }


def training_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    """The adapters' gradients after one training step (train mode, cross-entropy on a fixed batch)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (2, 12), generator=generator)
    y = torch.randint(0, VOCAB, (2, 12), generator=generator)
    model.train()
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        # a repacked weight runs bitsandbytes' inference-only gemv op, which PyTorch warns has no autograd kernel
        warnings.simplefilter("ignore")
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    return {name: (p.grad.clone() if p.grad is not None else None) for name, p in model.named_parameters() if p.requires_grad}


def calibration_prompts() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(0, VOCAB, (n,), generator=generator) for n in (5, 9, 12, 7, 3, 10)]


def force_avx512bf16_path(model: torch.nn.Module) -> None:
    """What ``Linear4bit.__init__`` sets on a CPU with avx512_bf16 (``has_avx512bf16()``)."""
    for module in linears_4bit(model).values():
        module.support_avx512bf16_for_cpu = True


def test_repack_hazard_is_reachable_through_the_attribute_this_test_forces():
    """The premise of the two tests below: bitsandbytes still decides the repack from this instance attribute."""
    import inspect

    source = inspect.getsource(bnb.nn.Linear4bit.forward)
    assert "self.support_avx512bf16_for_cpu" in source and "_convert_weight_packed_for_cpu" in source


def test_calibration_on_4bit_model_keeps_weights_and_training_gradients():
    model = tiny_4bit_lora_model()
    weights = dequantized(model)
    reference = training_gradients(model)
    assert set(reference) and all(g is not None and g.abs().sum() > 0 for g in reference.values())

    force_avx512bf16_path(model)
    placement = plan_placement(
        model, calibration_prompts(), method="plop+cka", rank=4, lora_alpha=8, plop=PlopArgs(num_kinds=2),
        calibration=CalibrationArgs(batch_size=4, progress=False),
    )  # fmt: skip
    assert len(placement.kinds) == 2

    for name, module in linears_4bit(model).items():
        assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False), name
        assert module.support_avx512bf16_for_cpu is True, f"{name}: the guard did not restore the attribute"
    for name, weight in dequantized(model).items():
        assert torch.equal(weight, weights[name]), f"{name}: the 4-bit weight changed during calibration"

    gradients = training_gradients(model)
    assert gradients.keys() == reference.keys()
    for layer in range(model.config.n_layer):
        in_layer = [name for name in gradients if name.startswith(f"transformer.h.{layer}.")]
        assert len(in_layer) == 5 * 2, in_layer  # lora_A and lora_B of 5 linears (one pair for the fused q, k, v)
        for name in in_layer:
            assert gradients[name] is not None and gradients[name].abs().sum() > 0, f"{name} got no gradient"
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, reference[name], rtol=1e-5, atol=1e-7, msg=f"{name}: gradient changed")


def test_guard_matters_without_it_calibration_breaks_the_4bit_model(monkeypatch):
    """The same pass with ``no_cpu_repack`` replaced by a no-op does the damage the guard exists for."""
    model = tiny_4bit_lora_model()
    weights = dequantized(model)
    reference = training_gradients(model)
    force_avx512bf16_path(model)

    with monkeypatch.context() as patch:
        patch.setattr(calibration_module, "no_cpu_repack", lambda model: contextlib.nullcontext())
        gpt = model
        kinds, layers = model_kinds(gpt.config), list(range(gpt.config.n_layer))
        plop = PlopScorer(gpt, kinds, layers)
        run_calibration(model, calibration_prompts(), [plop, CkaScorer(gpt, layers)], CalibrationArgs(batch_size=4, progress=False))

    packed = [n for n, m in linears_4bit(model).items() if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    assert packed == list(linears_4bit(model)), "every 4-bit weight should have been repacked"
    changed = [n for n, w in dequantized(model).items() if not torch.allclose(w, weights[n], atol=1e-3)]
    assert changed, "dequantize_4bit should return something else after the repack"
    # the scorer refuses to read a repacked weight rather than score garbage
    with pytest.raises(ValueError, match="CPU inference layout"):
        plop.result()

    # Training after the unguarded pass: the adapters' gradients are wrong (or missing), already in layer 0.
    gradients = training_gradients(model)

    def off(name: str) -> bool:
        got, want = gradients[name], reference[name]
        return got is None or not torch.allclose(got, want, rtol=1e-2, atol=1e-6)

    wrong = [name for name in gradients if off(name)]
    assert any(name.startswith("transformer.h.0.") for name in wrong), wrong
    assert len(wrong) > len(gradients) // 2, wrong

    # A later guarded pass finds the repacked weights, unpacks them (with a warning) and training is right
    # again, up to the absmax constants, which the repack rounded to bf16.
    force_avx512bf16_path(model)
    with pytest.warns(UserWarning, match="repacked into bitsandbytes' CPU inference layout"):
        run_calibration(model, calibration_prompts(), [PlopScorer(gpt, kinds, layers)], CalibrationArgs(batch_size=4, progress=False))
    for name, weight in dequantized(model).items():
        torch.testing.assert_close(weight, weights[name], rtol=1e-2, atol=1e-3, msg=name)
    for name, gradient in training_gradients(model).items():
        assert gradient is not None, name
        torch.testing.assert_close(gradient, reference[name], rtol=0.05, atol=1e-3, msg=name)


# ---- the real model: 4-bit vs full precision ---------------------------------------------------------------

SMOLLM2_PROMPTS = 32


def bf16_is_fast() -> bool:
    """bf16 matmuls are ~6x slower than fp32 on a CPU without avx512_bf16 (measured: 14 s vs 2.3 s for one batch)."""
    if torch.cuda.is_available():
        return True
    try:
        from bitsandbytes.backends.cpu.ops import has_avx512bf16  # noqa: PLC0415

        return bool(has_avx512bf16())
    except Exception:
        return False


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2_checkpoint) -> list[torch.Tensor]:
    from litgpt_plop.scoring.prompts import tokenize_prompts

    tokenizer = Tokenizer(smollm2_checkpoint)
    prompts = ReasoningGym(train_size=SMOLLM2_PROMPTS, val_size=8).prompts("train", tokenizer)
    return tokenize_prompts(prompts, tokenizer)


_scores: dict[tuple[str, str | None], dict[str, float]] = {}


def smollm2_kind_scores(checkpoint: Path, token_ids: list[torch.Tensor], precision: str, quantize: str | None) -> dict[str, float]:
    """PLoP's per-kind NFN of SmolLM2 (loaded as ``litgpt-plop plan`` loads it), cached per (precision, quantize)."""
    key = (precision, quantize)
    if key not in _scores:
        model = load_checkpoint_model(checkpoint, precision, quantize)
        placement = plan_placement(model, token_ids, method="plop", calibration=CalibrationArgs(num_samples=len(token_ids), progress=False))
        _scores[key] = dict(placement.scores.nfn_per_kind)
        del model
    return _scores[key]


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["bnb.nf4", "bnb.fp4-dq"])
def test_smollm2_4bit_ranks_kinds_like_full_precision(smollm2_checkpoint, smollm2_prompts, quantize):
    """NF4 without and FP4 with double quantization (so both quantization types and both double-quantization
    settings are covered in two passes), each against the dense model on the same prompts, computing in fp32
    as the CPU 4-bit finetune does (bf16 compute: the next test)."""
    dense = smollm2_kind_scores(smollm2_checkpoint, smollm2_prompts, "32-true", None)
    quantized = smollm2_kind_scores(smollm2_checkpoint, smollm2_prompts, "32-true", quantize)
    tau = kendall_tau(dense, quantized)
    assert tau >= 0.8, (tau, dense, quantized)
    for kind, value in dense.items():
        assert quantized[kind] == pytest.approx(value, rel=0.05), (kind, dense, quantized)


@pytest.mark.slow
@pytest.mark.skipif(not bf16_is_fast(), reason="bf16 compute is ~6x slower than fp32 on a CPU without avx512_bf16")
def test_smollm2_nf4_ranks_kinds_like_bf16(smollm2_checkpoint, smollm2_prompts):
    """QLoRA's usual setting: NF4 storage, bf16 compute, against the bf16 model."""
    dense = smollm2_kind_scores(smollm2_checkpoint, smollm2_prompts, "bf16-true", None)
    quantized = smollm2_kind_scores(smollm2_checkpoint, smollm2_prompts, "bf16-true", "bnb.nf4-dq")
    assert kendall_tau(dense, quantized) >= 0.8, (dense, quantized)
    for kind, value in dense.items():
        assert quantized[kind] == pytest.approx(value, rel=0.05), (kind, dense, quantized)


# ---- finetune and plan on CPU with --quantize bnb.nf4 ------------------------------------------------------


def test_finetune_qlora_plop_on_cpu_trains_merges_and_reloads_dense(tiny_checkpoint, tmp_path):
    out_dir = tmp_path / "qlora"
    tiny_run(
        tiny_checkpoint,
        out_dir,
        plugin="plop",
        quantize="bnb.nf4",
        lora_dropout=0.0,
        # four training items and a micro-batch of four: every step sees the same batch, so the loss must fall
        data=ReasoningGym(train_size=4, val_size=4, prompt_style="alpaca"),
        train=TrainArgs(save_interval=None, log_interval=1, global_batch_size=4, micro_batch_size=4, lr_warmup_steps=1,
                        epochs=100, max_steps=6, max_seq_length=96),
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.02}},
        calibration=CalibrationArgs(num_samples=8, batch_size=4),
        plop=PlopArgs(num_kinds=2),
        eval=EvalArgs(interval=100, max_iters=1, max_new_tokens=2, initial_validation=False, final_validation=False),
    )  # fmt: skip
    losses = logged_metric(out_dir, "loss")
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses

    final = out_dir / "final"
    placement = Placement.load(final / "placement.json")
    assert placement.method == "plop" and len(placement.kinds) == 2
    hparams = yaml.safe_load((final / "hyperparameters.yaml").read_text())
    assert hparams["quantize"] == "bnb.nf4"

    # The merged checkpoint is dense and loads strictly as a plain litgpt GPT.
    config = litgpt.Config.from_file(tiny_checkpoint / "model_config.yaml")
    merged_state = torch.load(final / "lit_model.pth", weights_only=True)
    base_state = torch.load(tiny_checkpoint / "lit_model.pth", weights_only=True)
    assert merged_state.keys() == litgpt.model.GPT(config).state_dict().keys()
    assert all(t.dtype == torch.float32 for t in merged_state.values())
    merged = litgpt.model.GPT(config)
    merged.load_state_dict(merged_state, strict=True)
    # the trained adapters are in it: the placed kinds' weights moved, the others did not
    placed_paths = {f"transformer.h.{s.layer}.{KIND_TO_PATH[s.kind]}.weight" for s in placement.sites}
    for name, tensor in merged_state.items():
        if name in placed_paths:
            assert not torch.equal(tensor, base_state[name]), f"{name}: no adapter merged in"
        else:
            assert torch.equal(tensor, base_state[name]), f"{name}: changed without an adapter"

    # Its logits are finite and close to the 4-bit adapted model's: they differ by the quantization error of the
    # base weights, about as much as the dense and the 4-bit base models differ from each other.
    adapted_4bit = load_adapter(load_checkpoint_model(tiny_checkpoint, quantize="bnb.nf4"), final)
    base_4bit = load_checkpoint_model(tiny_checkpoint, quantize="bnb.nf4")
    base_dense = load_checkpoint_model(tiny_checkpoint)
    x = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {name: m.eval()(x) for name, m in
                  [("merged", merged), ("adapted_4bit", adapted_4bit), ("base_4bit", base_4bit), ("base_dense", base_dense)]}  # fmt: skip
    assert torch.isfinite(logits["merged"]).all()

    def relative(a: str, b: str) -> float:
        return float((logits[a] - logits[b]).norm() / logits[b].norm())

    quantization_error = relative("base_4bit", "base_dense")
    assert 0 < relative("merged", "adapted_4bit") < 2 * quantization_error + 1e-3
    # ... and the trained adapters are in both: the merged model is nearer the adapted 4-bit model than its own base
    assert relative("merged", "adapted_4bit") < relative("merged", "base_dense")


def test_plan_cli_quantize_nf4_writes_placement(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"What is {i} + {2 * i}?" for i in range(12)))
    out_dir = tmp_path / "plan"
    result = subprocess.run(
        [sys.executable, "-m", "litgpt_plop", "plan", str(tiny_checkpoint), "--quantize", "bnb.nf4", "--method", "plop",
         "--calibration.file", str(prompts), "--calibration.num_samples", "12", "--plop.num_kinds", "2",
         "--out_dir", str(out_dir)],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    placement = json.loads((out_dir / "placement.json").read_text())
    assert placement["method"] == "plop"
    assert len({s["kind"] for s in placement["sites"]}) == 2
    assert placement["calibration"]["samples"] == 12
    assert set(placement["scores"]["nfn_per_kind"]) == {"query", "key", "value", "projection", "mlp_fc_1", "mlp_fc_2", "mlp_proj"}
    for name in ("report.md", "scores.png"):
        assert (out_dir / name).is_file(), name


def test_the_notice_about_bitsandbytes_optional_kernels_package_is_silenced_and_nothing_else(caplog):
    """On a CPU with avx512_bf16 bitsandbytes logs, when imported, that it could not load a kernel from the optional
    `kernels` package (which downloads from a model hub). Our filter drops exactly that message of that logger."""
    import inspect

    import bitsandbytes.backends.cpu.ops as cpu_ops

    from litgpt_plop.model.quantize import BNB_KERNELS_LOGGER, BNB_KERNELS_NOTICE

    assert cpu_ops.logger.name == BNB_KERNELS_LOGGER and BNB_KERNELS_NOTICE in inspect.getsource(cpu_ops)
    with caplog.at_level(logging.WARNING, logger=BNB_KERNELS_LOGGER):
        cpu_ops.logger.warning(f"{BNB_KERNELS_NOTICE}: %s. Please make sure ...", "No module named 'kernels'")
        cpu_ops.logger.warning("Some other bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["Some other bitsandbytes warning"]

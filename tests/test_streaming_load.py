"""The one loader (``litgpt_plop.model.checkpoint``) quantizes and converts while it loads, one tensor at a time.

* the model it gives is the model the load-everything-then-convert-then-quantize path gives, bit for bit
  (weights, 4-bit data and quantization state, rope cache), for each precision and 4-bit choice;
* ``MappedCheckpoint.release`` takes the pages of a tensor read from the mapped file out of this process's RSS,
  the tensor still reads the same afterwards, and memory that is not the file's is never touched;
* the finetune's CPU 4-bit path (built on the meta device, streamed) trains with ``--plugin none``: LitGPT's
  flags' adapters exist, in the run's precision, and only they train.
"""

from __future__ import annotations

import re
import sys

import bitsandbytes as bnb
import litgpt
import pytest
import torch
from litgpt.args import EvalArgs, TrainArgs
from litgpt.model import GPT

from helpers import logged_metric, tiny_config, tiny_run, write_checkpoint
from litgpt_plop.model.checkpoint import (
    PRECISION_DTYPES,
    MappedCheckpoint,
    create_missing_adapters,
    load_checkpoint_model,
    stream_checkpoint,
)  # fmt: skip
from litgpt_plop.data import ReasoningGym
from litgpt_plop.model.quantize import quantize_choice, quantize_linears_4bit

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS of file mappings: Linux /proc")


def reference_model(checkpoint_dir, precision: str | None, quantize: str | None) -> GPT:
    """What loading did before streaming: every tensor in memory, ``model.to(dtype)``, then quantize all."""
    config = litgpt.Config.from_file(checkpoint_dir / "model_config.yaml")
    model = GPT(config)
    model.load_state_dict(torch.load(checkpoint_dir / "lit_model.pth", weights_only=True))
    if precision is not None:
        model.to(PRECISION_DTYPES[precision])
    model.requires_grad_(False)
    if quantize is not None:
        quant_type, double_quant = quantize_choice(quantize)
        quantize_linears_4bit(model, quant_type=quant_type, double_quant=double_quant)
    return model


def everything(model: GPT) -> dict[str, torch.Tensor]:
    """Every tensor the model computes with: state dict (with bitsandbytes' quantization state), dequantized 4-bit
    weights, the rope cache."""
    tensors = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            tensors[f"{name}.dequantized"] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    tensors["cos"], tensors["sin"] = model.cos, model.sin
    return tensors


@pytest.mark.parametrize(
    "precision, quantize",
    [(None, None), ("bf16-true", None), ("bf16-true", "bnb.nf4"), ("32-true", "bnb.nf4-dq"), (None, "bnb.fp4"), ("16-true", "bnb.fp4-dq")],
)
def test_streamed_model_is_the_load_all_then_convert_model(tmp_path, precision, quantize):
    checkpoint_dir = write_checkpoint(tmp_path / "ckpt", tiny_config(n_layer=2))
    expected = everything(reference_model(checkpoint_dir, precision, quantize))
    got = everything(load_checkpoint_model(checkpoint_dir, precision, quantize, device="cpu"))
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    if quantize is not None:
        assert not any(type(m) is torch.nn.Linear for m in load_checkpoint_model(checkpoint_dir, precision, quantize, device="cpu").transformer.h.modules())


def rss_file_kib() -> int:
    """Resident pages of file mappings in this process (``RssFile`` of ``/proc/self/status``)."""
    with open("/proc/self/status") as f:
        return int(re.search(r"^RssFile:\s+(\d+) kB", f.read(), re.M).group(1))


@linux_only
def test_release_drops_mapped_pages_and_only_those(tmp_path):
    path = tmp_path / "lit_model.pth"
    expected = torch.randn(4096, 1024)
    torch.save({"big": expected, "small": torch.arange(10.0)}, path)  # 16 MiB + a little
    checkpoint = MappedCheckpoint(path)
    assert checkpoint.ranges, "the file's mapping should be found in /proc/self/maps"
    big = checkpoint.state_dict["big"]
    before = rss_file_kib()
    assert float(big.sum()) == float(expected.sum())  # touches every page
    touched = rss_file_kib()
    checkpoint.release(big)
    released = rss_file_kib()
    assert touched - before > 12 * 1024, (before, touched)
    assert touched - released > 12 * 1024, (touched, released)
    assert torch.equal(big, expected)  # read back from the file on the next access
    assert torch.equal(checkpoint.state_dict["small"], torch.arange(10.0))
    anonymous = torch.randn(4096, 1024)
    copy = anonymous.clone()
    checkpoint.release(anonymous)  # not the file's memory: left alone (MADV_DONTNEED would zero it)
    assert torch.equal(anonymous, copy)


def test_finetune_4bit_plugin_none_creates_litgpt_adapters(tiny_checkpoint, tmp_path):
    options = dict(
        plugin="none",
        precision="bf16-true",
        data=ReasoningGym(train_size=4, val_size=4, prompt_style="alpaca"),
        train=TrainArgs(save_interval=None, log_interval=1, global_batch_size=4, micro_batch_size=4, lr_warmup_steps=1,
                        epochs=100, max_steps=2, max_seq_length=64),
        eval=EvalArgs(interval=100, max_iters=1, max_new_tokens=2, initial_validation=False, final_validation=False),
    )  # fmt: skip
    tiny_run(tiny_checkpoint, tmp_path / "none-nf4", quantize="bnb.nf4", **options)
    tiny_run(tiny_checkpoint, tmp_path / "none-dense", **options)
    losses = logged_metric(tmp_path / "none-nf4", "loss")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # the adapters of LitGPT's default flags (query, value), as many as on the dense path
    trainable = {run: logged_metric(tmp_path / run, "trainable_params")[0] for run in ("none-nf4", "none-dense")}
    assert trainable["none-nf4"] == trainable["none-dense"] > 0, trainable


def test_adapters_the_checkpoint_lacks_are_created_and_base_weights_it_lacks_are_an_error(tmp_path):
    """``create_missing_adapters``: after a streamed load with ``strict=False``, LitGPT's flags' adapters exist as
    ``litgpt.lora`` initialises them (A drawn, B zero) in the asked dtype; a missing base weight is never drawn."""
    config = tiny_config(n_layer=2)
    checkpoint = write_checkpoint(tmp_path / "ck", config)
    lora = litgpt.lora.Config.from_file(checkpoint / "model_config.yaml", lora_r=4, lora_query=True, lora_value=True)
    with torch.device("meta"):
        model = litgpt.lora.GPT(lora)
    stream_checkpoint(model, checkpoint, dtype=torch.bfloat16, strict=False)
    create_missing_adapters(model, torch.bfloat16)
    adapters = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert len(adapters) == 2 * 2  # A and B of the fused qkv adapter (query and value), in each of 2 layers
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in adapters.values())
    assert all(torch.count_nonzero(p) > 0 for name, p in adapters.items() if "lora_A" in name)
    assert all(torch.count_nonzero(p) == 0 for name, p in adapters.items() if "lora_B" in name)

    state = torch.load(checkpoint / "lit_model.pth", weights_only=True)
    del state["transformer.h.1.mlp.fc_2.weight"]
    torch.save(state, checkpoint / "lit_model.pth")
    with torch.device("meta"):
        model = litgpt.lora.GPT(lora)
    stream_checkpoint(model, checkpoint, strict=False)
    with pytest.raises(RuntimeError, match=r"no weights for Linear parameters \['weight'\]"):
        create_missing_adapters(model, torch.float32)

"""The streamed final merge (``litgpt_plop.model.merge``): the file is what ``torch.save`` writes, and the merged
model is bit for bit what stock ``litgpt merge_lora`` writes, for mixed ranks, biases, bf16 and float32, and a
mixture of experts with its router adapted."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import litgpt
import litgpt.lora
import pytest
import torch
import yaml
from litgpt.scripts.merge_lora import merge_lora

from litgpt_plop.model.adapt import apply_placement
from litgpt_plop.model.export import save_adapter
from litgpt_plop.model.merge import merge_streamed, save_streamed
from litgpt_plop.selection.placement import HEAD_LAYER, Placement, Scores

from helpers import load_gpt, tiny_config, write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def stock_merge(adapter_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """What ``litgpt merge_lora`` writes for ``adapter_dir``'s adapter (merged in a copy without our file)."""
    copy = tmp_path / f"stock-{adapter_dir.name}"
    shutil.copytree(adapter_dir, copy, ignore=shutil.ignore_patterns("lit_model.pth"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        merge_lora(checkpoint_dir=copy)
    return torch.load(copy / "lit_model.pth", weights_only=True)


def assert_identical(ours: dict[str, torch.Tensor], stock: dict[str, torch.Tensor]) -> None:
    assert list(ours) == list(stock)  # the same keys in the same order
    for key in stock:
        assert ours[key].dtype == stock[key].dtype and torch.equal(ours[key], stock[key]), key


def with_tokenizer_files(directory: Path) -> Path:
    """Stock ``merge_lora`` checks that a checkpoint directory has tokenizer files; it does not read them."""
    (directory / "tokenizer.json").write_text("{}")
    (directory / "tokenizer_config.json").write_text("{}")
    return directory


def write_adapter(checkpoint_dir: Path, adapter_dir: Path, flags: dict, dtype: torch.dtype, seed: int) -> None:
    """A stock-layout adapter of random values (B too: a zero B would merge to nothing) for every LoRA tensor the
    ``flags`` give the checkpoint's model, with the files ``merge_lora`` reads beside it."""
    lora_config = litgpt.lora.Config.from_file(checkpoint_dir / "model_config.yaml", **flags)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in litgpt.lora.GPT(lora_config).state_dict().items() if "lora_" in k}
    g = torch.Generator().manual_seed(seed)
    adapter_dir.mkdir()
    for name in ("model_config.yaml", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint_dir / name, adapter_dir / name)
    adapter = {k: (torch.randn(s, generator=g) * 0.1).to(dtype) for k, s in shapes.items()}
    torch.save({"model": adapter}, adapter_dir / "lit_model.pth.lora")
    hparams = {**flags, "checkpoint_dir": str(checkpoint_dir), "precision": "bf16-true"}
    (adapter_dir / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams))


def test_save_streamed_writes_the_bytes_torch_save_writes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    state = {
        "a.weight": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "a.bias": torch.randn(5, generator=g),
        "b.scale": torch.tensor(3.5, dtype=torch.float16),
        "c.index": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d.weight": torch.randn(9, 4, generator=g).T,  # not contiguous: written as its contiguous copy
    }
    (tmp_path / "torch").mkdir()
    torch.save({k: v.contiguous() for k, v in state.items()}, tmp_path / "torch" / "model.pth")
    specs = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    save_streamed(tmp_path / "model.pth", specs, iter(state.values()))  # the same name: the archive is named after it
    assert (tmp_path / "model.pth").read_bytes() == (tmp_path / "torch" / "model.pth").read_bytes()
    loaded = torch.load(tmp_path / "model.pth", mmap=True, weights_only=True)
    assert_identical(loaded, state)
    with pytest.raises(ValueError, match=r"a.bias: a torch.float64 \(5,\) tensor on cpu, expected torch.float32"):
        save_streamed(tmp_path / "bad.pth", specs, iter([state["a.weight"], state["a.bias"].double()]))


def mixed_sites(mlp: str) -> list[tuple[int, str, int]]:
    fc = {"llama": "mlp_fc_2", "neox": "mlp_fc"}[mlp]
    return [(0, "query", 8), (0, "value", 2), (0, fc, 4), (2, "key", 6), (2, "projection", 2), (2, "mlp_proj", 8)]


@pytest.mark.parametrize(
    "mlp, base_dtype, dtype",
    [("llama", torch.float32, torch.float32), ("llama", torch.float32, torch.bfloat16),
     ("llama", torch.bfloat16, torch.bfloat16), ("neox", torch.bfloat16, torch.float32)],
)  # fmt: skip
def test_save_adapter_merges_as_stock_merge_lora(mlp, base_dtype, dtype, tmp_path: Path) -> None:
    """Per-site ranks 8, 6, 4, 2 (padded to 8, B folded), layer 1 without adapters, the head; LLaMA-style with
    grouped queries, Pythia-style with biases; the base checkpoint and the adapter in the same or other dtypes."""
    config = tiny_config(n_layer=3, mlp=mlp, n_embd=64)
    checkpoint_dir = with_tokenizer_files(write_checkpoint(tmp_path / "base", config))
    base = {k: v.to(base_dtype) for k, v in torch.load(checkpoint_dir / "lit_model.pth", weights_only=True).items()}
    torch.save(base, checkpoint_dir / "lit_model.pth")
    model = load_gpt(checkpoint_dir).to(dtype)
    sites = mixed_sites(mlp) + ([(HEAD_LAYER, "head", 4)] if mlp == "llama" else [])
    placement = Placement.from_sites(config, sites, lora_alpha=16, method="test", scores=Scores(candidate_kinds=["value"]))
    apply_placement(model, placement)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # B too: a zero B would merge to nothing
    out_dir = save_adapter(model, placement, tmp_path / "final", checkpoint_dir=checkpoint_dir, merge=True)
    ours = torch.load(out_dir / "lit_model.pth", weights_only=True)
    stock = stock_merge(out_dir, tmp_path)
    assert_identical(ours, stock)
    changed = [k for k in stock if not torch.equal(stock[k], base[k].to(stock[k].dtype))]
    fc = {"llama": "fc_2", "neox": "fc"}[mlp]
    expected = {"transformer.h.0.attn.qkv.weight", f"transformer.h.0.mlp.{fc}.weight", "transformer.h.2.attn.qkv.weight"}
    expected |= {"transformer.h.2.attn.proj.weight", "transformer.h.2.mlp.proj.weight"}
    assert set(changed) == expected | ({"lm_head.weight"} if mlp == "llama" else set())
    assert all(v.dtype == dtype for v in ours.values())


def test_a_mixture_of_experts_with_its_router_merges_as_stock(tmp_path: Path) -> None:
    """Mixtral-style: every expert's three linears and the router (``lora_mlp``) adapted, merged as stock merges."""
    config = tiny_config(n_layer=2, mlp_class_name="LLaMAMoE", n_expert=4, n_expert_per_token=2)
    checkpoint_dir = with_tokenizer_files(write_checkpoint(tmp_path / "base", config))
    flags = dict(lora_r=4, lora_alpha=8, lora_query=True, lora_value=True, lora_mlp=True, lora_head=False)
    adapter_dir = tmp_path / "adapter"
    write_adapter(checkpoint_dir, adapter_dir, flags, torch.bfloat16, seed=2)
    adapter = torch.load(adapter_dir / "lit_model.pth.lora", weights_only=True)["model"]
    assert "transformer.h.1.mlp.gate.lora_A" in adapter and "transformer.h.1.mlp.experts.3.fc_2.lora_B" in adapter
    merge_streamed(adapter_dir, checkpoint_dir)
    ours = torch.load(adapter_dir / "lit_model.pth", weights_only=True)
    assert_identical(ours, stock_merge(adapter_dir, tmp_path))
    base = torch.load(checkpoint_dir / "lit_model.pth", weights_only=True)
    assert not torch.equal(ours["transformer.h.0.mlp.gate.weight"], base["transformer.h.0.mlp.gate.weight"].bfloat16())
    assert not torch.equal(ours["transformer.h.1.mlp.experts.2.proj.weight"], base["transformer.h.1.mlp.experts.2.proj.weight"].bfloat16())
    litgpt.model.GPT(config).load_state_dict(ours, strict=True)


def test_each_base_tensors_pages_are_handed_back_once_it_is_written(tmp_path: Path, monkeypatch) -> None:
    """Every tensor read through the base checkpoint's mapping is released after it is written (else an 8B merge
    ends with all 15 GiB of the checkpoint resident), once each, and never before the record is in the file."""
    from litgpt_plop.model import merge as merge_module

    config = tiny_config(n_layer=2, n_embd=64)
    checkpoint_dir = with_tokenizer_files(write_checkpoint(tmp_path / "base", config))
    flags = dict(lora_r=4, lora_alpha=8, lora_query=True, lora_value=True, lora_mlp=True, lora_head=False)
    adapter_dir = tmp_path / "adapter"
    write_adapter(checkpoint_dir, adapter_dir, flags, torch.float32, seed=3)

    records, released = [], []
    real_release, real_save = merge_module.MappedCheckpoint.release, merge_module.save_streamed

    def release(self, tensor: torch.Tensor) -> None:
        start = tensor.untyped_storage().data_ptr()
        assert any(low <= start < high for low, high in self.ranges), "released a tensor outside the file mapping"
        released.append((start, len(records)))
        real_release(self, tensor)

    def save_streamed(path, specs, tensors, on_written=lambda: None):
        def written() -> None:
            records.append(1)  # one more record is in the file
            on_written()

        real_save(path, specs, tensors, on_written=written)

    monkeypatch.setattr(merge_module.MappedCheckpoint, "release", release)
    monkeypatch.setattr(merge_module, "save_streamed", save_streamed)
    merge_streamed(adapter_dir, checkpoint_dir)
    written = torch.load(adapter_dir / "lit_model.pth", weights_only=True)
    assert len(released) == len(written) == len({start for start, _ in released})  # every tensor, once
    assert all(done >= i + 1 for i, (_, done) in enumerate(released))  # the i-th released once the i-th is written

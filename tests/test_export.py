"""save_adapter / load_adapter: stock ``litgpt merge_lora`` and ``generate`` accept the output, and loading
re-creates the same model."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import litgpt
import litgpt.lora
import litgpt.model
import pytest
import torch
import torch.nn.functional as F
import yaml
from litgpt.scripts.merge_lora import merge_lora
from tokenizers import Tokenizer, models, pre_tokenizers

from litgpt_plop.model.adapt import apply_placement, current_placement, site_adapter
from litgpt_plop.model.export import LORA_FILE, load_adapter, save_adapter
from litgpt_plop.model.stock import load_stock_state_dict
from litgpt_plop.selection.placement import HEAD_LAYER, Placement, PlacementError, Scores

from helpers import load_gpt, tiny_config, write_checkpoint

# The trained model: LLaMA-style, 3 layers, 64 wide, grouped-query attention (4 heads of 16, 2 groups).
VOCAB = 96


pytestmark = pytest.mark.usefixtures("one_thread")


def write_checkpoint_with_tokenizer(directory: Path, config: litgpt.Config) -> Path:
    """A LitGPT checkpoint as ``litgpt download`` + ``convert_hf_checkpoint`` leave it, with a word-level tokenizer."""
    write_checkpoint(directory, config)
    words = ["<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


def mixed_placement(config: litgpt.Config) -> Placement:
    """Per layer and mixed rank: layer 0 has query 8 / value 2 in one qkv, layer 1 nothing, layer 2 key 6 alone;
    ranks 8, 6, 4, 2 (6 is not a power-of-two fraction of 8: the folding rounds)."""
    sites = [(0, "query", 8), (0, "value", 2), (0, "mlp_fc_2", 4), (2, "key", 6), (2, "projection", 2)]
    sites += [(2, "mlp_proj", 8), (HEAD_LAYER, "head", 4)]
    return Placement.from_sites(config, sites, lora_alpha=16, method="test", scores=Scores(candidate_kinds=["value"]))


def train(model: torch.nn.Module, steps: int = 3, seed: int = 3) -> None:
    """A few AdamW steps, so that every A and B is non-trivial."""
    tokens = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


TOKENS = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(9))


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(TOKENS)


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, litgpt.lora.GPT, Placement]:
    """(checkpoint dir, adapted and trained model, its placement)."""
    config = tiny_config(n_layer=3, n_embd=64, vocab_size=VOCAB)
    checkpoint_dir = write_checkpoint_with_tokenizer(tmp_path / "checkpoints" / "tiny-llama", config)
    model = load_gpt(checkpoint_dir)
    placement = mixed_placement(model.config)
    apply_placement(model, placement)
    train(model)
    return checkpoint_dir, model, placement


def test_stock_merge_lora_reproduces_the_model(trained, tmp_path: Path) -> None:
    checkpoint_dir, model, placement = trained
    out_dir = save_adapter(model, placement, tmp_path / "out" / "final", checkpoint_dir=checkpoint_dir)

    names = {p.name for p in out_dir.iterdir()}
    assert {LORA_FILE, "placement.json", "hyperparameters.yaml", "model_config.yaml", "tokenizer.json"} <= names
    hparams = yaml.safe_load((out_dir / "hyperparameters.yaml").read_text())
    assert hparams["checkpoint_dir"] == str(checkpoint_dir.resolve()) and hparams["precision"] == "32-true"
    assert {k: v for k, v in hparams.items() if k.startswith("lora_")} == placement.flags()

    with contextlib.redirect_stdout(io.StringIO()):
        merge_lora(checkpoint_dir=out_dir)  # stock LitGPT, reading hyperparameters.yaml
    merged = load_gpt(out_dir)  # the merged lit_model.pth, as a plain GPT, strictly loaded
    assert (logits(merged) - logits(model)).abs().max() < 1e-5

    # save_adapter's own (streamed) merge writes what stock merge_lora wrote, bit for bit
    streamed = save_adapter(model, placement, tmp_path / "streamed" / "final", checkpoint_dir=checkpoint_dir, merge=True)
    ours, stock = torch.load(streamed / "lit_model.pth"), torch.load(out_dir / "lit_model.pth")
    assert list(ours) == list(stock) and all(ours[k].dtype == stock[k].dtype and torch.equal(ours[k], stock[k]) for k in stock)
    out_dir = streamed

    # Stock generation runs on the streamed merge and continues greedily as the adapted model does.
    from litgpt.generate.base import main as generate

    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(io.StringIO()):
        generate(out_dir, prompt="w1 w2 w3", max_new_tokens=4, top_k=1, precision="32-true")
    ids = [3, 4, 5]  # w1 w2 w3 (ids 0 and 1 are <s>, </s>; no bos is added)
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert output.getvalue().strip().splitlines()[-1] == " ".join(f"w{i - 2}" for i in ids)


def test_load_adapter_recreates_the_model(trained, tmp_path: Path) -> None:
    checkpoint_dir, model, placement = trained
    out_dir = save_adapter(model, placement, tmp_path / "out", checkpoint_dir=checkpoint_dir)
    saved = Placement.load(out_dir / "placement.json")
    assert saved.sites == placement.sites and saved.method == "test" and saved.scores == Scores(candidate_kinds=["value"])

    for source in (checkpoint_dir, None, load_gpt(checkpoint_dir)):  # a directory, hyperparameters.yaml, a model
        loaded = load_adapter(source, out_dir)
        assert isinstance(loaded, litgpt.lora.GPT)
        assert current_placement(loaded).sites == placement.sites
        trainable = sum(p.numel() for p in loaded.parameters() if p.requires_grad)
        assert trainable == placement.trainable_params(loaded.config)
        assert (logits(loaded) - logits(model)).abs().max() < 1e-6
        for site in placement.sites:  # the per-site factors themselves come back, padding and folding undone
            ours, theirs = site_adapter(model, site.layer, site.kind), site_adapter(loaded, site.layer, site.kind)
            torch.testing.assert_close(theirs.A, ours.A, rtol=0, atol=0)
            torch.testing.assert_close(theirs.B, ours.B, rtol=1e-6, atol=1e-7)

    # The same through the lower-level pair: apply the placement, then load the stock-layout file into it.
    other = apply_placement(load_gpt(checkpoint_dir), saved)
    load_stock_state_dict(other, torch.load(out_dir / LORA_FILE)["model"])
    assert (logits(other) - logits(model)).abs().max() < 1e-6


def test_saved_file_is_stock_layout(trained, tmp_path: Path) -> None:
    """Zero updates where nothing is placed, padded ranks, folded scaling, LoRAQKVLinear's packed qkv."""
    checkpoint_dir, model, placement = trained
    out_dir = save_adapter(model, placement, tmp_path / "out", checkpoint_dir=checkpoint_dir)
    state = torch.load(out_dir / LORA_FILE)["model"]

    flags = placement.flags()
    assert flags == dict(flags, lora_r=8, lora_query=True, lora_key=True, lora_value=True, lora_projection=True,
                         lora_mlp=True, lora_head=True)  # fmt: skip
    stock = litgpt.lora.GPT(litgpt.lora.Config.from_file(checkpoint_dir / "model_config.yaml", **flags))
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in stock.state_dict().items() if "lora_" in k}

    # Layer 1 has no adapter: B is zero in every module there.
    assert all(not v.any() for k, v in state.items() if k.startswith("transformer.h.1.") and k.endswith("lora_B"))
    # A rank-2 site (layer 2 projection) padded to 8, B folded by 8 / 2.
    proj = site_adapter(model, 2, "projection")
    torch.testing.assert_close(state["transformer.h.2.attn.proj.lora_A"][:2], proj.A)
    assert not state["transformer.h.2.attn.proj.lora_A"][2:].any()
    torch.testing.assert_close(state["transformer.h.2.attn.proj.lora_B"][:, :2], proj.B * 4)
    assert not state["transformer.h.2.attn.proj.lora_B"][:, 2:].any()

    # Stock LitGPT's qkv, loaded with the file, computes each part's update exactly as our per-part adapters do.
    stock.load_state_dict({**torch.load(checkpoint_dir / "lit_model.pth"), **state})
    q, kv = 64, 32
    rows = {"query": slice(0, q), "key": slice(q, q + kv), "value": slice(q + kv, q + 2 * kv)}
    for layer in range(3):
        delta = stock.transformer.h[layer].attn.qkv.get_lora_AB()
        for part, sl in rows.items():
            adapter = site_adapter(model, layer, part)
            expected = torch.zeros_like(delta[sl]) if adapter is None else adapter.scaling * adapter.B @ adapter.A
            torch.testing.assert_close(delta[sl], expected, atol=1e-6, rtol=1e-5)
    assert (logits(stock) - logits(model)).abs().max() < 1e-5


def test_a_placement_for_another_model_is_refused_on_load(trained, tmp_path: Path) -> None:
    checkpoint_dir, model, placement = trained
    out_dir = save_adapter(model, placement, tmp_path / "out", checkpoint_dir=checkpoint_dir)
    deeper = write_checkpoint_with_tokenizer(tmp_path / "deeper", tiny_config(n_layer=4, n_embd=64, vocab_size=VOCAB))
    with pytest.raises(PlacementError, match="does not fit this model.*made for a model with 3 layers.*has 4"):
        load_adapter(deeper, out_dir)
    narrower_config = tiny_config(
        n_layer=3, n_embd=32, n_head=2, n_query_groups=1, intermediate_size=128, vocab_size=VOCAB
    )
    narrower = litgpt.model.GPT(narrower_config)
    with pytest.raises(PlacementError, match="does not fit this model.*width 64.*has width 32"):
        load_adapter(narrower, out_dir)
    assert type(narrower) is litgpt.model.GPT  # refused before it was touched


def test_adapter_file_and_placement_must_agree(trained, tmp_path: Path) -> None:
    checkpoint_dir, model, placement = trained
    out_dir = save_adapter(model, placement, tmp_path / "out", checkpoint_dir=checkpoint_dir)
    # A placement.json that claims less than the file holds: layer 2's mlp_proj adapter dropped (same flags).
    fewer = Placement.from_sites(model.config, [s for s in placement.sites if (s.layer, s.kind) != (2, "mlp_proj")])
    fewer.save(out_dir / "placement.json", model.config)
    untouched = load_gpt(checkpoint_dir)
    with pytest.raises(PlacementError, match=r"non-zero update beyond rank 0 at site 2.mlp_proj"):
        load_adapter(untouched, out_dir)
    assert type(untouched) is litgpt.model.GPT  # the file was checked before the model was adapted
    # Layer 0's value dropped: the only value site, so the union flags (and the packed qkv's shape) differ.
    fewer = Placement.from_sites(model.config, [s for s in placement.sites if (s.layer, s.kind) != (0, "value")])
    fewer.save(out_dir / "placement.json", model.config)
    with pytest.raises(PlacementError, match=r"h.0.attn.qkv.lora_A has shape \(24, 64\), expected \(16, 64\)"):
        load_adapter(checkpoint_dir, out_dir)
    # Far fewer flags: the keys do not match.
    Placement.from_kinds(model.config, ["query"], rank=8).save(out_dir / "placement.json", model.config)
    with pytest.raises(PlacementError, match="does not match the placement: missing keys"):
        load_adapter(checkpoint_dir, out_dir)


def test_save_refuses_a_placement_that_is_not_on_the_model(trained, tmp_path: Path) -> None:
    checkpoint_dir, model, placement = trained
    other = Placement.from_kinds(model.config, ["query", "value"], rank=8)
    with pytest.raises(PlacementError, match="are not the placement's"):
        save_adapter(model, other, tmp_path / "out", checkpoint_dir=checkpoint_dir)
    with pytest.raises(PlacementError, match="is not the model's.*made for a model with 3 layers"):
        shallower_config = tiny_config(n_layer=2, n_embd=64, vocab_size=VOCAB)
        shallower = write_checkpoint_with_tokenizer(tmp_path / "shallower", shallower_config)
        save_adapter(model, placement, tmp_path / "out", checkpoint_dir=shallower)
    assert not (tmp_path / "out").exists()


def test_a_failed_save_leaves_nothing_half_written(trained, tmp_path: Path) -> None:
    checkpoint_dir, model, placement = trained
    # A real failure after the adapter file has been written: a tokenizer "file" that cannot be copied.
    broken = tmp_path / "broken"
    write_checkpoint_with_tokenizer(broken, tiny_config(n_layer=3, n_embd=64, vocab_size=VOCAB))
    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer.json").mkdir()

    out_dir = tmp_path / "runs" / "out"
    with pytest.raises(IsADirectoryError):
        save_adapter(model, placement, out_dir, checkpoint_dir=broken)
    assert list((tmp_path / "runs").iterdir()) == []  # no out_dir, no temporary directory left behind

    save_adapter(model, placement, out_dir, checkpoint_dir=checkpoint_dir)
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    train(model, steps=1, seed=5)
    with pytest.raises(IsADirectoryError):
        save_adapter(model, placement, out_dir, checkpoint_dir=broken)
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["out"]


def test_saving_again_replaces_the_whole_directory(trained, tmp_path: Path) -> None:
    """A second save leaves nothing of the first: not a stale merge (``merge_lora`` would say "already merged" and
    skip), not any other file."""
    checkpoint_dir, model, placement = trained
    out_dir = save_adapter(model, placement, tmp_path / "out", checkpoint_dir=checkpoint_dir)
    (out_dir / "notes.txt").write_text("kept")
    with contextlib.redirect_stdout(io.StringIO()):
        merge_lora(checkpoint_dir=out_dir)
    train(model, steps=2, seed=7)
    save_adapter(model, placement, out_dir, checkpoint_dir=checkpoint_dir)
    assert not (out_dir / "lit_model.pth").exists()
    assert not (out_dir / "notes.txt").exists()
    with contextlib.redirect_stdout(io.StringIO()):
        merge_lora(checkpoint_dir=out_dir)
    assert (logits(load_gpt(out_dir)) - logits(model)).abs().max() < 1e-5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_save_without_adapters_is_refused(tmp_path: Path) -> None:
    model = litgpt.model.GPT(tiny_config(n_layer=3, n_embd=64, vocab_size=VOCAB))
    with pytest.raises(PlacementError, match="has no sites|no adapters"):
        save_adapter(model, Placement(sites=[]), tmp_path / "out")

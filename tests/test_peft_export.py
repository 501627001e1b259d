"""``export_peft``: a run's ``final/`` as a Hugging Face PEFT adapter gives the run's logits on the model that
``litgpt convert_from_litgpt`` writes, with per-site ranks, partly adapted q/k/v and fused Hugging Face linears.

Every parity check runs real models in fp32 on CPU: the LitGPT model carrying the placement (the truth), and
transformers' model of the converted base with ``PeftModel.from_pretrained`` on the export.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Callable

import litgpt
import pytest
import torch
from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint
from safetensors.torch import load_file

from litgpt_plop.model.adapt import apply_placement, site_adapter
from litgpt_plop.model.checkpoint import load_checkpoint_model
from litgpt_plop.model.export import PLACEMENT_FILE, load_adapter, save_adapter
from litgpt_plop.model.peft_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_peft
from litgpt_plop.selection.placement import HEAD_LAYER, Placement

from helpers import load_gpt, run_litgpt_plop, tiny_config, write_checkpoint

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers.initialization import no_init_weights  # noqa: E402  (after the skip: transformers is a test extra)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
TOKENS = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))


def _llama(c: litgpt.Config) -> torch.nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.padded_vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_query_groups,
        head_dim=c.head_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_base, max_position_embeddings=c.block_size,
        tie_word_embeddings=False,
    ))  # fmt: skip


def _neox(c: litgpt.Config) -> torch.nn.Module:
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        hidden_act="gelu", hidden_size=c.n_embd, num_attention_heads=c.n_head, num_hidden_layers=c.n_layer,
        intermediate_size=c.intermediate_size, layer_norm_eps=c.norm_eps, max_position_embeddings=c.block_size,
        rotary_emb_base=c.rope_base, rotary_pct=c.rotary_percentage, vocab_size=c.padded_vocab_size,
        use_parallel_residual=c.parallel_residual, tie_word_embeddings=False,
    ))  # fmt: skip


def _phi3(c: litgpt.Config) -> torch.nn.Module:
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(
        attention_bias=c.bias, head_dim=c.head_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.block_size, num_attention_heads=c.n_head, num_hidden_layers=c.n_layer,
        num_key_value_heads=c.n_query_groups, pad_token_id=c.padded_vocab_size - 1,
        partial_rotary_factor=c.rotary_percentage, rms_norm_eps=c.norm_eps, rope_theta=c.rope_base,
        vocab_size=c.padded_vocab_size, tie_word_embeddings=False,
    ))  # fmt: skip


def _phi(c: litgpt.Config) -> torch.nn.Module:
    return transformers.PhiForCausalLM(transformers.PhiConfig(
        vocab_size=c.padded_vocab_size, max_position_embeddings=c.block_size, hidden_size=c.n_embd,
        intermediate_size=c.intermediate_size, num_attention_heads=c.n_head, num_hidden_layers=c.n_layer,
        num_key_value_heads=c.n_query_groups, partial_rotary_factor=c.rotary_percentage, layer_norm_eps=c.norm_eps,
        rope_theta=c.rope_base, pad_token_id=0,
    ))  # fmt: skip


def _gemma(c: litgpt.Config) -> torch.nn.Module:
    return transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=c.padded_vocab_size, hidden_size=c.n_embd, head_dim=c.head_size, num_attention_heads=c.n_head,
        num_hidden_layers=c.n_layer, intermediate_size=c.intermediate_size, max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps, num_key_value_heads=c.n_query_groups, rope_theta=c.rope_base, attention_bias=c.bias,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
    ))  # fmt: skip


def _from_name(name: str, **overrides) -> litgpt.Config:
    sizes = dict(n_layer=3, n_head=4, n_query_groups=4, n_embd=64, padded_vocab_size=VOCAB, vocab_size=VOCAB, block_size=32)
    return litgpt.Config.from_name(name, **{**sizes, **overrides})


# name -> (the LitGPT config, transformers' model of the converted checkpoint). Names pick convert_from_litgpt's
# copier as they would for the real models: LLaMA-style (split q/k/v), GPT-NeoX (fused, interleaved qkv), Phi-3
# (fused [q|k|v] and gate_up_proj), Phi-2 (split, its own names), Gemma (tied head, GemmaMLP).
FAMILIES: dict[str, tuple[Callable[[], litgpt.Config], Callable[[litgpt.Config], torch.nn.Module]]] = {
    "llama": (lambda: tiny_config(n_layer=3, n_embd=64, vocab_size=VOCAB), _llama),
    "neox": (lambda: tiny_config(n_layer=3, mlp="neox", n_embd=64, vocab_size=VOCAB), _neox),
    "phi-3": (lambda: _from_name("Phi-3-mini-4k-instruct", intermediate_size=96), _phi3),
    "phi-2": (lambda: _from_name("phi-2", intermediate_size=128, rotary_percentage=0.5), _phi),
    "gemma": (lambda: _from_name("Gemma-7b", n_query_groups=2, head_size=16, intermediate_size=96), _gemma),
}


def mixed_sites(config: litgpt.Config) -> list[tuple[int, str, int]]:
    """Layer 0: query 8 and value 2 in one qkv, key without; layer 1: all of q/k/v at rank 4, both MLP inputs at
    different ranks; layer 2: key 6, projection 2, the MLP output 8; the head 4."""
    mlp_in = ["mlp_fc_1", "mlp_fc_2"] if config.mlp_class_name != "GptNeoxMLP" else ["mlp_fc"]
    sites = [(0, "query", 8), (0, "value", 2), (0, mlp_in[-1], 4), (1, "query", 4), (1, "key", 4), (1, "value", 4)]
    sites += [(1, kind, rank) for kind, rank in zip(mlp_in, (4, 2))]
    return sites + [(2, "key", 6), (2, "projection", 2), (2, "mlp_proj", 8), (HEAD_LAYER, "head", 4)]


def randomize_adapters(model: torch.nn.Module, placement: Placement, scale: float, seed: int = 0) -> None:
    """Non-zero B everywhere (LitGPT starts B at zero, which would make every adapter a no-op)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in placement.sites:
            B = site_adapter(model, site.layer, site.kind).B
            B.copy_(torch.randn(B.shape, generator=generator) * scale)


def logits(model: torch.nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of ``b``."""
    return float((a - b).abs().max() / b.abs().max())


class Run:
    """A finished run's ``final/`` on a tiny random base, the adapted LitGPT model's and the base's logits, and the
    base converted by ``convert_from_litgpt``."""

    def __init__(self, root: Path, family: str) -> None:
        make_config, self.make_hf = FAMILIES[family]
        self.config = make_config()
        self.checkpoint_dir = write_checkpoint(root / "checkpoints" / family, self.config)
        if family == "gemma":  # Gemma's head is its embedding (conversion leaves the head out)
            weights = torch.load(self.checkpoint_dir / "lit_model.pth")
            weights["lm_head.weight"] = weights["transformer.wte.weight"].clone()
            torch.save(weights, self.checkpoint_dir / "lit_model.pth")
        model = load_gpt(self.checkpoint_dir)
        self.base_logits = logits(model)
        self.placement = Placement.from_sites(self.config, mixed_sites(self.config), lora_alpha=16)
        apply_placement(model, self.placement)
        randomize_adapters(model, self.placement, scale=0.1)
        self.logits = logits(model)
        self.final = save_adapter(model, self.placement, root / "run" / "final", checkpoint_dir=self.checkpoint_dir)
        with contextlib.redirect_stdout(io.StringIO()):
            convert_lit_checkpoint(self.checkpoint_dir, root / "hf")
        self.hf_weights = torch.load(root / "hf" / "model.pth", weights_only=True)

    def hf_model(self) -> torch.nn.Module:
        model = self.make_hf(self.config)
        missing, unexpected = model.load_state_dict(self.hf_weights, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # Gemma's tied head
        return model.eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Callable[[str], Run]:
    cache: dict[str, Run] = {}

    def get(family: str) -> Run:
        if family not in cache:
            cache[family] = Run(tmp_path_factory.mktemp(family.replace("-", "")), family)
        return cache[family]

    return get


def read_export(out_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((out_dir / ADAPTER_CONFIG).read_text()), load_file(str(out_dir / ADAPTER_WEIGHTS))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_peft_adapter_gives_the_runs_logits_on_the_converted_model(family, runs, tmp_path):
    run = runs(family)
    hf = run.hf_model()
    assert relative(logits(hf), run.base_logits) < 1e-5  # the converted base is the base
    assert relative(run.logits, run.base_logits) > 1e-2  # the adapters are not a no-op

    exported = export_peft(run.final, tmp_path / "peft")
    settings, tensors = read_export(exported)
    assert settings["peft_type"] == "LORA" and settings["task_type"] == "CAUSAL_LM" and settings["rank_pattern"]
    adapted = peft.PeftModel.from_pretrained(hf, str(exported))
    assert relative(logits(adapted), run.logits) < 1e-4
    with adapted.disable_adapter():
        assert relative(logits(adapted), run.base_logits) < 1e-5

    # One rank everywhere: zero padding changes nothing, and the patterns are gone.
    padded = export_peft(run.final, tmp_path / "padded", pad_rank=True)
    padded_settings, padded_tensors = read_export(padded)
    assert padded_settings["rank_pattern"] == {} and padded_settings["alpha_pattern"] == {}
    assert padded_settings["lora_alpha"] == 16 and padded_settings["target_modules"] == settings["target_modules"]
    rank = padded_settings["r"]
    assert rank == max(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight"))
    assert padded_tensors.keys() == tensors.keys()
    for key, tensor in tensors.items():
        padded_tensor = padded_tensors[key]
        own_rank = tensor.shape[0] if key.endswith("lora_A.weight") else tensor.shape[1]
        if key.endswith("lora_A.weight"):
            assert padded_tensor.shape[0] == rank and torch.equal(padded_tensor[:own_rank], tensor)
            assert not padded_tensor[own_rank:].any()
        else:
            assert padded_tensor.shape[1] == rank and not padded_tensor[:, own_rank:].any()
    adapted_padded = peft.PeftModel.from_pretrained(run.hf_model(), str(padded))
    assert relative(logits(adapted_padded), run.logits) < 1e-4


def test_ranks_and_names_follow_the_placement(runs, tmp_path):
    """LLaMA-style: q/k/v split with their own ranks, the most common rank as ``r``, no adapter where there is no
    site (layer 0's key), alpha unchanged."""
    run = runs("llama")
    settings, tensors = read_export(export_peft(run.final, tmp_path / "peft"))
    layer = "model.layers.{}.{}".format
    assert settings["r"] == 4 and settings["lora_alpha"] == 16 and settings["alpha_pattern"] == {}
    assert settings["rank_pattern"] == {
        layer(0, "self_attn.q_proj"): 8, layer(0, "self_attn.v_proj"): 2, layer(1, "mlp.up_proj"): 2,
        layer(2, "self_attn.k_proj"): 6, layer(2, "self_attn.o_proj"): 2, layer(2, "mlp.down_proj"): 8,
    }  # fmt: skip
    assert layer(0, "self_attn.k_proj") not in settings["target_modules"] and "lm_head" in settings["target_modules"]
    assert len(settings["target_modules"]) == len(run.placement.sites) == len(tensors) // 2
    # Layer 0's value is its own module with exactly the site's A and B (its scaling alpha/2 is PEFT's 16/2).
    A, B = (tensors[f"base_model.model.{layer(0, 'self_attn.v_proj')}.lora_{m}.weight"] for m in "AB")
    value = site_adapter(load_adapter(run.checkpoint_dir, run.final), 0, "value")
    assert torch.equal(A, value.A) and torch.allclose(B, value.B, rtol=1e-6, atol=0)


@pytest.mark.parametrize("family, qkv", [("phi-3", "self_attn.qkv_proj"), ("neox", "attention.query_key_value")])
def test_fused_linears_stack_the_parts(family, qkv, runs, tmp_path):
    """A fused Hugging Face qkv holds the parts' ranks summed; equal ranks keep B as it is and carry the scaling in
    ``alpha_pattern`` (3 parts of rank 4: alpha 48 over rank 12)."""
    run = runs(family)
    prefix = "model.layers" if family == "phi-3" else "gpt_neox.layers"
    settings, _ = read_export(export_peft(run.final, tmp_path / "peft"))
    assert settings["rank_pattern"][f"{prefix}.0.{qkv}"] == 10  # query 8 + value 2
    assert settings["rank_pattern"][f"{prefix}.1.{qkv}"] == 12
    assert settings["alpha_pattern"] == {f"{prefix}.1.{qkv}": 48}


@pytest.mark.slow
def assert_peft_gives_smollm2s_logits(model, placement: Placement, checkpoint: Path, tmp_path: Path) -> dict:
    """Random nonzero adapters on ``model`` (SmolLM2 with ``placement`` applied), saved as a run's ``final/`` and
    exported: PEFT on the converted base gives the adapted model's logits, which differ from the base's. Returns the
    export's settings."""
    tokens = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    randomize_adapters(model, placement, scale=0.02)
    ours = logits(model, tokens)
    final = save_adapter(model, placement, tmp_path / "run" / "final", checkpoint_dir=checkpoint)
    del model
    exported = export_peft(final, tmp_path / "peft")
    settings, _ = read_export(exported)
    with contextlib.redirect_stdout(io.StringIO()):
        convert_lit_checkpoint(checkpoint, tmp_path / "hf")
    with no_init_weights():  # every weight is loaded next
        hf = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(checkpoint))
    hf.load_state_dict(torch.load(tmp_path / "hf" / "model.pth", mmap=True, weights_only=True))
    assert relative(logits(hf, tokens), ours) > 1e-2, f"the adapters on {len(placement.sites)} sites change nothing"
    adapted = peft.PeftModel.from_pretrained(hf, str(exported))
    assert relative(logits(adapted, tokens), ours) < 1e-4
    return settings


def test_smollm2_with_a_plop_like_placement(smollm2_checkpoint, tmp_path):
    """The real SmolLM2-135M-Instruct, PLoP's kinds (value, mlp_fc_2, mlp_proj) with per-layer ranks plus query in
    four layers: the export loaded by PEFT on the converted model gives the adapted model's logits."""
    model = load_checkpoint_model(smollm2_checkpoint, device="cpu")
    config = model.config
    sites = [(layer, "value", (2, 4, 8)[layer % 3]) for layer in range(config.n_layer)]
    sites += [(layer, "mlp_fc_2", 16) for layer in range(config.n_layer)]
    sites += [(layer, "mlp_proj", 4) for layer in range(8, config.n_layer)] + [(layer, "query", 8) for layer in range(4)]
    placement = Placement.from_sites(config, sites, lora_alpha=16)
    apply_placement(model, placement)
    settings = assert_peft_gives_smollm2s_logits(model, placement, smollm2_checkpoint, tmp_path)
    # rank 4 is the most common (10 values, 22 down_proj); a block path where every block has it, else full names
    targets, ranks = set(settings["target_modules"]), settings["rank_pattern"]
    assert {"self_attn.v_proj", "mlp.up_proj", "model.layers.8.mlp.down_proj", "model.layers.3.self_attn.q_proj"} <= targets
    assert "model.layers.7.mlp.down_proj" not in targets and "model.layers.4.self_attn.q_proj" not in targets
    assert settings["r"] == 4 and ranks["mlp.up_proj"] == 16 and ranks["model.layers.0.self_attn.v_proj"] == 2
    assert "model.layers.1.self_attn.v_proj" not in ranks and ranks["model.layers.2.self_attn.v_proj"] == 8


def test_smollm2_with_a_site_level_budget_grown_as_weightlora_plus_grows(smollm2_checkpoint, tmp_path, one_thread):
    """What the methods themselves produce on the real model: PLoP's site-level budget chosen by calibration (sites
    scattered over layers and kinds), then WeightLoRA+'s exact rank growth on some of them (``grow_ranks``, the
    step its cut takes): the export still gives the run's logits."""
    from litgpt.tokenizer import Tokenizer

    from litgpt_plop.args import CalibrationArgs, PlopArgs
    from litgpt_plop.data import ReasoningGym
    from litgpt_plop.decide import plan_placement
    from litgpt_plop.model.adapt import current_placement
    from litgpt_plop.scoring.prompts import tokenize_prompts
    from litgpt_plop.weightlora import grow_ranks

    model = load_checkpoint_model(smollm2_checkpoint, device="cpu")
    tokenizer = Tokenizer(smollm2_checkpoint)
    prompts = tokenize_prompts(ReasoningGym(train_size=8, val_size=2).prompts("train", tokenizer), tokenizer)
    calibration = CalibrationArgs(num_samples=8, resamples=0, progress=False, data_free="never")
    planned = plan_placement(model, prompts, "plop", rank=4, plop=PlopArgs(budget=0.15, granularity="site"), calibration=calibration)
    layers_of = {kind: {s.layer for s in planned.sites if s.kind == kind} for kind in {s.kind for s in planned.sites}}
    assert len(layers_of) > 1 and min(map(len, layers_of.values())) < model.config.n_layer  # kinds on some layers only
    apply_placement(model, planned)
    grown = {(s.layer, s.kind): 16 for s in list(planned.sites)[:3]}
    grow_ranks(model, grown, torch.Generator().manual_seed(0))
    placement = current_placement(model)
    assert sorted({s.rank for s in placement.sites}) == [4, 16]
    settings = assert_peft_gives_smollm2s_logits(model, placement, smollm2_checkpoint, tmp_path)
    assert settings["r"] == 4 and sorted(set(settings["rank_pattern"].values())) == [16]


# ---- the command -------------------------------------------------------------------------------------------


def test_the_command_writes_beside_final_and_replaces_whole(runs, monkeypatch, capsys):
    run = runs("llama")
    code, out, err = run_litgpt_plop(monkeypatch, capsys, "export_peft", run.final)
    peft_dir = run.final.parent / "peft"
    assert code == 0, err
    assert "Wrote a PEFT LoRA adapter" in out and str(peft_dir) in out
    (peft_dir / "stale.txt").write_text("from an earlier export")
    code, _, err = run_litgpt_plop(monkeypatch, capsys, "export_peft", run.final, "--out_dir", peft_dir, "--pad_rank", "true")
    assert code == 0, err
    assert {p.name for p in peft_dir.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS, PLACEMENT_FILE}
    assert json.loads((peft_dir / ADAPTER_CONFIG).read_text())["rank_pattern"] == {}


def _without(name: str) -> Callable[[Run, Path], Path]:
    def make(run: Run, tmp_path: Path) -> Path:
        copy = tmp_path / "final"
        copy.mkdir()
        for path in run.final.iterdir():
            if path.name != name:
                (copy / path.name).write_bytes(path.read_bytes())
        return copy

    return make


def _other_placement(run: Run, tmp_path: Path) -> Path:
    copy = _without(PLACEMENT_FILE)(run, tmp_path)
    Placement.from_sites(run.config, [(0, "query", 8)], lora_alpha=16).save(copy / PLACEMENT_FILE, run.config)
    return copy


def _moe(run: Run, tmp_path: Path) -> Path:
    config = tiny_config(n_layer=2, mlp_class_name="LLaMAMoE", n_expert=4, n_expert_per_token=2)
    checkpoint_dir = write_checkpoint(tmp_path / "checkpoints" / "tiny-moe", config)
    model = load_gpt(checkpoint_dir)
    placement = Placement.from_sites(config, [(0, "query", 4)], lora_alpha=16)
    apply_placement(model, placement)
    return save_adapter(model, placement, tmp_path / "moe" / "final", checkpoint_dir=checkpoint_dir)


@pytest.mark.parametrize(
    "make_final, extra, message",
    [
        (_without(PLACEMENT_FILE), [], "has no placement.json"),
        (_other_placement, [], "does not match the placement"),
        (_moe, [], "is a mixture of experts"),
        (lambda run, tmp_path: run.final, ["--out_dir", "FINAL"], "would replace FINAL_DIR"),
    ],
    ids=["no-placement", "other-placement", "moe", "out-dir-is-final"],
)
def test_bad_input_is_one_line_naming_it(make_final, extra, message, runs, monkeypatch, capsys, tmp_path):
    final = make_final(runs("llama"), tmp_path)
    extra = [str(final) if arg == "FINAL" else arg for arg in extra]
    before = sorted(p.name for p in final.iterdir())
    code, _, err = run_litgpt_plop(monkeypatch, capsys, "export_peft", final, *extra)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert sorted(p.name for p in final.iterdir()) == before
    assert not (final.parent / "peft").exists() or extra

"""apply_placement: the adapters end up exactly where the placement says, on tiny random LitGPT models."""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict

import litgpt
import litgpt.lora
import litgpt.model
import pytest
import torch
import torch.nn.functional as F
from litgpt.lora import LoRALinear, LoRAQKVLinear

from litgpt_plop.model.adapt import LoRAQKVMixedRankLinear, apply_placement, current_placement, site_adapter
from litgpt_plop.model.modules import base_linear, site_module
from litgpt_plop.selection.placement import (
    HEAD_LAYER,
    QKV_KINDS,
    Placement,
    PlacementError,
    Site,
    kinds_from_flags,
    model_kinds,
)
from litgpt_plop.model.quantize import quantize_linears_4bit

from helpers import random_gpt, tiny_config

VOCAB = 96


pytestmark = pytest.mark.usefixtures("one_thread")


def llama_config() -> litgpt.Config:
    """LLaMA-style (SmolLM2/Llama/Qwen2): LLaMAMLP, RMSNorm, grouped-query attention (4 heads of 16, 2 groups)."""
    return tiny_config(n_layer=2, n_embd=64, vocab_size=VOCAB)


def neox_config() -> litgpt.Config:
    """GPT-NeoX (pythia-14m, cut to 2 layers): GptNeoxMLP, LayerNorm, parallel residual, biases, full MHA."""
    return litgpt.Config.from_name("pythia-14m", n_layer=2, vocab_size=VOCAB, padded_vocab_size=VOCAB, block_size=32)


def gemma_config() -> litgpt.Config:
    """Gemma-2-style: GemmaMLP, post norms, soft-capping, one KV group, head_size * n_head != n_embd."""
    return litgpt.Config(
        name="tiny-gemma", n_layer=2, n_embd=64, n_head=2, n_query_groups=1, head_size=48, intermediate_size=96,
        mlp_class_name="GemmaMLP", gelu_approximate="tanh", norm_class_name="RMSNorm", post_attention_norm=True,
        post_mlp_norm=True, scale_embeddings=True, attention_logit_softcapping=50.0, final_logit_softcapping=30.0,
        bias=False, parallel_residual=False, rotary_percentage=1.0, vocab_size=VOCAB, padded_vocab_size=VOCAB,
        block_size=32,
    )  # fmt: skip


FAMILIES = {"llama": llama_config, "neox": neox_config, "gemma": gemma_config}


def make_placement(config: litgpt.Config, name: str) -> Placement:
    kinds = model_kinds(config)
    mlp = [k for k in kinds if k.startswith("mlp")]
    if name == "per_kind":
        return Placement.from_kinds(config, ["value", "projection", "mlp_proj"], rank=4)
    if name == "per_layer":
        return Placement.from_kinds(config, kinds, layers=[1], rank=4)
    if name == "mixed":  # layer 0: query and value at different ranks in one qkv; layer 1: key = value rank
        sites = [(0, "query", 8), (0, "value", 2), (0, mlp[0], 6), (1, "key", 4), (1, "value", 4)]
        sites += [(1, "projection", 2), (1, "mlp_proj", 8), (HEAD_LAYER, "head", 2)]
        return Placement.from_sites(config, sites)
    raise ValueError(name)


def build(config: litgpt.Config, start: str) -> tuple[torch.nn.Module, litgpt.model.GPT]:
    """(model to adapt, plain reference model with the same base weights)."""
    base = random_gpt(config)
    if start == "plain":
        model = litgpt.model.GPT(config)
        model.load_state_dict(base.state_dict())
    else:  # the usual candidate set: every LitGPT flag on
        flags = ("lora_query", "lora_key", "lora_value", "lora_projection", "lora_mlp", "lora_head")
        lora_config = litgpt.lora.Config(**asdict(config), lora_r=8, lora_alpha=16, **dict.fromkeys(flags, True))
        model = litgpt.lora.GPT(lora_config)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and all("lora_" in k for k in missing)
    return model, base


def all_sites(config: litgpt.Config) -> list[tuple[int, str]]:
    return [(layer, kind) for layer in range(config.n_layer) for kind in model_kinds(config)] + [(HEAD_LAYER, "head")]


def effective_weights(model: torch.nn.Module, config: litgpt.Config) -> dict[tuple[int, str], torch.Tensor]:
    """W + (LitGPT's ``get_lora_AB``) per site; for q/k/v the part's rows of the fused qkv."""
    q, kv = config.n_head * config.head_size, config.n_query_groups * config.head_size
    rows = {"query": slice(0, q), "key": slice(q, q + kv), "value": slice(q + kv, q + 2 * kv)}
    result = {}
    for layer, kind in all_sites(config):
        module = site_module(model, layer, kind)
        weight = base_linear(module).weight.detach().clone()
        if any("lora_" in n for n, _ in module.named_parameters(recurse=False)):
            weight += module.get_lora_AB()
        result[(layer, kind)] = weight[rows[kind]] if kind in QKV_KINDS else weight
    return result


def merged_plain_model(model: torch.nn.Module, config: litgpt.Config) -> litgpt.model.GPT:
    """A plain GPT whose linears hold the adapted model's effective weights."""
    merged = litgpt.model.GPT(config)
    state = {k.replace("linear.", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    merged.load_state_dict(state)
    weights = effective_weights(model, config)
    with torch.no_grad():
        for layer in range(config.n_layer):
            qkv = merged.transformer.h[layer].attn.qkv.weight
            qkv.copy_(torch.cat([weights[(layer, part)] for part in QKV_KINDS]))
            for kind in model_kinds(config):
                if kind not in QKV_KINDS:
                    site_module(merged, layer, kind).weight.copy_(weights[(layer, kind)])
        merged.lm_head.weight.copy_(weights[(HEAD_LAYER, "head")])
    return merged


def train_step(model: torch.nn.Module, tokens: torch.Tensor, lr: float = 1e-2) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def n_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- the main contract, for every family, placement shape and starting point ------------------------------


@pytest.mark.parametrize("start", ["plain", "lora_all"])
@pytest.mark.parametrize("placement_name", ["per_kind", "per_layer", "mixed"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapters_exactly_where_placed(family: str, placement_name: str, start: str) -> None:
    config = FAMILIES[family]()
    placement = make_placement(config, placement_name)
    model, base = build(config, start)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))

    adapted = apply_placement(model, placement)

    assert adapted is model and isinstance(model, litgpt.lora.GPT)
    assert all(isinstance(b, litgpt.lora.Block) for b in model.transformer.h)
    assert isinstance(model.config, litgpt.lora.Config)
    assert {k: getattr(model.config, k) for k in placement.flags()} == placement.flags()
    assert n_trainable(model) == placement.trainable_params(config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "lora_" in n}
    assert current_placement(model).sites == placement.sites

    base.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens), base(tokens))  # B = 0: the adapted model is the base model

    before = effective_weights(model, config)
    train_step(model, tokens)
    after = effective_weights(model, config)
    changed = {site for site in before if not torch.equal(before[site], after[site])}
    assert changed == {(s.layer, s.kind) for s in placement.sites}

    # The forward computes exactly W + scaling * B A per site (per part of the qkv).
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), merged_plain_model(model, config)(tokens), atol=1e-5, rtol=0)


# ---- how the model is changed -----------------------------------------------------------------------------


def test_base_linears_are_reused_not_copied() -> None:
    config = llama_config()
    model, _ = build(config, "plain")
    linears = {(layer, kind): site_module(model, layer, kind) for layer, kind in all_sites(config)}
    pointers = {site: m.weight.data_ptr() for site, m in linears.items()}
    apply_placement(model, make_placement(config, "mixed"))
    for site, linear in linears.items():
        assert base_linear(site_module(model, *site)) is linear
        assert site_module(model, *site).linear.weight.data_ptr() == pointers[site]


def test_model_inside_a_wrapper_is_adapted_in_place() -> None:
    config = neox_config()
    model, _ = build(config, "plain")
    wrapper = torch.nn.ModuleDict({"gpt": model})
    assert apply_placement(wrapper, make_placement(config, "per_kind")) is model
    assert wrapper["gpt"] is model and isinstance(model, litgpt.lora.GPT)
    assert model.config is model.transformer.h[0].config is model.transformer.h[0].attn.config
    trainable = {n for n, p in wrapper.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in wrapper.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_flag_placement_is_stock_lora_gpt(family: str) -> None:
    """A placement LitGPT's flags can express gives the very model ``litgpt.lora.GPT`` builds from them."""
    config = FAMILIES[family]()
    placement = Placement.from_kinds(config, kinds_from_flags(config, lora_query=True, lora_value=True, lora_mlp=True), rank=4)
    model, base = build(config, "plain")
    apply_placement(model, placement)
    stock = litgpt.lora.GPT(litgpt.lora.Config(**asdict(config), **placement.flags()))
    ours = {k: v.shape for k, v in model.state_dict().items()}
    assert ours == {k: v.shape for k, v in stock.state_dict().items()}
    assert [type(m) for m in model.modules()] == [type(m) for m in stock.modules()]
    stock.load_state_dict(model.state_dict())  # strict, both ways
    model.load_state_dict(stock.state_dict())
    # A base checkpoint loads into the adapted model through LitGPT's key mappings (lora_ keys missing only).
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all("lora_" in k for k in missing)


def test_left_out_adapters_are_deleted() -> None:
    config = llama_config()
    model, _ = build(config, "lora_all")
    apply_placement(model, make_placement(config, "per_layer"))  # layer 1 only
    block = model.transformer.h[0]
    for module in (block.attn.qkv, block.attn.proj, block.mlp.fc_1, block.mlp.fc_2, block.mlp.proj, model.lm_head):
        assert module.r == 0 and not hasattr(module, "lora_A") and not hasattr(module, "lora_B")
    assert not any("lora_" in n for n, _ in block.named_parameters())
    assert not any(block.attn.qkv.enable_lora)


def test_reapplying_keeps_unchanged_adapters() -> None:
    config = llama_config()
    model, _ = build(config, "plain")
    placement = make_placement(config, "mixed")
    apply_placement(model, placement)
    train_step(model, torch.randint(0, VOCAB, (2, 12)))
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    apply_placement(model, current_placement(model))  # its own placement: nothing changes
    assert {n: p for n, p in model.named_parameters() if "lora_" in n}.keys() == trained.keys()
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, trained[n])

    # Growing one part of the mixed qkv (query 8 -> 16): that part starts afresh, the value part keeps its weights.
    sites = [Site(s.layer, s.kind, 16) if (s.layer, s.kind) == (0, "query") else s for s in placement.sites]
    apply_placement(model, Placement.from_sites(config, sites))
    query, value = site_adapter(model, 0, "query"), site_adapter(model, 0, "value")
    assert query.A.shape == (16, config.n_embd) and not query.B.any()
    assert torch.equal(value.B, trained["transformer.h.0.attn.qkv.lora_B_value"])
    assert torch.equal(model.transformer.h[1].mlp.proj.lora_B, trained["transformer.h.1.mlp.proj.lora_B"])


# ---- the fused qkv ----------------------------------------------------------------------------------------


def test_mixed_rank_qkv_forward_is_per_part_lora() -> None:
    config = llama_config()
    model, _ = build(config, "plain")
    placement = Placement.from_sites(config, [(0, "query", 8), (0, "key", 3), (0, "value", 2)], lora_alpha=12)
    apply_placement(model, placement)
    qkv = model.transformer.h[0].attn.qkv
    assert isinstance(qkv, LoRAQKVMixedRankLinear) and qkv.ranks == (8, 3, 2)
    expected_params = sum(r * (config.n_embd + size) for r, size in zip((8, 3, 2), (64, 32, 32)))
    assert sum(p.numel() for p in qkv.parameters() if p.requires_grad) == expected_params
    with torch.no_grad():
        for part in QKV_KINDS:
            getattr(qkv, f"lora_B_{part}").normal_()
    x = torch.randn(2, 5, config.n_embd)
    parts = [
        x @ getattr(qkv, f"lora_A_{p}").T @ getattr(qkv, f"lora_B_{p}").T * (12 / r)
        for p, r in zip(QKV_KINDS, (8, 3, 2))
    ]
    expected = qkv.linear(x) + torch.cat(parts, dim=-1)
    torch.testing.assert_close(qkv(x), expected)
    torch.testing.assert_close(qkv(x), F.linear(x, qkv.linear.weight + qkv.get_lora_AB()))


@pytest.mark.parametrize("n_query_groups", [2, 4])  # GQA (split conv) and MHA (grouped conv)
def test_stock_qkv_layout_is_read_per_part(n_query_groups: int) -> None:
    """``site_adapter`` reads LitGPT's packed LoRAQKVLinear (A in chunks of r, B in blocks of part size) right."""
    config = llama_config()
    config.n_query_groups = n_query_groups
    lora_cfg = litgpt.lora.Config(**asdict(config), lora_r=3, lora_alpha=6, lora_query=True, lora_value=True)
    model = litgpt.lora.GPT(lora_cfg)
    qkv = model.transformer.h[0].attn.qkv
    with torch.no_grad():
        qkv.lora_B.normal_()
    delta = qkv.get_lora_AB()  # LitGPT's own (conv1d + zero_pad) computation
    q, kv = config.n_head * config.head_size, n_query_groups * config.head_size
    rows = {"query": slice(0, q), "key": slice(q, q + kv), "value": slice(q + kv, q + 2 * kv)}
    assert site_adapter(model, 0, "key") is None and not delta[rows["key"]].any()
    for part in ("query", "value"):
        adapter = site_adapter(model, 0, part)
        torch.testing.assert_close(adapter.scaling * adapter.B @ adapter.A, delta[rows[part]])
    expected = Placement.from_kinds(config, kinds_from_flags(config, lora_query=True, lora_value=True), rank=3)
    assert current_placement(model).sites == expected.sites


# ---- 4-bit base weights (bitsandbytes on CPU) -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_placement_on_4bit_base_trains(dtype: torch.dtype) -> None:
    import bitsandbytes as bnb

    config = llama_config()
    torch.manual_seed(0)
    model = litgpt.model.GPT(config).to(dtype)
    dense_logits_model = litgpt.model.GPT(config).to(dtype)
    dense_logits_model.load_state_dict(model.state_dict())
    assert quantize_linears_4bit(model, compute_dtype=dtype) == config.n_layer * 5  # qkv, proj, fc_1, fc_2, proj
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    tokens = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        base_logits = model(tokens)
        # Quantized, not garbage: close to the dense model (NF4 error only).
        assert (base_logits.float() - dense_logits_model.eval()(tokens).float()).abs().mean() < 0.1

    placement = make_placement(config, "mixed")
    apply_placement(model, placement)
    qkv = model.transformer.h[0].attn.qkv
    assert isinstance(qkv.linear, bnb.nn.Linear4bit) and qkv.linear.weight.dtype == torch.uint8
    # The CPU repack guard; and it is still the attribute bitsandbytes' forward reads (else it would guard nothing).
    assert qkv.linear.support_avx512bf16_for_cpu is False
    assert "self.support_avx512bf16_for_cpu" in inspect.getsource(bnb.nn.Linear4bit.forward)
    assert all(p.dtype == dtype for n, p in model.named_parameters() if "lora_" in n)
    assert n_trainable(model) == placement.trainable_params(config)
    with torch.no_grad():
        assert torch.equal(model(tokens), base_logits)

    # An eval pass without grad (a calibration pass) must not stop the adapters from learning afterwards.
    with torch.no_grad():
        model(tokens)
    losses = [train_step(model, tokens, lr=3e-2) for _ in range(6)]
    assert losses[-1] < losses[0] - 0.05
    model.train()
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    assert qkv.lora_A_query.grad is not None and qkv.lora_A_query.grad.abs().sum() > 0  # first block still learns
    assert not getattr(qkv.linear.weight.quant_state, "packing_format_for_cpu", False)


# ---- bad input --------------------------------------------------------------------------------------------


def test_bad_sites_are_refused_with_the_reason() -> None:
    config = llama_config()
    with pytest.raises(PlacementError, match="Unknown kind 'gate_proj'"):
        Placement.from_sites(config, [(0, "gate_proj", 4)])
    with pytest.raises(PlacementError, match="layer 5 is out of range for a model with 2 layers"):
        Placement.from_sites(config, [(5, "query", 4)])
    with pytest.raises(PlacementError, match="Rank must be positive, got 0"):
        Placement.from_sites(config, [(0, "query", 0)])
    with pytest.raises(PlacementError, match="has no 'mlp_fc'"):  # a Pythia kind on a LLaMA model
        Placement.from_sites(config, [(0, "mlp_fc", 4)])


def test_apply_refuses_bad_placements_before_touching_the_model() -> None:
    config = llama_config()
    model, _ = build(config, "plain")
    snapshot = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(PlacementError, match="has no sites: nothing would be trained"):
        apply_placement(model, Placement(sites=[]))
    with pytest.raises(PlacementError, match="layer 2 is out of range"):
        apply_placement(model, Placement(sites=[Site(2, "value", 4)]))  # n_layer unrecorded: caught on apply
    with pytest.raises(PlacementError, match="made for a model with 3 layers"):
        apply_placement(model, Placement.from_kinds(litgpt.Config(**{**asdict(config), "n_layer": 3}), ["value"]))
    assert type(model) is litgpt.model.GPT
    assert model.state_dict().keys() == snapshot.keys()


def test_shared_expert_mixture_of_experts_is_refused_and_left_untouched() -> None:
    # Mixtral/Qwen3-MoE-style mixtures are supported (tests/test_moe.py); DeepSeek-style shared experts are not.
    moe = litgpt.Config(
        **{**asdict(llama_config()), "name": "tiny-moe", "mlp_class_name": "LLaMAMoE", "n_expert": 4,
           "n_expert_per_token": 2, "moe_intermediate_size": 32, "n_shared_expert": 1},
    )  # fmt: skip
    model = litgpt.model.GPT(moe)
    types = [type(m) for m in model.modules()]
    keys = list(model.state_dict())
    placement = Placement.from_kinds(llama_config(), ["query", "value"])  # same depth and width
    with pytest.raises(PlacementError, match="shared experts or a grouped router"):
        apply_placement(model, placement)
    assert [type(m) for m in model.modules()] == types
    assert list(model.state_dict()) == keys
    assert type(model.config) is litgpt.Config
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_module_types_are_refused() -> None:
    config = llama_config()
    model, _ = build(config, "plain")
    model.transformer.h[1].mlp.fc_2 = torch.nn.Conv1d(64, 128, 1)
    with pytest.raises(PlacementError, match="'mlp_fc_2' at layer 1: Conv1d is not a linear layer"):
        apply_placement(model, make_placement(config, "per_kind"))
    assert type(model.transformer.h[0].attn.qkv) is torch.nn.Linear  # nothing was wrapped


def test_lora_linear_subclasses_keep_litgpt_semantics() -> None:
    """``mark_only_lora_as_trainable`` and ``merge_lora_weights`` from LitGPT work on an adapted model."""
    config = gemma_config()
    model, _ = build(config, "plain")
    apply_placement(model, make_placement(config, "mixed"))
    for p in model.parameters():
        p.requires_grad = True
    litgpt.lora.mark_only_lora_as_trainable(model)
    assert n_trainable(model) == make_placement(config, "mixed").trainable_params(config)
    tokens = torch.randint(0, VOCAB, (2, 10))
    train_step(model, tokens)
    model.eval()
    with torch.no_grad():
        expected = model(tokens)
        litgpt.lora.merge_lora_weights(model)
        assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear) and m.r > 0)
        torch.testing.assert_close(model(tokens), expected, atol=1e-5, rtol=0)
    assert isinstance(model.transformer.h[1].attn.qkv, LoRAQKVLinear)
    assert math.isclose(model.transformer.h[1].attn.qkv.scaling, 16 / 4)

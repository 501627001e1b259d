"""Mixture-of-experts models (LitGPT's ``LLaMAMoE``: Mixtral- and Qwen3-MoE-style): PLoP per expert on its routed
tokens, placements on every expert of a (layer, kind), the router left alone by the methods, stock LitGPT loading
the output, and ``--plugin none`` training what ``litgpt finetune_lora`` trains."""

import json
import subprocess
import sys
from pathlib import Path

import litgpt
import litgpt.lora
import pytest
import torch
import torch.nn.functional as F
import yaml
from litgpt.args import EvalArgs, TrainArgs
from litgpt.lora import LoRALinear

from litgpt_plop.model.adapt import apply_placement, current_placement, lora_config
from litgpt_plop.args import CalibrationArgs, PlopArgs
from litgpt_plop.scoring.calibration import calibrate, make_batches
from litgpt_plop.data import ReasoningGym
from litgpt_plop.scoring.kappa import condition_number, geometric_mean
from litgpt_plop.decide import kappa_placement
from litgpt_plop.selection.placement import Placement, site_params
from litgpt_plop.scoring.plop import PlopScorer
from litgpt_plop.decide import plan_placement
from litgpt_plop.weightlora.args import WeightLoRAArgs

from helpers import SMOLLM2_VOCAB, logged_metric, random_gpt, tiny_config, tiny_run

# Mixtral: every expert as wide as intermediate_size (moe_intermediate_size unset); Qwen3-MoE: narrower experts, q/k norm.
FAMILIES = {
    "mixtral": dict(mlp_class_name="LLaMAMoE", n_expert=4, n_expert_per_token=2),
    "qwen3moe": dict(mlp_class_name="LLaMAMoE", n_expert=8, n_expert_per_token=2, moe_intermediate_size=32, norm_qk=True),
}
MLP_KINDS = ("mlp_fc_1", "mlp_fc_2", "mlp_proj")
ATTRS = {"mlp_fc_1": "fc_1", "mlp_fc_2": "fc_2", "mlp_proj": "proj"}


def moe_config(family: str, **overrides) -> litgpt.Config:
    return tiny_config(name=f"tiny-{family}", **{**FAMILIES[family], **overrides})


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory, smollm2_checkpoint) -> dict[str, Path]:
    """Tiny random checkpoints of both families with SmolLM2's tokenizer (a 256-token context)."""
    from helpers import write_checkpoint

    root = tmp_path_factory.mktemp("moe")
    return {
        family: write_checkpoint(root / family, moe_config(family, vocab_size=SMOLLM2_VOCAB, block_size=256),
                                 tokenizer_from=smollm2_checkpoint)  # fmt: skip
        for family in FAMILIES
    }


def prompts(n: int, lengths: tuple[int, int] = (3, 12), vocab: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(t),), generator=g) for t in torch.randint(*lengths, (n,), generator=g)]


def routed_inputs(model: litgpt.model.GPT, ids: list[torch.Tensor]) -> dict[tuple[int, int], list[torch.Tensor]]:
    """By hand, per (layer, expert): the vectors entering that expert, prompt by prompt run alone (no padding),
    routed as LitGPT's LLaMAMoE routes: top-k of the router's logits."""
    captured: dict[int, list[torch.Tensor]] = {}
    handles = [block.mlp.register_forward_pre_hook(lambda m, a, l=layer: captured.setdefault(l, []).append(a[0][0]))
               for layer, block in enumerate(model.transformer.h)]  # fmt: skip
    with torch.no_grad():
        for prompt in ids:
            model(prompt[None])
    for handle in handles:
        handle.remove()
    inputs = {}
    config = model.config
    for layer, xs in captured.items():
        x = torch.cat(xs)  # (tokens, C)
        chosen = torch.topk(x @ model.transformer.h[layer].mlp.gate.weight.T, config.n_expert_per_token).indices
        for e in range(config.n_expert):
            inputs[(layer, e)] = x[(chosen == e).any(dim=1)]
    return inputs


def hand_nfn(expert: torch.nn.Module, kind: str, z: torch.Tensor) -> float | None:
    """NFN of one expert matrix on its routed tokens z: mean ||W u|| / ||u|| over its inputs u, over ||W||_F/sqrt(d_in)."""
    if z.shape[0] == 0:
        return None
    with torch.no_grad():
        u = z if kind != "mlp_proj" else F.silu(expert.fc_1(z)) * expert.fc_2(z)
    W = getattr(expert, ATTRS[kind]).weight.detach()
    ratios = (u @ W.T).norm(dim=1) / u.norm(dim=1)
    return float(ratios.double().mean() / (W.double().norm() / W.shape[1] ** 0.5))


@pytest.mark.parametrize("family", FAMILIES)
def test_plop_scores_every_expert_on_the_tokens_routed_to_it(family, one_thread):
    config = moe_config(family)
    model = random_gpt(config).eval()
    ids = prompts(6)
    scorer = PlopScorer(model, ["value", *MLP_KINDS], range(config.n_layer))
    batches, _ = make_batches(ids, batch_size=4, max_seq_length=32)  # ragged batches: padding must be left out
    calibrate(model, batches, [scorer], progress=False)
    scores = scorer.result()
    inputs = routed_inputs(model, ids)
    n_tokens = sum(len(p) for p in ids)
    for layer in range(config.n_layer):
        experts = model.transformer.h[layer].mlp.experts
        counts = [inputs[(layer, e)].shape[0] for e in range(config.n_expert)]
        assert sum(counts) == n_tokens * config.n_expert_per_token
        for kind in MLP_KINDS:
            key = f"{layer}.{kind}"
            expected = [hand_nfn(experts[e], kind, inputs[(layer, e)]) for e in range(config.n_expert)]
            assert scores.expert_tokens[key] == counts
            assert scores.per_expert[key] == pytest.approx(expected, rel=1e-5)
            # the site: weighted by the tokens each expert saw
            weighted = sum(v * c for v, c in zip(expected, counts) if v is not None) / sum(counts)
            assert scores.per_site[key] == pytest.approx(weighted, rel=1e-5)
    assert scores.tokens == n_tokens  # the value sites see every real token once
    assert set(scores.per_kind) == {"value", *MLP_KINDS}


def test_experts_without_a_calibration_token_are_listed_and_left_out(one_thread):
    config = moe_config("qwen3moe", n_expert=8, n_expert_per_token=1)
    model = random_gpt(config).eval()
    ids = prompts(2, lengths=(1, 3))  # at most 4 tokens: at most 4 of the 8 experts per block get any
    with pytest.warns(UserWarning, match="Some experts received no calibration token"):
        placement = plan_placement(model, ids, method="plop", calibration=CalibrationArgs(batch_size=2))
    inputs = routed_inputs(model, ids)
    scores = placement.scores
    expected = {str(l): [e for e in range(8) if inputs[(l, e)].shape[0] == 0] for l in range(config.n_layer)}
    assert all(len(v) >= 4 for v in expected.values())
    assert scores.unused_experts == expected
    for layer, idle in expected.items():
        values = scores.nfn_per_expert[f"{layer}.mlp_fc_1"]
        assert [e for e, v in enumerate(values) if v is None] == idle  # no score, not a zero averaged in
    report = placement_report(placement, config)
    assert "Experts that received no calibration token" in report and "block 0: experts" in report
    saved = json.loads(json.dumps(placement.to_dict(config)))
    assert Placement.from_dict(saved).scores.unused_experts == expected


def placement_report(placement: Placement, config: litgpt.Config) -> str:
    from litgpt_plop.reports.placement import _markdown

    return _markdown(placement, config)


@pytest.mark.parametrize("family", FAMILIES)
def test_placement_puts_lora_on_every_expert_never_on_the_router(family, one_thread):
    config = moe_config(family)
    model = random_gpt(config)
    placement = Placement.from_kinds(config, ["value", "mlp_proj"], layers=[1], rank=4)
    gpt = apply_placement(model, placement)
    assert isinstance(gpt, litgpt.lora.GPT) and isinstance(gpt.transformer.h[1].mlp, litgpt.lora.LLaMAMoE)
    for block in gpt.transformer.h:
        assert isinstance(block.mlp.gate, LoRALinear) and block.mlp.gate.r == 0  # the router: no adapter
    trainable = {name for name, p in gpt.named_parameters() if p.requires_grad}
    expected = {"transformer.h.1.attn.qkv.lora_A", "transformer.h.1.attn.qkv.lora_B"}
    expected |= {f"transformer.h.1.mlp.experts.{e}.proj.lora_{ab}" for e in range(config.n_expert) for ab in "AB"}
    assert trainable == expected
    assert sum(p.numel() for p in gpt.parameters() if p.requires_grad) == placement.trainable_params(config)
    assert site_params(config, "mlp_proj", 4) == config.n_expert * 4 * (config.n_embd + (config.moe_intermediate_size or config.intermediate_size))
    assert current_placement(gpt).sites == placement.sites
    # exactly the placed expert linears learn: B starts at zero, so give it values, then check the gradients
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    gpt(torch.randint(0, 64, (2, 16))).sum().backward()
    assert {n for n, p in gpt.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0} <= expected
    assert all(gpt.get_parameter(n).grad is not None for n in expected if ".qkv." in n)


@pytest.mark.parametrize("family", FAMILIES)
def test_kappa_scores_every_expert_and_takes_the_geometric_mean(family, one_thread):
    config = moe_config(family)
    model = random_gpt(config)
    placement = kappa_placement(model, None)
    scores = placement.scores
    for layer in range(config.n_layer):
        experts = model.transformer.h[layer].mlp.experts
        per_expert = [condition_number(experts[e].proj.weight.detach().float()) for e in range(config.n_expert)]
        assert scores.kappa_per_expert[f"{layer}.mlp_proj"] == pytest.approx(per_expert, rel=1e-9)
        assert scores.kappa_per_site[f"{layer}.mlp_proj"] == pytest.approx(geometric_mean(per_expert), rel=1e-9)
    assert "mlp_router" not in {s.kind for s in placement.sites}


def stock_load(final: Path, base: Path) -> litgpt.lora.GPT:
    """What ``litgpt merge_lora`` does: a ``litgpt.lora.GPT`` from hyperparameters.yaml's flags, the base weights, and
    ``lit_model.pth.lora`` loaded strictly."""
    hparams = yaml.safe_load((final / "hyperparameters.yaml").read_text())
    flags = {k: hparams[k] for k in hparams if k.startswith("lora_")}
    config = lora_config(litgpt.Config.from_file(base / "model_config.yaml"), flags)
    model = litgpt.lora.GPT(config)
    state = torch.load(base / "lit_model.pth", weights_only=True)
    state.update(torch.load(final / "lit_model.pth.lora", weights_only=True)["model"])
    model.load_state_dict(state, strict=True)
    return model


TRAIN = TrainArgs(save_interval=None, log_interval=1, global_batch_size=4, micro_batch_size=4, lr_warmup_steps=1,
                  epochs=1, max_steps=3, max_seq_length=64)  # fmt: skip
EVAL = EvalArgs(interval=100, max_iters=1, max_new_tokens=2, initial_validation=False, final_validation=False)
PLUGINS = {
    "plop": dict(calibration=CalibrationArgs(num_samples=8, batch_size=4), plop=PlopArgs(num_kinds=2)),
    "cka": dict(calibration=CalibrationArgs(num_samples=8, batch_size=4)),
    "kappa": dict(),
    "all": dict(),
    "weightlora": dict(weightlora=WeightLoRAArgs(k=3, warmup_steps=3)),
    # two rounds: K 4 -> 2 -> 1, each survivor's rank doubled per round (every expert of its (layer, kind) alike)
    "weightlora+": dict(weightlora=WeightLoRAArgs(k=4, warmup_steps=5), train=TRAIN.__class__(**{**TRAIN.__dict__, "max_steps": 6})),
    "none": dict(lora_mlp=True),
}


@pytest.mark.parametrize("plugin", PLUGINS)
@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_output_loads_in_stock_litgpt(family, plugin, moe_checkpoints, tmp_path, one_thread):
    checkpoint = moe_checkpoints[family]
    out_dir = tmp_path / plugin
    options = {"train": TRAIN, **PLUGINS[plugin]}
    tiny_run(checkpoint, out_dir, plugin=plugin, eval=EVAL, data=ReasoningGym(train_size=24, val_size=4, prompt_style="alpaca"),
             **options)  # fmt: skip
    final = out_dir / "final"
    placement = Placement.load(final / "placement.json")
    config = litgpt.Config.from_file(checkpoint / "model_config.yaml")
    if plugin == "weightlora":  # every candidate trains during the warm-up; K = 3 (layer, kind) gates survive it
        assert len(placement.sites) == 3
    elif plugin == "weightlora+":
        assert [s.rank for s in placement.sites] == [32]
    else:
        assert logged_metric(out_dir, "trainable_params") == [placement.trainable_params(config)]
    routers = {s for s in placement.sites if s.kind == "mlp_router"}
    # the router is adapted only where stock LitGPT's lora_mlp adapts it: with --plugin none
    assert bool(routers) == (plugin == "none")
    model = stock_load(final, checkpoint)  # strict: every key stock expects, no other
    trained = {(s.layer, s.kind) for s in placement.sites}
    for layer, block in enumerate(model.transformer.h):
        # stock's layout has an adapter on every expert linear once lora_mlp is on; only the placed ones hold an update
        for kind in MLP_KINDS:
            updates = [getattr(e, ATTRS[kind]).lora_B.count_nonzero() > 0 for e in block.mlp.experts if getattr(e, ATTRS[kind]).r]
            assert (any(updates) if updates else False) == ((layer, kind) in trained), (layer, kind)
            if (layer, kind) in trained:
                assert all(updates), (layer, kind)  # every expert of a placed (layer, kind) trained
        router = block.mlp.gate
        assert (router.r > 0 and bool(router.lora_B.count_nonzero())) == ((layer, "mlp_router") in trained)
    if plugin == "plop":  # the merged checkpoint runs in stock `litgpt generate`
        generated = subprocess.run(
            [sys.executable, "-m", "litgpt", "generate", str(final), "--prompt", "What is 1+1?", "--max_new_tokens", "3"],
            capture_output=True, text=True, timeout=300,
        )
        assert generated.returncode == 0, generated.stderr[-2000:]
        assert "What is 1+1?" in generated.stdout


@pytest.mark.parametrize("family", FAMILIES)
def test_plugin_none_trains_what_litgpt_finetune_lora_trains(family, moe_checkpoints, tmp_path):
    checkpoint = moe_checkpoints[family]
    tiny_run(checkpoint, tmp_path / "none", plugin="none", lora_mlp=True)
    stock = subprocess.run(
        [sys.executable, "-m", "litgpt", "finetune_lora", str(checkpoint), "--out_dir", str(tmp_path / "stock"),
         "--precision", "32-true", "--lora_mlp", "true", "--data", "litgpt_plop.data.ReasoningGym",
         "--data.train_size", "32", "--data.val_size", "8", "--data.prompt_style", "alpaca", "--train.save_interval",
         "2", "--train.log_interval", "1", "--train.global_batch_size", "4", "--train.micro_batch_size", "4",
         "--train.lr_warmup_steps", "1", "--train.epochs", "1", "--train.max_steps", "3", "--train.max_seq_length",
         "96", "--eval.interval", "100", "--eval.max_iters", "2", "--eval.max_new_tokens", "4",
         "--eval.initial_validation", "false", "--seed", "7"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert stock.returncode == 0, stock.stderr[-3000:]
    ours = torch.load(tmp_path / "none" / "final" / "lit_model.pth.lora", weights_only=True)["model"]
    theirs = torch.load(tmp_path / "stock" / "final" / "lit_model.pth.lora", weights_only=True)["model"]
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert any(".mlp.gate.lora_A" in k for k in theirs)  # stock's lora_mlp adapts the router too
    assert any(".mlp.experts.1.proj.lora_B" in k for k in theirs)
    assert logged_metric(tmp_path / "none", "loss") == pytest.approx(logged_metric(tmp_path / "stock", "loss"), rel=1e-5)
    for key in theirs:  # the same training: the same trained adapters
        assert torch.allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-6), key


def test_cpu_4bit_quantizes_every_expert_linear_and_the_router_then_plans(one_thread):
    import bitsandbytes as bnb

    from litgpt_plop.model.quantize import quantize_linears_4bit

    config = moe_config("qwen3moe", n_embd=64, moe_intermediate_size=64)
    model = random_gpt(config)
    per_block = 2 + 1 + 3 * config.n_expert  # qkv, proj, the router, three matrices per expert
    assert quantize_linears_4bit(model, quant_type="nf4", double_quant=True) == config.n_layer * per_block
    for block in model.transformer.h:
        assert isinstance(block.mlp.gate, bnb.nn.Linear4bit)
        assert all(isinstance(e.proj, bnb.nn.Linear4bit) for e in block.mlp.experts)
    placement = plan_placement(model, prompts(8), method="plop", calibration=CalibrationArgs(batch_size=4))
    assert set(placement.scores.nfn_per_expert) == {f"{l}.{k}" for l in range(config.n_layer) for k in MLP_KINDS}
    gpt = apply_placement(model, placement)
    assert sum(p.numel() for p in gpt.parameters() if p.requires_grad) == placement.trainable_params(config)
    gpt.train()
    gpt(torch.randint(0, 64, (2, 8))).sum().backward()


def test_finetune_on_cpu_4bit_quantizes_experts_and_router_and_saves_for_stock(moe_checkpoints, tmp_path, one_thread, capsys):
    checkpoint = moe_checkpoints["qwen3moe"]
    tiny_run(checkpoint, tmp_path / "nf4", plugin="plop", quantize="bnb.nf4", train=TRAIN, eval=EVAL,
             data=ReasoningGym(train_size=12, val_size=4, prompt_style="alpaca"), **PLUGINS["plop"])  # fmt: skip
    config = litgpt.Config.from_file(checkpoint / "model_config.yaml")
    # qkv, proj and the router per block, and three linears per expert: what stock's bitsandbytes precision converts
    assert f"Quantized {config.n_layer * (3 + 3 * config.n_expert)} linear layers to 4-bit" in capsys.readouterr().out
    final = tmp_path / "nf4" / "final"
    placement = Placement.load(final / "placement.json")
    assert placement.scores.nfn_per_expert and "mlp_router" not in placement.kinds
    stock_load(final, checkpoint)
    merged = litgpt.model.GPT(config)
    merged.load_state_dict(torch.load(final / "lit_model.pth", weights_only=True), strict=True)

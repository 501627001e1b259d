"""The scores' math (NFN, CKA), turning scores into placements, and the report."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn as nn
from litgpt import GPT, Config

from litgpt_plop.args import CkaArgs, PlopArgs
from litgpt_plop.scoring.calibration import make_batches, calibrate
from litgpt_plop.selection.placement import Placement, PlacementError, model_kinds, site_params
from litgpt_plop.reports.placement import summary_table, write_report
from litgpt_plop.scoring.cka import CkaScores, linear_cka
from litgpt_plop.scoring.hsic import unbiased_hsic
from litgpt_plop.scoring.plop import (
    PlopScorer,
    PlopScores,
    closed_form_denominator,
    monte_carlo_denominator,
    normalized_output_norms,
    weight_matrix,
)
from litgpt_plop.selection.methods import method_names
from litgpt_plop.selection.rules import budget_params
from litgpt_plop.decide import plan_placement, select_placement

from helpers import SCORING_MODEL, random_gpt, tiny_config


def nfn(linear: nn.Module, inputs: torch.Tensor, denominator: str = "closed_form", mc_samples: int = 4096, seed: int = 0) -> float:
    """Reference NFN of one linear on one batch of inputs ``(N, d_in)`` (every row a real token), written
    independently of the scorer: the mean normalised output norm over the denominator."""
    with torch.no_grad():
        outputs = linear(inputs)
        if linear.bias is not None:
            outputs = outputs - linear.bias
        numerator = float(normalized_output_norms(inputs, outputs).double().mean())
        weight = weight_matrix(linear)
    if denominator == "closed_form":
        return numerator / closed_form_denominator(weight)
    return numerator / monte_carlo_denominator(weight, mc_samples, seed)



# ---- NFN --------------------------------------------------------------------------------------------------


def gaussian_linear(d_out: int, d_in: int, seed: int, bias: float = 0.0) -> nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(d_in, d_out, bias=bias != 0.0)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(d_out, d_in, generator=generator))
        if bias:
            linear.bias.fill_(bias)
    return linear


def test_nfn_of_gaussian_weights_and_inputs_is_one():
    # A large bias checks that the numerator is ||y - bias||, not ||y||.
    linear = gaussian_linear(256, 128, seed=0, bias=5.0)
    inputs = torch.randn(4096, 128, generator=torch.Generator().manual_seed(1)) * 7.0  # scale must not matter
    assert nfn(linear, inputs) == pytest.approx(1.0, rel=0.03)
    assert nfn(linear, inputs, denominator="monte_carlo") == pytest.approx(1.0, rel=0.03)


def test_nfn_of_inputs_aligned_with_the_top_singular_direction_is_much_larger():
    generator = torch.Generator().manual_seed(0)
    linear = gaussian_linear(256, 128, seed=0)
    u, v = torch.randn(256, generator=generator), torch.randn(128, generator=generator)
    with torch.no_grad():
        linear.weight += 3.0 * torch.outer(u, v) / (u.norm() * v.norm()) * linear.weight.norm()
    top = torch.linalg.svd(linear.weight.detach())[2][0]
    aligned = torch.randn(2048, 1, generator=generator) * top + 0.01 * torch.randn(2048, 128, generator=generator)
    random_inputs = torch.randn(2048, 128, generator=generator)
    # (With one dominant direction the closed-form denominator is above mean ||W r||, so random inputs land
    # a bit below 1 here; what matters is the gap to aligned inputs.)
    assert 0.7 < nfn(linear, random_inputs) < 1.1
    assert nfn(linear, aligned) > 2.5 * nfn(linear, random_inputs)


@pytest.mark.parametrize("shape", [(64, 64), (256, 64), (64, 256), (576, 192)])
def test_closed_form_and_monte_carlo_denominators_agree(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    weight[: shape[0] // 4] *= 3.0  # not isotropic
    closed = closed_form_denominator(weight)
    assert monte_carlo_denominator(weight, 8192, seed=0) == pytest.approx(closed, rel=0.02)
    # seeded: the same draw every time
    assert monte_carlo_denominator(weight, 256, seed=3) == monte_carlo_denominator(weight, 256, seed=3)


def test_nfn_by_hand():
    # W = [[2, 0], [0, 1]], bias [1, -1], tokens z1 = [3, 4] (|z1| = 5) and z2 = [1, 0].
    # W z1/|z1| = [1.2, 0.8] -> sqrt(2.08); W z2/|z2| = [2, 0] -> 2; denominator ||W||_F / sqrt(2) = sqrt(5/2).
    linear = nn.Linear(2, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        linear.bias.copy_(torch.tensor([1.0, -1.0]))
    inputs = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    expected = (math.sqrt(2.08) + 2.0) / 2 / math.sqrt(2.5)
    assert nfn(linear, inputs) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.088520, rel=1e-5)
    # What wrong formulas would give instead:
    assert not math.isclose(expected, (math.sqrt(52) + 2.0) / 2 / math.sqrt(2.5), rel_tol=0.05)  # unnormalised z
    assert not math.isclose(expected, (math.sqrt(52) + 2.0) / 6 / math.sqrt(2.5), rel_tol=0.05)  # ratio of means
    assert not math.isclose(expected, (math.sqrt(2.08) + 2.0) / 2 / math.sqrt(5.0), rel_tol=0.05)  # no sqrt(d_in)


def test_zero_inputs_are_skipped():
    inputs = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    outputs = torch.tensor([[5.0, 0.0], [0.0, 0.0]])
    assert normalized_output_norms(inputs, outputs).tolist() == [1.0]


def test_fused_qkv_slices_score_like_separate_linears():
    config = tiny_config(n_layer=2, **SCORING_MODEL, bias=True)
    gpt = random_gpt(config)
    with torch.no_grad():  # a bias that would change the numbers if it were not subtracted
        for block in gpt.transformer.h:
            block.attn.qkv.bias.uniform_(-2.0, 2.0)
    captured = []
    handle = gpt.transformer.h[1].attn.qkv.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
    scorer = PlopScorer(gpt, ["query", "key", "value", "mlp_proj"], [0, 1])
    # ragged prompts: a mean of per-batch means would differ from the mean over all tokens
    token_ids = [torch.randint(0, 100, (4 + 5 * i,), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    batches, _ = make_batches(token_ids, batch_size=3, max_seq_length=64)
    calibrate(gpt, batches, [scorer], progress=False)
    handle.remove()
    scores = scorer.result()

    qkv = gpt.transformer.h[1].attn.qkv
    q_size, kv_size = config.n_head * config.head_size, config.n_query_groups * config.head_size
    rows = {"query": (0, q_size), "key": (q_size, q_size + kv_size), "value": (q_size + kv_size, q_size + 2 * kv_size)}
    for kind, (start, stop) in rows.items():
        separate = nn.Linear(config.n_embd, stop - start)
        with torch.no_grad():
            separate.weight.copy_(qkv.weight[start:stop])
            separate.bias.copy_(qkv.bias[start:stop])
        # the mean over every real token of the pass (not a mean of per-batch means: the batches are ragged)
        every_token = torch.cat([inputs[batch.mask] for inputs, batch in zip(captured, batches)])
        expected = nfn(separate, every_token)
        per_batch_mean = sum(nfn(separate, inputs[batch.mask]) for inputs, batch in zip(captured, batches)) / len(captured)
        assert abs(expected - per_batch_mean) > 1e-4 * expected  # the two aggregations really differ here
        assert scores.per_site[f"1.{kind}"] == pytest.approx(expected, rel=1e-5), kind
    assert set(scores.per_site) == {f"{l}.{k}" for l in (0, 1) for k in ("query", "key", "value", "mlp_proj")}
    assert scores.per_kind["key"] == pytest.approx((scores.per_site["0.key"] + scores.per_site["1.key"]) / 2)
    assert scores.per_layer[1] == pytest.approx(
        sum(scores.per_site[f"1.{k}"] for k in ("query", "key", "value", "mlp_proj")) / 4
    )


# ---- CKA --------------------------------------------------------------------------------------------------


def correlated(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(d, d, generator=generator, dtype=torch.float64)) + 0.5 * torch.randn(
        n, d, generator=generator, dtype=torch.float64
    )
    return x, y


def test_cka_of_a_matrix_with_itself_is_one():
    x, _ = correlated(50, 16, seed=0)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x + 5.0) == pytest.approx(1.0, abs=1e-12)  # centred


def test_cka_is_invariant_to_isotropic_scaling_and_orthogonal_transforms():
    x, y = correlated(64, 12, seed=1)
    q = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64))[0]
    reference = linear_cka(x, y)
    assert 0.1 < reference < 0.99
    assert linear_cka(3.7 * x, y) == pytest.approx(reference, rel=1e-10)
    assert linear_cka(x, 0.01 * y @ q) == pytest.approx(reference, rel=1e-10)
    assert linear_cka(x @ q.T, y) == pytest.approx(reference, rel=1e-10)
    # but not to an anisotropic scaling
    assert linear_cka(x * torch.linspace(0.1, 10, 12, dtype=torch.float64), y) != pytest.approx(reference, rel=1e-3)


def reference_unbiased_hsic(x: torch.Tensor, y: torch.Tensor) -> float:
    """Song et al. (2012), with explicit n x n Gram matrices."""
    n = x.shape[0]
    k, l = x @ x.T, y @ y.T
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    ones = torch.ones(n, 1, dtype=x.dtype)
    value = torch.trace(k @ l) + (ones.T @ k @ ones) * (ones.T @ l @ ones) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (
        ones.T @ k @ l @ ones
    )
    return float(value / (n * (n - 3)))


@pytest.mark.parametrize("n", [5, 40, 200])
def test_unbiased_hsic_matches_the_gram_matrix_formula(n):
    x, y = correlated(n, 24, seed=n)
    y = y[:, :10] + 1.0  # different widths, non-centred
    assert float(unbiased_hsic(x, y)) == pytest.approx(reference_unbiased_hsic(x, y), rel=1e-9)
    # the shift invariance the scorer relies on when it centres each batch first
    assert float(unbiased_hsic(x - x.mean(0), y - y.mean(0))) == pytest.approx(reference_unbiased_hsic(x, y), rel=1e-9)


def test_streaming_minibatch_cka_matches_the_one_shot_unbiased_estimate():
    x, y = correlated(4000, 8, seed=3)
    one_shot = float(unbiased_hsic(x, y) / torch.sqrt(unbiased_hsic(x, x) * unbiased_hsic(y, y)))
    sums = torch.zeros(3, dtype=torch.float64)
    for start in range(0, 4000, 250):
        xb, yb = x[start : start + 250], y[start : start + 250]
        sums += torch.stack([unbiased_hsic(xb, yb), unbiased_hsic(xb, xb), unbiased_hsic(yb, yb)])
    streamed = float(sums[0] / torch.sqrt(sums[1] * sums[2]))
    assert streamed == pytest.approx(one_shot, abs=0.02)
    assert 0.1 < one_shot < 0.95


# ---- selection --------------------------------------------------------------------------------------------

# The paper's Llama-3.2-1B figures (docs/methods.md): lowest three are projection, value, mlp_proj.
KIND_NFN = {
    "query": 2.58,
    "key": 2.63,
    "value": 0.97,
    "projection": 0.90,
    "mlp_fc_1": 1.40,
    "mlp_fc_2": 1.11,
    "mlp_proj": 1.05,
}


def synthetic_plop(config: Config) -> PlopScores:
    per_site = {}
    for layer in range(config.n_layer):
        for kind, value in KIND_NFN.items():
            per_site[f"{layer}.{kind}"] = value + 0.04 * ((layer * 7 + len(kind)) % 5 - 2)
    per_kind = {k: sum(per_site[f"{l}.{k}"] for l in range(config.n_layer)) / config.n_layer for k in KIND_NFN}
    per_layer = {l: sum(per_site[f"{l}.{k}"] for k in KIND_NFN) / len(KIND_NFN) for l in range(config.n_layer)}
    return PlopScores(per_site=per_site, per_kind=per_kind, per_layer=per_layer)


def synthetic_cka(degenerate: list[int] | None = None) -> CkaScores:
    return CkaScores(per_layer={0: 0.95, 1: 0.80, 2: 0.90, 3: 0.70}, degenerate_layers=degenerate or [])


def test_plop_chooses_the_three_lowest_kinds_on_every_layer():
    config = tiny_config(n_layer=4, **SCORING_MODEL)
    placement = select_placement(config, "plop", plop_scores=synthetic_plop(config))
    assert set(placement.kinds) == {"projection", "value", "mlp_proj"}
    assert placement.layers == [0, 1, 2, 3]
    assert placement.method == "plop"
    assert placement.scores.nfn_per_kind["value"] == pytest.approx(synthetic_plop(config).per_kind["value"])
    assert len(placement.scores.nfn_per_site) == 4 * len(model_kinds(config)) and placement.scores.nfn_per_layer
    assert placement.scores.cka_per_layer == {} and placement.scores.cka is None  # the fixed schema: empty, not absent
    assert Placement.from_dict(placement.to_dict(config)).scores == placement.scores  # JSON-friendly keys


def test_plop_inverse_chooses_the_highest_kinds():
    config = tiny_config(n_layer=4, **SCORING_MODEL)
    placement = select_placement(config, "plop-inverse", plop_scores=synthetic_plop(config), plop=PlopArgs(num_kinds=2))
    assert set(placement.kinds) == {"query", "key"}


def kind_cost(config: Config, kind: str, rank: int = 8) -> int:
    return config.n_layer * site_params(config, kind, rank)


def test_plop_budget_as_a_fraction_and_as_a_count():
    config = tiny_config(n_layer=4, **SCORING_MODEL)
    scores = synthetic_plop(config)
    all_params = sum(kind_cost(config, k) for k in model_kinds(config))
    # projection (lowest) + value fit; mlp_proj (third) would not
    limit = kind_cost(config, "projection") + kind_cost(config, "value") + kind_cost(config, "mlp_proj") - 1
    by_count = select_placement(config, "plop", plop_scores=scores, plop=PlopArgs(budget=limit))
    assert set(by_count.kinds) == {"projection", "value"}
    assert by_count.trainable_params(config) <= limit
    by_fraction = select_placement(config, "plop", plop_scores=scores, plop=PlopArgs(budget=limit / all_params))
    assert by_fraction.kinds == by_count.kinds
    assert budget_params(config, 1.0, 8) == all_params
    everything = select_placement(config, "plop", plop_scores=scores, plop=PlopArgs(budget=1.0))
    assert set(everything.kinds) == set(model_kinds(config))


def test_plop_site_granularity_respects_the_budget_and_takes_the_lowest_sites():
    config = tiny_config(n_layer=4, **SCORING_MODEL)
    scores = synthetic_plop(config)
    limit = 10 * site_params(config, "mlp_proj", 8)
    placement = select_placement(config, "plop", plop_scores=scores, plop=PlopArgs(budget=limit, granularity="site"))
    assert 0 < placement.trainable_params(config) <= limit
    chosen = {(s.layer, s.kind) for s in placement.sites}
    chosen_scores = [scores.per_site[f"{l}.{k}"] for l, k in chosen]
    others = [v for key, v in scores.per_site.items() if tuple((int(key.split(".")[0]), key.split(".")[1])) not in chosen]
    assert max(chosen_scores) <= min(others)
    assert len({k for _, k in chosen}) >= 1 and len(placement.layers) > 1
    with pytest.raises(PlacementError, match="budget"):
        select_placement(config, "plop", plop_scores=scores, plop=PlopArgs(granularity="site"))


def test_cka_keeps_the_lowest_ratio_of_layers_with_every_kind():
    config = tiny_config(n_layer=4, **SCORING_MODEL)
    placement = select_placement(config, "cka", cka_scores=synthetic_cka())
    assert placement.layers == [1, 3]
    assert set(placement.kinds) == set(model_kinds(config))
    assert placement.scores.cka_per_layer == {"0": 0.95, "1": 0.80, "2": 0.90, "3": 0.70}
    assert placement.scores.nfn_per_layer == {} and placement.scores.nfn_per_kind == {}
    assert select_placement(config, "cka", cka_scores=synthetic_cka(), cka=CkaArgs(ratio=0.25)).layers == [3]


def test_cka_never_selects_degenerate_layers():
    config = tiny_config(n_layer=4, **SCORING_MODEL)
    with pytest.warns(UserWarning, match=r"layer\(s\) \[3\]"):
        placement = select_placement(config, "cka", cka_scores=synthetic_cka(degenerate=[3]))
    assert placement.layers == [1, 2]
    assert placement.scores.degenerate_layers == [3]
    with pytest.raises(PlacementError, match="degenerate"):
        select_placement(config, "cka", cka_scores=synthetic_cka(degenerate=[0, 1, 3]))


def test_plop_plus_cka_puts_plop_kinds_on_cka_layers():
    config = tiny_config(n_layer=4, **SCORING_MODEL)
    placement = select_placement(config, "plop+cka", plop_scores=synthetic_plop(config), cka_scores=synthetic_cka())
    assert set(placement.kinds) == {"projection", "value", "mlp_proj"}
    assert placement.layers == [1, 3]
    assert len(placement.sites) == 6
    assert placement.scores.cka_per_layer["3"] == 0.70
    assert placement.scores.nfn_per_kind and placement.scores.nfn_per_site and placement.scores.nfn_per_layer


def test_methods_respect_candidate_kinds_and_layers():
    config = tiny_config(n_layer=4, **SCORING_MODEL)
    plop, cka = synthetic_plop(config), synthetic_cka()
    placement = select_placement(
        config, "plop", plop_scores=plop, candidate_kinds=["query", "key", "mlp_fc_1", "mlp_fc_2"], candidate_layers=[0, 2]
    )
    assert set(placement.kinds) == {"mlp_fc_1", "mlp_fc_2", "query"}
    assert placement.layers == [0, 2]
    placement = select_placement(config, "cka", cka_scores=cka, candidate_kinds=["value"], candidate_layers=[0, 2])
    assert placement.kinds == ["value"] and placement.layers == [2]
    placement = select_placement(
        config, "plop+cka", plop_scores=plop, cka_scores=cka, candidate_kinds=["query", "key"], plop=PlopArgs(num_kinds=1)
    )
    assert placement.kinds == ["query"] and placement.layers == [1, 3]


def test_selection_errors_name_the_problem():
    config = tiny_config(n_layer=4, **SCORING_MODEL)
    plop = synthetic_plop(config)
    with pytest.raises(PlacementError, match=r"budget .* selects nothing.*'projection'"):
        select_placement(config, "plop", plop_scores=plop, plop=PlopArgs(budget=100))
    with pytest.raises(PlacementError, match=r"budget .* selects nothing"):
        select_placement(config, "plop", plop_scores=plop, plop=PlopArgs(budget=1e-6))
    with pytest.raises(PlacementError, match=r"Unknown placement method 'lora-everywhere'.*'plop', 'plop-inverse', 'cka', 'plop\+cka'"):
        select_placement(config, "lora-everywhere", plop_scores=plop)
    with pytest.raises(PlacementError, match="Unknown candidate kind"):
        select_placement(config, "plop", plop_scores=plop, candidate_kinds=["mlp_fc"])
    with pytest.raises(PlacementError, match="out of range"):
        select_placement(config, "plop", plop_scores=plop, candidate_layers=[7])
    with pytest.raises(PlacementError, match="needs CKA scores"):
        select_placement(config, "plop+cka", plop_scores=plop)
    with pytest.raises(ValueError, match="budget"):
        PlopArgs(budget=1.5)
    with pytest.raises(ValueError, match="ratio"):
        CkaArgs(ratio=0.0)
    assert method_names("calibrated") == ("plop", "plop-inverse", "cka", "plop+cka")


def test_plan_placement_rejects_an_unknown_method_before_calibrating():
    gpt = GPT(tiny_config(n_layer=1, **SCORING_MODEL))
    with pytest.raises(PlacementError, match="Unknown placement method 'nope'"):
        plan_placement(gpt, [torch.tensor([1, 2, 3])], method="nope")


# ---- report -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["plop", "cka", "plop+cka", "plop-site"])
def test_report_is_written(tmp_path, method):
    config = tiny_config(n_layer=4, **SCORING_MODEL)
    plop_args = PlopArgs(budget=0.3, granularity="site") if method == "plop-site" else PlopArgs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        placement = select_placement(
            config,
            method.replace("-site", ""),
            plop_scores=synthetic_plop(config),
            cka_scores=synthetic_cka(degenerate=[0]),
            plop=plop_args,
            calibration={"samples": 128, "tokens": 9000, "batches": 16, "seconds": 3.2, "world_size": 1},
        )
    report_path, png_path = write_report(placement, config, tmp_path / "out")
    png = png_path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert 5_000 < len(png) < 2_000_000
    report = report_path.read_text()
    for kind in placement.kinds:
        assert kind in report
    assert "Trainable parameters" in report and "128 prompts" in report
    if method != "plop" and method != "plop-site":
        assert "degenerate" in report
        assert "1, 3" in report or "layers (1, 2)" in report or "(1, 3)" in report
    assert sorted(os.listdir(tmp_path / "out")) == ["report.md", "scores.png"]  # no temporary files left
    table = summary_table(placement, config)
    for kind in placement.kinds:
        assert kind in table
    assert f"{placement.trainable_params(config):,}" in table


def test_report_of_a_fixed_preset_without_scores(tmp_path):
    from litgpt_plop.selection.placement import preset

    config = tiny_config(n_layer=4, **SCORING_MODEL)
    placement = preset("qv", config)
    report_path, png_path = write_report(placement, config, tmp_path)
    assert png_path.read_bytes().startswith(b"\x89PNG")
    report = report_path.read_text()
    assert "query" in report and "value" in report and "fixed placement" in report
    assert "query" in summary_table(placement, config)


def test_nfn_does_not_depend_on_how_prompts_are_batched():
    """The same prompts in batches of 1 and of 8 give the same NFN per kind and per site (fp32, 1e-5 relative)."""
    config = tiny_config(n_layer=2, **SCORING_MODEL)
    gpt = random_gpt(config)
    token_ids = [torch.randint(0, 100, (3 + 7 * (i % 5),), generator=torch.Generator().manual_seed(i)) for i in range(16)]
    results = []
    for batch_size in (1, 8):
        scorer = PlopScorer(gpt, model_kinds(config), [0, 1])
        batches, _ = make_batches(token_ids, batch_size=batch_size, max_seq_length=64)
        calibrate(gpt, batches, [scorer], progress=False)
        results.append(scorer.result())
    one, eight = results
    assert one.batches == 16 and eight.batches == 2 and one.tokens == eight.tokens
    for kind in model_kinds(config):
        assert eight.per_kind[kind] == pytest.approx(one.per_kind[kind], rel=1e-5), kind
    for site in one.per_site:
        assert eight.per_site[site] == pytest.approx(one.per_site[site], rel=1e-5), site

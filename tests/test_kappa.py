"""``kappa``: condition numbers against ``torch.linalg.svdvals``, the q/k/v slices, 4-bit weights, PLoP's selection
rules on them, the commands (``plan --method kappa``, ``finetune --plugin kappa``), and a calibrated report's
comparison with the data-free choice."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from helpers import random_gpt, tiny_config, tiny_run

from litgpt_plop.args import CalibrationArgs, PlopArgs
from litgpt_plop.errors import InputError
from litgpt_plop.args import KappaArgs
from litgpt_plop.scoring.kappa import condition_number, score_weights
from litgpt_plop.decide import kappa_placement
from litgpt_plop.selection.methods import get_method
from litgpt_plop.selection.placement import Placement, Scores, qkv_part_sizes
from litgpt_plop.reports.kappa import data_free_section
from litgpt_plop.decide import plan_placement

KINDS = ["query", "key", "value", "projection", "mlp_fc_1", "mlp_fc_2", "mlp_proj"]


def svdvals_kappa(weight: torch.Tensor) -> float:
    s = torch.linalg.svdvals(weight.detach().double())
    return float(s[0] / s[-1])


def with_singular_values(values: list[float], d_out: int, d_in: int, seed: int) -> torch.Tensor:
    """A ``(d_out, d_in)`` float64 matrix whose singular values are ``values`` (random orthonormal bases; float64,
    so that rounding does not change them)."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, len(values), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, len(values), generator=generator, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


# ---- the number ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (24, 24)])
def test_condition_number_matches_svdvals(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    assert condition_number(weight) == pytest.approx(svdvals_kappa(weight), rel=1e-9)


@pytest.mark.parametrize("kappa", [50.0, 3.0e4, 1.0e8])
def test_condition_number_of_known_singular_values(kappa):
    # 1e8 is past the Gram matrix's range (GRAM_KAPPA_LIMIT): svdvals takes over. Not sigma_max^2 / sigma_min^2
    # (the Gram's own ratio), not the Frobenius norm over sigma_min: those would miss these numbers.
    values = [kappa, kappa / 2, 7.0, 1.0]
    weight = with_singular_values(values, 4, 20, seed=3)  # 4 rows: these are all its singular values
    assert condition_number(weight) == pytest.approx(svdvals_kappa(weight), rel=1e-6)
    assert condition_number(weight) == pytest.approx(kappa, rel=1e-6)
    assert condition_number(weight.float()) == pytest.approx(svdvals_kappa(weight.float()), rel=1e-6)


@pytest.mark.parametrize("kappa", [1.0e2, 1.0e5])
def test_lanczos_finds_the_extreme_singular_values_of_a_known_spectrum(kappa, one_thread):
    """600 singular values spread log-uniformly between 1 and kappa, bf16-sized matrices in float32: the Lanczos
    runs on the Gram matrix (both extremes) and on its inverse must land on them, not stop at a Ritz value that a
    loose tolerance or too few steps would give (a few steps from a random start are off by far more than 1e-6)."""
    from litgpt_plop.scoring.kappa import extreme_eigenvalues, gram_matrix, largest_eigenvalue

    values = torch.logspace(0, math.log10(kappa), 600, dtype=torch.float64).flip(0).tolist()
    weight = with_singular_values(values, 600, 900, seed=5).float()
    exact = svdvals_kappa(weight)
    assert exact == pytest.approx(kappa, rel=1e-5)
    assert condition_number(weight) == pytest.approx(exact, rel=1e-6)
    assert condition_number(weight.T) == pytest.approx(exact, rel=1e-6)
    gram = gram_matrix(weight)
    smallest, largest = extreme_eigenvalues(gram)
    exact_values = torch.linalg.svdvals(weight.double())  # the float32 weight's own, a little off ``values``
    assert largest == pytest.approx(float(exact_values[0]) ** 2, rel=1e-9)
    assert smallest == pytest.approx(float(exact_values[-1]) ** 2, rel=2e-6)
    assert largest_eigenvalue(gram.mv, 600, gram.device) == pytest.approx(largest, rel=1e-12)  # seeded: reproducible
    torch.testing.assert_close(gram, gram.T, rtol=0, atol=0)  # the mirrored strips make it exactly symmetric


def test_singular_and_zero_weights():
    singular = torch.zeros(4, 6)
    singular[0, 0], singular[1, 1] = 2.0, 1.0  # rank 2 of 4: sigma_min = 0
    assert condition_number(singular) == math.inf
    with pytest.raises(ValueError, match="all zeros"):
        condition_number(torch.zeros(3, 5))


# ---- a model ---------------------------------------------------------------------------------------------


def test_every_site_is_scored_on_its_own_weight_rows():
    config = tiny_config(n_layer=2)  # 4 heads, 2 query groups: query 32 rows, key and value 16 rows each
    gpt = random_gpt(config)
    scores = score_weights(gpt, KINDS, [0, 1])
    assert len(scores.per_site) == 14
    sizes = qkv_part_sizes(config)
    for layer in (0, 1):
        block = gpt.transformer.h[layer]
        qkv = block.attn.qkv.weight
        rows = {"query": qkv[: sizes["query"]], "key": qkv[sizes["query"] : sizes["query"] + sizes["key"]]}
        rows["value"] = qkv[sizes["query"] + sizes["key"] :]
        rows.update(projection=block.attn.proj.weight, mlp_fc_1=block.mlp.fc_1.weight, mlp_fc_2=block.mlp.fc_2.weight)
        rows["mlp_proj"] = block.mlp.proj.weight
        for kind, weight in rows.items():
            assert scores.per_site[f"{layer}.{kind}"] == pytest.approx(svdvals_kappa(weight), rel=1e-7), (layer, kind)
    for kind in KINDS:  # the geometric mean over the layers, not the arithmetic one
        a, b = scores.per_site[f"0.{kind}"], scores.per_site[f"1.{kind}"]
        assert scores.per_kind[kind] == pytest.approx(math.sqrt(a * b), rel=1e-12)


def test_four_bit_weights_are_dequantized_first(one_thread):
    pytest.importorskip("bitsandbytes")
    from litgpt_plop.model.quantize import quantize_linears_4bit
    from litgpt_plop.scoring.plop import weight_matrix

    gpt = random_gpt(tiny_config(n_layer=1))
    dense = score_weights(gpt, ["value", "mlp_proj"], [0])
    quantize_linears_4bit(gpt)
    quantized = score_weights(gpt, ["value", "mlp_proj"], [0])
    value_rows = weight_matrix(gpt.transformer.h[0].attn.qkv)[-16:]
    assert quantized.per_site["0.value"] == pytest.approx(svdvals_kappa(value_rows), rel=1e-7)
    assert quantized.per_site["0.mlp_proj"] == pytest.approx(svdvals_kappa(weight_matrix(gpt.transformer.h[0].mlp.proj)), rel=1e-7)
    assert quantized.per_site["0.value"] != pytest.approx(dense.per_site["0.value"], rel=1e-4)  # really the 4-bit weight


# ---- choosing --------------------------------------------------------------------------------------------


def conditioned_gpt(n_layer: int = 3):
    """A tiny model whose value slice has orthonormal rows (condition number 1), whose mlp_proj has condition
    number 2 and whose query slice is nearly singular, in every layer: kappa ranks value, mlp_proj first (random
    Gaussian matrices of these shapes are at about 6 and more), query last."""
    config = tiny_config(n_layer=n_layer)
    gpt = random_gpt(config)
    sizes = qkv_part_sizes(config)
    with torch.no_grad():
        for block in gpt.transformer.h:
            torch.nn.init.orthogonal_(block.attn.qkv.weight[sizes["query"] + sizes["key"] :])
            torch.nn.init.orthogonal_(block.mlp.proj.weight)
            block.mlp.proj.weight[0] *= 2.0  # orthonormal rows, one of them doubled: singular values 2, 1, ..., 1
            block.attn.qkv.weight[0] *= 1e-3
    return config, gpt


def test_kappa_chooses_the_lowest_kinds_and_records_why():
    config, gpt = conditioned_gpt()
    placement = kappa_placement(gpt, KINDS, rank=4, kappa=KappaArgs(num_kinds=2))
    assert placement.method == "kappa" and placement.kinds == ["value", "mlp_proj"]
    assert placement.layers == [0, 1, 2]
    scores = placement.scores
    assert scores.kappa_per_kind["value"] == pytest.approx(1.0, abs=1e-5)
    assert scores.kappa_per_kind["mlp_proj"] == pytest.approx(2.0, abs=1e-5)
    assert max(scores.kappa_per_kind, key=scores.kappa_per_kind.get) == "query"
    assert scores.kappa["num_kinds"] == 2 and len(scores.kappa["choice"]) == 6 and not scores.nfn_per_kind


def test_kappa_budget_and_site_granularity_follow_plops_rules():
    config, gpt = conditioned_gpt()
    value_cost = 3 * 4 * (16 + 32)  # 3 layers, rank 4, d_out 16 + d_in 32
    by_budget = kappa_placement(gpt, KINDS, rank=4, kappa=KappaArgs(budget=value_cost))
    assert by_budget.kinds == ["value"] and by_budget.trainable_params(config) == value_cost
    # site by site: the 3 value sites (condition number 1) fit, the next one (an mlp_proj site, 384) does not
    sites = kappa_placement(gpt, KINDS, rank=4, kappa=KappaArgs(budget=value_cost + 383, granularity="site"))
    assert [(s.layer, s.kind) for s in sites.sites] == [(0, "value"), (1, "value"), (2, "value")]
    both = kappa_placement(gpt, KINDS, rank=4, kappa=KappaArgs(budget=value_cost + 384, granularity="site"))
    assert [s.kind for s in both.sites].count("mlp_proj") == 1 and both.trainable_params(config) == value_cost + 384
    with pytest.raises(InputError, match="needs a budget|set `--kappa.budget`"):
        KappaArgs(granularity="site")
    with pytest.raises(ValueError, match="--kappa.budget"):
        kappa_placement(gpt, KINDS, rank=4, kappa=KappaArgs(budget=10))


def test_registry_says_kappa_reads_no_data():
    spec = get_method("kappa")
    assert spec.kind == "weights" and not spec.calibrates and spec.option_groups == ("kappa",)


def test_a_version_2_file_without_kappa_scores_still_loads():
    data = Placement.from_kinds(tiny_config(), ["value"], rank=2, method="qv").to_dict()
    for key in ("kappa_per_site", "kappa_per_kind", "kappa"):
        del data["scores"][key]
    loaded = Placement.from_dict(data)
    assert loaded.scores.kappa_per_site == {} and loaded.scores.kappa is None


# ---- a calibrated method against the data-free choice ----------------------------------------------------


def test_a_calibrated_plan_records_the_data_free_choice_with_its_own_size(one_thread):
    config, gpt = conditioned_gpt()
    prompts = [torch.randint(0, config.vocab_size, (10,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    calibration = CalibrationArgs(batch_size=4, progress=False)
    placement = plan_placement(gpt, prompts, "plop", rank=4, plop=PlopArgs(num_kinds=2), calibration=calibration)
    again = plan_placement(gpt, prompts, "plop", rank=4, plop=PlopArgs(num_kinds=2), calibration=calibration)
    assert again.scores == placement.scores  # no timings among the scores: the same model and prompts, the same scores
    record = placement.scores.kappa
    assert record["num_kinds"] == 2 and placement.calibration["kappa_seconds"] >= 0 and "seconds" not in record
    assert sorted({key.split(".")[1] for key in record["choice"]}) == ["mlp_proj", "value"]
    assert len(placement.scores.kappa_per_site) == 21 and len(placement.scores.nfn_per_site) == 21
    section = "\n".join(data_free_section(placement))
    assert "## Calibrated vs data-free" in section
    calibration = placement.calibration  # kappa's time is its own, not inside the calibration pass's
    assert f"took {calibration['kappa_seconds']:.1f} s beside the calibration pass's {calibration['seconds']:.1f} s" in section


def test_the_data_free_comparison_is_left_out_where_it_would_cost_more_than_the_pass(one_thread):
    """Its cost is the Gram matrices' multiply-adds, d^2 D per candidate matrix: SmolLM2's 210 add up to exactly
    58,604,912,640, under the floor, so every plan of it keeps the comparison; an 8B model's are 4 times the pass
    over 1,000 prompt tokens, so ``auto`` leaves them out and says why; ``always`` and ``never`` decide alone."""
    from litgpt import Config

    from litgpt_plop.scoring.kappa import data_free_skipped, gram_macs
    from litgpt_plop.selection.placement import model_kinds

    smol = Config.from_name("SmolLM2-135M-Instruct")
    assert gram_macs(smol, model_kinds(smol), range(30)) == 30 * (2 * 576**3 + 2 * 192**2 * 576 + 3 * 576**2 * 1536)
    assert data_free_skipped("auto", smol, model_kinds(smol), range(30), tokens=1) is None
    big = Config.from_name("Llama-3.1-8B")
    reason = data_free_skipped("auto", big, model_kinds(big), range(32), tokens=1000)
    assert reason.startswith("its condition numbers would cost 4.0 times the calibration pass's arithmetic")
    assert data_free_skipped("auto", big, model_kinds(big), range(32), tokens=4000) is None  # a longer pass pays for it
    assert data_free_skipped("always", big, model_kinds(big), range(32), tokens=1) is None
    config, gpt = conditioned_gpt()
    prompts = [torch.randint(0, config.vocab_size, (10,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    never = CalibrationArgs(batch_size=4, progress=False, data_free="never")
    placement = plan_placement(gpt, prompts, "plop", rank=4, plop=PlopArgs(num_kinds=2), calibration=never)
    assert placement.scores.kappa == {"skipped": "not asked for (--calibration.data_free never)"}
    assert not placement.scores.kappa_per_site and "kappa_seconds" not in placement.calibration
    assert "Not computed: not asked for" in "\n".join(data_free_section(placement))
    with pytest.raises(InputError, match="data_free"):
        CalibrationArgs(data_free="sometimes")


def with_choice(own_kinds: list[str], kappa_kinds: list[str]) -> Placement:
    config = tiny_config(n_layer=2)
    scores = Scores(
        candidate_kinds=KINDS, candidate_layers=[0, 1], kappa_per_kind={k: float(i + 1) for i, k in enumerate(KINDS)},
        kappa={"num_kinds": 2, "granularity": "kind", "choice": [f"{l}.{k}" for k in kappa_kinds for l in (0, 1)]},
    )  # fmt: skip
    return Placement.from_kinds(config, own_kinds, rank=2, method="plop", scores=scores)


def test_the_report_says_whether_and_how_the_choice_differs():
    same = "\n".join(data_free_section(with_choice(["value", "mlp_proj"], ["value", "mlp_proj"])))
    assert "The same sites: the calibration prompts did not change the choice" in same
    differ = "\n".join(data_free_section(with_choice(["value", "mlp_fc_2"], ["value", "mlp_proj"])))
    assert "The choices differ" in differ
    assert "Kinds both choose: value." in differ and "Only plop: mlp_fc_2." in differ and "Only kappa: mlp_proj." in differ
    assert "2 in both, 2 only in this placement, 2 only in kappa's" in differ
    assert data_free_section(Placement.from_kinds(tiny_config(), ["value"], rank=2, method="qv")) == []
    # a choice that could not be made still says what the condition numbers cost, apart from the calibration
    failed = with_choice(["value"], [])
    failed = replace(failed, scores=replace(failed.scores, kappa={**failed.scores.kappa, "choice": None, "error": "too small"}),
                     calibration={"seconds": 2.0, "kappa_seconds": 0.5})  # fmt: skip
    text = "\n".join(data_free_section(failed))
    assert "could not choose with the same options: too small" in text and "took 0.5 s beside the calibration pass's 2.0 s" in text


# ---- the commands on a tiny checkpoint -------------------------------------------------------------------


def test_plan_method_kappa(tiny_checkpoint, tmp_path, capsys):
    from litgpt_plop.commands.plan import plan

    out_dir = tmp_path / "plan"
    placement = plan(tiny_checkpoint, method="kappa", out_dir=out_dir, kappa=KappaArgs(num_kinds=2))
    saved = json.loads((out_dir / "placement.json").read_text())
    assert saved["method"] == "kappa" and len(saved["scores"]["kappa_per_site"]) == 14 and "calibration" not in saved
    assert sorted({s["kind"] for s in saved["sites"]}) == sorted(placement.kinds) and len(placement.kinds) == 2
    report = (out_dir / "report.md").read_text()
    assert "condition number" in report and "## Scores per kind" in report and (out_dir / "scores.png").is_file()
    assert "kappa" in capsys.readouterr().out
    with pytest.raises(InputError, match=r"--calibration\.\* does not apply to --method 'kappa'"):
        plan(tiny_checkpoint, method="kappa", out_dir=tmp_path / "x", calibration=CalibrationArgs(num_samples=3))


def test_finetune_plugin_kappa(tiny_checkpoint, tmp_path):
    out_dir = tmp_path / "kappa"
    tiny_run(tiny_checkpoint, out_dir, plugin="kappa", kappa=KappaArgs(num_kinds=1))
    saved = json.loads((out_dir / "final" / "placement.json").read_text())
    assert saved["method"] == "kappa" and len({s["kind"] for s in saved["sites"]}) == 1
    best = min(saved["scores"]["kappa_per_kind"], key=saved["scores"]["kappa_per_kind"].get)
    assert {s["kind"] for s in saved["sites"]} == {best}
    assert (out_dir / "final" / "lit_model.pth.lora").is_file()


# ---- the real model --------------------------------------------------------------------------------------


def test_smollm2_condition_numbers(smollm2_checkpoint, one_thread):
    """SmolLM2-135M-Instruct, three layers: the numbers are svdvals', value is the best conditioned kind there and
    query the worst (its geometric mean over all 30 layers is 6.0 against 1.5e4)."""
    from litgpt_plop.model.checkpoint import load_checkpoint_model
    from litgpt_plop.scoring.plop import weight_matrix

    model = load_checkpoint_model(smollm2_checkpoint)
    scores = score_weights(model, KINDS, [0, 15, 29])
    qkv = weight_matrix(model.transformer.h[15].attn.qkv)
    sizes = qkv_part_sizes(model.config)
    value = qkv[sizes["query"] + sizes["key"] :]
    assert scores.per_site["15.value"] == pytest.approx(svdvals_kappa(value), rel=1e-6)
    assert scores.per_site["29.mlp_fc_2"] == pytest.approx(svdvals_kappa(model.transformer.h[29].mlp.fc_2.weight), rel=1e-6)
    ranked = sorted(scores.per_kind, key=scores.per_kind.get)
    assert ranked[0] == "value" and ranked[-1] == "query"
    assert scores.per_kind["value"] < 12 and scores.per_kind["query"] > 1000


def test_smollm2_every_site_matches_svdvals(smollm2_checkpoint, one_thread):
    """All 210 candidate matrices of SmolLM2-135M-Instruct (condition numbers 3.9 to 7.7e5): the iterative extreme
    eigenvalues give each within 1e-3 of float64 svdvals' ratio (measured: within 5e-8)."""
    from litgpt_plop.model.checkpoint import load_checkpoint_model
    from litgpt_plop.scoring.kappa import site_weights

    model = load_checkpoint_model(smollm2_checkpoint)
    worst, largest = 0.0, 0.0
    with torch.no_grad():
        for layer, kind, _, weight in site_weights(model, KINDS, range(model.config.n_layer)):
            value, exact = condition_number(weight), svdvals_kappa(weight)
            assert value == pytest.approx(exact, rel=1e-3), (layer, kind)
            worst, largest = max(worst, abs(value / exact - 1)), max(largest, exact)
    assert largest > 5e5  # the worst query slice, where the Gram matrix's rounding matters most, was among them
    assert worst < 1e-6


def test_callback_method_kappa_reads_no_calibration_data(tmp_path):
    from helpers import LitLLM, trainer
    from torch.utils.data import DataLoader

    from litgpt_plop.callbacks import PLoPCallback

    class Untouchable(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int):
            raise AssertionError("kappa read the calibration data")

    config = tiny_config(n_layer=2, vocab_size=64, block_size=32)
    train = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    callback = PLoPCallback(method="kappa", calibration_data=DataLoader(Untouchable()), lora_r=4, kappa=KappaArgs(num_kinds=1))
    module = LitLLM(config, lr=1e-3)
    trainer(tmp_path, [callback], max_steps=2).fit(module, train_dataloaders=DataLoader(train, batch_size=4))
    placement = callback.placement
    assert placement.method == "kappa" and len(placement.kinds) == 1 and not callback.calibrated
    assert placement.kinds == [min(placement.scores.kappa_per_kind, key=placement.scores.kappa_per_kind.get)]
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert trainable == placement.trainable_params(config)

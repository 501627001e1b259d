"""How sure a calibrated choice is: bootstrap resamples of the calibration prompts, without a second pass."""

from __future__ import annotations

import torch
from helpers import tiny_config
from litgpt import GPT

from litgpt_plop.args import CalibrationArgs
from litgpt_plop.scoring.calibration import calibrate, make_batches
from litgpt_plop.selection.placement import Placement, Scores, model_kinds
from litgpt_plop.reports.placement import summary_table, write_report
from litgpt_plop.scoring.cka import CkaScorer
from litgpt_plop.scoring.plop import PlopScorer
from litgpt_plop.decide import plan_placement
from litgpt_plop.selection.stability import choice_stability


def prompts(n: int) -> list[torch.Tensor]:
    return [torch.randint(0, 64, (3 + 5 * (i % 4),), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def calibrated(gpt: GPT, token_ids: list[torch.Tensor]) -> tuple[PlopScorer, CkaScorer]:
    plop, cka = PlopScorer(gpt, model_kinds(gpt.config), [0, 1]), CkaScorer(gpt, [0, 1], pooling="last")
    batches, _ = make_batches(token_ids, batch_size=4, max_seq_length=64)
    calibrate(gpt, batches, [plop, cka], progress=False)
    return plop, cka


def test_resampled_scores_are_the_scores_of_the_resampled_prompts():
    torch.manual_seed(0)
    gpt = GPT(tiny_config(n_layer=2))
    token_ids = prompts(10)
    plop, cka = calibrated(gpt, token_ids)
    sample = [3, 3, 0, 7, 9, 9, 9, 1, 2, 5]
    # the same prompts calibrated for real, duplicates included
    plop_again, cka_again = calibrated(gpt, [token_ids[i] for i in sample])
    resampled, direct = plop.scores_of(sample), plop_again.result()
    for site, value in direct.per_site.items():
        assert abs(resampled.per_site[site] - value) <= 1e-6 * value, site  # float32 forwards in other batches
    cka_resampled, cka_direct = cka.scores_of(sample), cka_again.result()
    for layer in (0, 1):
        assert abs(cka_resampled.per_layer[layer] - cka_direct.per_layer[layer]) < 1e-6
    assert plop.scores_of(None).per_site == plop.result().per_site


def test_bootstrap_draws_as_many_prompts_as_there_are_with_replacement():
    """A choice that changes whenever prompt 0 is left out is kept with probability 1 - (1 - 1/n)^n ~ 0.65 (n = 10)."""
    config = tiny_config(n_layer=2)

    def choose(sample):
        kinds = ["value"] if sample is None or 0 in sample else ["query"]
        return Placement.from_kinds(config, kinds, scores=Scores(candidate_kinds=["query", "value"], candidate_layers=[0, 1]))

    stability = choice_stability(choose, num_prompts=10, resamples=400, seed=0)
    assert 0.55 < stability["same_choice"] < 0.75
    assert stability["kind_frequency"]["value"] == stability["same_choice"]
    assert abs(stability["kind_frequency"]["query"] - (1 - stability["same_choice"])) < 1e-12
    assert stability["layer_frequency"] == {"0": 1.0, "1": 1.0}


def test_plan_reports_how_sure_it_is(tmp_path):
    torch.manual_seed(0)
    gpt = GPT(tiny_config(n_layer=2))
    placement = plan_placement(gpt, prompts(12), method="plop+cka", calibration=CalibrationArgs(batch_size=4, resamples=50, progress=False))
    stability = placement.scores.stability
    assert stability["resamples"] == 50 and stability["prompts"] == 12
    assert set(stability["kind_frequency"]) == set(model_kinds(gpt.config))
    assert "How sure: resampling the 12 calibration prompts 50 times" in summary_table(placement, gpt.config)
    write_report(placement, gpt.config, tmp_path)
    assert "## How sure is this choice" in (tmp_path / "report.md").read_text()
    assert Placement.from_dict(placement.to_dict()).scores.stability == stability
    without = plan_placement(gpt, prompts(12), method="plop", calibration=CalibrationArgs(batch_size=4, resamples=0, progress=False))
    assert without.scores.stability is None

"""The placement-quality harness predicts what the finetune will train, and the summary's statistics are right."""

import sys
from pathlib import Path

import litgpt
import pytest
from litgpt.utils import save_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import placement_quality  # noqa: E402
import summarize  # noqa: E402

from litgpt_plop.args import CalibrationArgs, CkaArgs, PlopArgs  # noqa: E402
from litgpt_plop.placement import model_kinds  # noqa: E402
from litgpt_plop.plan import decide_placement  # noqa: E402


def tiny_config() -> litgpt.Config:
    return litgpt.Config(
        name="tiny-llama", n_layer=4, n_embd=64, n_head=4, n_query_groups=2, head_size=16, intermediate_size=128,
        mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm", bias=False, parallel_residual=False,
        rotary_percentage=1.0, vocab_size=64, padded_vocab_size=64, block_size=32,
    )  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2, 1337])
def test_harness_predicts_the_random_kinds_finetune_draws(seed):
    config = tiny_config()
    model = litgpt.model.GPT(config)
    candidates = list(model_kinds(config))
    # what litgpt_plop.finetune does for --plugin random --seed SEED
    placement = decide_placement(model, "random", None, candidates, 8, 16, CalibrationArgs(), PlopArgs(), CkaArgs(), seed)
    assert placement_quality.fixed_kinds("random", config, seed) == placement.kinds


def test_random_is_matched_per_seed(tmp_path):
    config = tiny_config()
    save_config(config, tmp_path)
    plans = {m: {"kinds": ["value", "mlp_fc_2", "mlp_proj"], "layers": list(range(config.n_layer))} for m in placement_quality.PLANNED}
    match = placement_quality.matching("t", placement_quality.Settings(), plans, tmp_path, seeds=[0, 1, 2])
    budget = match["budget"]
    for seed in (0, 1, 2):
        entry = placement_quality.entry_for(match, "random", seed)
        assert entry["kinds"] == placement_quality.fixed_kinds("random", config, seed)
        p1 = placement_quality.params_at_rank_one(config, entry["kinds"], list(range(config.n_layer)))
        # the closest rank: neither neighbour is nearer the budget
        assert entry["expected_params"] == entry["rank"] * p1
        for other in (entry["rank"] - 1, entry["rank"] + 1):
            if other >= 1:
                assert abs(other * p1 - budget) >= abs(entry["expected_params"] - budget)
    # a row recorded with another rank is not done; the same rank and kinds is
    entry = placement_quality.entry_for(match, "random", 0)
    assert placement_quality.is_done({"rank": entry["rank"], "kinds": entry["kinds"]}, "random", entry)
    assert not placement_quality.is_done({"rank": entry["rank"] + 1, "kinds": entry["kinds"]}, "random", entry)
    assert not placement_quality.is_done({"rank": entry["rank"], "kinds": ["query"]}, "random", entry)


def test_sign_test_exact_values():
    assert summarize.sign_test(0, 5) == pytest.approx(2 / 32)
    assert summarize.sign_test(1, 9) == pytest.approx(2 * 11 / 1024)
    assert summarize.sign_test(9, 1) == summarize.sign_test(1, 9)
    assert summarize.sign_test(3, 3) == 1.0
    assert summarize.sign_test(0, 0) == 1.0


def test_paired_table_counts_items_only_one_method_got_right():
    def row(seed, scores):
        return {"seed": seed, "item_scores": scores}

    methods = {
        "plop": [row(0, [1.0, 1.0, 0.0, 0.5]), row(1, [1.0, 0.0, 0.0, 1.0])],
        "qv": [row(0, [1.0, 0.0, 1.0, 1.0]), row(1, [0.0, 0.0, 0.0, 1.0]), row(2, [1.0, 1.0, 1.0, 1.0])],
    }
    table = summarize.paired_table(methods)
    line = next(line for line in table if line.startswith("| plop |"))
    # seed 0: item 1 plop only, items 2 and 3 qv only (0.5 is not exactly right); seed 1: item 0 plop only
    assert "+2 / -2 (1.00), 2 seeds" in line

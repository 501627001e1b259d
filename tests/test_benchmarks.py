"""The placement-quality harness predicts what the finetune will train, and the summary's statistics are right."""

import sys
from pathlib import Path

import litgpt
import pytest
from litgpt.utils import save_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import placement_quality  # noqa: E402
import rescore  # noqa: E402
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


RUN_ROW = {
    "config_id": "abc", "task": "basic_arithmetic", "method": "plop", "seed": 0, "started": "2026-11-23T01:00:00",
    "task_config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
    "settings": {"data_seed": 42, "train_size": 400, "eval_items": 40},
}  # fmt: skip


def test_rescore_items_start_with_the_runs_own_and_never_repeat_training_items():
    from litgpt_plop.data import ReasoningGym

    items = rescore.held_out_items(RUN_ROW, 120)
    run_data = ReasoningGym(task="basic_arithmetic", task_config=RUN_ROW["task_config"], train_size=400, val_size=40, seed=42)
    assert [i["question"] for i in items[:40]] == [i["question"] for i in run_data.items("val")]
    extra = [i["question"] for i in items[40:]]
    assert len(extra) == 80 and len(set(extra)) == 80
    # some of the further items of this configuration are training items (3 in the first 120): skipping is exercised
    assert not set(extra) & {i["question"] for i in run_data.items("train")}
    assert not set(extra) & {i["question"] for i in items[:40]}
    assert rescore.held_out_items(RUN_ROW, 10) == run_data.items("val")[:10]


def test_rescore_refuses_a_task_without_enough_distinct_questions():
    # chain_sum with two one-digit terms has a few hundred distinct questions
    row = {**RUN_ROW, "task": "chain_sum", "task_config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}
    with pytest.raises(RuntimeError, match="chain_sum: fewer than 1000 distinct held-out questions"):
        rescore.held_out_items(row, 1000)


def test_summary_uses_only_rescoring_of_the_run_it_shows(tmp_path):
    latest = {("basic_arithmetic", "plop", 0): {**RUN_ROW, "accuracy": 0.25}}
    lines = [
        {"config_id": "abc", "task": "basic_arithmetic", "method": "plop", "seed": 0, "run_started": "2026-11-22T00:00:00", "items": 400,
         "accuracy": 0.9, "agree_first": 40, "compared_first": 40},  # an earlier training of the same method and seed
        {"config_id": "abc", "task": "basic_arithmetic", "method": "plop", "seed": 0, "run_started": RUN_ROW["started"], "items": 100,
         "accuracy": 0.3, "mean_score": 0.4, "agree_first": 39, "compared_first": 40, "run_accuracy": 0.25},
    ]  # fmt: skip
    path = tmp_path / "rescore.jsonl"
    path.write_text("".join(summarize.json.dumps(line) + "\n" for line in lines))
    rescored = summarize.rescored_rows(path, "abc", latest)
    assert rescored[("basic_arithmetic", "plop", 0)]["accuracy"] == 0.3
    methods = {"plop": [latest[("basic_arithmetic", "plop", 0)]], "qv": [{**RUN_ROW, "method": "qv"}]}
    text = "\n".join(summarize.rescored_section("basic_arithmetic", methods, rescored, 40))
    assert "#### basic_arithmetic on 100 held-out items" in text
    assert "39 of 40 answers are right or wrong exactly as" in text and "1 run(s) are not rescored yet" in text
    assert "| plop | 1 | 30.0 | 0.400 | 25.0 |" in text

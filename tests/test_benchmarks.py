"""The placement-quality harness predicts what the finetune will train, and the benchmarks' statistics are right."""

import json
import math

import litgpt
import pytest
from litgpt.utils import save_config

from benchmarks.quality_grid import (
    CALIBRATED,
    FIXED,
    PLANNED,
    WEIGHTLORA,
    Settings,
    entry_for,
    fixed_kinds,
    is_done,
    matching,
    params_at_rank_one,
)
from benchmarks.rescore import held_out_items
from benchmarks.stats import kendall_tau, median_ratio, paired_counts, placement_permutation_p, placement_share, sign_test
from benchmarks.summarize import module_command, rescored_rows
from benchmarks.summary_tables import AUTOMATIC, PAIRED_BASELINES, paired_table, rescored_section
from litgpt_plop.args import CalibrationArgs, CkaArgs, PlopArgs
from litgpt_plop.selection.placement import model_kinds
from litgpt_plop.decide import decide_placement


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
    # what litgpt_plop.commands.finetune does for --plugin random --seed SEED
    placement = decide_placement(
        model, "random", None, candidates, 8, 16, calibration=CalibrationArgs(), plop=PlopArgs(), cka=CkaArgs(), seed=seed
    )
    assert fixed_kinds("random", config, seed) == placement.kinds


def test_random_is_matched_per_seed(tmp_path):
    config = tiny_config()
    save_config(config, tmp_path)
    plans = {m: {"kinds": ["value", "mlp_fc_2", "mlp_proj"], "layers": list(range(config.n_layer))} for m in PLANNED}
    match = matching("t", Settings(), plans, tmp_path, seeds=[0, 1, 2])
    budget = match["budget"]
    for seed in (0, 1, 2):
        entry = entry_for(match, "random", seed)
        assert entry["kinds"] == fixed_kinds("random", config, seed)
        p1 = params_at_rank_one(config, entry["kinds"], list(range(config.n_layer)))
        # the closest rank: neither neighbour is nearer the budget
        assert entry["expected_params"] == entry["rank"] * p1
        for other in (entry["rank"] - 1, entry["rank"] + 1):
            if other >= 1:
                assert abs(other * p1 - budget) >= abs(entry["expected_params"] - budget)
    # a row recorded with another rank is not done; the same rank and kinds is
    entry = entry_for(match, "random", 0)
    assert is_done({"rank": entry["rank"], "kinds": entry["kinds"]}, "random", entry)
    assert not is_done({"rank": entry["rank"] + 1, "kinds": entry["kinds"]}, "random", entry)
    assert not is_done({"rank": entry["rank"], "kinds": ["query"]}, "random", entry)


def test_sign_test_exact_values():
    assert sign_test(0, 5) == pytest.approx(2 / 32)
    assert sign_test(1, 9) == pytest.approx(2 * 11 / 1024)
    assert sign_test(9, 1) == sign_test(1, 9)
    assert sign_test(3, 3) == 1.0
    assert sign_test(0, 0) == 1.0


def test_sign_test_58_wins_29_losses():
    # two-sided exact binomial test, n = 87, p = 1/2: 2 * P(X <= 29), P(X <= 29) = sum_{i<=29} C(87, i) / 2^87
    assert sign_test(58, 29) == 2 * sum(math.comb(87, i) for i in range(30)) / 2**87
    assert sign_test(58, 29) == pytest.approx(0.0024794, abs=1e-7)
    assert sign_test(29, 58) == sign_test(58, 29)


def test_paired_counts_only_exactly_right_items_count():
    # items: both right, a only, b only, both wrong, a partial (not right) vs b right, a right vs b partial
    assert paired_counts([1.0, 1.0, 0.0, 0.0, 0.5, 1.0], [1.0, 0.0, 1.0, 0.0, 1.0, 0.5]) == (2, 2)
    assert paired_counts([1.0, 1.0, 1.0], [0.0]) == (1, 0)  # items past the shorter list are not compared


def test_kendall_tau_hand_computed():
    assert kendall_tau({"a": 1, "b": 2, "c": 3}, {"a": 10, "b": 20, "c": 30}) == 1.0
    assert kendall_tau({"a": 1, "b": 2, "c": 3}, {"a": 3, "b": 2, "c": 1}) == -1.0
    # one swapped pair (b, c) of 6: (5 - 1) / 6
    assert kendall_tau({"a": 1, "b": 2, "c": 3, "d": 4}, {"a": 1, "b": 3, "c": 2, "d": 4}) == pytest.approx(4 / 6)
    # tau-b with a tie in one scoring: pairs ab, ac concordant, bc tied in the second only -> 2 / sqrt(3 * 2)
    assert kendall_tau({"a": 1, "b": 2, "c": 3}, {"a": 0, "b": 5, "c": 5}) == pytest.approx(2 / math.sqrt(6))
    with pytest.raises(ValueError, match="same keys"):
        kendall_tau({"a": 1}, {"b": 1})


def test_placement_share_hand_computed():
    # placements a, b, c over two seeds; grand mean 4, placement means 2, 3, 7, seed means 3, 5
    table = {"a": [1, 3], "b": [3, 3], "c": [5, 9]}
    share = placement_share(table)
    assert (share["ss_placement"], share["ss_seed"], share["ss_residual"]) == pytest.approx((28, 6, 4))
    assert share["f"] == pytest.approx((28 / 2) / (4 / 2))
    # partial omega squared: 2 * (14 - 2) / (2 * 14 + (6 - 2) * 2)
    assert share["omega2"] == pytest.approx(2 / 3)
    # with seed 0's labels fixed, 2 of seed 1's 6 orders pair 5 with 9 (the two 3s swap): only those reach 28;
    # shuffling across seeds as well, or leaving the seed shift in, would give another count
    assert placement_permutation_p(table) == pytest.approx(1 / 3)
    # each seed ranks the two the other way round: no placement effect, the estimate falls below 0
    none = {"a": [1, 2], "b": [2, 1]}
    assert placement_share(none)["omega2"] == pytest.approx(-1 / 3)
    assert placement_permutation_p(none) == 1.0
    with pytest.raises(ValueError, match="same number"):
        placement_share({"a": [1, 2], "b": [1]})


def test_placement_permutation_p_draws_at_random_past_the_limit_and_repeats():
    table = {"a": [1.0, 1.1, 0.9], "b": [2.0, 2.2, 1.8], "c": [1.5, 1.4, 1.6], "d": [0.5, 0.7, 0.6]}
    exact = placement_permutation_p(table)  # 24 ** 2 = 576 relabellings: every one
    assert exact == pytest.approx(1 / 576)  # the observed order is the only one this extreme
    drawn = placement_permutation_p(table, permutations=200)
    # 200 draws plus the observed labelling, which always counts: never 0, and (1 + hits) / 201
    assert drawn == placement_permutation_p(table, permutations=200) and 1 / 201 <= drawn <= 0.02
    assert (drawn * 201) == pytest.approx(round(drawn * 201))


def test_median_ratio_pairs_side_by_side():
    assert median_ratio([2.0, 3.0, 10.0], [1.0, 3.0, 4.0]) == 2.0
    assert math.isnan(median_ratio([1.0], [0.0]))


def test_method_groups_come_from_the_registry():
    assert FIXED == ("qv", "attention", "mlp", "all", "random")
    assert CALIBRATED == ("plop", "plop-inverse", "cka", "plop+cka")
    assert PLANNED == ("plop", "plop-inverse", "plop+cka", "kappa")
    assert WEIGHTLORA == ("weightlora", "weightlora+")
    assert AUTOMATIC == ("plop", "cka", "plop+cka", "weightlora", "weightlora+")
    assert PAIRED_BASELINES == ("qv", "attention", "mlp", "all", "random", "plop-inverse", "kappa")


def test_recorded_commands_are_shown_as_module_runs():
    old = "python benchmarks/placement_quality.py --tasks chain_sum --steps 50 --methods plop+cka"
    assert module_command(old) == "python -m benchmarks.placement_quality --tasks chain_sum --steps 50 --methods plop+cka"
    assert module_command("python benchmarks/summarize.py") == "python -m benchmarks.summarize"
    assert module_command("python -m benchmarks.rescore --items 200") == "python -m benchmarks.rescore --items 200"


def test_paired_table_counts_items_only_one_method_got_right():
    def row(seed, scores):
        return {"seed": seed, "item_scores": scores}

    methods = {
        "plop": [row(0, [1.0, 1.0, 0.0, 0.5]), row(1, [1.0, 0.0, 0.0, 1.0])],
        "qv": [row(0, [1.0, 0.0, 1.0, 1.0]), row(1, [0.0, 0.0, 0.0, 1.0]), row(2, [1.0, 1.0, 1.0, 1.0])],
    }
    table = paired_table(methods)
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

    items = held_out_items(RUN_ROW, 120)
    run_data = ReasoningGym(task="basic_arithmetic", task_config=RUN_ROW["task_config"], train_size=400, val_size=40, seed=42)
    assert [i["question"] for i in items[:40]] == [i["question"] for i in run_data.items("val")]
    extra = [i["question"] for i in items[40:]]
    assert len(extra) == 80 and len(set(extra)) == 80
    # some of the further items of this configuration are training items (3 in the first 120): skipping is exercised
    assert not set(extra) & {i["question"] for i in run_data.items("train")}
    assert not set(extra) & {i["question"] for i in items[:40]}
    assert held_out_items(RUN_ROW, 10) == run_data.items("val")[:10]


def test_rescore_refuses_a_task_without_enough_distinct_questions():
    # chain_sum with two one-digit terms has a few hundred distinct questions
    row = {**RUN_ROW, "task": "chain_sum", "task_config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}
    with pytest.raises(RuntimeError, match="chain_sum: fewer than 1000 distinct held-out questions"):
        held_out_items(row, 1000)


def test_summary_uses_only_rescoring_of_the_run_it_shows(tmp_path):
    latest = {("basic_arithmetic", "plop", 0): {**RUN_ROW, "accuracy": 0.25}}
    lines = [
        {"config_id": "abc", "task": "basic_arithmetic", "method": "plop", "seed": 0, "run_started": "2026-11-22T00:00:00", "items": 400,
         "accuracy": 0.9, "agree_first": 40, "compared_first": 40},  # an earlier training of the same method and seed
        {"config_id": "abc", "task": "basic_arithmetic", "method": "plop", "seed": 0, "run_started": RUN_ROW["started"], "items": 100,
         "accuracy": 0.3, "mean_score": 0.4, "agree_first": 39, "compared_first": 40, "run_accuracy": 0.25},
    ]  # fmt: skip
    path = tmp_path / "rescore.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rescored = rescored_rows(path, "abc", latest)
    assert rescored[("basic_arithmetic", "plop", 0)]["accuracy"] == 0.3
    methods = {"plop": [latest[("basic_arithmetic", "plop", 0)]], "qv": [{**RUN_ROW, "method": "qv"}]}
    text = "\n".join(rescored_section("basic_arithmetic", methods, rescored, 40))
    assert "#### basic_arithmetic on 100 held-out items" in text
    assert "39 of 40 answers are right or wrong exactly as" in text and "1 run(s) are not rescored yet" in text
    assert "| plop | 1 | 30.0 | 0.400 | 25.0 |" in text


def test_merge_memory_adapter_is_one_stock_merge_lora_takes_and_counts_the_weights_it_rewrites(tmp_path):
    """The merge benchmark's adapter: stock ``merge_lora`` merges it, and its "rewritten" figure is the bf16 bytes of
    exactly the adapted weights (the fused qkv for q and v; qkv, proj and the three MLP matrices for ``all``)."""
    import torch
    from litgpt.scripts.merge_lora import merge_lora

    from benchmarks.merge_memory import PLACEMENTS, write_adapter
    from helpers import tiny_config, write_checkpoint

    config = tiny_config(n_layer=2)
    checkpoint = write_checkpoint(tmp_path / "ck", config, tokenizer_from=None)
    (checkpoint / "tokenizer.json").write_text("{}")
    (checkpoint / "tokenizer_config.json").write_text("{}")
    qkv_rows = (config.n_head + 2 * config.n_query_groups) * config.head_size
    qkv = 2 * config.n_layer * qkv_rows * config.n_embd
    assert write_adapter(checkpoint, PLACEMENTS["qv"], tmp_path / "qv") == qkv
    mlp = 2 * config.n_layer * 3 * config.n_embd * config.intermediate_size
    proj = 2 * config.n_layer * config.n_embd * config.n_head * config.head_size
    assert write_adapter(checkpoint, PLACEMENTS["all"], tmp_path / "all") == qkv + proj + mlp

    merge_lora(tmp_path / "qv")
    merged = torch.load(tmp_path / "qv" / "lit_model.pth", weights_only=True)
    base = torch.load(checkpoint / "lit_model.pth", weights_only=True)
    # the merge runs in bf16 (the adapter's dtype): compare with the base weights in bf16
    changed = sorted(name for name in base if not torch.equal(merged[name], base[name].to(merged[name].dtype)))
    assert changed == [f"transformer.h.{i}.attn.qkv.weight" for i in range(config.n_layer)]


def test_race_results_compare_a_race_with_its_candidates_own_runs(tmp_path):
    from benchmarks.common import append_jsonl
    from benchmarks.race_results import latest_rows, race_facts, rescored, section

    def row(method, val_loss, accuracy, finetune_s, race=None):
        return {"config_id": "c", "task": "t", "method": method, "seed": 0, "status": "ok", "val_loss": val_loss,
                "accuracy": accuracy, "eval_items": 4, "item_scores": [1.0, 0.0, float(accuracy > 0.4), 0.0],
                "finetune_s": finetune_s, "started": method, "settings": {"steps": 50, "lr_warmup_steps": 10}, "race": race}  # fmt: skip

    rounds = [{"step": 2, "val_loss": {"qv": 2.0, "all": 1.5, "mlp": 1.0}, "kept": ["mlp", "all"]},
              {"step": 4, "val_loss": {"all": 1.2, "mlp": 0.9}, "kept": ["mlp"]}]  # fmt: skip
    record = {"candidates": [{"name": n} for n in ("qv", "all", "mlp")], "rounds": rounds, "winner": "mlp", "overhead_steps": 6}
    results = tmp_path / "results.jsonl"
    for r in (row("qv", 1.1, 0.5, 100.0), row("all", 0.8, 0.25, 100.0), row("mlp", 0.9, 0.5, 100.0),
              row("race", 0.9, 0.5, 130.0, record)):  # fmt: skip
        append_jsonl(results, r)
    rows = latest_rows(results)
    facts = race_facts(rows[("c", "t", "race", 0)], rows, rescored(tmp_path / "none.jsonl"))
    assert facts["best_final_loss"] == "all" and facts["winner"] == "mlp"
    # round 1 ranks mlp < all < qv, the own runs end all < mlp < qv: one pair of three swapped
    assert facts["tau_first_round"] == pytest.approx(1 / 3)
    assert facts["wall_ratio"] == pytest.approx(1.3) and facts["same_answers"] is True
    text = section(rows, rescored(tmp_path / "none.jsonl"), "cmd")
    assert "| 0 | 2: mlp, all; 4: mlp | mlp | all | qv | +0.33 | 6 (12%) | 1.30x | yes |" in text


def test_settings_added_later_keep_the_hash_of_the_rows_recorded_before_them():
    # the 50-step grid's rows in benchmarks/results/placement_quality/results.jsonl carry this hash
    assert Settings(steps=50, train_size=400).config_id() == "ffa37bac30"
    assert Settings(steps=50, train_size=400, val_interval=5).config_id() != "ffa37bac30"


def test_the_grids_extra_validations_leave_the_random_stream_alone():
    """With --val_interval, LitGPT's loop validates every few steps; iterating the validation loader draws from
    torch's global generator, which dropout and the batch order also draw from. After the loop's first check (which
    every run makes), the grid's validations must not draw, or the run would train differently."""
    import lightning as L
    import litgpt.finetune.lora as litgpt_lora
    import torch
    from litgpt.args import EvalArgs
    from torch.utils.data import DataLoader

    from benchmarks.quality_worker import observing_validations

    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = litgpt.GPT(tiny_config())
    items = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))} for _ in range(4)]
    loader = DataLoader(items, batch_size=2)

    def draws() -> bool:
        before = torch.get_rng_state()
        loss = litgpt_lora.validate(fabric, model, loader, EvalArgs(max_iters=2), verbose=False)
        assert torch.isfinite(loss)
        return not torch.equal(before, torch.get_rng_state())

    validate, generate_example = litgpt_lora.validate, litgpt_lora.generate_example
    assert draws()  # LitGPT's own validation moves the stream
    with observing_validations(litgpt_lora):
        assert draws()  # the loop's first check, as in every run
        assert not draws() and not draws()
    assert (litgpt_lora.validate, litgpt_lora.generate_example) == (validate, generate_example)
    assert draws()


def test_a_runs_validation_curve_is_read_from_its_csv_log(tmp_path):
    from lightning.fabric.loggers import CSVLogger

    from benchmarks.quality_worker import read_metrics

    logger = CSVLogger(root_dir=tmp_path / "logs", name="csv")
    for step in range(1, 11):
        logger.log_metrics({"loss": 3.0 - step / 10, "iter_time": 0.5}, step=step)
        if step % 5 == 0:
            logger.log_metrics({"val_loss": 2.0 - step / 100, "val_ppl": 7.0}, step=step)
    logger.log_metrics({"val_loss": 1.8, "val_ppl": 6.0}, step=0)  # the validation after the loop, as finetune logs it
    logger.finalize("success")
    metrics = read_metrics(tmp_path)
    assert metrics["val_curve"] == [[5, 1.95], [10, 1.9]]
    assert metrics["val_loss"] == 1.8 and metrics["logged_steps"] == 10


def test_a_replayed_race_halves_on_the_recorded_losses():
    from benchmarks.race_replay import replay

    curves = {  # four candidates: two kept at step 10, one at step 20
        "a": {10: 1.0, 20: 0.9},
        "b": {10: 1.1, 20: 0.8},
        "c": {10: 1.2, 20: 0.5},  # best at 20, but dropped at 10
        "d": {10: 1.0, 20: 0.7},  # ties a at 10: a stays ahead, being listed first
    }
    race = replay(curves, first=10, eta=2)
    assert [r["kept"] for r in race["rounds"]] == [["a", "d"], ["d"]]
    assert race["winner"] == "d" and race["overhead_steps"] == 2 * 10 + 1 * 20
    one_round = replay(curves, first=20, eta=4)
    assert one_round == {"winner": "c", "rounds": [{"step": 20, "kept": ["c"]}], "overhead_steps": 60}
    assert replay(curves, first=5, eta=2) is None  # step 5 was not recorded


def test_the_replay_section_ranks_candidates_by_early_and_final_loss(tmp_path):
    from benchmarks.race_replay import candidates_of, section

    kinds = {"plop": (["value", "mlp_proj"], 30), "kappa": (["value", "mlp_proj"], 30), "cka": (["query"], 15)}
    early = {"plop": 1.0, "attention": 1.1, "mlp": 1.2, "all": 1.3, "qv": 1.4, "cka": 1.5, "kappa": 1.0}
    final = {"plop": 0.6, "attention": 0.5, "mlp": 0.7, "all": 0.8, "qv": 0.9, "cka": 1.0, "kappa": 0.6}
    rows = {}
    for seed in (0, 1):
        for method in early:
            rows[("c", "t", method, seed)] = {
                "config_id": "c", "task": "t", "method": method, "seed": seed, "status": "ok",
                "settings": {"steps": 100, "lr_warmup_steps": 10}, "kinds": kinds.get(method, ([method], 30))[0],
                "n_layers": kinds.get(method, ([method], 30))[1],
                "val_curve": [[10, 2.0 - final[method]], [20, early[method]], [100, final[method]]], "val_loss": final[method],
                "accuracy": 1 - final[method], "eval_items": 10, "started": f"{method}{seed}",
                "item_scores": [float(i < round(10 * (1 - final[method]))) for i in range(10)],
            }  # fmt: skip
    runs = {method: rows[("c", "t", method, 0)] for method in early}
    assert candidates_of(runs) == ["plop", "attention", "mlp", "all", "qv", "cka"]  # kappa placed PLoP's sites
    text = section(rows, {}, "cmd")
    assert "| 10 | -1.00 ± 0.00 | 0/2 |" in text  # the reverse order
    # at step 20 only plop and attention swap places against the final order: tau = (14 - 1) / 15
    assert f"| 20 | +{13 / 15:.2f} ± 0.00 | 0/2 |" in text
    assert "| 100 | +1.00 ± 0.00 | 2/2 |" in text
    # halving from step 20 keeps plop, attention, mlp, then plop, attention at 40 (not recorded): no race there;
    # one round at step 20 keeps plop, which ended second
    assert "| 6 | 20 | 100 (100%) | plop, plop | 0/2 | 0/2 | 40.0 ± 0.0 |" in text
    # both seeds alike: the placement explains all of it, and only 1 of the 720 relabellings of seed 1 as much
    assert "| final val loss | +1.00 | 0.001 | 0.00 |" in text
    # item by item against attention, the most accurate usual choice: cka loses 5 items (sign test p = 1/16),
    # qv 4 (p = 1/8); Holm over the five comparisons multiplies them by 5 and 4
    assert "vs `attention`, the best usual choice" in text
    assert "| cka | 0.0 ± 0.0 | 1.000 | 0 / 5, p = 0.312 |" in text and "| qv | 10.0 ± 0.0 | 0.900 | 0 / 4, p = 0.5 |" in text
    assert "| attention | 50.0 ± 0.0 | 0.500 | - |" in text
    # a third seed still running its candidates waits, named, and the two complete seeds count as before
    rows.update({("c", "t", method, 2): {**rows[("c", "t", method, 0)], "seed": 2} for method in ("plop", "mlp")})
    waiting = section(rows, {}, "cmd")
    assert "seeds 0, 1; candidates plop, attention, mlp, all, qv, cka" in waiting
    assert "Not counted until their candidates have all run: seed 2 lacks attention, all, qv, cka." in waiting
    assert "| 100 | +1.00 ± 0.00 | 2/2 |" in waiting
    # a task where no seed has every default candidate yet is named as waiting, not raced among the few it has
    partial = {key: row for key, row in rows.items() if key[2] in ("plop", "attention", "mlp", "all")}
    text = section({(c, "t2", m, s): {**row, "task": "t2"} for (c, t, m, s), row in partial.items()}, {}, "cmd")
    assert "### t2 (settings `c`)" in text and "No seed has run every candidate yet: seed 0 lacks qv; seed 1 lacks qv" in text
    assert "Replayed races" not in text


def test_scaling_starts_each_measurement_with_the_checkpoint_out_of_the_page_cache():
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from benchmarks.scaling import evict_page_cache

    if shutil.which("fincore") is None:
        pytest.skip("needs util-linux's fincore to see the page cache")
    out = Path(__file__).resolve().parent.parent / "out"  # on the checkpoints' filesystem (tmpfs keeps its pages)
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as directory:
        weights = Path(directory) / "lit_model.pth"
        weights.write_bytes(os.urandom(8 << 20))
        weights.read_bytes()
        cached = evict_page_cache(Path(directory))
        assert cached["cached_before_mib"] == pytest.approx(8, abs=0.1)
        assert cached["cached_after_mib"] == 0

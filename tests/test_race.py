"""``--plugin race``: the rounds' arithmetic, matched candidates, identical batches, the first round dropping a
clearly worse candidate, a winner that is exactly its own run, and outputs stock LitGPT takes."""

import gc
import hashlib
import subprocess
import sys
import weakref
from pathlib import Path

import lightning as L
import pytest
import torch
from litgpt.args import EvalArgs, TrainArgs

from litgpt_plop.args import CalibrationArgs, CkaArgs, KappaArgs, PlopArgs
from litgpt_plop.data import ReasoningGym
from litgpt_plop.errors import InputError
from litgpt_plop.race import RaceArgs, race_schedule
from litgpt_plop.race import runner
from litgpt_plop.race.candidates import race_candidates
from litgpt_plop.selection.placement import Placement

from helpers import random_gpt, tiny_config, tiny_run

TRAIN = TrainArgs(save_interval=100, log_interval=1, global_batch_size=4, micro_batch_size=4, lr_warmup_steps=1,
                  epochs=3, max_steps=16, max_seq_length=96)  # fmt: skip
BUDGET = 0.6  # 4 candidates in 16 steps: rounds end at steps 2 and 4


def test_rounds_halve_the_candidates_and_spend_the_budget_on_losers():
    schedule = race_schedule(7, 200, budget=0.25, eta=2)
    # 7 -> 4 -> 2 -> 1; losers 3 at s, 2 at 2s, 1 at 4s: 11 s <= 50 steps, so s = 4
    assert schedule.ends == (4, 8, 16) and schedule.survivors == (4, 2, 1)
    assert schedule.overhead_steps(7) == 3 * 4 + 2 * 8 + 1 * 16 == 44
    schedule = race_schedule(6, 1000, budget=0.1, eta=3)  # 6 -> 2 -> 1; losers 4 at s, 1 at 3s: 7 s <= 100
    assert schedule.ends == (14, 42) and schedule.survivors == (2, 1)


def test_no_round_ends_inside_the_warm_up_fewer_rounds_first_then_one_line():
    # 6 candidates, 1000 steps, budget 0.25: halving (9 s <= 250) would end its first round at 27, after 10 steps
    assert race_schedule(6, 1000, 0.25, 2, warmup_steps=10).ends == (27, 54, 108)
    # after a 30-step warm-up, halving cannot pay (31 * 9 > 250); eta 3 (6 -> 2 -> 1, 7 s) can: 35
    schedule = race_schedule(6, 1000, 0.25, 2, warmup_steps=30)
    assert schedule.ends == (35, 105) and schedule.survivors == (2, 1)
    # after 45 steps only one round fits (5 losers x 50 = 250)
    assert race_schedule(6, 1000, 0.25, 2, warmup_steps=45).ends == (50,)
    with pytest.raises(InputError, match=r"takes at least 55 \(0.28 of the 200-step run\): raise --race.budget to 0.28"):
        race_schedule(6, 200, 0.25, 2, warmup_steps=10)
    with pytest.raises(InputError, match="race fewer --race.candidates, shorten --train.lr_warmup_steps or train longer"):
        race_schedule(6, 50, 0.25, 2, warmup_steps=10)


def test_the_first_round_ends_after_litgpts_zero_learning_rate_step_and_the_last_before_the_run_ends():
    # halving (losers 2 at s, 1 at 2s, 1 at 4s: 8 s <= 12) would end at step 1, where LitGPT's learning rate is 0
    schedule = race_schedule(5, 40, budget=0.3, eta=2)
    assert schedule.ends == (2, 6) and schedule.survivors == (2, 1)  # so eta 3: 3 losers at 2, 1 at 6
    schedule = race_schedule(2, 10, budget=0.95, eta=2)  # one loser may spend 9 steps: the winner keeps the 10th
    assert schedule.ends == (9,)


def test_race_options_are_checked_in_one_line():
    with pytest.raises(InputError, match="race.budget"):
        RaceArgs(budget=1.5)
    with pytest.raises(InputError, match="race.eta"):
        RaceArgs(eta=1)
    with pytest.raises(InputError, match="two different"):
        RaceArgs(candidates=["qv", "qv"])


def test_candidates_are_matched_to_the_reference_budget_and_duplicates_left_out():
    model = random_gpt(tiny_config(n_layer=4))
    config = model.config
    args = RaceArgs(candidates=["qv", "attention", "all", "mlp", "random"], reference="qv")
    kinds = ["query", "key", "value", "projection", "mlp_fc_1", "mlp_fc_2", "mlp_proj"]
    placements = race_candidates(model, args, None, kinds, 8, 16, 0.0, CalibrationArgs(), PlopArgs(), CkaArgs(),
                                 KappaArgs(), seed=0)  # fmt: skip
    budget = Placement.from_kinds(config, ["query", "value"], rank=8).trainable_params(config)
    by_name = {p.method: p for p in placements}
    assert by_name["qv"].max_rank == 8 and by_name["qv"].lora_alpha == 16
    for p in placements:
        per_rank = p.trainable_params(config) // p.max_rank
        # the whole rank closest to the budget, and alpha / rank kept at 16 / 8
        assert abs(p.trainable_params(config) - budget) <= per_rank / 2, p.method
        assert p.lora_alpha == 2 * p.max_rank, p.method
    assert by_name["all"].max_rank < by_name["attention"].max_rank < by_name["qv"].max_rank
    # ``random`` draws 3 kinds; if they are those of an earlier candidate, it is that candidate and races once
    assert len({tuple((s.layer, s.kind) for s in p.sites) for p in placements}) == len(placements)


def token_batches(count: int, seed: int, vocab: int = 64, length: int = 12) -> list[dict]:
    """Counting sequences (``x, x+1, x+2, ...`` modulo ``vocab``) from random starts: something to learn."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = (torch.randint(0, vocab, (2, 1), generator=g) + torch.arange(length)) % vocab
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return batches


def test_candidates_see_the_same_batches_and_a_clearly_worse_one_goes_first(monkeypatch):
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    torch.manual_seed(0)
    model = fabric.setup_module(random_gpt(tiny_config(n_layer=2)))
    config = model.config
    placements = [
        Placement.from_kinds(config, ["query", "key", "value", "projection", "mlp_fc_1", "mlp_fc_2", "mlp_proj"], rank=8, method="all"),
        Placement.from_sites(config, [(0, "value", 1)], lora_alpha=1, method="one-adapter"),
        Placement.from_kinds(config, ["mlp_fc_1", "mlp_fc_2", "mlp_proj"], rank=8, method="mlp"),
    ]  # fmt: skip
    seen: dict[str, list[str]] = {}
    alive: dict[str, weakref.ref] = {}
    freed: list[bool] = []
    train_steps = runner.train_steps

    def recording(fabric, model, racer, batches, accumulation):
        seen.setdefault(racer.name, []).extend(hashlib.sha1(b["input_ids"].numpy().tobytes()).hexdigest() for b in batches)
        alive[racer.name] = weakref.ref(racer.optimizer)
        if racer.steps > 0:  # a later round: the first round's loser, its adapters and optimizer state are gone
            gc.collect()
            freed.append(alive["one-adapter"]() is None)
        return train_steps(fabric, model, racer, batches, accumulation)

    monkeypatch.setattr(runner, "train_steps", recording)

    def make_optimizer(params):
        optimizer = fabric.setup_optimizers(torch.optim.AdamW(params, lr=3e-2))
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    schedule = race_schedule(3, 40, budget=0.3, eta=2)  # 3 -> 2 -> 1: losers 1 at s, 1 at 2s
    assert schedule.ends == (4, 8)
    result = runner.run_race(fabric, model, placements, schedule, make_optimizer, token_batches(8, 1),
                             token_batches(2, 2), accumulation=2, eval=EvalArgs(max_iters=2))  # fmt: skip
    first, second = result.record["rounds"]
    assert first["kept"] == ["all", "mlp"] or first["kept"] == ["mlp", "all"]  # the single rank-1 adapter is out
    assert first["val_loss"]["one-adapter"] > max(first["val_loss"]["all"], first["val_loss"]["mlp"])
    # 2 micro-batches per step; everyone the same ones, in the same order, as far as it got
    assert len(seen["one-adapter"]) == 4 * 2 and len(seen[result.record["winner"]]) == 8 * 2
    assert seen["all"][:8] == seen["mlp"][:8] == seen["one-adapter"]
    assert seen["all"] == seen["mlp"]
    assert result.record["overhead_steps"] == 4 + 8
    # the winner is the model's placement now, and only its adapters train
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in result.winner.adapters.parameters()}
    assert freed == [True, True]  # while the race went on
    gc.collect()  # and at its end only the winner's optimizer is left
    assert {name for name, ref in alive.items() if ref() is not None} == {result.record["winner"]}


CALIBRATION = CalibrationArgs(num_samples=8, batch_size=4, resamples=0)


def race_run(checkpoint: Path, out_dir: Path, **options) -> Placement:
    options = {"lora_dropout": 0.0, **options}
    tiny_run(checkpoint, out_dir, plugin="race", train=TRAIN, data=ReasoningGym(train_size=32, val_size=8, prompt_style="alpaca"),
             **options)  # fmt: skip
    return Placement.load(out_dir / "final" / "placement.json")


def test_the_winner_is_exactly_its_own_run_and_stock_litgpt_takes_it(tiny_checkpoint, tmp_path, one_thread):
    # dropout draws from the random stream: the race keeps every candidate's stream as its own run has it
    candidates = ["plop", "qv", "mlp", "all"]
    race = race_run(tiny_checkpoint, tmp_path / "race", race=RaceArgs(candidates=candidates, budget=BUDGET), lora_dropout=0.1,
                    calibration=CALIBRATION)  # fmt: skip
    record = race.scores.race
    assert [c["name"] for c in record["candidates"]] == candidates
    assert [r["step"] for r in record["rounds"]] == [2, 4] == list(race_schedule(4, 16, BUDGET, 2, warmup_steps=1).ends)
    assert race.method == record["winner"] and (tmp_path / "race" / "final" / "race.png").is_file()
    assert "## The race" in (tmp_path / "race" / "final" / "report.md").read_text()
    # the same seed and batches, the winner alone, at the rank and alpha it raced with: the same adapter, bit for bit
    alone_options = {"calibration": CALIBRATION} if race.method == "plop" else {}
    tiny_run(tiny_checkpoint, tmp_path / "alone", plugin=race.method, train=TRAIN, lora_dropout=0.1, lora_r=race.max_rank,
             lora_alpha=race.lora_alpha, data=ReasoningGym(train_size=32, val_size=8, prompt_style="alpaca"), **alone_options)  # fmt: skip
    raced = torch.load(tmp_path / "race" / "final" / "lit_model.pth.lora", weights_only=True)["model"]
    alone = torch.load(tmp_path / "alone" / "final" / "lit_model.pth.lora", weights_only=True)["model"]
    assert raced.keys() == alone.keys()
    for name, value in alone.items():
        assert torch.equal(raced[name], value), name
    assert any(v.count_nonzero() for k, v in raced.items() if "lora_B" in k)
    final = tmp_path / "race" / "final"
    for command in (["merge_lora", str(final)], ["generate", str(final), "--prompt", "1+1=", "--max_new_tokens", "2"]):
        done = subprocess.run([sys.executable, "-m", "litgpt", *command], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]


def test_race_on_a_mixture_of_experts_with_calibrated_candidates(tmp_path, smollm2_checkpoint, one_thread):
    from helpers import SMOLLM2_VOCAB, write_checkpoint

    config = tiny_config(name="tiny-mixtral", mlp_class_name="LLaMAMoE", n_expert=4, n_expert_per_token=2,
                         vocab_size=SMOLLM2_VOCAB, block_size=256)  # fmt: skip
    checkpoint = write_checkpoint(tmp_path / "moe", config, tokenizer_from=smollm2_checkpoint)
    placement = race_run(checkpoint, tmp_path / "out", calibration=CALIBRATION, race=RaceArgs(budget=0.9))
    record = placement.scores.race
    names = [c["name"] for c in record["candidates"]]
    assert names[:5] == ["plop", "attention", "mlp", "all", "qv"]
    assert placement.method == record["winner"] in names
    assert [len(r["kept"]) for r in record["rounds"]][-1] == 1
    assert (tmp_path / "out" / "final" / "lit_model.pth.lora").is_file()


def test_two_cpu_processes_race_as_one_process_does(tiny_checkpoint, tmp_path):
    from test_multi_device import check_loads_in_stock_litgpt, lora_state, run_finetune

    run_finetune("litgpt-plop", tiny_checkpoint, tmp_path / "one", "race", devices=1)
    run_finetune("litgpt-plop", tiny_checkpoint, tmp_path / "two", "race", devices=2)
    one, two = (Placement.load(tmp_path / name / "final" / "placement.json").scores.race for name in ("one", "two"))
    # every rank validated its half; the mean over ranks is the one process's loss, so the same rounds
    assert [r["kept"] for r in two["rounds"]] == [r["kept"] for r in one["rounds"]] and two["winner"] == one["winner"]
    for round_one, round_two in zip(one["rounds"], two["rounds"]):
        assert round_two["val_loss"] == pytest.approx(round_one["val_loss"], rel=1e-5)
    adapters_one, adapters_two = (lora_state(tmp_path / name / "final" / "lit_model.pth.lora") for name in ("one", "two"))
    assert adapters_one.keys() == adapters_two.keys()
    for name, value in adapters_one.items():
        torch.testing.assert_close(adapters_two[name], value, atol=1e-6, rtol=1e-4, msg=name)
    check_loads_in_stock_litgpt(tiny_checkpoint, tmp_path / "two" / "final")

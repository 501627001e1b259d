"""WeightLoRA's cut is made among gates that moved: LitGPT's schedule (whose first step has learning rate 0) and
the shortest warm-up ``litgpt-plop finetune`` accepts, the refusal of a shorter one, the wait of a cut whose gates
have not moved, what the report says about the gates at the cut, and the parameter budget."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from litgpt import Config
from litgpt.args import TrainArgs
from litgpt.finetune.lora import get_lr_scheduler

from litgpt_plop.commands.cli import main
from litgpt_plop.errors import InputError
from litgpt_plop.selection.placement import Placement, preset, site_params
from litgpt_plop.reports.placement import write_report
from litgpt_plop.selection.rules import budget_params
from litgpt_plop.weightlora import WeightLoRAArgs, WeightLoRAController

from helpers import random_gpt, tiny_config, tiny_run

VOCAB = 64
TOKENS = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(5))


def train(lr_warmup_steps: int, max_steps: int) -> TrainArgs:
    return TrainArgs(save_interval=None, log_interval=1, global_batch_size=4, micro_batch_size=4,
                     lr_warmup_steps=lr_warmup_steps, epochs=1, max_steps=max_steps, max_seq_length=96)  # fmt: skip


def gates_at(history: dict, step: int) -> dict[str, float]:
    """Every candidate's gate in ``gates.json`` after optimizer step ``step``."""
    return dict(zip(history["sites"], history["gates"][history["steps"].index(step)]))


# ---- finetune: the shortest warm-up it accepts chooses by the gates -----------------------------------------


@pytest.mark.parametrize("lr_warmup_steps", [1, 3])
def test_the_shortest_warmup_finetune_accepts_keeps_adapters_whose_gates_differ(
    tiny_checkpoint, tmp_path, lr_warmup_steps
):
    """Under LitGPT's schedule, with a short and a longer LR warm-up: the shortest ``--weightlora.warmup_steps``
    that finetune accepts ends where the gates have moved, and the adapters it keeps are the largest gates there,
    not the first K candidates in name order with every gate still 1.0."""
    k, out_dir = 5, tmp_path / "run"
    for warmup in range(2, 8):  # 2: WeightLoRAArgs' own minimum
        try:
            tiny_run(tiny_checkpoint, out_dir, plugin="weightlora", train=train(lr_warmup_steps, 4),
                     weightlora=WeightLoRAArgs(k=k, warmup_steps=warmup))  # fmt: skip
        except InputError as e:
            assert "`--weightlora.warmup_steps`" in str(e) and "is too short" in str(e)
            continue
        break
    history = json.loads((out_dir / "gates.json").read_text())
    (cut_step,) = [e["step"] for e in history["events"] if e["event"] == "final"]
    at_cut = gates_at(history, cut_step)
    kept = history["kept"]
    kept_gates = [at_cut[key] for key in kept]
    assert len(set(kept_gates)) > 1, f"warm-up {warmup}: every kept gate was {kept_gates[0]} at the cut"
    assert kept != history["sites"][:k], f"warm-up {warmup}: the first {k} candidates in order were kept"
    smallest_kept = min(abs(w) for w in kept_gates)
    assert all(abs(w) <= smallest_kept for key, w in at_cut.items() if key not in kept)

    # LitGPT's first step has learning rate 0 whatever its warm-up: the gates first move at step 3, which is
    # exactly the shortest warm-up accepted (the minimum is neither too short nor longer than needed)
    first_moved = next(s for s, row in zip(history["steps"], history["gates"]) if set(row) != {1.0})
    assert first_moved == warmup == cut_step == 3
    # the record and the report state the gates at the cut
    record = Placement.load(out_dir / "final" / "placement.json").scores.weightlora
    (cut,) = record["cuts"]
    assert cut["step"] == cut["scheduled_step"] == 3 and record["first_moved_step"] == 3
    assert list(cut["kept"]) == kept and [cut["kept"][key] for key in kept] == pytest.approx(kept_gates)
    assert not cut["kept_all_equal"] and not cut["tie"]
    report = (out_dir / "final" / "report.md").read_text()
    assert "| adapter | gate at the cut | kept |" in report and "the largest removed gate" in report
    assert "All kept gates were equal" not in report
    assert all(f"| {key} |" in report for key in kept)


def test_weightlora_plus_with_the_shortest_warmup_changes_the_adapters_only_on_moved_gates(tiny_checkpoint, tmp_path):
    """2 rounds: 3 + 2 = 5 steps. Round 1 is scheduled after step 2, where LitGPT's gates have not moved yet: it
    waits for step 3, round 2 for step 4, and the end comes after step 5 as scheduled."""
    out_dir = tmp_path / "plus"
    args = WeightLoRAArgs(k=8, warmup_steps=5)
    tiny_run(tiny_checkpoint, out_dir, plugin="weightlora+", train=train(1, 5), weightlora=args)
    record = Placement.load(out_dir / "final" / "placement.json").scores.weightlora
    cuts = [(c["event"], c["scheduled_step"], c["step"]) for c in record["cuts"]]
    assert cuts == [("round 1", 2, 3), ("round 2", 3, 4), ("final", 5, 5)]
    assert [len(c["kept"]) for c in record["cuts"]] == [4, 2, 2]
    assert all(len(set(c["kept"].values())) == len(c["kept"]) for c in record["cuts"])
    assert "(scheduled after step 2; it waited for the gates to move)" in (out_dir / "final" / "report.md").read_text()


def refused(tiny_checkpoint: Path, out_dir: Path, plugin: str, args: WeightLoRAArgs, steps: TrainArgs) -> str:
    """The message of the ``InputError`` finetune raises, having loaded no weights and written nothing."""
    with pytest.raises(InputError) as info:
        tiny_run(tiny_checkpoint, out_dir, plugin=plugin, train=steps, weightlora=args)
    assert not (out_dir / "final").exists() and not (out_dir / "placement.json").exists()
    return str(info.value)


@pytest.mark.parametrize(
    ("plugin", "args", "shortest"),
    [
        ("weightlora", WeightLoRAArgs(k=4, warmup_steps=2), 3),
        ("weightlora+", WeightLoRAArgs(k=8, warmup_steps=4), 5),  # 2 rounds, then the end: steps 3, 4, 5
        ("weightlora+", WeightLoRAArgs(k=8, warmup_steps=3, rounds=1), 4),
    ],
    ids=["weightlora", "plus-2-rounds", "plus-1-round"],
)
def test_a_warmup_too_short_for_litgpts_schedule_is_refused_up_front(tiny_checkpoint, tmp_path, plugin, args, shortest):
    message = refused(tiny_checkpoint, tmp_path / "out", plugin, args, train(1, 10))
    assert message.startswith(f"`--weightlora.warmup_steps` {args.warmup_steps} is too short under LitGPT's schedule")
    assert f"Use `--weightlora.warmup_steps` {shortest} or more" in message
    assert "first move at step 3" in message
    # the value it names is accepted (checked up to the first step of the run: refused later only for its length)
    with pytest.raises(InputError, match="longer than the run"):
        tiny_run(tiny_checkpoint, tmp_path / "ok", plugin=plugin, train=train(1, shortest - 1),
                 weightlora=WeightLoRAArgs(k=args.k, warmup_steps=shortest, rounds=args.rounds))  # fmt: skip


def test_a_warmup_longer_than_the_run_is_refused_before_the_model_loads(tiny_checkpoint, tmp_path):
    steps = train(1, 4)
    message = refused(tiny_checkpoint, tmp_path / "a", "weightlora", WeightLoRAArgs(k=4, warmup_steps=5), steps)
    assert "`--weightlora.warmup_steps` 5 is longer than the run (4 optimizer steps" in message
    assert "Use at most 4" in message
    # no --train.max_steps: the length is --train.epochs over the data (32 items, batches of 4: 8 steps)
    steps = TrainArgs(save_interval=None, log_interval=1, global_batch_size=4, micro_batch_size=4, lr_warmup_steps=1,
                      epochs=1, max_steps=None, max_seq_length=96)  # fmt: skip
    message = refused(tiny_checkpoint, tmp_path / "b", "weightlora", WeightLoRAArgs(k=4, warmup_steps=9), steps)
    assert "is longer than the run (8 optimizer steps" in message


def test_the_command_line_says_it_in_one_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    argv = ["litgpt-plop", "finetune", str(tiny_checkpoint), "--plugin", "weightlora", "--weightlora.warmup_steps", "2",
            "--out_dir", str(tmp_path / "out")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("LITGPT_PLOP_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: `--weightlora.warmup_steps` 2 is too short") and "3 or more" in err[0]


# ---- the controller: a cut waits for gates that moved ------------------------------------------------------


def litgpt_loop(model: torch.nn.Module, controller: WeightLoRAController, steps: int) -> list[tuple[int, str]]:
    """``steps`` optimizer steps of AdamW under LitGPT's own ``get_lr_scheduler`` (learning rate 0 at step 1), the
    controller attached: the (step, event) of every change of the adapters."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_lr_scheduler(optimizer, warmup_steps=1, max_steps=steps)
    changes: list[tuple[int, str]] = []
    controller.attach(optimizer, on_change=lambda events: changes.extend((controller.step, e) for e in events))
    for _ in range(steps):
        logits = model(TOKENS[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return changes


@pytest.mark.usefixtures("one_thread")
def test_a_cut_whose_gates_have_not_moved_waits_for_them():
    """A loop the controller cannot refuse (LitGPT's schedule, warm-ups its own minimum allows): the end and each
    WeightLoRA+ round wait until the gates have moved since the previous change, one step apart."""
    config = tiny_config(vocab_size=VOCAB)
    model = random_gpt(config)
    controller = WeightLoRAController(model, preset("all", config, rank=2), WeightLoRAArgs(k=4, warmup_steps=2))
    assert litgpt_loop(model, controller, 4) == [(3, "final")]  # scheduled after step 2; the gates moved at 3
    (cut,) = controller.cuts
    assert (cut["scheduled_step"], cut["step"]) == (2, 3) and len(set(cut["kept"].values())) == 4

    model = random_gpt(config)
    args = WeightLoRAArgs(k=8, warmup_steps=4, plus=True, rounds=2)  # rounds scheduled after steps 2 and 3
    controller = WeightLoRAController(model, preset("all", config, rank=2), args)
    assert litgpt_loop(model, controller, 6) == [(3, "round 1"), (4, "round 2"), (5, "final")]
    assert [(c["scheduled_step"], c["step"]) for c in controller.cuts] == [(2, 3), (3, 4), (4, 5)]
    assert all(len(set(c["kept"].values())) == len(c["kept"]) for c in controller.cuts)
    assert [len(c["kept"]) for c in controller.cuts] == [4, 2, 2] and controller.finished


def test_the_report_says_plainly_when_the_kept_gates_were_all_equal(tmp_path):
    config = tiny_config(vocab_size=VOCAB)
    candidates = preset("all", config, rank=2)
    keys = [s.key for s in candidates.sites]
    cut = {"event": "final", "step": 2, "scheduled_step": 2, "kept": dict.fromkeys(keys[:3], 1.0), "kept_params": 9,
           "largest_removed": [keys[3], 1.0], "kept_all_equal": True, "tie": True}  # fmt: skip
    record = {"first_moved_step": None, "cuts": [cut], "final": True}
    placement = Placement.from_sites(config, [(0, kind, 2) for kind in ("query", "key", "value")], method="weightlora")
    placement.scores.weightlora = record
    report = write_report(placement, config, tmp_path)[0].read_text()
    assert "All kept gates were equal (1): the gates had not told the adapters apart" in report
    assert "The gates never moved" in report


# ---- the parameter budget ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_a_budget_keeps_the_largest_gates_that_fit_and_never_more():
    """LLaMA-style: the MLP matrices are twice as wide as attention's, and key/value half as tall as query, so
    adapters differ in size; every thresholding keeps a prefix of the gates by |w| that fits, stopping at the
    first that does not."""
    config = tiny_config(vocab_size=VOCAB)
    candidates = preset("all", config, rank=2)
    costs = [site_params(config, s.kind, s.rank) for s in candidates.sites]
    assert len(set(costs)) > 1
    budget = sum(costs) // 3
    model = random_gpt(config)
    controller = WeightLoRAController(model, candidates, WeightLoRAArgs(budget=budget, warmup_steps=5))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 6):
        F.cross_entropy(model(TOKENS[:, :-1]).flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.on_optimizer_step(step, optimizer)
        gates = controller.history[-1]
        if step >= 2:  # the gates moved from step 2 on (this loop trains at step 1)
            assert sum(c for c, w in zip(costs, gates) if w != 0) <= budget, f"step {step}"
    assert controller.finished
    (cut,) = controller.cuts
    kept = set(cut["kept"])
    placement = controller.placement
    assert placement.trainable_params(config) == cut["kept_params"] <= budget
    assert {s.key for s in placement.sites} == kept and len(kept) > 1
    # largest first, greedy: the largest removed gate is no larger than any kept one, and it did not fit
    key, w = cut["largest_removed"]
    assert all(abs(v) >= abs(w) for v in cut["kept"].values())
    assert cut["kept_params"] + costs[[s.key for s in candidates.sites].index(key)] > budget


def test_finetune_with_a_budget_fraction(tiny_checkpoint, tmp_path):
    out_dir = tmp_path / "budget"
    args = WeightLoRAArgs(budget=0.3, warmup_steps=3)
    tiny_run(tiny_checkpoint, out_dir, plugin="weightlora", train=train(1, 4), weightlora=args)
    placement = Placement.load(out_dir / "final" / "placement.json")
    config = Config.from_file(tiny_checkpoint / "model_config.yaml")
    limit = budget_params(config, 0.3, 8)  # a fraction of `all` at the run's rank, as --plop.budget
    assert 0 < placement.trainable_params(config) <= limit
    assert placement.scores.weightlora["budget_params"] == limit and placement.scores.weightlora["k"] is None
    assert f"fitted the budget of {limit:,}" in (out_dir / "final" / "report.md").read_text()


def test_bad_budgets_are_refused_naming_the_flag():
    config = tiny_config(vocab_size=VOCAB)
    with pytest.raises(InputError, match=r"`--weightlora.k` \(4\) and `--weightlora.budget` \(1000\) both say"):
        WeightLoRAArgs(k=4, budget=1000)
    with pytest.raises(InputError, match=r"`--weightlora.budget` does not apply to WeightLoRA\+"):
        WeightLoRAArgs(budget=1000, plus=True)
    with pytest.raises(InputError, match=r"`--weightlora.budget` as a fraction of the `all` placement must be in"):
        WeightLoRAArgs(budget=1.5)
    candidates = preset("all", config, rank=2)
    biggest = max(site_params(config, s.kind, 2) for s in candidates.sites)
    model = random_gpt(config)
    with pytest.raises(InputError, match=rf"smaller than the candidate adapter .* alone \({biggest:,} parameters"):
        WeightLoRAController(model, candidates, WeightLoRAArgs(budget=biggest - 1, warmup_steps=2))
    assert not any("lora_" in name for name, _ in model.named_parameters())  # refused before touching the model

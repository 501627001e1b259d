"""WeightLoRA / WeightLoRA+: K gates after every step, exact pruning, folding and rank growth, freed optimizer
state, stock-loadable export, a Lightning run end to end, and clear errors."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import weakref
from pathlib import Path

import litgpt
import litgpt.model
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from litgpt.scripts.merge_lora import merge_lora
from torch.utils.data import DataLoader

from litgpt_plop.model.adapt import (
    LoRAQKVMixedRankLinear,
    SiteParameters,
    apply_placement,
    current_placement,
    site_adapter,
    site_parameters,
)  # fmt: skip
from litgpt_plop.callbacks import WeightLoRACallback
from litgpt_plop.model.export import save_adapter
from litgpt_plop.model.modules import site_module
from litgpt_plop.selection.placement import HEAD_LAYER, Placement, site_params
from litgpt_plop.selection.placement import preset as preset_placement
from litgpt_plop.weightlora import (
    WeightLoRAArgs, WeightLoRAController, WeightLoRASchedule, grow_ranks, remap_optimizer, rescale_state_rows,
    round_steps,
)  # fmt: skip

from helpers import LitLLM, load_gpt, random_gpt, tiny_config, trainer, write_checkpoint

# Every model here is tiny_config's default with this vocabulary: LLaMA-style, 2 layers, 32 wide, grouped-query
# attention (4 heads of 8, 2 groups): q, k, v parts of different sizes.
VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def square_config() -> litgpt.Config:
    """Every site is 32 x 32 (no GQA, intermediate size = width), so every adapter of rank r costs the same."""
    return tiny_config(vocab_size=VOCAB, n_query_groups=4, intermediate_size=32)


TOKENS = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(5))


def loss_of(model: torch.nn.Module) -> torch.Tensor:
    logits = model(TOKENS[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten())


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS[:2, :-1])


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    loss = loss_of(model)
    loss.backward()
    optimizer.step()  # an attached controller runs here, after the step
    optimizer.zero_grad()
    return loss.item()


def trainable(model: torch.nn.Module) -> dict[int, torch.nn.Parameter]:
    return {id(p): p for p in model.parameters() if p.requires_grad}


def held(optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
    return {id(p): p for group in optimizer.param_groups for p in group["params"]}


def updates(model: torch.nn.Module, placement: Placement) -> dict[str, torch.Tensor]:
    """``s * B A`` of every site (the gated B while gates are on)."""
    result = {}
    for s in placement.sites:
        adapter = site_adapter(model, s.layer, s.kind)
        result[s.key] = adapter.scaling * adapter.B.float() @ adapter.A.float()
    return result


# ---- WeightLoRA: K gates, then K adapters ------------------------------------------------------------------


def test_a_run_whose_gates_never_move_ends_with_every_candidate_and_says_so():
    """A gate learning rate too small to move a gate: no cut is ever made, and the end-of-run warning says why and
    how many adapters were trained instead of K."""
    config = tiny_config(vocab_size=VOCAB)
    model = random_gpt(config)
    candidates = preset_placement("all", config, rank=2)
    args = WeightLoRAArgs(k=3, warmup_steps=2, gate_lr=1e-30)
    controller = WeightLoRAController(model, candidates, args, max_steps=4)
    optimizer = adamw(model)
    controller.attach(optimizer)
    for _ in range(4):
        train_step(model, optimizer)
    assert not controller.finished and controller.gates.tolist() == [1.0] * 14
    assert len(current_placement(model).sites) == 14
    warning = controller.not_final_warning()
    assert "no final cut by step 4" in warning and "its gates never moved" in warning
    assert "All 14 remaining candidate adapters" in warning and "gate_lr, now 1e-30" in warning


def test_exactly_k_gates_every_step_then_only_k_adapters_and_no_stale_optimizer_state():
    config = tiny_config(vocab_size=VOCAB)
    model = random_gpt(config)
    candidates = preset_placement("all", config, rank=2)  # 2 layers x 7 kinds
    k, warmup = 5, 4
    controller = WeightLoRAController(model, candidates, WeightLoRAArgs(k=k, warmup_steps=warmup), max_steps=6)
    assert controller.num_candidates == 14
    optimizer = adamw(model)
    assert not any(p is controller.gates for p in held(optimizer).values())  # the gates have their own optimizer
    changes = []
    controller.attach(optimizer, on_change=lambda events: changes.append((controller.step, events)))

    # step 1: every lora_B is still 0, so every gate gradient is exactly 0 and the gates are tied at 1:
    # thresholding now would keep the first K candidates by order, so it waits
    train_step(model, optimizer)
    assert controller.gates.tolist() == [1.0] * 14 and not controller.gates_informed
    for step in range(2, warmup):
        train_step(model, optimizer)
        assert int((controller.gates != 0).sum()) == k, f"step {step}"
        assert len(current_placement(model).sites) == 14  # zero-gated adapters stay until the warm-up ends
    assert controller.history_steps == [1, 2, 3]
    assert [sum(v != 0 for v in values) for values in controller.history] == [14, k, k]
    assert len(set(controller.history[1])) > 2, "the first thresholding chose among gates that had not moved"

    # weak references to every candidate's A (the fused qkv tensors are rebuilt anyway, so take the others)
    mlp_sites = [s for s in candidates.sites if s.kind.startswith("mlp")]
    refs = {s.key: weakref.ref(site_parameters(model, s.layer, s.kind).A) for s in mlp_sites}
    train_step(model, optimizer)  # step 4: the attached controller ends the warm-up
    assert controller.finished and changes == [(4, ["final"])]
    assert controller.not_final_warning() is None

    placement = controller.placement
    assert placement.method == "weightlora" and len(placement.sites) == k
    assert current_placement(model).sites == placement.sites
    assert {s.key for s in placement.sites} == {s.key for s, w in zip(controller.sites, controller.history[-1]) if w}
    params = trainable(model)
    assert sum(p.numel() for p in params.values()) == placement.trainable_params(config)
    # the main optimizer holds exactly the surviving adapters, and no state of removed ones
    assert held(optimizer).keys() == params.keys()
    assert {id(p) for p in optimizer.state} <= params.keys()
    gc.collect()
    kept = {s.key for s in placement.sites}
    assert any(key not in kept for key in refs)
    assert all((ref() is None) == (key not in kept) for key, ref in refs.items()), "a removed adapter is still alive"
    # plain LoRA from here: no gates left on the model, and training goes on
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert math.isfinite(train_step(model, optimizer))
    assert controller.history_steps == [1, 2, 3, 4]


def test_the_end_of_warmup_changes_nothing_the_model_computes():
    """Removing zero-gated adapters and folding the gates into B is exact."""
    config = tiny_config(vocab_size=VOCAB)
    model = random_gpt(config)
    candidates = preset_placement("all", config, rank=2)
    controller = WeightLoRAController(model, candidates, WeightLoRAArgs(k=6, warmup_steps=3))
    optimizer = adamw(model)
    for step in (1, 2):
        train_step(model, optimizer)
        controller.on_optimizer_step(step, optimizer)
    loss_of(model).backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():  # a negative gate too: its sign goes into B
        controller.gates[controller.gates != 0] *= torch.linspace(-1.5, 2.0, 6)
    controller.gates.grad = None  # no gate step: only the pruning and folding act
    before = logits(model)
    assert controller.on_optimizer_step(3, optimizer) == ["final"]
    assert (logits(model) - before).abs().max() < 1e-6


def test_fused_qkv_parts_are_separate_adapters_and_keep_their_optimizer_state():
    """Gates per part of the fused qkv; when a part is removed the others move to a new tensor with their Adam
    moments (rescaled for the folded gate), the rest keep theirs."""
    config = tiny_config(vocab_size=VOCAB)
    model = random_gpt(config)
    sites = [(0, "query", 2), (0, "key", 2), (0, "value", 2), (1, "mlp_proj", 2)]
    candidates = Placement.from_sites(config, sites, method="test")
    controller = WeightLoRAController(model, candidates, WeightLoRAArgs(k=2, warmup_steps=2))
    optimizer = adamw(model)
    train_step(model, optimizer)
    controller.on_optimizer_step(1, optimizer)
    loss_of(model).backward()
    optimizer.step()
    optimizer.zero_grad()
    controller.gates.grad = None
    with torch.no_grad():  # keep key (negative gate) and mlp_proj
        controller.gates.zero_()
        controller.gates[controller.index[(0, "key")]] = -0.5
        controller.gates[controller.index[(1, "mlp_proj")]] = 2.0
    old_key = site_parameters(model, 0, "key")
    old_proj = site_parameters(model, 1, "mlp_proj")
    key_state = {n: optimizer.state[old_key.B][n][old_key.B_rows].clone() for n in ("exp_avg", "exp_avg_sq")}
    key_A_state = optimizer.state[old_key.A]["exp_avg"][old_key.A_rows].clone()
    proj_state = {n: optimizer.state[old_proj.B][n].clone() for n in ("exp_avg", "exp_avg_sq")}
    before = logits(model)
    controller.on_optimizer_step(2, optimizer)

    assert [(s.layer, s.kind) for s in controller.placement.sites] == [(0, "key"), (1, "mlp_proj")]
    assert (logits(model) - before).abs().max() < 1e-6
    new_key = site_parameters(model, 0, "key")
    assert new_key.B is not old_key.B  # the qkv was rebuilt with the key part only
    torch.testing.assert_close(optimizer.state[new_key.A]["exp_avg"], key_A_state)
    torch.testing.assert_close(optimizer.state[new_key.B]["exp_avg"], key_state["exp_avg"] / -0.5)
    torch.testing.assert_close(optimizer.state[new_key.B]["exp_avg_sq"], key_state["exp_avg_sq"] / 0.25)
    assert site_parameters(model, 1, "mlp_proj").B is old_proj.B  # unchanged module: same tensor, state rescaled
    torch.testing.assert_close(optimizer.state[old_proj.B]["exp_avg"], proj_state["exp_avg"] / 2.0)
    torch.testing.assert_close(optimizer.state[old_proj.B]["exp_avg_sq"], proj_state["exp_avg_sq"] / 4.0)
    assert held(optimizer).keys() == trainable(model).keys()


# ---- WeightLoRA+: exact rank growth, same budget ------------------------------------------------------------


def test_rank_extension_leaves_every_update_unchanged():
    config = tiny_config(vocab_size=VOCAB)
    model = random_gpt(config)
    sites = [(0, "query", 2), (0, "value", 2), (0, "mlp_proj", 2), (1, "projection", 3)]
    placement = Placement.from_sites(config, sites)
    apply_placement(model, placement)
    optimizer = adamw(model)
    for _ in range(3):  # B non-zero
        train_step(model, optimizer)
    adapters = {s.key: site_adapter(model, s.layer, s.kind) for s in placement.sites}
    old = {key: (a.A.clone(), a.B.clone()) for key, a in adapters.items()}
    before, before_logits = updates(model, placement), logits(model)

    grow_ranks(model, {(0, "query"): 4, (0, "mlp_proj"): 8}, torch.Generator().manual_seed(0))
    grown = current_placement(model)
    assert {s.key: s.rank for s in grown.sites} == {"0.query": 4, "0.value": 2, "0.mlp_proj": 8, "1.projection": 3}
    assert isinstance(site_module(model, 0, "query"), LoRAQKVMixedRankLinear)  # query grew, value did not
    after = updates(model, grown)
    for key in before:
        assert (after[key] - before[key]).abs().max() < 1e-6, key
    assert (logits(model) - before_logits).abs().max() < 1e-6
    for key, layer, kind in (("0.query", 0, "query"), ("0.mlp_proj", 0, "mlp_proj")):
        adapter, (A_old, _) = site_adapter(model, layer, kind), old[key]
        r = A_old.shape[0]
        assert torch.equal(adapter.A[:r], A_old)
        assert adapter.B[:, r:].count_nonzero() == 0  # new columns of B are zero
        new_rows = adapter.A[r:]
        assert (new_rows @ A_old.T).abs().max() < 1e-5  # orthogonal to the old row space
        gram = new_rows @ new_rows.T
        torch.testing.assert_close(gram, gram.diagonal().mean() * torch.eye(len(new_rows)), atol=1e-5, rtol=0)


MLP = ("mlp_fc_1", "mlp_fc_2", "mlp_proj")


@pytest.mark.parametrize(
    ("kinds", "k"),
    [(("query", "key", "value", "projection"), 8), (("query", "key", "value", "projection", *MLP), 8)],
    ids=["K=n=8", "K=8-of-14"],
)
def test_weightlora_plus_ends_with_the_budget_it_started_with(kinds, k):
    config = square_config()
    model = random_gpt(config)
    rank, warmup = 2, 7
    candidates = Placement.from_kinds(config, kinds, rank=rank)
    args = WeightLoRAArgs(k=k, warmup_steps=warmup, plus=True, rounds=2)
    controller = WeightLoRAController(model, candidates, args)
    # the stages share the 6 steps after the first, whose gate gradients are all zero
    assert controller.round_at == round_steps(warmup, 2) == [3, 5]
    optimizer = adamw(model)
    start_budget = k * site_params(config, "query", rank)  # the K adapters with non-zero gates, at rank r
    if k == len(candidates.sites):
        assert sum(p.numel() for p in trainable(model).values()) == start_budget

    for step in range(1, warmup + 2):
        loss_of(model).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in controller.round_at:  # isolate the round: the surviving updates w * s * B A must not change
            controller.gates.grad = None
            before = updates(model, controller.placement)
        held_before = set(held(optimizer))
        controller.on_optimizer_step(step, optimizer)
        if step in controller.round_at:
            after = updates(model, controller.placement)
            assert after and all((after[key] - before[key]).abs().max() < 1e-6 for key in after)
            new = set(held(optimizer)) - held_before
            assert new and not any(optimizer.state.get(p) for p in held(optimizer).values() if id(p) in new)
        assert held(optimizer).keys() == trainable(model).keys()
        if step == controller.round_at[-1]:
            ranks = {s.rank for s in controller.placement.sites}
            assert len(controller.placement.sites) == k // 4 and ranks == {4 * rank}
            assert controller.placement.trainable_params(config) == start_budget
    assert controller.finished and controller.placement.method == "weightlora+"
    assert sum(p.numel() for p in trainable(model).values()) == start_budget


# ---- the schedule and the optimizer surgery on their own ---------------------------------------------------


def test_schedule_says_which_step_does_what():
    schedule = WeightLoRASchedule(warmup_steps=7, rounds=2, k=8)
    assert [(e.name, e.step, e.k) for e in schedule.events()] == [("round 1", 3, 4), ("round 2", 5, 2), ("final", 7, 2)]
    assert schedule.rounds_due(2, rounds_done=0) == []
    # rounds that waited for the gates' first informative gradient all run at once, in order
    assert [e.name for e in schedule.rounds_due(6, rounds_done=0)] == ["round 1", "round 2"]
    assert [e.name for e in schedule.rounds_due(6, rounds_done=1)] == ["round 2"]
    assert not schedule.is_final(6) and schedule.is_final(7)
    assert [e.name for e in WeightLoRASchedule(warmup_steps=4, rounds=0, k=3).events()] == ["final"]


def stepped_adamw(groups: list[list[torch.nn.Parameter]], steps: int = 2) -> torch.optim.AdamW:
    """AdamW over ``groups`` (one param group each) after ``steps`` steps on random gradients: it has state."""
    optimizer = torch.optim.AdamW([{"params": group} for group in groups], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for p in (p for group in groups for p in group):
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return optimizer


def test_remap_optimizer_on_plain_tensors_frees_the_removed_and_carries_the_rows_of_the_replaced():
    """Adapters x and y share a fused A (rows 0:2 and 2:4) and a fused B (rows 0:2 and 2:6), as the parts of
    LitGPT's qkv do; x is removed, so y moves to tensors of its own. No model: the surgery is on tensors."""
    fused_A, fused_B, other = (torch.nn.Parameter(torch.randn(shape)) for shape in ((4, 3), (6, 2), (3, 3)))
    optimizer = stepped_adamw([[other, fused_A], [fused_B]])
    old_state = {p: {name: value.clone() for name, value in optimizer.state[p].items()} for p in (fused_A, fused_B)}
    before = {
        "x": SiteParameters(fused_A, slice(0, 2), fused_B, slice(0, 2), 1.0),
        "y": SiteParameters(fused_A, slice(2, 4), fused_B, slice(2, 6), 1.0),
    }
    new_A = torch.nn.Parameter(fused_A.detach()[2:4].clone())
    new_B = torch.nn.Parameter(fused_B.detach()[2:6].clone())
    remap_optimizer(optimizer, before, {"y": SiteParameters(new_A, slice(0, 2), new_B, slice(0, 4), 1.0)})

    # the new tensors take the old ones' places in their groups; the old ones and their state are gone
    groups = [[id(p) for p in group["params"]] for group in optimizer.param_groups]
    assert groups == [[id(other), id(new_A)], [id(new_B)]]
    assert {id(p) for p in optimizer.state} == {id(other), id(new_A), id(new_B)}
    for new, old, rows in ((new_A, fused_A, slice(2, 4)), (new_B, fused_B, slice(2, 6))):
        assert optimizer.state[new].keys() == old_state[old].keys()
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[new][name], old_state[old][name][rows]), name
        assert float(optimizer.state[new]["step"]) == float(old_state[old]["step"]) == 2.0
    for p in (other, new_A, new_B):
        p.grad = torch.ones_like(p)
    optimizer.step()  # and it trains on

    # a grown adapter (in ``reset``) starts with no state
    grown_A, grown_B = torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(4, 4))
    after = {"y": SiteParameters(grown_A, slice(0, 4), grown_B, slice(0, 4), 1.0)}
    remap_optimizer(optimizer, {"y": SiteParameters(new_A, slice(0, 2), new_B, slice(0, 4), 1.0)}, after, reset={"y"})
    groups = [[id(p) for p in group["params"]] for group in optimizer.param_groups]
    assert groups == [[id(other), id(grown_A)], [id(grown_B)]]
    assert {id(p) for p in optimizer.state} == {id(other)}


def test_rescale_state_rows_divides_exp_avg_by_w_and_exp_avg_sq_by_w_squared():
    param = torch.nn.Parameter(torch.zeros(4, 2))
    optimizer = stepped_adamw([[param]], steps=1)
    state = optimizer.state[param]
    state["exp_avg"].copy_(torch.arange(8.0).reshape(4, 2))
    state["exp_avg_sq"].copy_(torch.full((4, 2), 2.0))
    rescale_state_rows(optimizer, param, slice(1, 3), -0.5)  # after param[1:3] *= -0.5
    assert state["exp_avg"].tolist() == [[0, 1], [-4, -6], [-8, -10], [6, 7]]
    assert state["exp_avg_sq"].tolist() == [[2, 2], [8, 8], [8, 8], [2, 2]]
    rescale_state_rows(optimizer, param, slice(0, 1), 0.0)  # a zero gate: the rows' history is meaningless
    assert state["exp_avg"][0].tolist() == [0, 0] and state["exp_avg_sq"][0].tolist() == [0, 0]
    # an optimizer whose state it does not know (Adagrad's "sum") is reset rather than left wrong
    adagrad = torch.optim.Adagrad([param])
    param.grad = torch.ones_like(param)
    adagrad.step()
    rescale_state_rows(adagrad, param, slice(0, 1), 2.0)
    assert not adagrad.state[param]


# ---- export ------------------------------------------------------------------------------------------------


def merged_logits(model: torch.nn.Module, placement: Placement, checkpoint_dir: Path, out_dir: Path) -> torch.Tensor:
    """Save, merge with stock ``litgpt merge_lora``, reload the merged weights as a plain ``litgpt.model.GPT``."""
    save_adapter(model, placement, out_dir, checkpoint_dir=checkpoint_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        merge_lora(checkpoint_dir=out_dir)
    return logits(load_gpt(out_dir).eval())


def test_saved_adapters_merge_in_stock_litgpt_during_and_after_warmup(tmp_path):
    config = tiny_config(vocab_size=VOCAB)
    checkpoint_dir = write_checkpoint(tmp_path / "base", config, seed=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # placeholders: merge_lora only checks they exist
        (checkpoint_dir / name).write_text("{}")
    model = load_gpt(checkpoint_dir)
    sites = [(0, "query", 2), (0, "key", 4), (0, "value", 2), (0, "mlp_fc_2", 4), (1, "projection", 2)]
    sites += [(1, "mlp_proj", 4), (HEAD_LAYER, "head", 2)]
    candidates = Placement.from_sites(config, sites, method="plop")  # e.g. a PLoP placement, mixed ranks
    controller = WeightLoRAController(model, candidates, WeightLoRAArgs(k=4, warmup_steps=4, plus=True, rounds=1))
    optimizer = adamw(model)
    controller.attach(optimizer)
    train_step(model, optimizer)
    train_step(model, optimizer)  # the gates learn from step 2 on; the WeightLoRA+ round is at step 2 too

    # mid-warm-up: the export holds what the gated model computes, zero-gated adapters included (as zero updates)
    assert 0 < int((controller.gates != 0).sum()) < len(sites)
    during = merged_logits(model, controller.placement, checkpoint_dir, tmp_path / "step2")
    assert (during - logits(model)).abs().max() < 1e-5

    for _ in range(4):
        train_step(model, optimizer)
    assert controller.finished
    final = controller.placement
    assert len(final.sites) == 2 and {s.rank for s in final.sites} <= {4, 8}
    after = merged_logits(model, final, checkpoint_dir, tmp_path / "final")
    assert (after - logits(model)).abs().max() < 1e-5
    saved = json.loads((tmp_path / "final" / "placement.json").read_text())
    assert saved["method"] == "weightlora+" and len(saved["sites"]) == 2


# ---- Lightning ---------------------------------------------------------------------------------------------


def lit_module() -> LitLLM:
    """The tiny model, AdamW at 1e-2 decaying linearly to 0 over 100 steps."""
    return LitLLM(tiny_config(vocab_size=VOCAB), lr=1e-2, lr_decay_steps=100)


def loader(n: int = 32, seed: int = 0) -> DataLoader:
    starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    return DataLoader((starts + 3 * torch.arange(17)) % VOCAB, batch_size=2)


def test_trainer_fit_end_to_end_with_gradient_accumulation(tmp_path):
    callback = WeightLoRACallback(WeightLoRAArgs(k=3, warmup_steps=4), candidates="all", lora_r=2)
    module = lit_module()
    t = trainer(tmp_path, [callback], max_steps=7, accumulate_grad_batches=2, log_every_n_steps=1)  # metrics read below
    t.fit(module, train_dataloaders=loader())

    assert t.global_step == 7 and len(module.losses) == 14
    assert all(math.isfinite(loss) for loss in module.losses)
    controller = callback.controller
    assert controller.history_steps == [1, 2, 3, 4]  # one gate step per optimizer step, not per batch
    placement = callback.placement
    assert placement.method == "weightlora" and len(placement.sites) == 3
    assert current_placement(module.model).sites == placement.sites
    params = trainable(module)
    assert sum(p.numel() for p in params.values()) == placement.trainable_params(module.model.config)
    assert held(t.optimizers[0]).keys() == params.keys()
    assert {id(p) for p in t.optimizers[0].state} <= params.keys()
    log_dir = Path(t.log_dir)
    saved = json.loads((log_dir / "placement.json").read_text())
    assert saved["method"] == "weightlora" and len(saved["sites"]) == 3 and saved["scores"]["weightlora"]["final"]
    assert (log_dir / "gates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((log_dir / "gates.json").read_text())
    assert history["steps"] == [1, 2, 3, 4] and len(history["gates"][0]) == 14
    header = (log_dir / "metrics.csv").read_text().splitlines()[0]
    assert "weightlora/gate/0.query" in header and "weightlora/adapters" in header


def test_resume_mid_warmup_continues_as_an_uninterrupted_run(tmp_path):
    args = WeightLoRAArgs(k=4, warmup_steps=4)
    straight = lit_module()
    every_2 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    callbacks = [WeightLoRACallback(args, lora_r=2), every_2]
    trainer(tmp_path / "straight", callbacks, max_steps=6).fit(straight, loader(n=4))
    (mid_warmup,) = (tmp_path / "ckpt").glob("*step=2.ckpt")

    resumed_callback = WeightLoRACallback(args, lora_r=2)
    resumed = lit_module()
    t = trainer(tmp_path / "resumed", [resumed_callback], max_steps=6)
    t.fit(resumed, loader(n=4), ckpt_path=mid_warmup)  # 2 batches an epoch: the checkpoint is at an epoch's end

    assert resumed_callback.controller.finished
    assert resumed_callback.placement.sites == current_placement(straight.model).sites
    assert resumed_callback.controller.history_steps == [1, 2, 3, 4]
    torch.testing.assert_close(logits(resumed.model), logits(straight.model), atol=1e-5, rtol=0)


# ---- bad input ---------------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error(tmp_path):
    config = tiny_config(vocab_size=VOCAB)
    model = random_gpt(config)
    qv = preset_placement("qv", config, rank=2)  # 4 candidates
    with pytest.raises(ValueError, match=r"K=5 is larger than the number of candidate adapters \(4\)"):
        WeightLoRAController(model, qv, WeightLoRAArgs(k=5, warmup_steps=2))
    assert not any("lora_" in name for name, _ in model.named_parameters())  # refused before touching the model
    with pytest.raises(ValueError, match="must keep at least 1 adapter, got K=0"):
        WeightLoRAArgs(k=0)
    with pytest.raises(ValueError, match=r"fraction of the candidates must be in \(0, 1\], got 0.0"):
        WeightLoRAArgs(k=0.0)
    with pytest.raises(ValueError, match=r"warm-up \(10 steps\) is longer than the run \(5 optimizer steps\)"):
        WeightLoRAController(model, qv, WeightLoRAArgs(k=2, warmup_steps=10), max_steps=5)
    empty = Placement(sites=[], method="plop")
    with pytest.raises(ValueError, match="candidate placement 'plop' has no sites"):
        WeightLoRAController(model, empty, WeightLoRAArgs(k=1, warmup_steps=2))
    with pytest.raises(ValueError, match="halves K=2 2 times, which leaves no adapter"):
        WeightLoRAController(model, qv, WeightLoRAArgs(k=2, warmup_steps=4, plus=True))
    with pytest.raises(ValueError, match="warmup_steps` must be at least 2 .* every lora_B is still 0"):
        WeightLoRAArgs(k=2, warmup_steps=1)
    with pytest.raises(ValueError, match="too short for 2 WeightLoRA\\+ rounds: it needs at least 4"):
        WeightLoRAController(model, qv, WeightLoRAArgs(k=4, warmup_steps=3, plus=True))
    # the callback knows the run's length from the Trainer
    callback = WeightLoRACallback(WeightLoRAArgs(k=2, warmup_steps=10), candidates="qv", lora_r=2)
    with pytest.raises(ValueError, match=r"warm-up \(10 steps\) is longer than the run \(3 optimizer steps\)"):
        trainer(tmp_path, [callback], max_steps=3).fit(lit_module(), loader())

"""``WeightLoRAController``: runs WeightLoRA / WeightLoRA+ on a LitGPT model, independent of the training loop.

What it does and when: the ``litgpt_plop.weightlora`` docstring and docs/methods.md, section 3. It puts the gated
candidates on the model, steps and thresholds the gates after each optimizer step, and restructures the adapters
when the schedule (``WeightLoRASchedule``) says so. It writes no files: ``report_files`` returns their bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from litgpt import Config
from torch.utils.hooks import RemovableHandle

from litgpt_plop.model.adapt import apply_placement, unit_parameters
from litgpt_plop.distributed import all_reduce_sum, distributed
from litgpt_plop.model.modules import gpt_of
from litgpt_plop.selection.placement import Placement, PlacementError, Site, site_params, site_shape
from litgpt_plop.weightlora.args import WeightLoRAArgs, resolve_k
from litgpt_plop.weightlora.cut import checked_budget, cut_record, keep_mask
from litgpt_plop.weightlora.gates import attach_gates, detach_gates, fold_gates, gates_moved, step_gates
from litgpt_plop.weightlora.growth import reshape_adapters
from litgpt_plop.weightlora.record import GATES_FILE, GATES_PLOT, ControllerRecord
from litgpt_plop.weightlora.schedule import ScheduledEvent, WeightLoRASchedule

__all__ = ["GATES_FILE", "GATES_PLOT", "WeightLoRAController"]


class WeightLoRAController(ControllerRecord):
    """Runs WeightLoRA / WeightLoRA+ on a LitGPT model, independent of the training loop.

    Construction puts the gated candidate adapters on the model (``apply_placement``, then gates): build it before
    the main optimizer, which must hold the model's trainable parameters (the gates are not among them). Then, after
    every main optimizer step, call ``on_optimizer_step(step, optimizer)``, or once ``attach(optimizer)``. What it
    records (gates, state, report files) comes from ``ControllerRecord``.

    Args:
        model: a module holding a LitGPT ``GPT`` (the GPT itself, a LightningModule, Fabric's wrapper).
        candidates: the adapters to choose from (e.g. ``preset("all", config)`` or PLoP's placement), with ranks.
        args: K or a parameter budget, warm-up, gate optimizer, WeightLoRA+ rounds.
        max_steps: the run's length in optimizer steps, when known: a warm-up longer than that is refused.
        seed: seed of the random directions added to A when a rank grows.
    """

    def __init__(
        self,
        model: nn.Module,
        candidates: Placement,
        args: WeightLoRAArgs,
        max_steps: int | None = None,
        seed: int = 0,
        _state: dict[str, Any] | None = None,
    ) -> None:
        self.gpt = gpt_of(model)
        self.args = args
        self.schedule = _checked_schedule(candidates, args, self.gpt.config, max_steps)
        self.budget = checked_budget(candidates, args, self.gpt.config)  # parameters, None: keep K adapters
        self.k, self.rounds, self.round_at = self.schedule.k, self.schedule.rounds, self.schedule.round_steps
        self.candidates = candidates
        self.sites: list[Site] = list(candidates.sites)  # gate i belongs to sites[i]
        self.index = {(s.layer, s.kind): i for i, s in enumerate(self.sites)}
        n = len(self.sites)
        self.generator = torch.Generator().manual_seed(seed)

        self.step = 0  # optimizer steps seen
        self.rounds_done = 0
        self.finished = False
        self.gates_informed = False  # whether the gates have moved (thresholding waits for it)
        self.first_moved_step: int | None = None
        self.moved_since_change = False  # since the last change of the adapters (a round, the end wait for it)
        self.settled = torch.ones(n)  # the gates when the last step was done, to see whether they moved
        self.k_now = self.k
        self.alive = [True] * n
        self.ranks = {(s.layer, s.kind): s.rank for s in self.sites}
        self.gates = nn.Parameter(torch.ones(n, device=self.gpt.transformer.wte.weight.device))
        self.gate_optimizer: torch.optim.Optimizer | None = torch.optim.SGD([self.gates], lr=args.gate_lr)
        self.history_steps: list[int] = []
        self.history: list[list[float]] = []  # gate values after each step's thresholding
        self.events: list[dict[str, Any]] = []
        self.cuts: list[dict[str, Any]] = []  # what each round and the end kept, from which gates (``cut_record``)
        if _state is None:
            apply_placement(self.gpt, self._placement_of(candidates.method))
            attach_gates(self.gpt, self._alive_index(), self.gates)
        else:
            self._restore(_state)

    # ---- what it holds -------------------------------------------------------------------------------------

    @property
    def num_candidates(self) -> int:
        return len(self.sites)

    @property
    def placement(self) -> Placement:
        """The adapters on the model now (the final placement once ``finished``), with method
        ``weightlora``/``weightlora+``; ``scores`` records K or the budget, the schedule, the gates and the cuts."""
        return self._placement_of(self.args.method)

    @property
    def costs(self) -> list[int]:
        """Every candidate's trainable parameters at its current rank."""
        return [site_params(self.gpt.config, s.kind, self.ranks[(s.layer, s.kind)]) for s in self.sites]

    def to(self, device: torch.device | str) -> "WeightLoRAController":
        """Move the gates next to the model (same parameter object, so the gate optimizer keeps working)."""
        self.gates.data = self.gates.data.to(device)
        if self.gates.grad is not None:
            self.gates.grad = self.gates.grad.to(device)
        return self

    # ---- the training-loop hook ----------------------------------------------------------------------------

    def on_optimizer_step(
        self, step: int, optimizer: torch.optim.Optimizer | None = None, grad_scale: float = 1.0
    ) -> list[str]:
        """Call after main optimizer step number ``step`` (counted from 1), with that optimizer, whose gradients the
        gates share. Steps the gates, thresholds them, and runs the WeightLoRA+ rounds and the end of the warm-up
        when ``step`` reaches them and the gates have moved since the previous change (editing ``optimizer`` in
        place). ``grad_scale``: the loss scale the gradients were computed with (fp16 mixed precision), to undo on
        the gates. Returns what happened (``"round 1"``, ``"final"``), for the caller to log or save."""
        self.step = step
        if self.finished:
            return []
        self._average_gate_gradient()
        step_gates(self.gates, self.gate_optimizer, self.args.gate_clip, grad_scale)
        if gates_moved(self.gates, self.settled, self.alive):
            self.first_moved_step = self.first_moved_step or step
            self.gates_informed = self.moved_since_change = True
        decided_on = self.gates.detach().cpu().tolist()  # what this step's choices are made from
        happened = []
        if self.gates_informed:  # tied gates would keep the first K candidates in order: wait for them to move
            self._threshold()
            for event in self.schedule.rounds_due(step, self.rounds_done):
                if not self.moved_since_change:
                    break  # each round chooses among gates that moved since the previous one
                self._round(optimizer, event, decided_on)
                happened.append(event.name)
        if self.schedule.is_final(step) and self.rounds_done == self.rounds and self.moved_since_change:
            self._finish(optimizer, decided_on)
            happened.append("final")
        self.settled = self.gates.detach().cpu().clone()
        self.history_steps.append(step)
        self.history.append(self.settled.tolist())
        for what in happened:
            self.events.append({"step": step, "event": what, "adapters": sum(self.alive), "k": self.k_now})
        return happened

    def attach(
        self, optimizer: torch.optim.Optimizer, on_change: Callable[[list[str]], None] | None = None
    ) -> RemovableHandle:
        """Call ``on_optimizer_step`` after every ``optimizer.step()`` (a torch step post-hook), counting steps from
        ``self.step``: for loops one cannot add a call to, such as ``litgpt.finetune.lora.fit``. Accepts Fabric's
        optimizer wrapper. ``on_change(events)`` runs after a step that changed the adapters (a WeightLoRA+ round,
        the end of the warm-up), e.g. to give a checkpoint saver the new ``placement``. Remove with the returned
        handle's ``remove()``."""
        raw = getattr(optimizer, "optimizer", optimizer)  # Fabric's _FabricOptimizer wraps the torch optimizer

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            events = self.on_optimizer_step(self.step + 1, opt)
            if events and on_change is not None:
                on_change(events)

        return raw.register_step_post_hook(hook)

    # ---- the steps -----------------------------------------------------------------------------------------

    def _average_gate_gradient(self) -> None:
        """Under data parallelism each rank's gates saw only its share of the batch, and the gates are no parameter
        of the model, so DDP does not average their gradient: average it here, as DDP does the adapters'. Every rank
        then steps the same gates and cuts the same adapters (a reduced tensor is bit-identical on every rank)."""
        if distributed() and self.gates.grad is not None:
            self.gates.grad = all_reduce_sum(self.gates.grad) / dist.get_world_size()

    def _threshold(self) -> torch.Tensor:
        """Keep the ``k_now`` alive gates of largest |w| (with a budget: the largest that fit it), zero the rest.
        Returns the (CPU) mask of the kept ones."""
        keep = keep_mask(self.gates, self.alive, self.k_now, self.costs, self.budget)
        with torch.no_grad():
            self.gates[~keep.to(self.gates.device)] = 0.0
        if self.budget is not None:
            self.k_now = int(keep.sum())
        return keep

    def _round(self, optimizer: torch.optim.Optimizer | None, event: ScheduledEvent, decided_on: list[float]) -> None:
        """WeightLoRA+: halve K, remove the adapters outside the new top K, double the survivors' rank."""
        self.rounds_done += 1
        self.k_now = event.k
        alive, keep = list(self.alive), self._threshold()
        grow = [(s.layer, s.kind) for s, kept in zip(self.sites, keep.tolist()) if kept]  # candidate order
        self._restructure(optimizer, keep, grow=grow, fold=False)
        self._record(event, decided_on, alive, keep)

    def _finish(self, optimizer: torch.optim.Optimizer | None, decided_on: list[float]) -> None:
        """End of warm-up: remove the zero-gated adapters, fold the gates into B, drop the gates."""
        alive, keep = list(self.alive), self._threshold()
        self._restructure(optimizer, keep, grow=[], fold=True)
        self._record(self.schedule.events()[-1], decided_on, alive, keep)
        self.finished = True
        self.gate_optimizer = None
        self.gates.grad = None

    def _record(self, event: ScheduledEvent, decided_on: list[float], alive: list[bool], keep: torch.Tensor) -> None:
        """Keep what a cut chose, from which gates (``cut_record``); the next cut waits for the gates to move."""
        keys = [s.key for s in self.sites]
        record = cut_record(event.name, self.step, event.step, keys, decided_on, alive, keep.tolist(), self.costs)
        self.cuts.append(record)
        self.moved_since_change = False

    def _restructure(
        self, optimizer: torch.optim.Optimizer | None, keep: torch.Tensor, grow: list[tuple[int, str]], fold: bool
    ) -> None:
        """Remove the adapters outside ``keep``, double the rank of those in ``grow`` and, with ``fold``, fold the
        gates into B; then hand the new tensors to ``optimizer`` and, unless folded, gate them again."""
        gpt = self.gpt
        before = unit_parameters(gpt, self._alive_index())  # per expert too, in a mixture of experts
        detach_gates(gpt)  # the stored B tensors again (same objects), so the layout code sees raw values
        if fold:  # the kept adapters' gates go into their B
            gates = self.gates.detach().cpu()
            weights = {key: float(gates[i]) for key, i in self._alive_index().items() if keep[i]}
            fold_gates(before, weights, optimizer)
        for i in range(len(self.sites)):
            self.alive[i] = self.alive[i] and bool(keep[i])
        for key in grow:
            self.ranks[key] *= 2
        # the generator draws the new directions in candidate order, the same in every process
        new_ranks = {key: self.ranks[key] for key in grow}
        placement = self._placement_of(self.args.method, with_scores=False)
        reshape_adapters(gpt, placement, before, new_ranks, self.generator, optimizer)
        if not fold:
            attach_gates(gpt, self._alive_index(), self.gates)
        del before  # the last references to the removed tensors here

    # ---- placement, state ----------------------------------------------------------------------------------

    def _alive_index(self) -> dict[tuple[int, str], int]:
        return {(s.layer, s.kind): i for i, s in enumerate(self.sites) if self.alive[i]}

    def _placement_of(self, method: str, with_scores: bool = True) -> Placement:
        c = self.candidates
        sites = [Site(s.layer, s.kind, self.ranks[(s.layer, s.kind)]) for s, a in zip(self.sites, self.alive) if a]
        scores = c.scores
        if with_scores:
            scores = dataclasses.replace(c.scores, weightlora=self.scores_record())
        # LoRA alpha and dropout, the model and the calibration are the candidates'
        return dataclasses.replace(c, sites=sites, method=method, scores=scores)

    @classmethod
    def from_state_dict(
        cls, model: nn.Module, state: dict[str, Any], max_steps: int | None = None, seed: int = 0
    ) -> "WeightLoRAController":
        """Resume: put the saved adapter structure (and gates, if still warming up) on ``model``, so that a checkpoint
        of the run's model and optimizer loads into it."""
        candidates = Placement.from_dict(state["candidates"])
        return cls(model, candidates, WeightLoRAArgs(**state["args"]), max_steps, seed, _state=state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the values of ``state`` (``state_dict``) into a controller whose model already has its structure."""
        saved = Placement.from_dict(state["placement"])
        if saved.sites != self.placement.sites or bool(state["finished"]) != self.finished:
            raise PlacementError(
                f"The saved WeightLoRA state has adapters {[f'{s.key}@{s.rank}' for s in saved.sites]}, but the model"
                f" has {[f'{s.key}@{s.rank}' for s in self.placement.sites]}"
            )
        self._load_values(state)

    def _restore(self, state: dict[str, Any]) -> None:
        self.alive = [bool(a) for a in state["alive"]]
        saved = Placement.from_dict(state["placement"])
        for site in saved.sites:
            self.ranks[(site.layer, site.kind)] = site.rank
        self.finished = bool(state["finished"])
        apply_placement(self.gpt, self._placement_of(self.args.method, with_scores=False))
        self._load_values(state)
        if self.finished:
            self.gate_optimizer = None
        else:
            attach_gates(self.gpt, self._alive_index(), self.gates)


def _checked_schedule(
    candidates: Placement, args: WeightLoRAArgs, config: Config, max_steps: int | None
) -> WeightLoRASchedule:
    """The run's schedule, once the candidates, K, the warm-up and the WeightLoRA+ growth are known to fit."""
    if not candidates.sites:
        raise PlacementError(
            f"WeightLoRA chooses among candidate adapters, but the candidate placement {candidates.method!r} has"
            " no sites"
        )
    candidates.validate(config)
    # with a budget the count varies: the schedule's K is then every candidate
    k = len(candidates.sites) if args.budget is not None else resolve_k(args.k, len(candidates.sites))
    schedule = WeightLoRASchedule(args.warmup_steps, args.rounds if args.plus else 0, k)
    if max_steps is not None and schedule.warmup_steps > max_steps:
        raise ValueError(
            f"The WeightLoRA warm-up ({schedule.warmup_steps} steps) is longer than the run ({max_steps} optimizer"
            " steps): the placement would never be final"
        )
    for site in candidates.sites:
        final_rank, d_in = site.rank << schedule.rounds, site_shape(config, site.kind)[1]
        if final_rank > d_in:
            raise ValueError(
                f"WeightLoRA+ would grow site {site.key} to rank {final_rank}, more than its {d_in} inputs"
            )
    return schedule

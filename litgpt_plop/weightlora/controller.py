"""``WeightLoRAController``: runs WeightLoRA / WeightLoRA+ on a LitGPT model, independent of the training loop.

What it does and when: the ``litgpt_plop.weightlora`` docstring and docs/methods.md, section 3. It puts the gated
candidates on the model, steps and thresholds the gates after each optimizer step, and restructures the adapters
when the schedule (``WeightLoRASchedule``) says so. It writes no files: ``report_files`` returns their bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn as nn
from litgpt import Config
from torch.utils.hooks import RemovableHandle

from litgpt_plop.adapt import apply_placement, site_parameters
from litgpt_plop.modules import gpt_of
from litgpt_plop.placement import Placement, PlacementError, Site, site_shape
from litgpt_plop.report import gates_json, gates_png
from litgpt_plop.weightlora.args import WeightLoRAArgs, resolve_k
from litgpt_plop.weightlora.gates import attach_gates, detach_gates, fold_gates, step_gates, top_k_mask
from litgpt_plop.weightlora.growth import reshape_adapters
from litgpt_plop.weightlora.schedule import ScheduledEvent, WeightLoRASchedule

GATES_FILE = "gates.json"
GATES_PLOT = "gates.png"


class WeightLoRAController:
    """Runs WeightLoRA / WeightLoRA+ on a LitGPT model, independent of the training loop.

    Construction puts the gated candidate adapters on the model (``apply_placement``, then gates): build it before
    the main optimizer, which must hold the model's trainable parameters (the gates are not among them). Then, after
    every main optimizer step, call ``on_optimizer_step(step, optimizer)``, or once ``attach(optimizer)``.

    Args:
        model: a module holding a LitGPT ``GPT`` (the GPT itself, a LightningModule, Fabric's wrapper).
        candidates: the adapters to choose from (e.g. ``preset("all", config)`` or PLoP's placement), with ranks.
        args: K, warm-up, gate optimizer, WeightLoRA+ rounds.
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
        self.k, self.rounds, self.round_at = self.schedule.k, self.schedule.rounds, self.schedule.round_steps
        self.candidates = candidates
        self.sites: list[Site] = list(candidates.sites)  # gate i belongs to sites[i]
        self.index = {(s.layer, s.kind): i for i, s in enumerate(self.sites)}
        n = len(self.sites)
        self.generator = torch.Generator().manual_seed(seed)

        self.step = 0  # optimizer steps seen
        self.rounds_done = 0
        self.finished = False
        self.gates_informed = False  # whether the gates have had a non-zero gradient (thresholding waits for it)
        self.k_now = self.k
        self.alive = [True] * n
        self.ranks = {(s.layer, s.kind): s.rank for s in self.sites}
        self.gates = nn.Parameter(torch.ones(n, device=self.gpt.transformer.wte.weight.device))
        self.gate_optimizer: torch.optim.Optimizer | None = torch.optim.SGD([self.gates], lr=args.gate_lr)
        self.history_steps: list[int] = []
        self.history: list[list[float]] = []  # gate values after each step's thresholding
        self.events: list[dict[str, Any]] = []
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
        ``weightlora``/``weightlora+``; ``scores`` records K, the schedule and the gates."""
        return self._placement_of(self.args.method)

    def gate_values(self) -> dict[str, float]:
        """The current gate of every candidate (0 for removed ones), keyed ``"<layer>.<kind>"``."""
        return {s.key: float(w) for s, w in zip(self.sites, self.gates.detach().cpu().tolist())}

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
        when ``step`` reaches them (editing ``optimizer`` in place). ``grad_scale``: the loss scale the gradients
        were computed with (fp16 mixed precision), to undo on the gates. Returns what happened (``"round 1"``,
        ``"final"``), so that the caller can log it or save the new placement.
        """
        self.step = step
        if self.finished:
            return []
        informative = step_gates(self.gates, self.gate_optimizer, self.args.gate_clip, grad_scale)
        self.gates_informed = informative or self.gates_informed
        happened = []
        if self.gates_informed:  # tied gates would keep the first K candidates in order: wait for a gradient
            self._threshold(self.k_now)
            for event in self.schedule.rounds_due(step, self.rounds_done):
                self._round(optimizer, event)
                happened.append(event.name)
        self.history_steps.append(step)
        self.history.append(self.gates.detach().cpu().tolist())
        if self.schedule.is_final(step):
            self._finish(optimizer)
            happened.append("final")
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

    def _threshold(self, k: int) -> torch.Tensor:
        """Keep the k alive gates of largest |w|, zero the rest. Returns the (CPU) mask of the kept ones."""
        keep = top_k_mask(self.gates, self.alive, k)
        with torch.no_grad():
            self.gates[~keep.to(self.gates.device)] = 0.0
        return keep

    def _round(self, optimizer: torch.optim.Optimizer | None, event: ScheduledEvent) -> None:
        """WeightLoRA+: halve K, remove the adapters outside the new top K, double the survivors' rank."""
        self.rounds_done += 1
        self.k_now = event.k
        keep = self._threshold(self.k_now)
        grow = [(s.layer, s.kind) for s, kept in zip(self.sites, keep.tolist()) if kept]  # candidate order
        self._restructure(optimizer, keep, grow=grow, fold=False)

    def _finish(self, optimizer: torch.optim.Optimizer | None) -> None:
        """End of warm-up: remove the zero-gated adapters, fold the gates into B, drop the gates."""
        keep = self._threshold(self.k_now)
        self._restructure(optimizer, keep, grow=[], fold=True)
        self.finished = True
        self.gate_optimizer = None
        self.gates.grad = None

    def _restructure(
        self, optimizer: torch.optim.Optimizer | None, keep: torch.Tensor, grow: list[tuple[int, str]], fold: bool
    ) -> None:
        """Remove the adapters outside ``keep``, double the rank of those in ``grow`` and, with ``fold``, fold the
        gates into B; then hand the new tensors to ``optimizer`` and, unless folded, gate them again."""
        gpt = self.gpt
        before = {key: site_parameters(gpt, *key) for key in self._alive_index()}
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
            scores = dataclasses.replace(c.scores, weightlora={
                "k": self.k,
                "k_now": self.k_now,
                "num_candidates": len(self.sites),
                "final": self.finished,
                "step": self.step,
                "warmup_steps": self.args.warmup_steps,
                "round_steps": self.round_at,
                "candidates": {"method": c.method, "sites": [[s.layer, s.kind, s.rank] for s in c.sites]},
                "gates": self.gate_values(),
                "events": list(self.events),
            })
        # LoRA alpha and dropout, the model and the calibration are the candidates'
        return dataclasses.replace(c, sites=sites, method=method, scores=scores)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the candidates and options, where the schedule is, which adapters are left with
        which rank, the gates (while warming up) and their history. The adapter weights are the model's."""
        return {
            "args": dataclasses.asdict(self.args),
            "candidates": self.candidates.to_dict(),
            "placement": self.placement.to_dict(),
            "step": self.step,
            "rounds_done": self.rounds_done,
            "finished": self.finished,
            "gates_informed": self.gates_informed,
            "k_now": self.k_now,
            "alive": list(self.alive),
            "gates": self.gates.detach().cpu().tolist(),
            "history_steps": list(self.history_steps),
            "history": [list(v) for v in self.history],
            "events": list(self.events),
        }

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

    def _load_values(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.rounds_done = int(state["rounds_done"])
        self.gates_informed = bool(state.get("gates_informed", True))  # states saved before the rule: thresholded
        self.k_now = int(state["k_now"])
        self.history_steps = [int(s) for s in state["history_steps"]]
        self.history = [list(v) for v in state["history"]]
        self.events = list(state["events"])
        with torch.no_grad():
            self.gates.copy_(torch.tensor(state["gates"], dtype=self.gates.dtype))

    # ---- outputs -------------------------------------------------------------------------------------------

    def report_files(self) -> dict[str, bytes]:
        """``gates.json`` (every gate at every warm-up step) and ``gates.png`` (their plot), as bytes to write; the
        placement itself is ``placement``."""
        keys = [s.key for s in self.sites]
        kept = {s.key: self.ranks[(s.layer, s.kind)] for s, alive in zip(self.sites, self.alive) if alive}
        text = gates_json(self.args.method, keys, self.history_steps, self.history, self.events, list(kept))
        png = gates_png(
            self.args.method, keys, self.history_steps, self.history, kept, self.round_at[: self.rounds_done],
            self.args.warmup_steps, self.step, self.finished,
        )  # fmt: skip
        return {GATES_FILE: text.encode("utf-8"), GATES_PLOT: png}


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
    k = resolve_k(args.k, len(candidates.sites))
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

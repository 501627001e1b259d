"""What a ``WeightLoRAController`` records: its entry in ``scores.weightlora`` (``scores_record``), its resumable
state (``state_dict``, ``_load_values``), the gate files beside the report (``report_files``) and the warning of a
run that made no final cut (``not_final_warning``).

``ControllerRecord`` is mixed into the controller and reads its attributes, so that the controller's own class holds
only the algorithm and this module needs nothing of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from litgpt_plop.reports.gates import gates_json, gates_png

GATES_FILE = "gates.json"
GATES_PLOT = "gates.png"


class ControllerRecord:
    """The records of a ``WeightLoRAController`` (mixed into it): every method reads the controller's attributes."""

    def gate_values(self) -> dict[str, float]:
        """The current gate of every candidate (0 for removed ones), keyed ``"<layer>.<kind>"``."""
        return {s.key: float(w) for s, w in zip(self.sites, self.gates.detach().cpu().tolist())}

    def scores_record(self) -> dict[str, Any]:
        """``scores.weightlora``: K or the budget, the schedule, where the gates first moved, every gate now, the events
        and the cuts (``litgpt_plop.weightlora.cut.cut_record``), which the report states."""
        return {
            "k": None if self.budget is not None else self.k,
            "k_now": self.k_now,
            "budget": self.args.budget,
            "budget_params": self.budget,
            "num_candidates": len(self.sites),
            "final": self.finished,
            "step": self.step,
            "warmup_steps": self.args.warmup_steps,
            "round_steps": self.round_at,
            "first_moved_step": self.first_moved_step,
            "candidates": {"method": self.candidates.method, "sites": [[s.layer, s.kind, s.rank] for s in self.candidates.sites]},
            "gates": self.gate_values(),
            "events": list(self.events),
            "cuts": list(self.cuts),
        }


    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the candidates and options, where the schedule is, which adapters are left with
        which rank, the gates (while warming up), whether they moved, and their history. The adapter weights are the
        model's."""
        return {
            "args": dataclasses.asdict(self.args),
            "candidates": self.candidates.to_dict(),
            "placement": self.placement.to_dict(),
            "step": self.step,
            "rounds_done": self.rounds_done,
            "finished": self.finished,
            "gates_informed": self.gates_informed,
            "first_moved_step": self.first_moved_step,
            "moved_since_change": self.moved_since_change,
            "k_now": self.k_now,
            "alive": list(self.alive),
            "gates": self.gates.detach().cpu().tolist(),
            "history_steps": list(self.history_steps),
            "history": [list(v) for v in self.history],
            "events": list(self.events),
            "cuts": list(self.cuts),
        }


    def _load_values(self, state: dict[str, Any]) -> None:
        """Take the values of ``state`` (``state_dict``) into ``c``, whose model already has their structure."""
        self.step = int(state["step"])
        self.rounds_done = int(state["rounds_done"])
        self.gates_informed = bool(state.get("gates_informed", True))  # states saved before the rule: thresholded
        self.first_moved_step = state.get("first_moved_step")
        # states saved before the cut waited for moved gates: they had moved if they had been informed
        self.moved_since_change = bool(state.get("moved_since_change", self.gates_informed))
        self.cuts = list(state.get("cuts", []))
        self.k_now = int(state["k_now"])
        self.history_steps = [int(s) for s in state["history_steps"]]
        self.history = [list(v) for v in state["history"]]
        self.events = list(state["events"])
        with torch.no_grad():
            self.gates.copy_(torch.tensor(state["gates"], dtype=self.gates.dtype))
        self.settled = self.gates.detach().cpu().clone()


    def report_files(self) -> dict[str, bytes]:
        """``gates.json`` (every gate at every warm-up step, the events and the cuts) and ``gates.png`` (their plot, the
        rounds and the end drawn where they happened: later than scheduled if they waited for the gates to move)."""
        keys = [s.key for s in self.sites]
        kept = {s.key: self.ranks[(s.layer, s.kind)] for s, alive in zip(self.sites, self.alive) if alive}
        text = gates_json(self.args.method, keys, self.history_steps, self.history, self.events, list(kept), self.cuts)
        cut_steps = {cut["event"]: cut["step"] for cut in self.cuts}
        png = gates_png(
            self.args.method, keys, self.history_steps, self.history, kept, [s for e, s in cut_steps.items() if e != "final"],
            self.args.warmup_steps, self.step, self.finished, cut_steps.get("final"),
        )  # fmt: skip
        return {GATES_FILE: text.encode("utf-8"), GATES_PLOT: png}

    def not_final_warning(self) -> str | None:
        """At the end of a run: why no final cut was made (for a warning), or None when the placement is final.

        A cut waits for the gates to move, so a gate learning rate too small for the loss (or a run that stops
        right after the warm-up) ends with every remaining candidate trained, which is not what was asked for."""
        if self.finished:
            return None
        why = (
            "its gates never moved"
            if self.first_moved_step is None
            else "its gates did not move again after the last WeightLoRA+ round"
        )
        return (
            f"WeightLoRA made no final cut by step {self.step} (warm-up: {self.args.warmup_steps} steps): {why}, and"
            f" a cut waits for them. All {sum(self.alive)} remaining candidate adapters were trained and saved, not"
            f" K. Raise the gate learning rate (gate_lr, now {self.args.gate_lr}) or train for more steps"
        )

"""What a ``WeightLoRAController`` records: its entry in ``scores.weightlora`` (``scores_record``), its resumable
state (``controller_state``, ``load_values``) and the gate files beside the report (``report_files``).

Plain functions over the controller's attributes, kept apart so that the controller holds only the algorithm.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from litgpt_plop.report_gates import gates_json, gates_png

if TYPE_CHECKING:  # the controller builds on this module
    from litgpt_plop.weightlora.controller import WeightLoRAController

GATES_FILE = "gates.json"
GATES_PLOT = "gates.png"


def scores_record(c: WeightLoRAController) -> dict[str, Any]:
    """``scores.weightlora``: K or the budget, the schedule, where the gates first moved, every gate now, the events
    and the cuts (``litgpt_plop.weightlora.cut.cut_record``), which the report states."""
    return {
        "k": None if c.budget is not None else c.k,
        "k_now": c.k_now,
        "budget": c.args.budget,
        "budget_params": c.budget,
        "num_candidates": len(c.sites),
        "final": c.finished,
        "step": c.step,
        "warmup_steps": c.args.warmup_steps,
        "round_steps": c.round_at,
        "first_moved_step": c.first_moved_step,
        "candidates": {"method": c.candidates.method, "sites": [[s.layer, s.kind, s.rank] for s in c.candidates.sites]},
        "gates": c.gate_values(),
        "events": list(c.events),
        "cuts": list(c.cuts),
    }


def controller_state(c: WeightLoRAController) -> dict[str, Any]:
    """What a resumed run needs: the candidates and options, where the schedule is, which adapters are left with
    which rank, the gates (while warming up), whether they moved, and their history. The adapter weights are the
    model's."""
    return {
        "args": dataclasses.asdict(c.args),
        "candidates": c.candidates.to_dict(),
        "placement": c.placement.to_dict(),
        "step": c.step,
        "rounds_done": c.rounds_done,
        "finished": c.finished,
        "gates_informed": c.gates_informed,
        "first_moved_step": c.first_moved_step,
        "moved_since_change": c.moved_since_change,
        "k_now": c.k_now,
        "alive": list(c.alive),
        "gates": c.gates.detach().cpu().tolist(),
        "history_steps": list(c.history_steps),
        "history": [list(v) for v in c.history],
        "events": list(c.events),
        "cuts": list(c.cuts),
    }


def load_values(c: WeightLoRAController, state: dict[str, Any]) -> None:
    """Take the values of ``state`` (``controller_state``) into ``c``, whose model already has their structure."""
    c.step = int(state["step"])
    c.rounds_done = int(state["rounds_done"])
    c.gates_informed = bool(state.get("gates_informed", True))  # states saved before the rule: thresholded
    c.first_moved_step = state.get("first_moved_step")
    # states saved before the cut waited for moved gates: they had moved if they had been informed
    c.moved_since_change = bool(state.get("moved_since_change", c.gates_informed))
    c.cuts = list(state.get("cuts", []))
    c.k_now = int(state["k_now"])
    c.history_steps = [int(s) for s in state["history_steps"]]
    c.history = [list(v) for v in state["history"]]
    c.events = list(state["events"])
    with torch.no_grad():
        c.gates.copy_(torch.tensor(state["gates"], dtype=c.gates.dtype))
    c.settled = c.gates.detach().cpu().clone()


def report_files(c: WeightLoRAController) -> dict[str, bytes]:
    """``gates.json`` (every gate at every warm-up step, the events and the cuts) and ``gates.png`` (their plot, the
    rounds and the end drawn where they happened: later than scheduled if they waited for the gates to move)."""
    keys = [s.key for s in c.sites]
    kept = {s.key: c.ranks[(s.layer, s.kind)] for s, alive in zip(c.sites, c.alive) if alive}
    text = gates_json(c.args.method, keys, c.history_steps, c.history, c.events, list(kept), c.cuts)
    cut_steps = {cut["event"]: cut["step"] for cut in c.cuts}
    png = gates_png(
        c.args.method, keys, c.history_steps, c.history, kept, [s for e, s in cut_steps.items() if e != "final"],
        c.args.warmup_steps, c.step, c.finished, cut_steps.get("final"),
    )  # fmt: skip
    return {GATES_FILE: text.encode("utf-8"), GATES_PLOT: png}

"""WeightLoRA's gates for people: ``gates.json`` (every gate after every optimizer step) and ``gates.png``."""

from __future__ import annotations

import io
import json
from typing import Any


def gates_json(
    method: str,
    sites: list[str],
    steps: list[int],
    gates: list[list[float]],
    events: list[dict[str, Any]],
    kept: list[str],
    cuts: list[dict[str, Any]] | None = None,
) -> str:
    """``gates.json``: every candidate's gate (``gates[i][j]``: site ``sites[j]`` after optimizer step ``steps[i]``),
    the WeightLoRA+ rounds and the end of the warm-up (``events``), the sites ``kept``, and what each cut kept from
    which gates (``cuts``, ``litgpt_plop.weightlora.cut.cut_record``)."""
    history = {"method": method, "sites": sites, "steps": steps, "gates": gates, "events": events, "kept": kept}
    history["cuts"] = cuts or []
    return json.dumps(history) + "\n"


def gates_png(
    method: str,
    sites: list[str],
    steps: list[int],
    gates: list[list[float]],
    kept: dict[str, int],
    round_steps: list[int],
    warmup_steps: int,
    step: int,
    finished: bool,
    cut_step: int | None = None,
) -> bytes:
    """``gates.png``: each candidate's gate over the warm-up, the ``kept`` sites (key -> rank) in colour, the
    removed ones in grey; the rounds run so far (``round_steps``) dotted, the end of the warm-up dashed, at
    ``cut_step`` (where it happened: after ``warmup_steps`` if it waited for the gates to move)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, site in enumerate(sites):  # grey first, so that the kept adapters are drawn on top
        if site not in kept:
            ax.plot(steps, [row[i] for row in gates], color="0.75", linewidth=0.8)
    for i, site in enumerate(sites):
        if site in kept:
            label = f"{site} (r={kept[site]})"
            ax.plot(steps, [row[i] for row in gates], linewidth=1.6, label=label if len(kept) <= 16 else None)
    for round_step in round_steps:
        ax.axvline(round_step, color="0.4", linestyle=":", linewidth=1)
    if finished:
        ax.axvline(cut_step or warmup_steps, color="0.2", linestyle="--", linewidth=1)
    ax.axhline(0.0, color="0.5", linewidth=0.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("gate w")
    state = "final" if finished else f"step {step} of the {warmup_steps}-step warm-up"
    ax.set_title(f"{method}: {len(kept)} of {len(sites)} adapters kept ({state})")
    if kept and len(kept) <= 16:
        ax.legend(fontsize=7, loc="best")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()

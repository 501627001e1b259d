"""report.md's "Race" section and ``race.png``: the candidates of ``--plugin race`` (``litgpt_plop.race``), their
validation losses round by round, and which survived."""

from __future__ import annotations

import io
from typing import Any

RACE_FIGURE = "race.png"


def race_section(record: dict[str, Any] | None) -> list[str]:
    """The candidates (sites, rank, alpha, trainable parameters) and a table of validation losses per round, the
    winner first; empty when the placement did not come from a race."""
    if not record:
        return []
    rounds = record["rounds"]
    last_round = {c["name"]: max((i for i, r in enumerate(rounds) if c["name"] in r["val_loss"]), default=-1)
                  for c in record["candidates"]}  # fmt: skip
    # the winner first, then by how long each lasted and its last loss
    order = sorted(record["candidates"], key=lambda c: (-last_round[c["name"]], rounds[last_round[c["name"]]]["val_loss"][c["name"]]))
    out = [
        "## The race",
        "",
        f"`{record['winner']}` won a race of {len(order)} candidates (successive halving on validation loss). Every"
        " candidate trained on the same batches with the same learning-rate schedule, its rank set so that its"
        f" trainable parameters match the reference's. The candidates that lost trained {record['overhead_steps']}"
        f" steps in all; the winner's {record['race_steps']} race steps count toward the run. Validation loss after"
        " each round (- : dropped before it):",
        "",
        "| candidate | rank | alpha | trainable | " + " | ".join(f"step {r['step']}" for r in rounds) + " |",
        "|---|---|---|---|" + "---|" * len(rounds),
    ]
    for c in order:
        losses = [f"{r['val_loss'][c['name']]:.4f}" if c["name"] in r["val_loss"] else "-" for r in rounds]
        name = f"**{c['name']}**" if c["name"] == record["winner"] else c["name"]
        out.append(f"| {name} | {c['rank']} | {c['lora_alpha']} | {c['trainable_params']:,} | " + " | ".join(losses) + " |")
    out += ["", "The rule assumes that the early validation loss ranks placements as the end of training would;"
            " docs/methods.md says where that fails.", "", f"![race]({RACE_FIGURE})", ""]  # fmt: skip
    return out


def race_png(record: dict[str, Any]) -> bytes:
    """``race.png``: validation loss per candidate over the rounds, the winner drawn thicker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for candidate in record["candidates"]:
        name = candidate["name"]
        points = [(r["step"], r["val_loss"][name]) for r in record["rounds"] if name in r["val_loss"]]
        steps, losses = zip(*points)
        ax.plot(steps, losses, marker="o", linewidth=2.5 if name == record["winner"] else 1.2, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"Race: {record['winner']} won")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()

"""report.md's "Experts" section for a mixture of experts (the scores come from ``litgpt_plop.scoring.experts``)."""

from __future__ import annotations


def expert_section(per_expert: dict[str, list[float | None]], expert_tokens: dict[str, list[int]],
                   unused: dict[str, list[int]], kappa_per_expert: dict[str, list[float]]) -> list[str]:  # fmt: skip
    """report.md's "Experts" section: per MLP kind, the spread of the per-expert scores over every layer and
    expert (the placement itself is per (layer, kind), the same for every expert of a block), and the experts
    that received no calibration token."""
    if not per_expert and not kappa_per_expert:
        return []
    out = [
        "## Experts",
        "",
        "A site of an MLP kind is that matrix in every expert of its block; LoRA goes on all of them or none, so the"
        " output loads in stock LitGPT. Each expert was scored on the tokens the router sent to it; a site's NFN is"
        " the mean over its experts weighted by those tokens. The spread over every layer and expert:",
        "",
        "| kind | NFN min | NFN median | NFN max | tokens per expert (min-max) | kappa min | kappa max |",
        "|---|---|---|---|---|---|---|",
    ]
    kinds = list(dict.fromkeys(key.split(".", 1)[1] for key in [*per_expert, *kappa_per_expert]))
    for kind in kinds:
        nfn = sorted(v for key, values in per_expert.items() if key.split(".", 1)[1] == kind for v in values if v is not None)
        tokens = [t for key, counts in expert_tokens.items() if key.split(".", 1)[1] == kind for t in counts]
        kappa = [v for key, values in kappa_per_expert.items() if key.split(".", 1)[1] == kind for v in values]
        cells = [f"{nfn[0]:.3f}", f"{nfn[len(nfn) // 2]:.3f}", f"{nfn[-1]:.3f}"] if nfn else ["-"] * 3
        cells.append(f"{min(tokens)}-{max(tokens)}" if tokens else "-")
        cells += [f"{min(kappa):.3g}", f"{max(kappa):.3g}"] if kappa else ["-"] * 2
        out.append(f"| {kind} | " + " | ".join(cells) + " |")
    out.append("")
    if unused:
        listed = "; ".join(f"block {layer}: experts {', '.join(map(str, experts))}" for layer, experts in unused.items())
        out += [f"**Experts that received no calibration token** (no score, left out of the means): {listed}.", ""]
    elif per_expert:
        out += ["Every expert received calibration tokens.", ""]
    return out

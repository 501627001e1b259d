"""What a calibrated placement chose and why, for people: ``report.md`` + ``scores.png``, and a terminal table.

Reads only the ``Placement`` (its ``method``, ``sites``, ``scores`` and ``calibration``) and the model config,
so it also works on a placement loaded from ``placement.json``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from litgpt import Config

from litgpt_plop.atomic import write_bytes_atomic
from litgpt_plop.selection.methods import METHODS, title
from litgpt_plop.reports.experts import expert_section
from litgpt_plop.reports.race import RACE_FIGURE, race_png, race_section
from litgpt_plop.selection.placement import HEAD_LAYER, Placement, Scores, model_kinds, site_params
from litgpt_plop.reports.kappa import data_free_section, kappa_kind_table, kappa_summary_lines, kappa_why

_WEIGHTLORA_MEANING = (
    "WeightLoRA gave every candidate adapter a trainable gate and, after every optimizer step once the gates had"
    " moved, kept only the adapters of largest gate magnitude (the K largest, or with a parameter budget the"
    " largest that fit it); at the end of the warm-up the others were removed and the gates folded into B."
    " WeightLoRA+ also halved K and doubled the survivors' rank during the warm-up. A cut never chooses among gates"
    " that have not moved since the previous one: it waits for them. The gates' history is in `gates.png` and"
    " `gates.json` beside this report."
)

_NFN_MEANING = (
    "PLoP measures how strongly each pretrained linear map responds to the task's own inputs compared with a"
    " random input of the same size: the normalised feature norm (NFN). About 1 means \"like a random input\";"
    " larger means the weights are already aligned with the task. LoRA goes where the NFN is lowest, where the"
    " pretrained weights are least adapted to the task."
)
_CKA_MEANING = (
    "CKA compares the hidden state entering each block with the one leaving it, over the calibration prompts"
    " (1 = the block barely changes the representation). Blocks that change it most (lowest CKA) matter most for"
    " adaptation, so they get LoRA."
)


def _all_params(config: Config, rank: int) -> int:
    return config.n_layer * sum(site_params(config, kind, rank) for kind in model_kinds(config))


def _layers_in_words(layers: list[int], n_layer: int) -> str:
    if len(layers) == n_layer:
        return f"all {n_layer} layers"
    return f"{len(layers)} of {n_layer} layers ({', '.join(str(l) for l in layers)})"


def _choice_in_words(placement: Placement, config: Config) -> str:
    """One sentence: which kinds on which layers."""
    by_kind: dict[str, list[int]] = {}
    for site in placement.sites:
        by_kind.setdefault(site.kind, []).append(site.layer)
    layer_sets = {tuple(sorted(layers)) for kind, layers in by_kind.items() if layers != [HEAD_LAYER]}
    kinds = ", ".join(placement.kinds)
    if len(layer_sets) <= 1:
        layers = list(next(iter(layer_sets))) if layer_sets else []
        where = _layers_in_words(layers, config.n_layer) if layers else "the head"
        return f"LoRA on {kinds} in {where} ({len(placement.sites)} adapters)."
    parts = [f"{kind} in {len(layers)} of {config.n_layer} layers" for kind, layers in by_kind.items()]
    return f"LoRA on single sites: {'; '.join(parts)} ({len(placement.sites)} adapters)."


def _chosen(placement: Placement) -> set[tuple[int, str]]:
    return {(s.layer, s.kind) for s in placement.sites}


def _params_line(placement: Placement, config: Config) -> str:
    rank = placement.max_rank
    params = placement.trainable_params(config)
    reference = _all_params(config, rank)
    share = 100.0 * params / reference if reference else 0.0
    return (
        f"Trainable parameters: {params:,}, that is {share:.1f}% of putting LoRA on every linear map"
        f" (`all` at rank {rank}: {reference:,})."
    )


def _why(placement: Placement) -> str:
    scores = placement.scores
    plop, cka = scores.plop or {}, scores.cka or {}
    spec = METHODS.get(placement.method)
    lines = []
    if spec is not None and spec.uses_plop:
        lines.append(_NFN_MEANING)
        order = "highest" if spec.inverse else "lowest"
        if plop.get("granularity") == "site":
            lines.append(
                f"It chose single (layer, kind) sites by their own NFN, {order} first, until the budget of"
                f" {plop.get('budget_params'):,} parameters was used."
            )
        elif plop.get("budget") is not None:
            lines.append(
                f"It added kinds {order}-NFN first while they fitted the budget of {plop.get('budget_params'):,} parameters."
            )
        elif plop.get("num_kinds", 0) > len(scores.candidate_kinds):
            lines.append(
                f"It was asked for {plop.get('num_kinds')} kinds, but there are only {len(scores.candidate_kinds)}"
                " candidates: it chose all of them, so the scores decided nothing."
            )
        else:
            lines.append(f"It chose the {plop.get('num_kinds')} kinds with the {order} NFN.")
        if spec.inverse:
            lines.append("This is PLoP's ablation baseline, expected to do worse than PLoP.")
    if spec is not None and spec.uses_cka:
        lines.append(_CKA_MEANING)
        lines.append(
            f"It kept the {cka.get('ratio', 0.5):g} fraction of candidate layers with the lowest CKA"
            f" ({cka.get('pooling', 'last')} pooling, {cka.get('samples', 0)} samples)."
        )
        if scores.degenerate_layers:
            lines.append(
                f"Layer(s) {scores.degenerate_layers} were not considered: every calibration sample looks the same"
                " there (e.g. every prompt ends with the same template token), so their CKA means nothing."
            )
    if spec is not None and spec.kind == "gated":
        lines += [_WEIGHTLORA_MEANING, *_weightlora_why(scores.weightlora or {})]
    lines += kappa_why(placement)
    if not lines:
        lines.append(f"`{placement.method}` is a fixed placement: it was not calibrated and has no scores.")
    return "\n\n".join(lines)


def _weightlora_why(record: dict[str, Any]) -> list[str]:
    """What a WeightLoRA run's gates decided: where they first moved, the budget, and each cut with its gates."""
    lines = []
    moved = record.get("first_moved_step")
    lines.append(
        f"The gates first moved at optimizer step {moved} (until then every gate was still 1: the gradient of a gate"
        " is 0 while its lora_B is); thresholding started there." if moved else "The gates never moved: nothing was"
        " chosen by them."
    )
    if record.get("budget_params") is not None:
        lines.append(
            f"It kept adapters in order of gate magnitude, largest first, while their parameters fitted the budget of"
            f" {record['budget_params']:,} (`--weightlora.budget` {record['budget']})."
        )
    lines += [_cut_text(cut) for cut in record.get("cuts", [])]
    if not record.get("final", True):
        lines.append(
            f"The warm-up had not ended when this was written (step {record.get('step')}, end scheduled after step"
            f" {record.get('warmup_steps')}): this placement is not final."
        )
    return lines


def _cut_text(cut: dict[str, Any]) -> str:
    """One cut in words and a table: the kept adapters' gates, the largest removed one, and whether they decided."""
    event = "the end of the warm-up" if cut["event"] == "final" else f"WeightLoRA+ {cut['event']}"
    when = f"step {cut['step']}"
    if cut["step"] != cut["scheduled_step"]:
        when += f" (scheduled after step {cut['scheduled_step']}; it waited for the gates to move)"
    kept = sorted(cut["kept"].items(), key=lambda item: -abs(item[1]))
    rank = "" if cut["event"] == "final" else " at their doubled rank"
    text = (
        f"At {event}, after {when}, it kept {len(kept)} adapters ({cut['kept_params']:,} parameters{rank}) with these"
        " gates (the values the cut was decided on):\n\n| adapter | gate at the cut | kept |\n|---|---|---|\n"
    )
    text += "\n".join(f"| {key} | {w:.6g} | yes |" for key, w in kept)
    removed = cut.get("largest_removed")
    if removed is not None:
        text += f"\n| {removed[0]} | {removed[1]:.6g} | no (the largest removed gate) |"
    if cut["kept_all_equal"]:
        text += (
            f"\n\nAll kept gates were equal ({kept[0][1]:g}): the gates had not told the adapters apart, so the"
            " candidate order chose them, not the gates."
        )
    elif cut["tie"]:
        text += (
            "\n\nThe smallest kept gate equals the largest removed one: that last choice followed the candidate"
            " order."
        )
    return text


def _markdown(placement: Placement, config: Config) -> str:
    out = [
        f"# Where LoRA goes: {title(placement.method)}",
        "",
        f"Model `{config.name}` ({config.n_layer} layers, width {config.n_embd}) · method `{placement.method}` ·"
        f" rank {placement.max_rank} · alpha {placement.lora_alpha}",
        "",
        "## The choice",
        "",
        _choice_in_words(placement, config),
        "",
        _params_line(placement, config),
        "",
        *race_section(placement.scores.race),
        "## Why",
        "",
        _why(placement),
        "",
    ]
    out += _kind_table(placement) + kappa_kind_table(placement) + data_free_section(placement)
    scores = placement.scores
    out += expert_section(scores.nfn_per_expert, scores.expert_tokens, scores.unused_experts, scores.kappa_per_expert)
    out += _layer_table(placement) + _stability_section(placement) + _calibration_section(placement.calibration)
    out += ["![scores](scores.png)", ""]
    return "\n".join(out)


def _kind_table(placement: Placement) -> list[str]:
    per_kind = placement.scores.nfn_per_kind
    if not per_kind:
        return []
    chosen = _chosen(placement)
    layers_of = {kind: sum(1 for (l, k) in chosen if k == kind) for kind in per_kind}
    ranked = sorted(per_kind, key=per_kind.get)
    out = ["## Scores per kind", "", "| kind | NFN (mean over layers) | rank, lowest first | LoRA |", "|---|---|---|---|"]
    for kind in per_kind:
        lora = f"yes ({_coverage(layers_of[kind], _n_sites(placement.scores, kind))})" if layers_of[kind] else "no"
        out.append(f"| {kind} | {per_kind[kind]:.3f} | {ranked.index(kind) + 1} | {lora} |")
    return out + [""]


def _layer_table(placement: Placement) -> list[str]:
    scores = placement.scores
    nfn_layers, cka_layers = scores.nfn_per_layer, scores.cka_per_layer
    layer_keys = list(dict.fromkeys([*nfn_layers, *cka_layers]))
    if not layer_keys:
        return []
    header = ["layer"] + (["NFN (mean over kinds)"] if nfn_layers else []) + (["CKA"] if cka_layers else []) + ["LoRA"]
    out = ["## Scores per layer", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    degenerate = set(scores.degenerate_layers)
    placed = {l for (l, k) in _chosen(placement)}
    for key in layer_keys:
        row = [key]
        if nfn_layers:
            row.append(f"{nfn_layers[key]:.3f}")
        if cka_layers:
            row.append(f"{cka_layers[key]:.4f}" + (" (degenerate)" if int(key) in degenerate else ""))
        row.append("yes" if int(key) in placed else "no")
        out.append("| " + " | ".join(row) + " |")
    return out + [""]


def _calibration_section(calibration: dict[str, Any] | None) -> list[str]:
    if not calibration:
        return []
    return [
        "## Calibration",
        "",
        f"{calibration.get('samples', 0):,} prompts, {calibration.get('tokens', 0):,} tokens, {calibration.get('batches', 0)}"
        f" batches, {calibration.get('seconds', 0):.1f} s"
        + (f", on {calibration['world_size']} processes" if calibration.get("world_size", 1) > 1 else "")
        + (f"; {calibration['truncated']} prompts truncated to {calibration.get('max_seq_length')} tokens" if calibration.get("truncated") else "")
        + ".",
        "",
    ]


def _coverage(count: int, total: int) -> str:
    return "all layers" if count == total else f"{count} of {total} layers"


def _n_sites(scores: Scores, kind: str) -> int:
    return sum(1 for key in scores.nfn_per_site if key.split(".", 1)[1] == kind)


def _figure_png(placement: Placement, config: Config) -> bytes:
    """``scores.png``: a layer x kind NFN heatmap (condition numbers for ``kappa``) with the chosen sites outlined,
    and/or per-layer CKA bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = placement.scores
    spec = METHODS.get(placement.method)
    kappa = spec is not None and spec.uses_kappa  # a calibrated method's condition numbers are in its report's text
    per_kind, per_site = (scores.kappa_per_kind, scores.kappa_per_site) if kappa else (scores.nfn_per_kind, scores.nfn_per_site)
    block_kinds = [k for k in per_kind if k != "head"]
    site_layers = {int(key.split(".", 1)[0]) for key in per_site if not key.startswith("-")}
    layers = sorted(site_layers | {int(l) for l in scores.cka_per_layer})
    panels = (1 if block_kinds else 0) + (1 if scores.cka_per_layer else 0)
    if panels == 0:
        return _placement_map_png(placement, config)
    widths = ([1.0 + 0.75 * len(block_kinds)] if block_kinds else []) + ([3.0] if scores.cka_per_layer else [])
    height = max(3.0, 0.3 * len(layers) + 1.8)
    fig, axes = plt.subplots(1, panels, figsize=(sum(widths) + 1.5, height), gridspec_kw={"width_ratios": widths}, squeeze=False)
    axes = list(axes[0])
    fig.suptitle(f"{config.name}: {title(placement.method)}", fontsize=11)
    if block_kinds:
        _nfn_heatmap(fig, axes.pop(0), placement, layers, block_kinds, kappa)
    if scores.cka_per_layer:
        _cka_bars(axes.pop(0), placement, layers, height)
    fig.tight_layout()
    return _png(fig)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _nfn_heatmap(fig: Any, ax: Any, placement: Placement, layers: list[int], block_kinds: list[str], kappa: bool = False) -> None:
    """The NFN per site, or with ``kappa`` log10 of the condition number per site (cells show the number itself)."""
    import math

    import numpy as np
    from matplotlib.patches import Rectangle

    scores, chosen = placement.scores, _chosen(placement)
    per_site = {k: math.log10(v) for k, v in scores.kappa_per_site.items()} if kappa else scores.nfn_per_site
    grid = np.full((len(layers), len(block_kinds)), np.nan)
    for i, layer in enumerate(layers):
        for j, kind in enumerate(block_kinds):
            grid[i, j] = per_site.get(f"{layer}.{kind}", np.nan)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    label = "log10 condition number (lower = LoRA first)" if kappa else "NFN (lower = more in need of LoRA)"
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, label=label)
    for i, layer in enumerate(layers):
        for j, kind in enumerate(block_kinds):
            if (layer, kind) in chosen:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
            if len(layers) * len(block_kinds) <= 120 and not np.isnan(grid[i, j]):
                shade = image.norm(grid[i, j])  # dark text on the light (yellow) end of viridis
                text = f"{10 ** grid[i, j]:.3g}" if kappa else f"{grid[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if shade > 0.6 else "white")
    ax.set_xticks(range(len(block_kinds)), block_kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_ylabel("layer")
    ax.set_title(f"{'condition number' if kappa else 'NFN'} per site (red box = LoRA)", fontsize=10)


def _cka_bars(ax: Any, placement: Placement, layers: list[int], height: float) -> None:
    from matplotlib.patches import Patch

    cka_layers = placement.scores.cka_per_layer
    degenerate = set(placement.scores.degenerate_layers)
    placed = {l for (l, k) in _chosen(placement)}
    # Bars show 1 - CKA: the similarities of real blocks sit close to 1, their differences would not show.
    # A degenerate layer's CKA is meaningless (often ~0): drawn as an empty hatched stub, not a long bar.
    values = [0.0 if l in degenerate else 1.0 - cka_layers[str(l)] for l in layers]
    longest = max(max(values), 1e-12)
    colors = ["tab:red" if l in placed else "lightgrey" for l in layers]
    bars = ax.barh(range(len(layers)), values, color=colors, edgecolor="black", linewidth=0.5)
    for bar, layer in zip(bars, layers):
        label = f" {cka_layers[str(layer)]:.3f}"
        if layer in degenerate:
            bar.set_width(0.04 * longest)
            bar.set_hatch("//")
            bar.set_facecolor("white")
            label = " degenerate"
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=7)
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_ylim(len(layers) - 0.5, -0.5)  # layer 0 on top, rows aligned with the heatmap
    ax.set_xlim(0, longest * 1.4)
    ax.set_xlabel("1 - CKA (longer = block changes more)")
    ax.set_title("CKA per layer (value at bar end)", fontsize=10)
    legend = [Patch(facecolor="tab:red", label="LoRA"), Patch(facecolor="lightgrey", label="no LoRA")]
    if degenerate:
        legend.append(Patch(facecolor="white", hatch="//", edgecolor="black", label="degenerate (ignored)"))
    ax.legend(handles=legend, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1 - 0.3 / height), ncol=len(legend))


def _placement_map_png(placement: Placement, config: Config) -> bytes:
    """For a placement without scores (a fixed preset): which (layer, kind) sites have LoRA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = list(model_kinds(config))
    chosen = _chosen(placement)
    grid = np.array([[1.0 if (layer, kind) in chosen else 0.0 for kind in kinds] for layer in range(config.n_layer)])
    fig, ax = plt.subplots(figsize=(1.5 + 0.75 * len(kinds), max(3.0, 0.3 * config.n_layer + 1.8)))
    ax.imshow(grid, aspect="auto", cmap="Reds", vmin=0, vmax=1.25, interpolation="nearest")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(config.n_layer), [str(l) for l in range(config.n_layer)])
    ax.set_ylabel("layer")
    ax.set_title(f"{config.name}: fixed placement {placement.method!r} (red = LoRA; no scores)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def write_report(placement: Placement, config: Config, out_dir: Path | str) -> tuple[Path, Path]:
    """Write ``report.md`` (the choice and the scores in words and tables) and ``scores.png`` (and ``race.png`` for a
    race's winner) into ``out_dir``,
    each atomically (temporary file, then rename). Returns both paths."""
    out_dir = Path(out_dir)
    png = _figure_png(placement, config)
    report_path, png_path = out_dir / "report.md", out_dir / "scores.png"
    write_bytes_atomic(png_path, png)
    if placement.scores.race:
        write_bytes_atomic(out_dir / RACE_FIGURE, race_png(placement.scores.race))
    write_bytes_atomic(report_path, _markdown(placement, config).encode("utf-8"))
    return report_path, png_path


def summary_table(placement: Placement, config: Config) -> str:
    """A few lines for the terminal: the choice, its cost, and the scores it was based on."""
    scores = placement.scores
    chosen = _chosen(placement)
    lines = [
        f"{title(placement.method)} placement for {config.name}"
        f" (rank {placement.max_rank}): {_choice_in_words(placement, config)}",
        _params_line(placement, config),
    ]
    per_kind = scores.nfn_per_kind
    if per_kind:
        lines += ["", f"{'kind':<12} {'NFN':>7}  LoRA"]
        for kind, value in sorted(per_kind.items(), key=lambda item: item[1]):
            count = sum(1 for (l, k) in chosen if k == kind)
            mark = _coverage(count, _n_sites(scores, kind)) if count else ""
            lines.append(f"{kind:<12} {value:>7.3f}  {mark}")
    cka_layers = scores.cka_per_layer
    if cka_layers:
        degenerate = set(scores.degenerate_layers)
        placed = {l for (l, k) in chosen}
        lines += ["", f"{'layer':<6} {'CKA':>7}  LoRA"]
        for key, value in cka_layers.items():
            note = "yes" if int(key) in placed else ""
            if int(key) in degenerate:
                note = "degenerate, ignored"
            lines.append(f"{key:<6} {value:>7.4f}  {note}")
    lines += kappa_summary_lines(placement)
    if scores.stability:
        lines += ["", _stability_sentence(scores.stability)]
    return "\n".join(lines)


def _stability_sentence(stability: dict[str, Any]) -> str:
    return (
        f"How sure: resampling the {stability['prompts']} calibration prompts {stability['resamples']} times (bootstrap),"
        f" the same sites were chosen {100 * stability['same_choice']:.0f}% of the time."
    )


def _stability_section(placement: Placement) -> list[str]:
    """How often resampled prompts make the same choice, and each kind (and, for a layer choice, each layer)."""
    stability, spec = placement.scores.stability, METHODS.get(placement.method)
    if not stability:
        return []
    out = ["## How sure is this choice", "", _stability_sentence(stability)]
    if stability.get("failed"):
        out[-1] += f" On {stability['failed']} resample(s) the method could not choose at all."
    out += ["", "| kind | chosen in resamples | chosen here |", "|---|---|---|"]
    chosen_kinds = set(placement.kinds)
    for kind, share in stability["kind_frequency"].items():
        out.append(f"| {kind} | {100 * share:.0f}% | {'yes' if kind in chosen_kinds else 'no'} |")
    if spec is not None and spec.uses_cka:
        unsure = [f"{layer} ({100 * share:.0f}%)" for layer, share in stability["layer_frequency"].items() if 0 < share < 1]
        out += ["", "Layers chosen in only some resamples: " + (", ".join(unsure) if unsure else "none") + "."]
    return out + [""]

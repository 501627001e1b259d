"""The report's parts about condition numbers (``Scores.kappa*``): the ``kappa`` method's own explanation and
kind table, and, for a calibrated method, what its choice has in common with what the weights alone choose.

Reads only the ``Placement``, like ``litgpt_plop.reports.placement``, which calls these functions.
"""

from __future__ import annotations

from litgpt_plop.selection.methods import METHODS, title
from litgpt_plop.selection.placement import Placement

KAPPA_MEANING = (
    "kappa scores every candidate matrix by its condition number, its largest singular value divided by its"
    " smallest, from the pretrained weights alone: no data is read. A low condition number means the matrix"
    " stretches every direction about equally; KappaTune's argument is that adapting such matrices disturbs"
    " what the model already knows least. LoRA goes on the lowest."
)


def _uses_kappa(placement: Placement) -> bool:
    spec = METHODS.get(placement.method)
    return spec is not None and spec.uses_kappa


def _choice_sites(placement: Placement) -> set[tuple[int, str]] | None:
    """The sites the condition numbers choose (``Scores.kappa["choice"]``), or None if there is no such choice."""
    record = placement.scores.kappa or {}
    if record.get("choice") is None:
        return None
    return {(int(key.split(".", 1)[0]), key.split(".", 1)[1]) for key in record["choice"]}


def _kinds_in_order(kinds: set[str], order: list[str]) -> list[str]:
    return [k for k in order if k in kinds]


def _names(kinds: list[str]) -> str:
    return ", ".join(kinds) if kinds else "none"


def kappa_why(placement: Placement) -> list[str]:
    """The "Why" paragraphs of a ``kappa`` placement ([] for another method)."""
    if not _uses_kappa(placement):
        return []
    record = placement.scores.kappa or {}
    if record.get("granularity") == "site":
        rule = (
            "It chose single (layer, kind) sites by their own condition number, lowest first, until the budget of"
            f" {record.get('budget_params'):,} parameters was used."
        )
    elif record.get("budget") is not None:
        rule = f"It added kinds lowest first while they fitted the budget of {record.get('budget_params'):,} parameters."
    else:
        rule = f"It chose the {record.get('num_kinds')} kinds with the lowest condition number (geometric mean over layers)."
    how = f"The {len(placement.scores.kappa_per_site)} condition numbers were computed as {record.get('computed_as')}."
    return [KAPPA_MEANING, rule, how]


def kappa_kind_table(placement: Placement) -> list[str]:
    """``## Scores per kind`` of a ``kappa`` placement: each kind's condition number, its rank, its LoRA."""
    per_kind = placement.scores.kappa_per_kind
    if not _uses_kappa(placement) or not per_kind:
        return []
    ranked = sorted(per_kind, key=per_kind.get)
    placed = {s.kind: 0 for s in placement.sites}
    for site in placement.sites:
        placed[site.kind] += 1
    out = ["## Scores per kind", "", "| kind | condition number (geometric mean over layers) | rank, lowest first | LoRA |", "|---|---|---|---|"]
    for kind in per_kind:
        lora = f"yes ({placed[kind]} sites)" if kind in placed else "no"
        out.append(f"| {kind} | {per_kind[kind]:.4g} | {ranked.index(kind) + 1} | {lora} |")
    return out + [""]


def data_free_section(placement: Placement) -> list[str]:
    """For a calibrated method: ``## Calibrated vs data-free``, whether its choice differs from what ``kappa``
    chooses from the weights alone with the same selection options, and how ([] without such a comparison)."""
    spec = METHODS.get(placement.method)
    record = placement.scores.kappa
    if spec is None or not spec.calibrates or not record:
        return []
    out = ["## Calibrated vs data-free", ""]
    if record.get("skipped"):
        return out + [f"Not computed: {record['skipped']}.", ""]
    kappa_sites = _choice_sites(placement)
    if kappa_sites is None:
        return out + [f"`kappa` could not choose with the same options: {record.get('error')}", "", _time_line(placement), ""]
    order = list(placement.scores.candidate_kinds)
    own_sites = {(s.layer, s.kind) for s in placement.sites}
    own_kinds = {k for _, k in own_sites}
    kappa_kinds = {k for _, k in kappa_sites}
    size = f"{record['num_kinds']} kinds" if record.get("num_kinds") else f"a budget of {record.get('budget_params'):,} parameters"
    out.append(
        f"From the weights alone (no data), `kappa` with the same selection options ({size}, by {record.get('granularity')})"
        f" chooses {_names(_kinds_in_order(kappa_kinds, order))} ({len(kappa_sites)} sites). {title(placement.method)} chose"
        f" {_names(_kinds_in_order(own_kinds, order))} ({len(own_sites)} sites)."
    )
    out.append("")
    if own_sites == kappa_sites:
        out.append("**The same sites: the calibration prompts did not change the choice.**")
    else:
        both = _kinds_in_order(own_kinds & kappa_kinds, order)
        only_own = _kinds_in_order(own_kinds - kappa_kinds, order)
        only_kappa = _kinds_in_order(kappa_kinds - own_kinds, order)
        out += [
            "**The choices differ.**",
            "",
            f"- Kinds both choose: {_names(both)}.",
            f"- Only {placement.method}: {_names(only_own)}.",
            f"- Only kappa: {_names(only_kappa)}.",
            f"- Sites: {len(own_sites & kappa_sites)} in both, {len(own_sites - kappa_sites)} only in this placement,"
            f" {len(kappa_sites - own_sites)} only in kappa's.",
        ]
    out.append("")
    out += _rank_table(placement, own_kinds, kappa_kinds)
    return out + [_time_line(placement), ""]


def _time_line(placement: Placement) -> str:
    """How long the condition numbers took, apart from the calibration pass (whose own time excludes them)."""
    seconds = (placement.calibration or {}).get("kappa_seconds")
    took = f" took {seconds:.1f} s beside the calibration pass's {placement.calibration.get('seconds', 0):.1f} s" if seconds is not None else ""
    return f"The condition numbers{took} ({(placement.scores.kappa or {}).get('computed_as')})."


def _rank_table(placement: Placement, own_kinds: set[str], kappa_kinds: set[str]) -> list[str]:
    """Each kind's NFN and condition number side by side, with their ranks (PLoP's methods only)."""
    nfn, kappa = placement.scores.nfn_per_kind, placement.scores.kappa_per_kind
    if not nfn or set(nfn) != set(kappa):
        return []
    nfn_rank, kappa_rank = sorted(nfn, key=nfn.get), sorted(kappa, key=kappa.get)
    out = ["| kind | NFN | NFN rank | condition number | its rank | chosen here | chosen by kappa |", "|---|---|---|---|---|---|---|"]
    for kind in nfn:
        out.append(
            f"| {kind} | {nfn[kind]:.3f} | {nfn_rank.index(kind) + 1} | {kappa[kind]:.4g} | {kappa_rank.index(kind) + 1}"
            f" | {'yes' if kind in own_kinds else ''} | {'yes' if kind in kappa_kinds else ''} |"
        )
    return out + [""]


def kappa_summary_lines(placement: Placement) -> list[str]:
    """Terminal lines: a ``kappa`` placement's kind table, or a calibrated placement's one-line comparison."""
    scores = placement.scores
    if _uses_kappa(placement) and scores.kappa_per_kind:
        chosen = {s.kind for s in placement.sites}
        lines = ["", f"{'kind':<12} {'kappa':>9}  LoRA"]
        for kind, value in sorted(scores.kappa_per_kind.items(), key=lambda item: item[1]):
            lines.append(f"{kind:<12} {value:>9.4g}  {'yes' if kind in chosen else ''}")
        return lines
    kappa_sites = _choice_sites(placement)
    spec = METHODS.get(placement.method)
    if spec is None or not spec.calibrates or kappa_sites is None:
        return []
    own_sites = {(s.layer, s.kind) for s in placement.sites}
    order = list(scores.candidate_kinds)
    kinds = _names(_kinds_in_order({k for _, k in kappa_sites}, order))
    verdict = "the same sites" if own_sites == kappa_sites else f"{len(own_sites & kappa_sites)} of {len(own_sites)} sites in common"
    return ["", f"Data-free (kappa, no calibration) would choose {kinds}: {verdict} (report.md, \"Calibrated vs data-free\")."]

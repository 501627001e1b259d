"""Does PLoP's choice depend on the task? PLoP's per-kind ranking and the per-layer CKA profile on many tasks,
against the data-free choice (``kappa``). Calibration only: nothing is trained.

For each task, the calibration pass of ``litgpt-plop plan --method plop+cka`` (``plan_placement``: one pass gives
PLoP's NFN per kind and CKA per layer, and, since every calibrated plan computes it, the condition numbers and
kappa's choice) on 64 prompts of the task, in the model's own chat template (what a finetune calibrates on),
with the grid's calibration settings (batch 8, at most 256 tokens). Tasks: reasoning-gym tasks of four
kinds (arithmetic, string manipulation, logic, word problems; the placement grid's task configs where it has
them, reasoning-gym's defaults otherwise) and plain English questions (the first utterance of each English
conversation of the PyPI ``chatterbot-corpus``). Controls: a few tasks again on 64 other prompts (disjoint items),
which says how much of a difference between tasks is just the choice of prompts.

Reported: each task's three lowest-NFN kinds (PLoP's choice at ``--plop.num_kinds 3``) and full ranking, Kendall's
tau between every pair of tasks' NFN-per-kind rankings, each task's tau with kappa's ranking and the kinds it
shares with kappa's three, Kendall's tau between the tasks' CKA-per-layer profiles and the overlap of CKA's
chosen layers, and what the condition numbers cost inside each calibrated plan.

    python -m benchmarks.cross_task --threads 1          # -> benchmarks/results/cross_task.{json,md} and RESULTS.md
    python -m benchmarks.cross_task --tasks basic_arithmetic english_qa --controls --num_prompts 16   # a quick look
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, RESULTS_ROOT, benchmark_parser, command_line, git_commit, machine, write_results
from benchmarks.results_md import write_section
from benchmarks.stats import kendall_tau

BEGIN, END = "<!-- cross_task:begin -->", "<!-- cross_task:end -->"
TRAINING_COST = "## Training cost per placement"  # where RESULTS.md has no cross-task section yet, it goes before this
QA = "english_qa"
# (task, category); reasoning-gym task configs: the placement grid's where it has one (TASK_CONFIGS), else defaults.
TASKS = (
    ("basic_arithmetic", "arithmetic"),
    ("chain_sum", "arithmetic"),
    ("products", "arithmetic"),
    ("spell_backward", "string"),
    ("letter_counting", "string"),
    ("caesar_cipher", "string"),
    ("word_sorting", "string"),
    ("propositional_logic", "logic"),
    ("syllogism", "logic"),
    ("knights_knaves", "logic"),
    ("gsm_symbolic", "word problem"),
    ("leg_counting", "word problem"),
    ("time_intervals", "word problem"),
    ("family_relationships", "word problem"),
    (QA, "English QA"),
)
CONTROLS = ("basic_arithmetic", "knights_knaves", QA)  # each again on other prompts
CONTROL_SEED_OFFSET = 100_000  # reasoning-gym items of a control start this far from the task's (disjoint)
SHORT = {"query": "q", "key": "k", "value": "v", "projection": "o", "mlp_fc_1": "fc1", "mlp_fc_2": "fc2", "mlp_proj": "proj"}


@dataclass(frozen=True)
class Spec:
    """One calibration set: a task, and for a control, that the prompts are the task's other ones."""

    task: str
    category: str
    control: bool = False

    @property
    def name(self) -> str:
        return f"{self.task} (other prompts)" if self.control else self.task


# ---- prompts -----------------------------------------------------------------------------------------------


def english_questions(seed: int) -> list[str]:
    """The distinct first utterances of the English conversations of ``chatterbot-corpus``, shuffled with ``seed``."""
    try:
        import chatterbot_corpus
    except ImportError:
        raise SystemExit("english_qa needs the corpus: pip install chatterbot-corpus==1.3.3") from None
    import yaml

    questions: list[str] = []
    for path in sorted((Path(chatterbot_corpus.__file__).parent / "data" / "english").glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text()).get("conversations", []):
            if conversation and isinstance(conversation[0], str) and conversation[0] not in questions:
                questions.append(conversation[0])
    random.Random(seed).shuffle(questions)
    return questions


def prompt_token_ids(spec: Spec, tokenizer: Any, num_prompts: int, seed: int, prompt_style: str | None = None) -> list[Any]:
    """The calibration prompts of ``spec``, tokenized (the prompt only): in the checkpoint's chat template, or in the
    LitGPT prompt style ``prompt_style`` (``none``: the text as it is, LitGPT's ``Default`` style)."""
    from benchmarks.quality_grid import TASK_CONFIGS
    from litgpt_plop.data import ReasoningGym
    from litgpt_plop.scoring.prompts import data_module_prompts, tokenize_prompts

    from litgpt.prompts import Default

    offset = CONTROL_SEED_OFFSET if spec.control else 0
    style = Default() if prompt_style == "none" else prompt_style  # LitGPT registers no name for its Default style
    if spec.task == QA:
        questions = english_questions(seed)
        chosen = questions[num_prompts : 2 * num_prompts] if spec.control else questions[:num_prompts]
        return tokenize_prompts(chosen, tokenizer, style or ReasoningGym().resolve_prompt_style(tokenizer))
    data = ReasoningGym(task=spec.task, task_config=TASK_CONFIGS.get(spec.task), train_size=num_prompts, val_size=1, seed=seed + offset)
    return data_module_prompts(data, tokenizer, num_prompts, seed, style)


# ---- measuring ---------------------------------------------------------------------------------------------


def calibrate(model: Any, token_ids: list[Any], num_prompts: int) -> dict[str, Any]:
    """One ``plop+cka`` plan: NFN per kind, PLoP's 3 kinds, CKA per layer and its layers, the condition numbers."""
    from litgpt_plop.args import CalibrationArgs, PlopArgs
    from litgpt_plop.decide import plan_placement

    calibration = CalibrationArgs(num_samples=num_prompts, batch_size=8, max_seq_length=256, progress=False)
    t0 = time.perf_counter()
    placement = plan_placement(model, token_ids, "plop+cka", plop=PlopArgs(num_kinds=3), calibration=calibration)
    seconds = time.perf_counter() - t0
    scores = placement.scores
    nfn = scores.nfn_per_kind
    kappa = scores.kappa or {}
    return {
        "nfn_per_kind": nfn,
        "ranking": sorted(nfn, key=lambda k: (nfn[k], list(nfn).index(k))),
        "kinds": placement.kinds,  # PLoP's kinds (ranked over every layer), here on CKA's layers
        "cka_per_layer": scores.cka_per_layer,
        "cka_layers": placement.layers,
        "degenerate_layers": scores.degenerate_layers,
        "kappa_per_kind": scores.kappa_per_kind,
        "kappa_kinds": sorted({key.split(".", 1)[1] for key in kappa.get("choice") or []}, key=list(nfn).index),
        "plan_s": round(seconds, 2),
        "calibration_s": (placement.calibration or {}).get("seconds"),
        "kappa_s": (placement.calibration or {}).get("kappa_seconds"),
        # bootstrap resamples of the prompts (``--calibration.resamples``): how firm each kind's choice is
        "kind_frequency": (scores.stability or {}).get("kind_frequency"),
        "tokens": (placement.calibration or {}).get("tokens"),
    }


def condition_number_cost(model: Any) -> dict[str, Any]:
    """The condition numbers of the model's 210 matrices three ways, one after the other: as ``litgpt_plop.scoring.kappa``
    computes them (float64 Gram matrix), and ``torch.linalg.svdvals`` in float64 and in float32; seconds each and
    the largest relative difference from float64 svdvals."""
    import torch

    from litgpt_plop.scoring.kappa import condition_number, site_weights
    from litgpt_plop.selection.placement import model_kinds

    config = model.config
    weights = {(l, k): w.clone() for l, k, w in site_weights(model, list(model_kinds(config)), range(config.n_layer))}

    def svdvals_kappa(dtype: torch.dtype):
        def kappa(weight: torch.Tensor) -> float:
            s = torch.linalg.svdvals(weight.to(dtype))
            return float(s[0] / s[-1])

        return kappa

    ways = {"gram_float64": condition_number, "svdvals_float64": svdvals_kappa(torch.float64), "svdvals_float32": svdvals_kappa(torch.float32)}
    values, seconds = {}, {}
    with torch.no_grad():
        for name, way in ways.items():
            t0 = time.perf_counter()
            values[name] = {key: way(w) for key, w in weights.items()}
            seconds[name] = round(time.perf_counter() - t0, 2)
    reference = values["svdvals_float64"]
    diff = {name: max(abs(v[key] / reference[key] - 1) for key in weights) for name, v in values.items()}
    return {"matrices": len(weights), "seconds": seconds, "max_rel_diff_vs_svdvals_float64": diff, "max_kappa": max(reference.values())}


def run(
    specs: list[Spec], checkpoint_dir: Path, num_prompts: int, seed: int, prompt_style: str | None, log: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every spec's calibration (rows), and what the condition numbers cost computed three ways."""
    from litgpt.tokenizer import Tokenizer

    from litgpt_plop.model.checkpoint import load_checkpoint_model

    model = load_checkpoint_model(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    cost = condition_number_cost(model)
    log(f"condition numbers of {cost['matrices']} matrices: {cost['seconds']} s; max relative difference from float64 svdvals:"
        f" {cost['max_rel_diff_vs_svdvals_float64']}")  # fmt: skip
    rows = []
    for spec in specs:
        token_ids = prompt_token_ids(spec, tokenizer, num_prompts, seed, prompt_style)
        row = {"task": spec.name, "category": spec.category, "control": spec.control, "prompts": len(token_ids)}
        row["mean_prompt_tokens"] = round(statistics.fmean(len(t) for t in token_ids), 1)
        row["example"] = tokenizer.decode(token_ids[0])
        row.update(calibrate(model, token_ids, num_prompts))
        log(
            f"{spec.name:<36} {' < '.join(SHORT[k] for k in row['ranking'])}   PLoP: {', '.join(row['kinds'])}"
            f"   ({row['calibration_s']:.1f} s pass, {row['kappa_s']:.1f} s condition numbers)"
        )
        rows.append(row)
    return rows, cost


# ---- comparing ---------------------------------------------------------------------------------------------


def comparisons(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Kendall's tau between tasks (NFN per kind, CKA per layer), CKA's layer overlap, agreement with kappa."""
    tasks = [r for r in rows if not r["control"]]
    names = [r["task"] for r in tasks]
    nfn_tau = {a["task"]: {b["task"]: kendall_tau(a["nfn_per_kind"], b["nfn_per_kind"]) for b in tasks} for a in tasks}
    cka_tau = {a["task"]: {b["task"]: kendall_tau(a["cka_per_layer"], b["cka_per_layer"]) for b in tasks} for a in tasks}
    overlap = {
        a["task"]: {b["task"]: len(set(a["cka_layers"]) & set(b["cka_layers"])) for b in tasks} for a in tasks
    }  # fmt: skip
    for row in rows:
        row["tau_with_kappa"] = kendall_tau(row["nfn_per_kind"], row["kappa_per_kind"])
        row["kinds_shared_with_kappa"] = len(set(row["kinds"]) & set(row["kappa_kinds"]))
    controls = []
    for row in rows:
        if row["control"]:
            task = next(r for r in tasks if row["task"].startswith(r["task"] + " "))
            controls.append({
                "task": task["task"],
                "nfn_tau": kendall_tau(task["nfn_per_kind"], row["nfn_per_kind"]),
                "cka_tau": kendall_tau(task["cka_per_layer"], row["cka_per_layer"]),
                "same_kinds": task["kinds"] == row["kinds"],
                "cka_layers_shared": len(set(task["cka_layers"]) & set(row["cka_layers"])),
            })  # fmt: skip
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    return {
        "nfn_tau": nfn_tau,
        "cka_tau": cka_tau,
        "cka_layers_shared": overlap,
        "controls": controls,
        "nfn_tau_pairs": [nfn_tau[a][b] for a, b in pairs],
        "cka_tau_pairs": [cka_tau[a][b] for a, b in pairs],
    }


# ---- writing -----------------------------------------------------------------------------------------------


def _spread(values: list[float], fmt: str = "+.2f") -> str:
    return f"min {min(values):{fmt}}, median {statistics.median(values):{fmt}}, max {max(values):{fmt}}"


def _cost_line(cost: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    sec, diff = cost["seconds"], cost["max_rel_diff_vs_svdvals_float64"]
    inside = [r["kappa_s"] / r["calibration_s"] for r in rows]
    return (
        f"Cost of the {cost['matrices']} condition numbers, one after the other in this process: {sec['gram_float64']} s as"
        f" `kappa` computes them (float64 Gram matrix; largest relative difference from float64 svdvals {diff['gram_float64']:.1e}),"
        f" {sec['svdvals_float64']} s with float64 svdvals, {sec['svdvals_float32']} s with float32 svdvals (difference"
        f" {diff['svdvals_float32']:.1e}; the largest condition number is {cost['max_kappa']:.3g}). Inside each calibrated plan"
        f" below they took {_spread([r['kappa_s'] for r in rows], '.1f')} s, {_spread(inside, '.2f')} times its calibration pass."
    )


def _range_table(tasks: list[dict[str, Any]]) -> list[str]:
    """Each kind's NFN over the tasks (lowest, median, highest) beside its condition number: how close the ranking is."""
    out = ["Each kind's NFN over the tasks, and its condition number (geometric mean over layers):", ""]
    out += ["| kind | NFN lowest | median | highest | condition number |", "|---|---|---|---|---|"]
    for kind in tasks[0]["ranking"]:
        values = [r["nfn_per_kind"][kind] for r in tasks]
        out.append(
            f"| {kind} | {min(values):.3f} | {statistics.median(values):.3f} | {max(values):.3f} | {tasks[0]['kappa_per_kind'][kind]:.4g} |"
        )
    return out + [""]


def _matrix(title: str, names: list[str], matrix: dict[str, dict[str, float]], fmt: str) -> list[str]:
    out = [title, "", "| | " + " | ".join(str(i + 1) for i in range(len(names))) + " |", "|---|" + "---|" * len(names)]
    for i, a in enumerate(names):
        cells = ["" if a == b else format(matrix[a][b], fmt) for b in names]
        out.append(f"| {i + 1}. {a} | " + " | ".join(cells) + " |")
    return out + [""]


def markdown(data: dict[str, Any]) -> str:
    rows, comp = data["rows"], data["comparisons"]
    tasks = [r for r in rows if not r["control"]]
    names = [r["task"] for r in tasks]
    kappa_kinds = tasks[0]["kappa_kinds"]
    kappa_rank = " < ".join(SHORT[k] for k in sorted(tasks[0]["kappa_per_kind"], key=tasks[0]["kappa_per_kind"].get))
    same = [r["task"] for r in tasks if set(r["kinds"]) == set(kappa_kinds)]
    kind_sets = sorted({", ".join(r["kinds"]) for r in tasks})
    s = data["settings"]
    out = [
        BEGIN, "", "## Cross-task: what does the task's calibration add?", "",
        f"Generated by `benchmarks/cross_task.py` (`{data['command']}`); raw numbers in `{data['results_file']}`."
        f" SmolLM2-135M-Instruct, fp32, {s['num_prompts']} prompts per task"
        f" {'in the model' + chr(39) + 's chat template' if not s.get('prompt_style') else 'in prompt style ' + repr(s['prompt_style'])}, batches of 8,"
        f" at most 256 tokens; one `plop+cka` calibration pass per task (no training). Kinds: {', '.join(f'{v} = {k}' for k, v in SHORT.items())}."
        " \"Least firm kind\": of PLoP's three, the one chosen least often over 200 bootstrap resamples of the task's prompts"
        " (`--calibration.resamples`), with that share. \"c\" rows: controls, the task again on other prompts.",
        "",
        f"Data-free `kappa` (condition numbers, no prompts): {', '.join(kappa_kinds)}; ranking {kappa_rank}.",
        "",
        _cost_line(data["condition_number_cost"], rows),
        "",
        "| # | task | category | mean prompt tokens | NFN ranking, lowest first | PLoP's 3 kinds | = kappa's? | Kendall τ with kappa"
        " | its least firm kind in resamples | degenerate CKA layers | pass (s) | condition numbers (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for i, r in enumerate(rows):
        number = str(i + 1) if not r["control"] else "c"
        shared = "yes" if set(r["kinds"]) == set(kappa_kinds) else f"{r['kinds_shared_with_kappa']} of 3"
        frequency = r.get("kind_frequency") or {}
        firm = min(r["kinds"], key=lambda k: frequency.get(k, 0.0)) if frequency else None
        firm_text = f"{SHORT[firm]} {100 * frequency[firm]:.0f}%" if firm else "n/a"
        out.append(
            f"| {number} | {r['task']} | {r['category']} | {r['mean_prompt_tokens']:.0f} | {' < '.join(SHORT[k] for k in r['ranking'])}"
            f" | {', '.join(SHORT[k] for k in r['kinds'])} | {shared} | {r['tau_with_kappa']:+.2f} | {firm_text}"
            f" | {len(r['degenerate_layers'])} | {r['calibration_s']:.1f} | {r['kappa_s']:.1f} |"
        )
    out += [
        "",
        f"- PLoP chose kappa's three kinds on {len(same)} of {len(tasks)} tasks; {len(kind_sets)} different sets of kinds"
        f" over the tasks: {'; '.join(kind_sets)}.",
        f"- Kendall τ between tasks' NFN rankings ({len(comp['nfn_tau_pairs'])} pairs): {_spread(comp['nfn_tau_pairs'])}."
        f" Each task's τ with kappa's ranking: {_spread([r['tau_with_kappa'] for r in tasks])}.",
        f"- Kendall τ between tasks' CKA-per-layer profiles: {_spread(comp['cka_tau_pairs'])}.",
    ]
    for c in comp["controls"]:
        out.append(
            f"- Control, {c['task']} on {s['num_prompts']} other prompts: NFN τ {c['nfn_tau']:+.2f} with the first set,"
            f" {'the same' if c['same_kinds'] else 'other'} kinds; CKA τ {c['cka_tau']:+.2f}, {c['cka_layers_shared']} of"
            f" {len(tasks[0]['cka_layers'])} CKA layers shared."
        )
    out += ["", *_range_table(tasks)]
    out += _matrix("Kendall τ between the tasks' NFN-per-kind rankings:", names, comp["nfn_tau"], "+.2f")
    out += _matrix("Kendall τ between the tasks' CKA-per-layer profiles:", names, comp["cka_tau"], "+.2f")
    out += _matrix(f"CKA's chosen layers ({len(tasks[0]['cka_layers'])} of 30) that two tasks share:", names, comp["cka_layers_shared"], "d")
    return "\n".join(out + [END]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser("benchmarks.cross_task", __doc__)
    parser.add_argument("--tasks", nargs="+", default=[t for t, _ in TASKS], help="tasks (default: all %(default)s)")
    parser.add_argument("--controls", nargs="*", default=list(CONTROLS), help="tasks run again on other prompts (default: %(default)s)")
    parser.add_argument("--num_prompts", type=int, default=64, help="calibration prompts per task (default: %(default)s, as the grid)")
    parser.add_argument("--seed", type=int, default=42, help="data seed, as the grid's (default: %(default)s)")
    parser.add_argument("--prompt_style", default=None, help="LitGPT prompt style of the prompts (default: the checkpoint's chat template; 'none': the text as it is)")
    parser.add_argument("--tag", default="", help="suffix of the result files: cross_task_<tag>.{json,md}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT, help="directory for cross_task.{json,md} (default: %(default)s)")
    parser.add_argument("--results_md", default=str(REPO_ROOT / "benchmarks" / "RESULTS.md"), help="RESULTS.md to put the section in ('' for none)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    categories = dict(TASKS)
    specs = [Spec(t, categories.get(t, "other")) for t in args.tasks]
    specs += [Spec(t, categories.get(t, "other"), control=True) for t in args.controls if t in args.tasks]
    started = time.perf_counter()
    rows, cost = run(specs, args.checkpoint_dir, args.num_prompts, args.seed, args.prompt_style, lambda text: print(text, flush=True))
    data = {
        "command": command_line("benchmarks.cross_task", argv),
        "settings": {
            "num_prompts": args.num_prompts, "seed": args.seed, "threads": args.threads, "batch_size": 8, "max_seq_length": 256,
            "prompt_style": args.prompt_style,
        },  # fmt: skip
        "machine": machine(),
        "git_commit": git_commit(),
        "wall_s": None,
        "condition_number_cost": cost,
        "rows": rows,
        "comparisons": comparisons(rows),
    }
    data["wall_s"] = round(time.perf_counter() - started, 1)
    stem = f"cross_task_{args.tag}" if args.tag else "cross_task"
    data["results_file"] = f"benchmarks/results/{stem}.json"
    block = markdown(data)
    write_results(args.out, stem, data, block.replace(BEGIN, "").replace(END, "").strip())
    if args.results_md:
        write_section(Path(args.results_md), BEGIN, END, block, before=TRAINING_COST)
        print(f"Updated {args.results_md}")


if __name__ == "__main__":
    main()

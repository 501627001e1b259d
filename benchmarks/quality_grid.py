"""The placement-quality grid's settings and its parameter matching: which tasks and methods it runs, what a run's
settings hash covers, and the rank (or K) that gives each method the task's trainable-parameter budget.

``benchmarks.placement_quality``'s docstring explains the matching in full; its driver, ``benchmarks.quality_worker``
(one run in its own process), ``benchmarks.summarize`` and ``benchmarks.rescore`` all read the grid from here, so
they agree on what a method is and on which recorded row stands for a run. Only light imports at module level:
the model's config and the placement code are imported where they are needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from benchmarks.common import RESULTS_ROOT, read_jsonl
from litgpt_plop.selection.methods import get_method, method_names

RESULTS_DIR = RESULTS_ROOT / "placement_quality"

# The task configs: basic_arithmetic as in configs/demo-cpu.yaml (two terms of 1-2 digits); chain_sum with three
# one-digit terms (about 20% after 50 steps: room both ways). Tried and not in the default grid (RESULTS.md says
# what they gave at 50 steps): leg_counting (1-2 kinds of animal, up to 3 of each: every placement answered "12"
# to everything, also at 100 steps), spell_backward (3-6 letters: no exact answer from any placement, partial
# credit only), products (two terms of 1 or 2 digits: one-digit products right, two-digit ones wrong, so it
# saturates near 50%). gsm_symbolic as is (multi-step word problems: a 135M model answering in at most 16 tokens
# without working is expected to stay near 0%, so it tells little at this size).
TASK_CONFIGS: dict[str, dict[str, Any] | None] = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
    "leg_counting": {"min_animals": 1, "max_animals": 2, "max_instances": 3},
    "spell_backward": {"min_word_len": 3, "max_word_len": 6},
    "products": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
    "chain_sum": {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1},
    "gsm_symbolic": None,
    # the GPU grid's (benchmarks.gpu_grid): letter_counting as reasoning-gym makes it (5-15 words; "1" is the answer
    # to 37% of the items, so room both ways), and the free-text task of benchmarks.qa_task (answer likelihood)
    "letter_counting": None,
    "chatterbot_qa": None,
}
# What the grid runs, in the order it runs and reports them. What each one is comes from the project's method
# registry (litgpt_plop.selection.methods); ``all@r0`` and ``base`` exist only here (see placement_quality's docstring).
METHODS = (
    "qv", "attention", "mlp", "all", "random", "plop", "plop-inverse", "cka", "plop+cka", "kappa", "weightlora",
    "weightlora+", "race", "all@r0",
)  # fmt: skip
EXTRA_METHODS = ("base",)


def _registered(*kinds: str) -> tuple[str, ...]:
    """The grid's methods that the registry lists as one of ``kinds``, in the grid's order."""
    return tuple(m for m in METHODS if m in method_names(*kinds))


FIXED = _registered("preset")
CALIBRATED = _registered("calibrated")
WEIGHTS = _registered("weights")  # scored from the weights alone (kappa)
# sites known only once scored: planned first
PLANNED = tuple(m for m in CALIBRATED + WEIGHTS if get_method(m).uses_plop or get_method(m).uses_kappa)
WEIGHTLORA = _registered("gated")
RACE = _registered("race")  # chooses among the others while training, at the grid's budget (its own matching)
REFERENCES = ("plop", "qv")


@dataclasses.dataclass
class Settings:
    """Everything that changes a run's numbers. Its hash (``config_id``) is part of the resume key."""

    steps: int = 100
    micro_batch: int = 8
    lr: float = 2e-3
    lr_warmup_steps: int = 10
    rank: int = 8
    alpha_rule: str = "ratio"
    reference: str = "plop"
    train_size: int = 800
    eval_items: int = 40
    max_new_tokens: int = 16
    max_seq_length: int = 256
    calibration_samples: int = 64
    cka_ratio: float = 0.5
    weightlora_warmup: float = 0.25
    data_seed: int = 42
    lora_dropout: float = 0.05
    smoke: bool = False
    val_interval: int = 0
    """Validate every this many optimizer steps too, not only at the end (0): the run's validation curve, what a race
    would have compared at its rounds (``benchmarks.race_replay``). The validations leave the run's training as it
    is (``benchmarks.quality_worker.rng_neutral``)."""

    def config_id(self) -> str:
        """A short hash of every field: rows recorded with other settings are never taken for this grid's. A field
        added later is left out at its default, so that the rows recorded before it keep their hash."""
        fields = dataclasses.asdict(self)
        if not fields["val_interval"]:
            del fields["val_interval"]
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:10]

    def alpha(self, rank: int) -> int:
        """``lora_alpha`` at ``rank``: ``ratio`` keeps alpha / r = 2 at every rank, so rank adjustment changes
        capacity and not the step size; ``fixed`` keeps alpha = 2 r0."""
        base_alpha = 2 * self.rank  # alpha 16 at r0 = 8, the project's default
        return max(1, round(rank * base_alpha / self.rank)) if self.alpha_rule == "ratio" else base_alpha

    def weightlora_warmup_steps(self) -> int:
        """WeightLoRA's gated warm-up: a quarter of the steps (by default), at least 5."""
        return max(5, round(self.steps * self.weightlora_warmup))  # finetune refuses less for WeightLoRA+ (3 + rounds)


FULL = {"tasks": ["basic_arithmetic", "chain_sum"], "methods": list(METHODS) + ["base"], "seeds": [0, 1, 2]}
SMOKE = {
    "tasks": ["basic_arithmetic"],
    "methods": ["base", "qv", "plop"],
    "seeds": [0],
    "steps": 5,
    "lr_warmup_steps": 1,
    "train_size": 64,
    "eval_items": 8,
    "calibration_samples": 16,
}


def settings_for(options: Mapping[str, Any], smoke: bool) -> Settings:
    """The run settings: each of ``options`` that is given (not None), else the smoke profile's value (with
    ``smoke``), else the default. A warm-up as long as the run is cut to a fifth of it."""
    settings = Settings(smoke=smoke)
    profile = SMOKE if smoke else {}
    for field in dataclasses.fields(Settings):
        if field.name == "smoke":
            continue
        value = options.get(field.name)
        if value is None:
            value = profile.get(field.name, getattr(settings, field.name))
        setattr(settings, field.name, value)
    if settings.steps < 1 or settings.eval_items < 1 or settings.rank < 1:
        raise SystemExit("--steps, --eval_items and --rank must be positive")
    if settings.lr_warmup_steps >= settings.steps:
        settings.lr_warmup_steps = max(1, settings.steps // 5)
    return settings


# ---- parameter matching ------------------------------------------------------------------------------------


def model_config(checkpoint_dir: Path) -> Any:
    """The checkpoint's LitGPT ``Config`` (what the placement arithmetic needs; no weights are loaded)."""
    from litgpt import Config

    return Config.from_file(Path(checkpoint_dir) / "model_config.yaml")


def params_at_rank_one(config: Any, kinds: list[str], layers: list[int] | None) -> int:
    """P1: the trainable parameters of rank-1 adapters on ``kinds`` x ``layers`` (every layer when None)."""
    from litgpt_plop.selection.placement import Placement

    return Placement.from_kinds(config, kinds, layers=layers, rank=1).trainable_params(config)


def closest_rank(budget: int, p1: int) -> int:
    """The integer rank r >= 1 whose r * p1 is closest to ``budget``."""
    low = max(1, budget // p1)
    return min((low, low + 1), key=lambda r: (abs(r * p1 - budget), r))


def fixed_kinds(method: str, config: Any, seed: int = 0) -> list[str]:
    """The kinds a preset method puts adapters on, exactly as the finetune decides them (``random``: per seed)."""
    from litgpt_plop.selection.placement import model_kinds, preset

    # exactly what finetune does: decide_placement -> preset(..., candidates=every kind but the head, seed=--seed)
    candidates = list(model_kinds(config))
    return preset(method, config, rank=1, candidates=candidates, seed=seed).kinds


def site_shapes(settings: Settings, plans: dict[str, Any], config: Any) -> dict[str, dict[str, Any]]:
    """The sites of every method that puts one rank on a set of sites known before training (all but ``random``,
    whose kinds change with the seed, and WeightLoRA, whose sites are learned): kinds, layers (None for CKA alone,
    whose layers only calibration knows), the number of layers and P1, the parameters at rank 1."""
    from litgpt_plop.selection.placement import model_kinds

    shapes: dict[str, dict[str, Any]] = {}
    for method in FIXED:
        if method != "random":
            shapes[method] = {"kinds": fixed_kinds(method, config), "layers": list(range(config.n_layer))}
    for method in PLANNED:
        shapes[method] = {"kinds": plans[method]["kinds"], "layers": plans[method]["layers"]}
    n_cka = max(1, int(settings.cka_ratio * config.n_layer + 0.5))  # litgpt_plop.selection.rules.choose_layers
    for method in CALIBRATED:
        if method not in PLANNED:  # CKA alone: every kind on n_cka layers, a cost known without calibration
            shapes[method] = {"kinds": list(model_kinds(config)), "layers": None, "n_layers": n_cka}
    for shape in shapes.values():
        layers = shape["layers"]
        shape.setdefault("n_layers", len(layers) if layers is not None else None)
        shape["p1"] = (
            params_at_rank_one(config, shape["kinds"], layers)
            if layers is not None
            else n_cka * params_at_rank_one(config, shape["kinds"], [0])
        )
    return shapes


def at_closest_rank(plugin: str, kinds: list[str], n_layers: int | None, p1: int, budget: int) -> dict[str, Any]:
    """A method's entry: the rank whose parameters come closest to ``budget`` on sites that cost ``p1`` at rank 1."""
    rank = closest_rank(budget, p1)
    return {"plugin": plugin, "rank": rank, "kinds": kinds, "n_layers": n_layers, "expected_params": rank * p1}


def random_entries(config: Any, budget: int, seeds: list[int]) -> dict[int, dict[str, Any]]:
    """``random``'s entry per seed: each seed draws other kinds, so each draw gets its own closest rank."""
    by_seed = {}
    for seed in seeds:
        kinds = fixed_kinds("random", config, seed)
        p1 = params_at_rank_one(config, kinds, list(range(config.n_layer)))
        by_seed[seed] = at_closest_rank("random", kinds, config.n_layer, p1, budget)
    return by_seed


def weightlora_entries(config: Any, settings: Settings, budget: int) -> dict[str, dict[str, Any]]:
    """WeightLoRA(+)'s entries: rank r0 and K adapters, K such that K adapters of the mean candidate's size cost
    about ``budget`` (which adapters survive is learned while training)."""
    from litgpt_plop.selection.placement import model_kinds

    r0 = settings.rank
    candidates = list(model_kinds(config))
    n_candidates = len(candidates) * config.n_layer
    mean_adapter = params_at_rank_one(config, candidates, None) / n_candidates * r0
    k = max(1, min(n_candidates, round(budget / mean_adapter)))
    return {
        method: {
            "plugin": method,
            "rank": r0,
            "k": k,
            "kinds": None,
            "n_layers": None,
            "expected_params": round(k * mean_adapter),
            "warmup_steps": settings.weightlora_warmup_steps(),
        }
        for method in WEIGHTLORA
    }


def matching(task: str, settings: Settings, plans: dict[str, Any], checkpoint_dir: Path, seeds: list[int]) -> dict[str, Any]:
    """The budget of a task and, per method, the rank (and K) that matches it, with the expected parameters.

    ``random`` draws other kinds for every seed, so its entry is per seed: ``entry_for(match, "random", seed)``.
    """
    config = model_config(checkpoint_dir)
    r0 = settings.rank
    shapes = site_shapes(settings, plans, config)
    budget = r0 * shapes[settings.reference]["p1"]
    methods: dict[str, Any] = {
        method: at_closest_rank(method, shape["kinds"], shape["n_layers"], shape["p1"], budget) for method, shape in shapes.items()
    }
    methods["all@r0"] = {**methods["all"], "rank": r0, "expected_params": r0 * shapes["all"]["p1"]}
    methods["random"] = {"by_seed": random_entries(config, budget, seeds)}
    methods.update(weightlora_entries(config, settings, budget))
    for method in RACE:  # every candidate matched to the reference at r0, as the grid matches the fixed ones
        methods[method] = {"plugin": method, "rank": r0, "kinds": None, "n_layers": None, "expected_params": budget}
    for entry in methods.values():
        for one in entry["by_seed"].values() if "by_seed" in entry else [entry]:
            one["alpha"] = settings.alpha(one["rank"])
    return {"task": task, "budget": budget, "reference": settings.reference, "rank0": r0, "methods": methods}


def entry_for(match: dict[str, Any], method: str, seed: int | None) -> dict[str, Any]:
    """What ``method`` runs with for ``seed``: its rank, kinds, alpha (and K)."""
    entry = match["methods"][method]
    return entry["by_seed"][seed] if "by_seed" in entry else entry


def print_matching(match: dict[str, Any], methods: list[str]) -> None:
    """The matching as a table on the console: what a grid is about to train, before it spends hours on it."""
    budget = match["budget"]
    print(f"\n{match['task']}: budget {budget:,} trainable parameters = {match['reference']} at rank {match['rank0']}")
    print(f"  {'method':<13} {'rank':>4} {'alpha':>5} {'K':>4} {'params':>11} {'vs budget':>9}  placement")
    for method in methods:
        if method not in match["methods"]:
            continue
        entry = match["methods"][method]
        for seed, m in entry["by_seed"].items() if "by_seed" in entry else [(None, entry)]:
            name = method if seed is None else f"{method} s{seed}"
            if method in WEIGHTLORA:
                where = f"K={m['k']} of the candidate adapters (learned), warm-up {m['warmup_steps']} steps"
            elif method in RACE:
                where = "the winner of the race among the other placements (learned)"
            else:
                where = f"{', '.join(m['kinds'])} on {m['n_layers']} layers"
            print(
                f"  {name:<13} {m['rank']:>4} {m['alpha']:>5} {m.get('k', ''):>4} {m['expected_params']:>11,}"
                f" {m['expected_params'] / budget - 1:>+9.1%}  {where}"
            )


# ---- which recorded row stands for a run -------------------------------------------------------------------


def recorded_rows(path: Path, include_failed: bool = False) -> dict[tuple, dict[str, Any]]:
    """(config_id, task, method, seed) -> the newest row recorded as ok (or any row, with ``include_failed``)."""
    rows: dict[tuple, dict[str, Any]] = {}
    for row in read_jsonl(path):  # a line cut short by a kill is skipped: that run is simply run again
        if row.get("status") == "ok" or include_failed:
            rows[(row["config_id"], row["task"], row["method"], row.get("seed"))] = row
    return rows


def is_done(row: dict[str, Any] | None, method: str, m: dict[str, Any] | None) -> bool:
    """Whether a recorded row ran what the matching asks for now (the same rank; for fixed kinds, the same kinds)."""
    if row is None:
        return False
    if m is None:  # base: nothing to match
        return True
    if row.get("rank") != m["rank"]:
        return False
    return method not in FIXED or row.get("kinds") is None or sorted(row["kinds"]) == sorted(m["kinds"])


def is_stale(row: dict[str, Any] | None, method: str, rerun: list[str], rerun_before: str | None) -> bool:
    """Whether ``--rerun`` asks for this row to be run again: its method is named and it started before
    ``rerun_before`` (local time as the rows record it; an older row of a fixed method is superseded)."""
    return method in rerun and row is not None and row.get("started", "") < rerun_before

"""Evidence for the issue "does automatic placement beat the usual choices": a placement x task x seed grid.

Finetunes SmolLM2-135M-Instruct (the embedded checkpoint) with ``litgpt_plop.commands.finetune.setup`` once per
(task, method, seed), each run in a fresh subprocess (its peak RSS is measured with ``os.wait4``, and a crash or
timeout in one run is recorded and does not stop the grid), then scores held-out items with greedy generation.
Results are appended as JSON lines to ``--out``; a rerun skips every (task, method, seed, settings) already
recorded as ``ok`` (failed runs are retried), so the grid can be stopped and resumed at any time.
``python -m benchmarks.summarize`` turns the file into ``benchmarks/RESULTS.md`` and a plot.

Methods (``--methods``): the ``litgpt-plop finetune --plugin`` of the same name, all candidates = every linear
but the head (7 kinds x 30 layers on SmolLM2-135M):

    qv, attention, mlp, all, random      fixed kinds on every layer
    plop, plop-inverse                   3 kinds chosen by calibration (lowest / highest NFN), every layer
    cka                                  every kind on half the layers (--cka.ratio 0.5), chosen by calibration
    plop+cka                             PLoP's 3 kinds on CKA's half of the layers
    kappa                                3 kinds with the lowest condition number, every layer (weights only, no data)
    weightlora, weightlora+              K gated adapters learned during a warm-up (a quarter of the steps)
    all@r0                               ``all`` at the reference rank r0: the unmatched "everything" reference
    base                                 no finetuning: the pretrained model's accuracy (once per task, no seed)

Matching trainable parameters (docs/methods.md section 1: "at matched trainable-parameter counts (rank adjusted)")
------------------------------------------------------------------------------------------------------------------
* The budget B of a task is what ``--reference`` costs at rank r0 (``--rank``, default 8). Default reference:
  ``plop``, PLoP's default decision (its 3 lowest-NFN kinds on all 30 layers) at r0, as in the paper, where PLoP
  runs at its usual rank and the baselines are rank-adjusted to it. B therefore depends on the task (PLoP may
  choose other kinds for another task's prompts). ``--reference qv`` instead uses LitGPT's default (q and v at r0:
  460,800 parameters on SmolLM2-135M, the same for every task); then PLoP too is rank-adjusted.
* A method that puts one rank r on a known set of sites costs P(r) = r * P1, P1 = sum over its sites of
  (d_in + d_out). Its rank is the integer r >= 1 whose P(r) is closest to B: r = max(1, round(B / P1)).
* The sites of ``plop``, ``plop-inverse`` and ``plop+cka`` come from calibration (and ``kappa``'s from the
  weights), so they are learned first:
  before the first run of a task, ``litgpt_plop.plan.plan`` (what ``litgpt-plop plan`` runs; ~10 s per method
  for basic_arithmetic on an idle machine, longer for gsm_symbolic's longer prompts) is run once per task
  (cached in the run directory) in a subprocess for those methods with exactly the calibration settings the finetune uses, and the
  rank is set from the sites it chose. ``--plop.budget`` is NOT used: it keeps rank r0 and changes the number of
  kinds (greedily, so it undershoots by up to one kind), which is a different method from the paper's
  "3 kinds, rank adjusted". After each run the harness checks that the finetune chose the same sites as the plan
  (``sites_match_plan``) and records the parameters the run really trained.
* ``cka``: every kind on round(0.5 * 30) = 15 layers: P1 known without calibration. ``random``: the finetune
  draws its 3 kinds with ``preset("random", seed=--seed)``, so each seed has its own draw (on SmolLM2: seed 0
  key, value, mlp_fc_1; seed 1 projection, mlp_fc_2, mlp_proj; seed 2 key, value, projection); the harness makes the
  same draw and matches the rank per seed.
* ``weightlora`` / ``weightlora+``: rank r0 (WeightLoRA+ grows the survivors to 4 r0 itself), K =
  round(B / (r0 * mean P1 of one candidate adapter)), so K adapters of average size cost about B. Which adapters
  survive (and so the exact count) is decided while training; the recorded count is the final placement's.
  WeightLoRA+ starts with the same K and keeps K // 4 at rank 4 r0 (the same budget).
* ``lora_alpha`` follows the rank, alpha = r * (16 / r0) (``--alpha_rule ratio``), so every method has the
  same LoRA scale alpha / r = 2 and rank adjustment changes capacity, not the step size; ``--alpha_rule fixed``
  keeps alpha = 16 for every rank instead.

Per run (one JSON line): held-out exact-match accuracy (greedy, the task's own scorer, the prompt style the
checkpoint was trained with: ``litgpt_plop.commands.demo.accuracy``'s procedure, plus the mean partial-credit score),
final validation loss (on the same held-out items), trainable parameters (the final ``placement.json``; for
WeightLoRA also the gated count during the warm-up, from ``metrics.csv``), the rank, the budget, calibration
seconds (``placement.json``'s calibration record), median training-step time (``metrics.csv`` ``iter_time``), the
run's peak RSS (``os.wait4`` of the subprocess: model load, calibration, training, merge and evaluation) and the
peak at the end of finetuning (before evaluation), wall times, the machine's load average before and after.

Seeds: ``--seeds`` changes ``finetune``'s seed (LoRA initialisation, dropout) and the order of the training
batches (the shuffling seed of the same training items). The training items, the held-out items and the
calibration prompts stay the same, so every run of a task is scored on the same questions. ``random``'s kinds
change with the seed too (see above).

Resuming: a (task, method, seed) counts as done only if its newest ``ok`` row ran the rank (and, for the fixed
kinds, the kinds) that the matching asks for now; a row recorded with another rank is run again and the new row
supersedes it (``benchmarks.summarize`` uses the newest ``ok`` row of each run). After a fix in a method,
``--rerun METHOD --rerun_before TIME`` runs that method's rows started before TIME again.

Sizing (defaults, per run on 2 idle CPU cores): micro batch = global batch = 8, 100 optimizer steps (800
training examples, one pass over ``--train_size 800``), lr 2e-3 AdamW with 10 warm-up steps then cosine, 40
held-out items (validation loss and accuracy), 16 new tokens at most, 64 calibration prompts. basic_arithmetic
(~45 tokens per example): ~2.5 s/step -> ~4 min of training + ~1 min calibration/merge + ~1-2 min evaluation,
about 7 minutes; chain_sum's prompts are about as long. Full default grid (basic_arithmetic and
chain_sum): 2 tasks x 12 methods x 3 seeds = 72 runs + 2 base evaluations: roughly 8-9 hours. gsm_symbolic
(``--tasks gsm_symbolic``; ~100 tokens, up to ~190) is about 2-3x slower per run, 10-15 minutes.

What RESULTS.md reports was run at half that length, two harness processes side by side with one torch thread
each (about 4-6 minutes per run on 2 cores, 2 runs at a time):

    python -m benchmarks.placement_quality --tasks basic_arithmetic chain_sum --steps 50 --train_size 400 --threads 1 \
        --methods base qv attention mlp all random all@r0 &
    python -m benchmarks.placement_quality --tasks basic_arithmetic chain_sum --steps 50 --train_size 400 --threads 1 \
        --methods plop plop-inverse cka plop+cka weightlora weightlora+      # start once the first has planned
    python -m benchmarks.rescore --items 200         # the same trained runs on 200 held-out items (no training)
    python -m benchmarks.summarize

    # the full grid (resumable; Ctrl-C and rerun the same command to continue)
    python -m benchmarks.placement_quality
    python -m benchmarks.summarize                       # -> benchmarks/RESULTS.md + plot

    # a smoke check of the harness (base, qv and plop, 1 seed, 5 steps, 8 items: minutes, numbers mean nothing)
    python -m benchmarks.placement_quality --smoke
    python -m benchmarks.summarize --smoke

    # only print the parameter matching (runs the three cheap PLoP/CKA plans per task, no training)
    python -m benchmarks.placement_quality --dry_run
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DEFAULT_CHECKPOINT,
    REPO_ROOT,
    RESULTS_ROOT,
    append_jsonl,
    command_line,
    git_commit,
    machine,
    read_jsonl,
    run_worker,
    self_peak_rss_mib,
    write_text,
)
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
}
# What the grid runs, in the order it runs and reports them. What each one is comes from the project's method
# registry (litgpt_plop.selection.methods); ``all@r0`` and ``base`` exist only here (see the module docstring).
METHODS = (
    "qv", "attention", "mlp", "all", "random", "plop", "plop-inverse", "cka", "plop+cka", "kappa", "weightlora",
    "weightlora+", "all@r0",
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

    def config_id(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:10]

    def alpha(self, rank: int) -> int:
        base_alpha = 2 * self.rank  # alpha 16 at r0 = 8, the project's default
        return max(1, round(rank * base_alpha / self.rank)) if self.alpha_rule == "ratio" else base_alpha

    def weightlora_warmup_steps(self) -> int:
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


# ---- parameter matching ------------------------------------------------------------------------------------


def model_config(checkpoint_dir: Path):
    from litgpt import Config

    return Config.from_file(Path(checkpoint_dir) / "model_config.yaml")


def params_at_rank_one(config, kinds: list[str], layers: list[int] | None) -> int:
    from litgpt_plop.selection.placement import Placement

    return Placement.from_kinds(config, kinds, layers=layers, rank=1).trainable_params(config)


def closest_rank(budget: int, p1: int) -> int:
    """The integer rank r >= 1 whose r * p1 is closest to ``budget``."""
    low = max(1, budget // p1)
    return min((low, low + 1), key=lambda r: (abs(r * p1 - budget), r))


def fixed_kinds(method: str, config, seed: int = 0) -> list[str]:
    from litgpt_plop.selection.placement import model_kinds, preset

    # exactly what finetune does: decide_placement -> preset(..., candidates=every kind but the head, seed=--seed)
    candidates = list(model_kinds(config))
    return preset(method, config, rank=1, candidates=candidates, seed=seed).kinds


def matching(task: str, settings: Settings, plans: dict[str, Any], checkpoint_dir: Path, seeds: list[int]) -> dict[str, Any]:
    """The budget of a task and, per method, the rank (and K) that matches it, with the expected parameters.

    ``random`` draws other kinds for every seed, so its entry is per seed: ``entry_for(match, "random", seed)``.
    """
    from litgpt_plop.selection.placement import model_kinds

    config = model_config(checkpoint_dir)
    r0 = settings.rank
    shapes: dict[str, dict[str, Any]] = {}
    for method in FIXED:
        if method == "random":
            continue
        kinds = fixed_kinds(method, config)
        shapes[method] = {"kinds": kinds, "layers": list(range(config.n_layer))}
    for method in PLANNED:
        plan = plans[method]
        shapes[method] = {"kinds": plan["kinds"], "layers": plan["layers"]}
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
    budget = r0 * shapes[settings.reference]["p1"]

    methods: dict[str, Any] = {}
    for method, shape in shapes.items():
        rank = closest_rank(budget, shape["p1"])
        methods[method] = {
            "plugin": method,
            "rank": rank,
            "kinds": shape["kinds"],
            "n_layers": shape["n_layers"],
            "expected_params": rank * shape["p1"],
        }
    methods["all@r0"] = {**methods["all"], "rank": r0, "expected_params": r0 * shapes["all"]["p1"]}
    by_seed = {}
    for seed in seeds:
        kinds = fixed_kinds("random", config, seed)
        p1 = params_at_rank_one(config, kinds, list(range(config.n_layer)))
        rank = closest_rank(budget, p1)
        by_seed[seed] = {"plugin": "random", "rank": rank, "kinds": kinds, "n_layers": config.n_layer, "expected_params": rank * p1}
    methods["random"] = {"by_seed": by_seed}
    candidates = list(model_kinds(config))
    n_candidates = len(candidates) * config.n_layer
    mean_adapter = params_at_rank_one(config, candidates, None) / n_candidates * r0
    k = max(1, min(n_candidates, round(budget / mean_adapter)))
    for method in WEIGHTLORA:
        methods[method] = {
            "plugin": method,
            "rank": r0,
            "k": k,
            "kinds": None,
            "n_layers": None,
            "expected_params": round(k * mean_adapter),
            "warmup_steps": settings.weightlora_warmup_steps(),
        }
    for entry in methods.values():
        for one in entry["by_seed"].values() if "by_seed" in entry else [entry]:
            one["alpha"] = settings.alpha(one["rank"])
    return {"task": task, "budget": budget, "reference": settings.reference, "rank0": r0, "methods": methods}


# ---- the subprocess side -----------------------------------------------------------------------------------


def make_data(spec: dict[str, Any]):
    """The task's data module; training batches shuffled with ``shuffle_seed`` (same items, other order)."""
    import torch
    from litgpt.data import get_sft_collate_fn
    from torch.utils.data import DataLoader

    from litgpt_plop.data import ReasoningGym

    @dataclasses.dataclass
    class SeededOrderReasoningGym(ReasoningGym):
        """``ReasoningGym`` whose training batches are shuffled with their own seed (the items stay the same)."""

        shuffle_seed: int | None = None

        def train_dataloader(self) -> DataLoader:
            if self.shuffle_seed is None:
                return super().train_dataloader()
            return DataLoader(
                self.train_dataset,
                batch_size=self.batch_size,
                shuffle=True,
                generator=torch.Generator().manual_seed(self.shuffle_seed),
                num_workers=self.num_workers,
                collate_fn=get_sft_collate_fn(max_seq_length=self.max_seq_length, ignore_index=self.ignore_index),
            )

    return SeededOrderReasoningGym(
        task=spec["task"],
        task_config=spec["task_config"],
        train_size=spec["train_size"],
        val_size=spec["val_size"],
        seed=spec["data_seed"],
        shuffle_seed=spec.get("shuffle_seed"),
    )


def calibration_args(spec: dict[str, Any]):
    from litgpt_plop.args import CalibrationArgs

    return CalibrationArgs(num_samples=spec["calibration_samples"], batch_size=8, max_seq_length=256, progress=False)


def evaluate(checkpoint_dir: Path, data, num_items: int, max_new_tokens: int, records_path: Path | None) -> dict[str, Any]:
    """``litgpt_plop.commands.demo.accuracy``'s procedure (the checkpoint's prompt style, greedy, the task's scorer), keeping
    the partial-credit mean and the answers too."""
    from litgpt.prompts import PromptStyle, has_prompt_style, load_prompt_style
    from litgpt.tokenizer import Tokenizer

    from litgpt_plop.model.checkpoint import load_checkpoint_model
    from litgpt_plop.data import evaluate_accuracy

    model = load_checkpoint_model(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    prompt_style = load_prompt_style(checkpoint_dir) if has_prompt_style(checkpoint_dir) else PromptStyle.from_config(model.config)
    items = data.items("val")[:num_items]
    t0 = time.perf_counter()
    result = evaluate_accuracy(model, tokenizer, items, data.scorer(), prompt_style, max_new_tokens)
    seconds = time.perf_counter() - t0
    if records_path is not None:
        with open(records_path, "w") as f:
            for r in result.records:
                f.write(json.dumps(dataclasses.asdict(r)) + "\n")
    for r in result.records[:3]:
        print(f"  Q: {r.question!r}  expected {r.reference!r}  got {r.answer!r}", flush=True)
    return {
        "accuracy": result.accuracy,
        "mean_score": result.mean_score,
        "item_scores": [r.score for r in result.records],
        "eval_items": len(result.records),
        "eval_s": round(seconds, 2),
        "prompt_style": type(prompt_style).__name__,
    }


def read_metrics(out_dir: Path) -> dict[str, Any]:
    files = sorted(out_dir.glob("logs/csv/*/metrics.csv"))
    if not files:
        return {"metrics_csv": None}
    rows = list(csv.DictReader(open(files[-1])))

    def column(name: str) -> list[float]:
        return [float(row[name]) for row in rows if row.get(name) not in (None, "")]

    iter_times, losses, val_losses, trainable = column("iter_time"), column("loss"), column("val_loss"), column("trainable_params")
    return {
        "metrics_csv": str(files[-1].relative_to(REPO_ROOT)) if files[-1].is_relative_to(REPO_ROOT) else str(files[-1]),
        "median_step_s": statistics.median(iter_times) if iter_times else None,
        "mean_step_s": statistics.fmean(iter_times) if iter_times else None,
        "logged_steps": len(iter_times),
        "final_train_loss": losses[-1] if losses else None,
        "val_loss": val_losses[-1] if val_losses else None,
        "trainable_params_logged": int(trainable[0]) if trainable else None,
    }


def worker(spec_path: Path) -> None:
    """One job in this process: ``plan`` (PLoP/CKA decisions), ``base`` (evaluate the pretrained model) or
    ``finetune`` (finetune + evaluate). Writes ``spec["result_path"]``."""
    import warnings

    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_float32_matmul_precision("high")
    warnings.filterwarnings("ignore", message=r"The epoch parameter in `scheduler.step\(\)`.*")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    checkpoint_dir = Path(spec["checkpoint_dir"])
    run_dir = Path(spec["run_dir"])
    result: dict[str, Any] = {}
    t0 = time.perf_counter()

    if spec["mode"] == "plan":
        from litgpt_plop.args import CkaArgs
        from litgpt_plop.commands.plan import plan

        for method in spec["methods"]:
            # only the option groups the method reads (plan refuses the others): kappa reads no calibration
            groups = get_method(method).option_groups
            options = {"calibration": calibration_args(spec)} if "calibration" in groups else {}
            placement = plan(
                checkpoint_dir,
                method=method,
                out_dir=run_dir / method,
                data=make_data(spec),
                cka=CkaArgs(ratio=spec["cka_ratio"]),
                lora_r=spec["rank"],
                **options,
            )
            result[method] = {
                "kinds": placement.kinds,
                "layers": placement.layers,
                "sites": [[s.layer, s.kind] for s in placement.sites],
                "calibration_s": (placement.calibration or {}).get("seconds"),
                "per_kind": placement.scores.nfn_per_kind,
            }

    elif spec["mode"] == "base":
        result.update(evaluate(checkpoint_dir, make_data(spec), spec["eval_items"], spec["max_new_tokens"], run_dir / "eval.jsonl"))

    else:
        from litgpt.args import EvalArgs, TrainArgs

        import litgpt_plop.commands.finetune as finetune
        from litgpt_plop.args import CkaArgs
        from litgpt_plop.selection.placement import ALL_KINDS
        from litgpt_plop.weightlora import WeightLoRAArgs

        # Fabric never finalizes its loggers, so the CSV logger's last rows could stay unwritten (log_interval=1
        # flushes every row, but finalize anyway): keep a handle on it.
        loggers = []
        choose_logger = finetune.choose_logger

        def keep_logger(*args: Any, **kwargs: Any):
            logger = choose_logger(*args, **kwargs)
            loggers.append(logger)
            return logger

        finetune.choose_logger = keep_logger
        plugin = spec["plugin"]
        groups = get_method(plugin).option_groups  # the --<group>.* options this plugin reads
        options: dict[str, Any] = {}
        if "calibration" in groups:
            options["calibration"] = calibration_args(spec)
        if "cka" in groups:
            options["cka"] = CkaArgs(ratio=spec["cka_ratio"])
        if "weightlora" in groups:
            options["weightlora"] = WeightLoRAArgs(k=spec["k"], warmup_steps=spec["warmup_steps"])
        data = make_data(spec)
        t_train = time.perf_counter()
        try:
            finetune.setup(
                checkpoint_dir=checkpoint_dir,
                out_dir=run_dir,
                plugin=plugin,
                precision="32-true",
                lora_r=spec["rank"],
                lora_alpha=spec["alpha"],
                lora_dropout=spec["lora_dropout"],
                data=data,
                train=TrainArgs(
                    save_interval=None,
                    log_interval=1,
                    global_batch_size=spec["micro_batch"],
                    micro_batch_size=spec["micro_batch"],
                    lr_warmup_steps=spec["lr_warmup_steps"],
                    epochs=10_000,  # max_steps ends the run, never the epoch count (which would also generate an example)
                    max_steps=spec["steps"],
                    max_seq_length=spec["max_seq_length"],
                ),
                eval=EvalArgs(
                    interval=10**9, max_new_tokens=spec["max_new_tokens"], max_iters=10**6,
                    initial_validation=False, final_validation=True,
                ),  # fmt: skip
                optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": spec["lr"], "weight_decay": 0.0}},
                logger_name="csv",
                seed=spec["seed"],
                **options,
            )
        finally:
            for logger in loggers:
                logger.finalize("success")
        result["finetune_s"] = round(time.perf_counter() - t_train, 2)
        result["peak_rss_finetune_mb"] = round(self_peak_rss_mib(), 1)
        result.update(read_metrics(run_dir))
        final = run_dir / "final"
        placement = json.loads((final / "placement.json").read_text())
        sites = placement["sites"]
        result.update(
            trainable_params=placement["trainable_params"],
            kinds=sorted({s["kind"] for s in sites}, key=ALL_KINDS.index),
            n_layers=len({s["layer"] for s in sites}),
            n_sites=len(sites),
            ranks=sorted({s["rank"] for s in sites}),
            calibration_s=(placement.get("calibration") or {}).get("seconds"),
            sites=[[s["layer"], s["kind"]] for s in sites],
        )
        result.update(evaluate(final, data, spec["eval_items"], spec["max_new_tokens"], run_dir / "eval.jsonl"))
        if not spec.get("keep_checkpoints"):
            # the merged model is ~0.5 GB per run; the adapter (lit_model.pth.lora) and placement stay
            (final / "lit_model.pth").unlink(missing_ok=True)

    result["worker_s"] = round(time.perf_counter() - t0, 2)
    result["peak_rss_self_mb"] = round(self_peak_rss_mib(), 1)
    write_text(Path(spec["result_path"]), json.dumps(result))


def run_subprocess(spec: dict[str, Any], timeout: float, quiet: bool) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Run ``worker`` on ``spec`` in a fresh interpreter. Returns (result or None, process facts)."""
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "spec.json"
    result_path = Path(spec["result_path"])
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2))
    log_path = run_dir / "log.txt"
    run = run_worker(
        "benchmarks.placement_quality", ["--worker", str(spec_path)], log=log_path if quiet else None, console=not quiet, timeout=timeout
    )
    facts = {
        "returncode": run.returncode,
        "timed_out": run.timed_out,
        "wall_s": round(run.wall_s, 2),
        "peak_rss_mb": round(run.peak_rss_mib, 1),
        "cpu_user_s": round(run.cpu_user_s, 1),
        "cpu_sys_s": round(run.cpu_sys_s, 1),
        "cpu_per_wall": round(run.cpu_per_wall, 2),
        "log": str(log_path.relative_to(REPO_ROOT)) if log_path.is_relative_to(REPO_ROOT) else str(log_path),
    }
    if run.returncode != 0 or not result_path.is_file():
        try:
            facts["error_tail"] = log_path.read_text()[-3000:] if quiet else "(see the console)"
        except OSError:
            pass
        return None, facts
    return json.loads(result_path.read_text()), facts


# ---- the grid ----------------------------------------------------------------------------------------------


def base_spec(task: str, settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "checkpoint_dir": str(args.checkpoint_dir),
        "task": task,
        "task_config": TASK_CONFIGS.get(task),
        "train_size": settings.train_size,
        "val_size": settings.eval_items,
        "data_seed": settings.data_seed,
        "eval_items": settings.eval_items,
        "max_new_tokens": settings.max_new_tokens,
        "calibration_samples": settings.calibration_samples,
        "cka_ratio": settings.cka_ratio,
        "rank": settings.rank,
        "threads": args.threads,
    }


def load_plans(task: str, settings: Settings, args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """The PLoP / PLoP^-1 / PLoP+CKA decisions of a task (cached in the work directory)."""
    path = work_dir / task / "plans.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if all(method in cached for method in PLANNED):  # a cache from before a method was added is planned again
            return cached
    print(f"== {task}: planning {', '.join(PLANNED)} to learn their sites (calibration only)", flush=True)
    spec = {**base_spec(task, settings, args), "mode": "plan", "methods": list(PLANNED)}
    spec["run_dir"] = str(work_dir / task / "plans")
    spec["result_path"] = str(work_dir / task / "plans" / "result.json")
    result, facts = run_subprocess(spec, args.timeout, args.quiet)
    if result is None:
        raise RuntimeError(f"Planning {task} failed (exit {facts['returncode']}); log: {facts['log']}\n{facts.get('error_tail', '')}")
    result = {method: result[method] for method in PLANNED}
    path.write_text(json.dumps(result, indent=2))
    return result


def print_matching(match: dict[str, Any], methods: list[str]) -> None:
    budget = match["budget"]
    print(f"\n{match['task']}: budget {budget:,} trainable parameters = {match['reference']} at rank {match['rank0']}")
    print(f"  {'method':<13} {'rank':>4} {'alpha':>5} {'K':>4} {'params':>11} {'vs budget':>9}  placement")
    for method in methods:
        if method not in match["methods"]:
            continue
        entry = match["methods"][method]
        for seed, m in entry["by_seed"].items() if "by_seed" in entry else [(None, entry)]:
            name = method if seed is None else f"{method} s{seed}"
            where = (
                f"K={m['k']} of the candidate adapters (learned), warm-up {m['warmup_steps']} steps"
                if method in WEIGHTLORA
                else f"{', '.join(m['kinds'])} on {m['n_layers']} layers"
            )
            print(
                f"  {name:<13} {m['rank']:>4} {m['alpha']:>5} {m.get('k', ''):>4} {m['expected_params']:>11,}"
                f" {m['expected_params'] / budget - 1:>+9.1%}  {where}"
            )


def entry_for(match: dict[str, Any], method: str, seed: int | None) -> dict[str, Any]:
    """What ``method`` runs with for ``seed``: its rank, kinds, alpha (and K)."""
    entry = match["methods"][method]
    return entry["by_seed"][seed] if "by_seed" in entry else entry


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.placement_quality",
        description=(
            "Placement-quality grid: finetune SmolLM2-135M-Instruct on reasoning-gym tasks with each LoRA placement at"
            " matched trainable parameters, over seeds; one subprocess per run; results as JSON lines (resumable)."
            " See the module docstring for how parameters are matched."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__[__doc__.index("    # the full grid"):],
    )
    p.add_argument("--tasks", nargs="+", default=None, help=f"reasoning-gym tasks (default: {FULL['tasks']}; smoke: {SMOKE['tasks']})")
    p.add_argument(
        "--methods", nargs="+", default=None, choices=list(METHODS) + list(EXTRA_METHODS), metavar="METHOD",
        help=f"placements to run, from {list(METHODS) + list(EXTRA_METHODS)} (default: all of them; smoke: {SMOKE['methods']})",
    )  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: 0 1 2; smoke: 0)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 100; smoke 5)")
    p.add_argument("--micro_batch", type=int, default=None, help="examples per step (= global batch; default 8)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 2e-3)")
    p.add_argument("--rank", type=int, default=None, help="reference rank r0 (default 8)")
    p.add_argument("--reference", choices=REFERENCES, default=None, help="what sets the budget: plop (default) or qv at r0")
    p.add_argument("--alpha_rule", choices=("ratio", "fixed"), default=None, help="ratio (default): alpha = 2 r; fixed: alpha = 2 r0")
    p.add_argument("--eval_items", type=int, default=None, help="held-out items for accuracy and val loss (default 40; smoke 8)")
    p.add_argument("--train_size", type=int, default=None, help="training items (default 800; smoke 64)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="generation budget per answer (default 16)")
    p.add_argument("--calibration_samples", type=int, default=None, help="calibration prompts (default 64; smoke 16)")
    p.add_argument("--out", type=Path, default=None, help="JSONL results file (default benchmarks/results/placement_quality/results.jsonl; smoke: smoke.jsonl)")
    p.add_argument("--work_dir", type=Path, default=None, help="run directories (default benchmarks/results/placement_quality/runs/<full|smoke>)")
    p.add_argument("--checkpoint_dir", type=Path, default=DEFAULT_CHECKPOINT, help="LitGPT checkpoint to finetune (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--smoke", action="store_true", help="tiny settings to check the harness end to end (numbers mean nothing)")
    p.add_argument("--dry_run", action="store_true", help="plan and print the parameter matching, train nothing")
    p.add_argument("--no_retry_failed", action="store_true", help="also skip runs recorded as failed")
    p.add_argument("--rerun", nargs="+", default=[], metavar="METHOD", help="run these methods again where their newest ok row started before --rerun_before (after a fix in the method; the new row supersedes)")
    p.add_argument("--rerun_before", default=None, metavar="TIME", help="local time as the rows record it, e.g. 2026-11-23T02:12:00 (needed with --rerun)")
    p.add_argument("--keep_checkpoints", action="store_true", help="keep each run's merged lit_model.pth (~0.5 GB each)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed and recorded as failed (default 3600)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's choice)")
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=True, help="send each run's output to its log.txt (default) or to the console")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    settings = Settings(smoke=args.smoke)
    profile = SMOKE if args.smoke else {}
    for field in dataclasses.fields(Settings):
        if field.name == "smoke":
            continue
        value = getattr(args, field.name, None)
        if value is None:
            value = profile.get(field.name, getattr(settings, field.name))
        setattr(settings, field.name, value)
    if settings.steps < 1 or settings.eval_items < 1 or settings.rank < 1:
        raise SystemExit("--steps, --eval_items and --rank must be positive")
    if settings.lr_warmup_steps >= settings.steps:
        settings.lr_warmup_steps = max(1, settings.steps // 5)
    return settings


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return
    settings = settings_from(args)
    profile = SMOKE if args.smoke else FULL
    tasks = args.tasks or profile["tasks"]
    methods = args.methods or profile["methods"]
    seeds = args.seeds if args.seeds is not None else profile["seeds"]
    name = "smoke" if args.smoke else "full"
    out = args.out or RESULTS_DIR / ("smoke.jsonl" if args.smoke else "results.jsonl")
    work_root = args.work_dir or RESULTS_DIR / "runs"
    if args.work_dir is None:
        work_root.mkdir(parents=True, exist_ok=True)
        (work_root / ".gitignore").write_text("*\n")  # run directories are bulky scratch, never committed
    config_id = settings.config_id()
    work_dir = (work_root / name / config_id).resolve()
    for task in tasks:
        if task not in TASK_CONFIGS:
            print(f"note: {task!r} has no preset config here; using reasoning-gym's defaults", flush=True)
    command = command_line("benchmarks.placement_quality", argv)
    info = machine()
    commit = git_commit()
    print(f"placement_quality: config {config_id} ({name}); results -> {out}; runs -> {work_dir}", flush=True)
    print(f"settings: {json.dumps(dataclasses.asdict(settings))}", flush=True)

    finetuned = [m for m in methods if m != "base"]
    matches = {}
    for task in tasks:
        plans = load_plans(task, settings, args, work_dir) if finetuned else {}
        if finetuned:
            matches[task] = matching(task, settings, plans, args.checkpoint_dir, seeds)
            print_matching(matches[task], finetuned)
    if args.dry_run:
        return

    recorded = recorded_rows(out, include_failed=args.no_retry_failed)
    # seed-major: a grid stopped early still has every task x method for the first seeds
    jobs = [(task, "base", None) for task in tasks if "base" in methods]
    jobs += [(task, method, seed) for seed in seeds for task in tasks for method in finetuned]
    if args.rerun and not args.rerun_before:
        raise SystemExit("--rerun needs --rerun_before TIME: the rows started before it are run again")

    def stale(row: dict[str, Any] | None, method: str) -> bool:
        return method in args.rerun and row is not None and row.get("started", "") < args.rerun_before

    todo = [
        (task, method, seed) for task, method, seed in jobs
        if not is_done(recorded.get((config_id, task, method, seed)), method, None if method == "base" else entry_for(matches[task], method, seed))
        or stale(recorded.get((config_id, task, method, seed)), method)
    ]  # fmt: skip
    print(f"\n{len(jobs)} runs, {len(jobs) - len(todo)} already done in {out}, {len(todo)} to go", flush=True)

    for index, (task, method, seed) in enumerate(todo, 1):
        spec = {**base_spec(task, settings, args), "mode": "base" if method == "base" else "finetune"}
        row: dict[str, Any] = {
            "config_id": config_id,
            "task": task,
            "method": method,
            "seed": seed,
            "smoke": settings.smoke,
            "settings": dataclasses.asdict(settings),
            "task_config": TASK_CONFIGS.get(task),
        }
        if method != "base":
            match = matches[task]
            m = entry_for(match, method, seed)
            spec.update(
                plugin=m["plugin"], rank=m["rank"], alpha=m["alpha"], seed=seed, shuffle_seed=settings.data_seed + 1000 * (seed + 1),
                steps=settings.steps, micro_batch=settings.micro_batch, lr=settings.lr, lr_warmup_steps=settings.lr_warmup_steps,
                max_seq_length=settings.max_seq_length, lora_dropout=settings.lora_dropout, keep_checkpoints=args.keep_checkpoints,
            )  # fmt: skip
            if method in WEIGHTLORA:
                spec.update(k=m["k"], warmup_steps=m["warmup_steps"])
            row.update(
                plugin=m["plugin"], rank=m["rank"], alpha=m["alpha"], k=m.get("k"), budget_params=match["budget"],
                reference=f"{match['reference']}@r{match['rank0']}", expected_params=m["expected_params"],
            )  # fmt: skip
        run_dir = work_dir / task / method.replace("+", "_plus").replace("@", "_at_") / ("base" if seed is None else f"seed{seed}")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        spec["run_dir"] = str(run_dir)
        spec["result_path"] = str(run_dir / "result.json")
        label = f"[{index}/{len(todo)}] {task} {method}" + ("" if seed is None else f" seed {seed}")
        if method != "base":
            label += f" (rank {spec['rank']}{', K ' + str(spec['k']) if 'k' in spec else ''})"
        print(f"{label} ...", flush=True)
        load_before = os.getloadavg()
        started = time.time()
        result, facts = run_subprocess(spec, args.timeout, args.quiet)
        row.update(
            status="ok" if result is not None else ("timeout" if facts["timed_out"] else "failed"),
            **(result or {}),
            **facts,
            loadavg_before=[round(x, 2) for x in load_before],
            loadavg_after=[round(x, 2) for x in os.getloadavg()],
            started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            machine=info,
            git_commit=commit,
            command=command,
            run_dir=str(run_dir.relative_to(REPO_ROOT)) if run_dir.is_relative_to(REPO_ROOT) else str(run_dir),
        )
        if result is not None and method in PLANNED:
            plan_sites = sorted(map(tuple, plans_cache(work_dir, task)[method]["sites"]))
            row["sites_match_plan"] = sorted(map(tuple, result["sites"])) == plan_sites
        if result is not None and method != "base":
            row["params_vs_budget"] = round(row["trainable_params"] / row["budget_params"] - 1, 4)
        row.pop("sites", None)
        append_jsonl(out, row)
        if result is None:
            print(f"    {row['status']} (exit {facts['returncode']}) after {facts['wall_s']:.0f}s; log: {facts['log']}", flush=True)
            tail = (facts.get("error_tail") or "").strip().splitlines()[-5:]
            for line in tail:
                print(f"    | {line}", flush=True)
        else:
            parts = [f"acc {row['accuracy']:.3f} ({row['eval_items']} items)"]
            if method != "base":
                parts += [
                    f"val loss {row['val_loss']:.3f}" if row.get("val_loss") is not None else "val loss n/a",
                    f"params {row['trainable_params']:,} ({row['params_vs_budget']:+.1%} vs budget)",
                    f"step {row['median_step_s']:.2f}s" if row.get("median_step_s") else "step n/a",
                ]
                if row.get("calibration_s") is not None:
                    parts.append(f"calibration {row['calibration_s']:.1f}s")
                if row.get("sites_match_plan") is False:
                    parts.append("SITES DIFFER FROM THE PLAN")
            parts += [f"peak RSS {row['peak_rss_mb']:.0f} MB", f"{row['wall_s']:.0f}s"]
            print("    " + ", ".join(parts), flush=True)
    print(f"\ndone; summarize with: python -m benchmarks.summarize{' --smoke' if args.smoke else ''} --results {out}", flush=True)


def plans_cache(work_dir: Path, task: str) -> dict[str, Any]:
    return json.loads((work_dir / task / "plans.json").read_text())


if __name__ == "__main__":
    main()

"""One job of the placement-quality grid, in the fresh process ``benchmarks.placement_quality`` starts for it.

    python -m benchmarks.quality_worker --_worker SPEC_FILE      # benchmarks.common.call_worker's protocol

A job is ``plan`` (the PLoP / PLoP^-1 / PLoP+CKA / kappa decisions of a task, whose sites set their rank),
``base`` (score the pretrained model) or ``finetune`` (``litgpt_plop.commands.finetune.setup`` with the matched
rank, then score the merged model). Each job gets its own process so that its peak RSS is its own and a crash
or hang costs one run, not the grid. The report (``answer_worker``) holds what the job measured; the parent adds
the process facts and writes the row.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, answer_worker, self_peak_rss_mib
from litgpt_plop.selection.methods import get_method

# ---- data, calibration, scoring ----------------------------------------------------------------------------


def make_data(spec: dict[str, Any]) -> Any:
    """The task's data module (``benchmarks.qa_task``'s for its free-text task, else reasoning-gym's); training
    batches shuffled with ``shuffle_seed`` (same items, other order)."""
    import torch
    from litgpt.data import get_sft_collate_fn
    from torch.utils.data import DataLoader

    from benchmarks.qa_task import TASK as QA_TASK, ChatterbotQA
    from litgpt_plop.data import ReasoningGym

    base = ChatterbotQA if spec["task"] == QA_TASK else ReasoningGym

    @dataclasses.dataclass
    class SeededOrder(base):  # type: ignore[valid-type, misc]
        """The task's data module whose training batches are shuffled with their own seed (the items stay the same)."""

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

    return SeededOrder(
        task=spec["task"],
        task_config=spec["task_config"],
        train_size=spec["train_size"],
        val_size=spec["val_size"],
        seed=spec["data_seed"],
        shuffle_seed=spec.get("shuffle_seed"),
    )


def calibration_args(spec: dict[str, Any]) -> Any:
    """The calibration settings of the plans and the finetunes alike, so a plan predicts the finetune's sites."""
    from litgpt_plop.args import CalibrationArgs

    return CalibrationArgs(num_samples=spec["calibration_samples"], batch_size=8, max_seq_length=256, progress=False)


def evaluate_nll(model: Any, tokenizer: Any, prompt_style: Any, data: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """The free-text task's score: each held-out answer's mean negative log-likelihood (``benchmarks.qa_task``)."""
    from benchmarks.qa_task import answer_nll

    data.prompt_style = prompt_style
    data.connect(tokenizer=tokenizer, batch_size=1, max_seq_length=spec.get("max_seq_length", 256))
    data.setup()
    t0 = time.perf_counter()
    scores = answer_nll(model, data, spec["eval_items"], spec.get("eval_batch") or 32)
    return {
        "accuracy": None, "nll": statistics.fmean(scores), "item_scores": scores, "eval_items": len(scores),
        "eval_s": round(time.perf_counter() - t0, 2), "prompt_style": type(prompt_style).__name__,
    }  # fmt: skip


def evaluate(checkpoint_dir: Path, data: Any, spec: dict[str, Any], records_path: Path | None) -> dict[str, Any]:
    """``litgpt_plop.commands.demo.accuracy``'s procedure (the checkpoint's prompt style, greedy, the task's scorer), keeping
    the partial-credit mean and the answers too; for the free-text task, ``evaluate_nll``. ``spec``: ``eval_items``,
    ``max_new_tokens``, and ``eval_batch`` (items answered together; 1 when absent)."""
    import torch
    from litgpt.prompts import PromptStyle, has_prompt_style, load_prompt_style
    from litgpt.tokenizer import Tokenizer

    from benchmarks.qa_task import TASK as QA_TASK
    from litgpt_plop.data import evaluate_accuracy
    from litgpt_plop.model.checkpoint import load_checkpoint_model

    model = load_checkpoint_model(checkpoint_dir)
    if torch.cuda.is_available():
        model = model.cuda()
    tokenizer = Tokenizer(checkpoint_dir)
    prompt_style = load_prompt_style(checkpoint_dir) if has_prompt_style(checkpoint_dir) else PromptStyle.from_config(model.config)
    if spec["task"] == QA_TASK:
        return evaluate_nll(model, tokenizer, prompt_style, data, spec)
    items = data.items("val")[: spec["eval_items"]]
    t0 = time.perf_counter()
    result = evaluate_accuracy(model, tokenizer, items, data.scorer(), prompt_style, spec["max_new_tokens"], spec.get("eval_batch") or 1)
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
    """Step times, losses and the logged trainable-parameter count from the run's ``metrics.csv`` (the newest)."""
    files = sorted(out_dir.glob("logs/csv/*/metrics.csv"))
    if not files:
        return {"metrics_csv": None}
    with open(files[-1]) as f:
        rows = list(csv.DictReader(f))

    def column(name: str) -> list[float]:
        return [float(row[name]) for row in rows if row.get(name) not in (None, "")]

    iter_times, losses, val_losses, trainable = column("iter_time"), column("loss"), column("val_loss"), column("trainable_params")
    # LitGPT logs a validation at the iteration it followed (one optimizer step per iteration in the grid); the
    # validation after the loop is logged at step 0 and is the run's final ``val_loss``
    val_curve = [[int(row["step"]), float(row["val_loss"])] for row in rows
                 if row.get("val_loss") not in (None, "") and int(row["step"]) > 0]  # fmt: skip
    return {
        "metrics_csv": str(files[-1].relative_to(REPO_ROOT)) if files[-1].is_relative_to(REPO_ROOT) else str(files[-1]),
        "median_step_s": statistics.median(iter_times) if iter_times else None,
        "mean_step_s": statistics.fmean(iter_times) if iter_times else None,
        "logged_steps": len(iter_times),
        "final_train_loss": losses[-1] if losses else None,
        "val_loss": val_losses[-1] if val_losses else None,
        "val_curve": val_curve,
        "trainable_params_logged": int(trainable[0]) if trainable else None,
    }


# ---- the jobs ----------------------------------------------------------------------------------------------


def plan_job(spec: dict[str, Any], checkpoint_dir: Path, run_dir: Path) -> dict[str, Any]:
    """``litgpt-plop plan`` for each of ``spec["methods"]``: the kinds, layers and sites each one chooses."""
    from litgpt_plop.args import CkaArgs
    from litgpt_plop.commands.plan import plan

    result: dict[str, Any] = {}
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
    return result


def plugin_options(spec: dict[str, Any]) -> dict[str, Any]:
    """The ``--<group>.*`` options of the run's plugin, and only those: finetune refuses groups a plugin ignores."""
    from litgpt_plop.args import CkaArgs
    from litgpt_plop.weightlora import WeightLoRAArgs

    groups = get_method(spec["plugin"]).option_groups
    options: dict[str, Any] = {}
    if "calibration" in groups:
        options["calibration"] = calibration_args(spec)
    if "cka" in groups:
        options["cka"] = CkaArgs(ratio=spec["cka_ratio"])
    if "weightlora" in groups:
        options["weightlora"] = WeightLoRAArgs(k=spec["k"], warmup_steps=spec["warmup_steps"])
    if "race" in groups:
        from litgpt_plop.race import RaceArgs

        options["race"] = RaceArgs(reference=spec["reference"])
    return options


@contextlib.contextmanager
def finalized_loggers() -> Iterator[None]:
    """Finalize every logger the finetune makes when it ends. Fabric never finalizes its loggers, so the CSV
    logger's last rows could stay unwritten (log_interval=1 flushes every row, but finalize anyway)."""
    from litgpt_plop.commands import finetune

    loggers: list[Any] = []
    choose_logger = finetune.choose_logger

    def keep_logger(*args: Any, **kwargs: Any) -> Any:
        logger = choose_logger(*args, **kwargs)
        loggers.append(logger)
        return logger

    finetune.choose_logger = keep_logger
    try:
        yield
    finally:
        for logger in loggers:
            logger.finalize("success")
        finetune.choose_logger = choose_logger


@contextlib.contextmanager
def observing_validations(litgpt_lora: Any) -> Iterator[None]:
    """Make the validations of LitGPT's loop after its first one leave the training as it would have been.

    With ``eval.interval`` LitGPT's loop validates and then samples an example. Iterating the validation loader
    draws a seed from torch's global generator, the stream that dropout and the training batches' order also draw
    from: those validations run on a copy of the stream (``torch.random.fork_rng``), as the race's round validations
    do (``litgpt_plop.race.runner.validation_loss``). The example is only printed, and even with the stream restored
    it left the later steps' losses slightly different (a 6-step run validated every 2 steps: step 3's loss 2.75303
    against 2.75274 validated once), so it is not sampled. The loop's first validation, two batches before the first
    step, is every run's and draws as it always does. With this, a run validated every few steps trains exactly as
    the same run validated once at the end, and as a race's candidate does.
    """
    import torch

    from litgpt_plop.race.runner import cuda_devices

    validate, generate_example = litgpt_lora.validate, litgpt_lora.generate_example
    calls = 0

    def validate_after_the_first(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return validate(*args, **kwargs)
        with torch.random.fork_rng(devices=cuda_devices()):
            return validate(*args, **kwargs)

    litgpt_lora.validate, litgpt_lora.generate_example = validate_after_the_first, lambda *args, **kwargs: None
    try:
        yield
    finally:
        litgpt_lora.validate, litgpt_lora.generate_example = validate, generate_example


def train(spec: dict[str, Any], checkpoint_dir: Path, run_dir: Path, data: Any) -> None:
    """``litgpt-plop finetune`` as the grid runs it: fp32, one optimizer step per micro batch, ``spec["steps"]``
    steps, a CSV log row every step, a validation at the end (and every ``spec["val_interval"]`` steps, when given,
    without changing the training), no intermediate checkpoints."""
    import litgpt.finetune.lora as litgpt_lora
    from litgpt.args import EvalArgs, TrainArgs

    from litgpt_plop.commands import finetune

    # a race validates its candidates at its rounds itself; LitGPT's validations after it would move its winner's
    # random stream: a race runs as it always does
    val_interval = spec.get("val_interval") if spec["plugin"] != "race" else None
    observing = observing_validations(litgpt_lora) if val_interval else contextlib.nullcontext()
    with finalized_loggers(), observing:
        finetune.setup(
            checkpoint_dir=checkpoint_dir,
            out_dir=run_dir,
            plugin=spec["plugin"],
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
                interval=val_interval or 10**9,
                max_new_tokens=spec["max_new_tokens"],
                max_iters=10**6,
                initial_validation=False,
                final_validation=True,
            ),
            optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": spec["lr"], "weight_decay": 0.0}},
            logger_name="csv",
            seed=spec["seed"],
            **plugin_options(spec),
        )


def placement_facts(final: Path) -> dict[str, Any]:
    """What the run really trained, from its final ``placement.json``: parameters, kinds, layers, sites, ranks."""
    from litgpt_plop.selection.placement import ALL_KINDS

    placement = json.loads((final / "placement.json").read_text())
    sites = placement["sites"]
    return {
        "trainable_params": placement["trainable_params"],
        "kinds": sorted({s["kind"] for s in sites}, key=ALL_KINDS.index),
        "n_layers": len({s["layer"] for s in sites}),
        "n_sites": len(sites),
        "ranks": sorted({s["rank"] for s in sites}),
        "calibration_s": (placement.get("calibration") or {}).get("seconds"),
        "sites": [[s["layer"], s["kind"]] for s in sites],
        "race": placement["scores"].get("race"),  # the race's candidates and rounds (``--plugin race``)
        "race_s": (placement.get("calibration") or {}).get("race_seconds"),
    }


def finetune_job(spec: dict[str, Any], checkpoint_dir: Path, run_dir: Path) -> dict[str, Any]:
    """Finetune, then score the merged model on the held-out items; the peak RSS of the finetune alone too."""
    data = make_data(spec)
    t_train = time.perf_counter()
    train(spec, checkpoint_dir, run_dir, data)
    result: dict[str, Any] = {
        "finetune_s": round(time.perf_counter() - t_train, 2),
        "peak_rss_finetune_mb": round(self_peak_rss_mib(), 1),
    }
    result.update(read_metrics(run_dir))
    final = run_dir / "final"
    result.update(placement_facts(final))
    result.update(evaluate(final, data, spec, run_dir / "eval.jsonl"))
    if not spec.get("keep_checkpoints"):
        # the merged model is ~0.5 GB per run; the adapter (lit_model.pth.lora) and placement stay
        (final / "lit_model.pth").unlink(missing_ok=True)
    return result


def work(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the job ``spec["mode"]`` names in this process; its report, with the job's seconds and peak RSS."""
    import warnings

    import torch

    torch.set_float32_matmul_precision("high")
    warnings.filterwarnings("ignore", message=r"The epoch parameter in `scheduler.step\(\)`.*")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    checkpoint_dir, run_dir = Path(spec["checkpoint_dir"]), Path(spec["run_dir"])
    t0 = time.perf_counter()
    if spec["mode"] == "plan":
        result = plan_job(spec, checkpoint_dir, run_dir)
    elif spec["mode"] == "base":
        result = evaluate(checkpoint_dir, make_data(spec), spec, run_dir / "eval.jsonl")
    else:
        result = finetune_job(spec, checkpoint_dir, run_dir)
    result["worker_s"] = round(time.perf_counter() - t0, 2)
    result["peak_rss_self_mb"] = round(self_peak_rss_mib(), 1)
    if torch.cuda.is_available():  # what sizes the GPU grid's parallel runs (benchmarks.gpu_grid)
        result["cuda_peak_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return result


def main(argv: list[str] | None = None) -> None:
    """The worker's entry point: only ``call_worker`` starts it, so its one flag stays out of ``--help``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality_worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--_worker", required=True, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    answer_worker(args._worker, work)


if __name__ == "__main__":
    main()

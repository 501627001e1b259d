"""Score the placement-quality runs again on more held-out items, from the adapters they saved: no retraining.

``benchmarks.placement_quality`` scores each run on the task's first ``eval_items`` (40) held-out items, where one item
is 2.5 accuracy points and most differences between placements are one to three items. Every run directory keeps
its adapter (``final/``: ``lit_model.pth.lora``, ``placement.json`` and the configs), so the same trained models
can answer many more held-out items for the cost of generation alone.

Per run: the base checkpoint plus the saved adapter (``litgpt_plop.model.export.load_adapter``, unmerged), the run's
prompt style, greedy answers of at most ``max_new_tokens`` to the first ``--items`` held-out items of the task,
scored with the task's own scorer, prompts of equal token length answered together (``--batch_size``). The first
``eval_items`` of them are the items the run was scored on; the rest come from the same held-out seed range,
minus any whose question is among the run's training items or repeats an earlier held-out question. Each row
records how many of the first ``eval_items`` answers agree (right vs wrong) with the run's own scoring, which
checks the set-up: an unmerged adapter and batched decoding round differently from the merged model decoded one
by one, which can flip a near-tie, nothing more.

Output: one JSON line per run in ``benchmarks/results/placement_quality/rescore.jsonl``, keyed by the run's row
(settings hash, task, method, seed and the time the run started), so a run trained again is scored again and a
finished grid resumes where it stopped. ``benchmarks.summarize`` reads the file and adds the larger evaluation to
RESULTS.md.

    python -m benchmarks.rescore --items 200 --threads 2
    python -m benchmarks.rescore --tasks basic_arithmetic --methods plop qv --items 200
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_CHECKPOINT, REPO_ROOT, append_jsonl, command_line, machine, read_jsonl
from benchmarks.quality_grid import RESULTS_DIR, recorded_rows


def held_out_items(row: dict[str, Any], num_items: int) -> list[dict[str, Any]]:
    """The run's own held-out items first, then further ones that are neither training items nor repeats."""
    from litgpt_plop.data import ReasoningGym

    settings = row["settings"]
    common = {"task": row["task"], "task_config": row.get("task_config"), "seed": settings["data_seed"]}
    # Exactly the run's data module: its held-out items and the training items it excluded them from.
    run_data = ReasoningGym(train_size=settings["train_size"], val_size=settings["eval_items"], **common)
    original = run_data.items("val")
    if num_items <= len(original):
        return original[:num_items]
    seen = {item["question"] for item in run_data.items("train")} | {item["question"] for item in original}
    items: list[dict[str, Any]] = []
    size = num_items
    while len(items) < num_items:
        found = len(items)
        size *= 2  # skipped items need room; reasoning-gym builds items lazily, so a long list is cheap
        pool = ReasoningGym(train_size=1, val_size=size, **common).items("val")
        if [item["question"] for item in pool[: len(original)]] != [item["question"] for item in original]:
            raise RuntimeError(f"{row['task']}: a larger held-out list does not start with the run's items")
        items, taken = list(original), set(seen)
        for item in pool[len(original) :]:
            if item["question"] not in taken:
                items.append(item)
                taken.add(item["question"])
            if len(items) == num_items:
                break
        if len(items) == found:  # twice the pool, no new question
            raise RuntimeError(
                f"{row['task']}: fewer than {num_items} distinct held-out questions in its configuration"
                f" (found {found} that are not training items)"
            )
    return items


def rescore_run(row: dict[str, Any], items: list[dict[str, Any]], checkpoint_dir: Path, batch_size: int, max_new_tokens: int) -> dict[str, Any]:
    """Load the run's model (base or base + saved adapter) and score it on ``items``."""
    from litgpt.prompts import PromptStyle, has_prompt_style, load_prompt_style
    from litgpt.tokenizer import Tokenizer

    from litgpt_plop.model.checkpoint import load_checkpoint_model
    from litgpt_plop.data import ReasoningGym, evaluate_accuracy
    from litgpt_plop.model.export import load_adapter

    run_dir = Path(row["run_dir"])
    run_dir = run_dir if run_dir.is_absolute() else REPO_ROOT / run_dir
    if row["method"] == "base":
        model, style_dir = load_checkpoint_model(checkpoint_dir), checkpoint_dir
    else:
        style_dir = run_dir / "final"
        if not (style_dir / "lit_model.pth.lora").is_file():
            raise FileNotFoundError(f"{str(style_dir)!r} has no saved adapter (lit_model.pth.lora)")
        model = load_adapter(checkpoint_dir, style_dir)
    model.requires_grad_(False)
    tokenizer = Tokenizer(checkpoint_dir)
    prompt_style = load_prompt_style(style_dir) if has_prompt_style(style_dir) else PromptStyle.from_config(model.config)
    scorer = ReasoningGym(task=row["task"], task_config=row.get("task_config"), seed=row["settings"]["data_seed"]).scorer()
    started = time.perf_counter()
    result = evaluate_accuracy(model, tokenizer, items, scorer, prompt_style, max_new_tokens, batch_size=batch_size)
    seconds = time.perf_counter() - started
    scores = [r.score for r in result.records]
    recorded = row.get("item_scores") or []
    agree = sum((a == 1.0) == (b == 1.0) for a, b in zip(scores, recorded))
    return {
        "items": len(scores),
        "accuracy": result.accuracy,
        "mean_score": result.mean_score,
        "item_scores": scores,
        "agree_first": agree,
        "compared_first": min(len(scores), len(recorded)),
        "eval_s": round(seconds, 2),
    }


def rescored_keys(path: Path) -> set[tuple]:
    # a line cut short by a kill is skipped: that run is scored again
    return {(r["config_id"], r["task"], r["method"], r.get("seed"), r["run_started"], r["items"]) for r in read_jsonl(path)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rescore", description="Score benchmarks.placement_quality's runs again on more held-out items.")
    p.add_argument("--results", type=Path, default=RESULTS_DIR / "results.jsonl", help="the harness's JSONL (default: results.jsonl)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "rescore.jsonl", help="JSONL written here (default: rescore.jsonl)")
    p.add_argument("--config_id", default=None, help="settings hash to rescore (default: the newest row's)")
    p.add_argument("--tasks", nargs="+", default=None, help="only these tasks (default: all)")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all)")
    p.add_argument("--items", type=int, default=200, help="held-out items per run, the run's own first (default 200)")
    p.add_argument("--batch_size", type=int, default=25, help="prompts answered together (default 25)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--checkpoint_dir", type=Path, default=DEFAULT_CHECKPOINT, help="the base checkpoint the runs finetuned")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r for r in recorded_rows(args.results).values() if not r.get("smoke")]
    if not rows:
        raise SystemExit(f"No successful runs in {str(args.results)!r}")
    config_id = args.config_id or max(rows, key=lambda r: r.get("started", ""))["config_id"]
    rows = [
        r for r in rows
        if r["config_id"] == config_id and (args.tasks is None or r["task"] in args.tasks)
        and (args.methods is None or r["method"] in args.methods)
    ]  # fmt: skip
    if not rows:
        raise SystemExit(f"No runs of settings {config_id} match --tasks {args.tasks} --methods {args.methods}")
    done = rescored_keys(args.out)
    todo = [r for r in rows if (r["config_id"], r["task"], r["method"], r.get("seed"), r["started"], args.items) not in done]
    todo.sort(key=lambda r: (r["task"], r.get("seed") if r.get("seed") is not None else -1, r["method"]))
    print(f"rescore: settings {config_id}, {len(rows)} runs, {len(rows) - len(todo)} already scored on {args.items} items, {len(todo)} to go", flush=True)
    info = machine()
    command = command_line("benchmarks.rescore", argv)
    items_by_task: dict[str, list[dict[str, Any]]] = {}
    for index, row in enumerate(todo, 1):
        task = row["task"]
        if task not in items_by_task:
            items_by_task[task] = held_out_items(row, args.items)
        label = f"[{index}/{len(todo)}] {task} {row['method']}" + ("" if row.get("seed") is None else f" seed {row['seed']}")
        try:
            result = rescore_run(row, items_by_task[task], args.checkpoint_dir, args.batch_size, row["settings"]["max_new_tokens"])
        except (FileNotFoundError, RuntimeError, ValueError) as e:
            print(f"{label}: skipped: {e}", flush=True)
            continue
        out = {
            "config_id": config_id, "task": task, "method": row["method"], "seed": row.get("seed"),
            "run_started": row["started"], "run_accuracy": row.get("accuracy"), **result,
            "batch_size": args.batch_size, "machine": info, "scored": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command,
        }  # fmt: skip
        append_jsonl(args.out, out)  # one whole line per run: a kill loses at most the run in progress
        print(
            f"{label}: acc {result['accuracy']:.3f} on {result['items']} items (was {row.get('accuracy', float('nan')):.3f}"
            f" on {result['compared_first']}; {result['agree_first']}/{result['compared_first']} agree), {result['eval_s']:.0f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()

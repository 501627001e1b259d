"""The CPU demo behind ``make demo``: PLoP-placed LoRA on the embedded SmolLM2-135M-Instruct, accuracy before/after.

Runs ``litgpt-plop finetune --config configs/demo-cpu.yaml`` (printing the placement table and training with
LitGPT's loop), and scores the held-out items with greedy generation before and after.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml
from jsonargparse import CLI
from litgpt.prompts import PromptStyle, has_prompt_style, load_prompt_style
from litgpt.tokenizer import Tokenizer

from litgpt_plop.data import ReasoningGym, evaluate_accuracy
from litgpt_plop.commands.finetune import setup as finetune
from litgpt_plop.selection.placement import Placement
from litgpt_plop.model.checkpoint import load_checkpoint_model
from litgpt_plop.prepare import prepare_smollm2


def accuracy(checkpoint_dir: Path, data: ReasoningGym, num_items: int, max_new_tokens: int, batch_size: int = 1) -> float:
    """Exact-match accuracy on held-out items, prompted as ``litgpt generate`` would prompt this checkpoint."""
    model = load_checkpoint_model(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    if has_prompt_style(checkpoint_dir):  # a finetuned checkpoint records the style it was trained with
        prompt_style = load_prompt_style(checkpoint_dir)
    else:
        prompt_style = PromptStyle.from_config(model.config)
    items = data.items("val")[:num_items]
    result = evaluate_accuracy(model, tokenizer, items, data.task, prompt_style, max_new_tokens, batch_size=batch_size)
    for record in result.records[:3]:
        print(f"  Q: {record.question!r}  expected {record.reference!r}  got {record.answer!r}")
    return result.accuracy


def main(
    finetune_config: Path = Path("configs/demo-cpu.yaml"), num_items: int = 40, max_new_tokens: int = 16, batch_size: int = 8
) -> None:
    """Finetune with the demo config and report held-out accuracy before and after.

    Arguments:
        finetune_config: A ``litgpt-plop finetune`` config file.
        num_items: How many held-out items to score.
        max_new_tokens: Generation budget per answer.
        batch_size: Held-out questions of equal token length answered together (1: one by one).
    """
    t0 = time.perf_counter()
    settings = yaml.safe_load(Path(finetune_config).read_text())
    checkpoint_dir = prepare_smollm2(Path(settings["checkpoint_dir"]))
    out_dir = Path(settings["out_dir"])
    data_args = settings["data"]["init_args"]
    data = ReasoningGym(**data_args)

    print(f"\n== Accuracy of the pretrained model on {num_items} held-out {data.task} items")
    before = accuracy(checkpoint_dir, data, num_items, max_new_tokens, batch_size)
    print(f"accuracy before finetuning: {before:.1%}")

    print(f"\n== litgpt-plop finetune --config {finetune_config}")
    CLI(finetune, args=["--config", str(finetune_config)])

    print(f"\n== Accuracy of the finetuned model (merged weights in {out_dir / 'final'})")
    after = accuracy(out_dir / "final", data, num_items, max_new_tokens, batch_size)
    placement = Placement.load(out_dir / "final" / "placement.json")

    print("\n== Summary")
    print(f"placement ({placement.method}): {', '.join(placement.kinds)} in {len(placement.layers)} layers, rank {placement.max_rank}")
    print(f"  why: {out_dir / 'report.md'}, {out_dir / 'scores.png'}")
    print(f"held-out accuracy: {before:.1%} before, {after:.1%} after finetuning ({num_items} items)")
    print(f"outputs: {out_dir / 'final'} (stock `litgpt generate {out_dir / 'final'}` and `litgpt chat` accept it)")
    print(f"wall time: {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    CLI(main)

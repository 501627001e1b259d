"""A free-text task for the quality grids: English questions and answers from ``chatterbot-corpus``, scored by the
likelihood the model gives the reference answer (there is no single right string to match).

The corpus (PyPI ``chatterbot-corpus``, ``chatterbot_corpus/data/english/*.yml``) holds short conversations; every
two consecutive turns are one (question, answer) pair: 2,393 pairs over 1,044 distinct questions. One question can
have several answers ("Hi, How is it going?": Good / Fine / Okay / ...), so the split is by question: a seeded
shuffle of the distinct questions, held-out questions taken until the held-out split has ``val_size`` pairs, every
pair of the other questions for training. No held-out question is ever trained on.

Score of one held-out pair: the mean negative log-likelihood (nats per token) of its answer tokens given the
question in the checkpoint's prompt style, exactly the tokens and the masking of the finetune's own validation loss
(``litgpt.data.SFTDataset``: the prompt masked, the answer and its end-of-sequence token counted). Lower is better.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from litgpt_plop.data import ReasoningGym

TASK = "chatterbot_qa"
DISTRIBUTION = "chatterbot-corpus"
LANGUAGE_DIR = "chatterbot_corpus/data/english/"


def corpus_pairs() -> list[tuple[str, str]]:
    """Every (question, answer) pair of the English corpus, in file order then conversation order."""
    import importlib.metadata

    import yaml

    distribution = importlib.metadata.distribution(DISTRIBUTION)
    files = sorted(str(f) for f in distribution.files or () if str(f).startswith(LANGUAGE_DIR) and str(f).endswith(".yml"))
    if not files:
        raise FileNotFoundError(f"{DISTRIBUTION} is installed but has no {LANGUAGE_DIR}*.yml files")
    pairs = []
    for name in files:
        with open(distribution.locate_file(name), encoding="utf-8") as f:
            data = yaml.safe_load(f)
        for conversation in data.get("conversations") or []:
            turns = [str(turn).strip() for turn in conversation]
            pairs += [(q, a) for q, a in zip(turns, turns[1:]) if q and a]
    return pairs


def split_by_question(pairs: list[tuple[str, str]], val_size: int, train_size: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """Held-out pairs (at least ``val_size``, cut to it) of questions never trained on; at most ``train_size``
    training pairs of the other questions (a seeded subset when there are more)."""
    questions = sorted({q for q, _ in pairs})
    random.Random(seed).shuffle(questions)
    by_question: dict[str, list[tuple[str, str]]] = {}
    for q, a in pairs:
        by_question.setdefault(q, []).append((q, a))
    held_out: list[tuple[str, str]] = []
    taken = 0
    while len(held_out) < val_size and taken < len(questions):
        held_out += by_question[questions[taken]]
        taken += 1
    if len(held_out) < val_size:
        raise ValueError(f"{TASK}: only {len(pairs)} pairs, fewer than the {val_size} held-out items asked for")
    train = [pair for q in questions[taken:] for pair in by_question[q]]
    if len(train) > train_size:
        train = random.Random(seed + 1).sample(train, train_size)
    return {"val": held_out[:val_size], "train": train}


@dataclass
class ChatterbotQA(ReasoningGym):
    """``ReasoningGym``'s finetuning data module (prompt style, masking, loaders) over the corpus's pairs."""

    task: str = TASK

    def items(self, split: str = "val") -> list[dict[str, Any]]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not self._items:
            splits = split_by_question(corpus_pairs(), self.val_size, self.train_size, self.seed)
            self._items = {name: [{"question": q, "answer": a} for q, a in pairs] for name, pairs in splits.items()}
        return self._items[split]

    def scorer(self) -> Any:
        raise TypeError(f"{TASK} has no answer to match: score it with benchmarks.qa_task.answer_nll")


@torch.no_grad()
def answer_nll(model: Any, data: ChatterbotQA, num_items: int, batch_size: int = 32) -> list[float]:
    """Mean negative log-likelihood (nats per answer token) of each of the first ``num_items`` held-out answers,
    with the data module's tokens and masking (``data`` must be connected to the checkpoint's tokenizer and set up)."""
    from litgpt.data import get_sft_collate_fn

    dataset = data.test_dataset
    collate = get_sft_collate_fn(max_seq_length=data.max_seq_length, ignore_index=data.ignore_index)
    device = model.transformer.wte.weight.device
    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        for start in range(0, min(num_items, len(dataset)), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, num_items, len(dataset)))])
            input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            logits = model(input_ids)[:, :-1].float()
            targets = labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=data.ignore_index, reduction="none"
            ).view(targets.shape)
            counted = (targets != data.ignore_index).sum(dim=1)
            scores += (losses.sum(dim=1) / counted.clamp(min=1)).tolist()
    finally:
        model.train(was_training)
    return scores

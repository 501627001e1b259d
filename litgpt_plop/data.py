"""Procedural reasoning tasks from ``reasoning-gym`` as a LitGPT data module, plus a greedy accuracy evaluation.

From a LitGPT CLI::

    litgpt finetune_lora checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \\
        --data litgpt_plop.data.ReasoningGym --data.task basic_arithmetic --data.train_size 500

In Python::

    data = ReasoningGym(task="basic_arithmetic", val_size=40)
    result = evaluate_accuracy(model, tokenizer, data.items("val"), data.scorer(), data.resolve_prompt_style(tokenizer))
    print(result.accuracy)
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from litgpt.data import DataModule, SFTDataset, get_sft_collate_fn
from litgpt.generate.base import batched_generate_fn, generate_fn
from litgpt.model import GPT
from litgpt.prompts import PromptStyle, model_name_to_prompt_style
from litgpt.tokenizer import Tokenizer
from torch.utils.data import DataLoader

from litgpt_plop.model.quantize import disable_cpu_repack

Split = Literal["train", "val"]

# reasoning-gym seeds item `i` with `seed + i`, so the datasets for seeds s and s + 1 are the same list shifted by
# one. The held-out items therefore start this many seeds away from the training items.
VAL_SEED_OFFSET = 1_000_000


class Scorer(Protocol):
    """What scores an answer: every reasoning-gym dataset has this method."""

    def score_answer(self, answer: str | None, entry: dict[str, Any]) -> float: ...


@dataclass
class ReasoningGym(DataModule):
    """A reasoning-gym task for supervised finetuning: the question is the instruction, the answer the output.

    Training and validation items come from disjoint seed ranges, and any training item whose question also
    appears among the validation items is skipped, so the two splits never share a question.
    """

    task: str = "basic_arithmetic"
    """The reasoning-gym dataset name (see ``reasoning_gym.factory.DATASETS``)."""
    task_config: dict[str, Any] | None = None
    """Extra options for the task's config class, e.g. ``{"min_terms": 2, "max_terms": 2, "max_digits": 2}``."""
    train_size: int = 1000
    """Number of training items."""
    val_size: int = 50
    """Number of held-out items (validation loss during finetuning and accuracy evaluation)."""
    seed: int = 42
    """Seed of the first training item; held-out items start at ``seed + VAL_SEED_OFFSET``. Also shuffles batches."""
    mask_prompt: bool = True
    """Whether to mask the prompt section from the label (with ``ignore_index``): learn answers, not questions."""
    prompt_style: str | PromptStyle | None = None
    """The style to apply to the questions. ``None`` picks the style LitGPT associates with the checkpoint the
    tokenizer comes from (``smollm2`` for ``SmolLM2-135M-Instruct``), as ``litgpt generate`` does."""
    ignore_index: int = -100
    """The index to use for elements to be ignored in the label."""
    num_workers: int = 0
    """How many DataLoader processes to use for loading. Items are tiny, so the main process suffices."""

    tokenizer: Tokenizer | None = field(default=None, init=False, repr=False)
    batch_size: int = field(default=1, init=False, repr=False)
    max_seq_length: int = field(default=-1, init=False, repr=False)
    train_dataset: SFTDataset | None = field(default=None, init=False, repr=False)
    test_dataset: SFTDataset | None = field(default=None, init=False, repr=False)
    _items: dict[str, list[dict[str, Any]]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__init__()
        if isinstance(self.prompt_style, str):
            self.prompt_style = PromptStyle.from_name(self.prompt_style)

    def connect(
        self, tokenizer: Tokenizer | None = None, batch_size: int = 1, max_seq_length: int | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_seq_length = -1 if max_seq_length is None else max_seq_length
        # LitGPT's finetune scripts read `data.prompt_style` after `connect`, so resolve the default here.
        if self.prompt_style is None and tokenizer is not None:
            self.prompt_style = self.resolve_prompt_style(tokenizer)

    def resolve_prompt_style(self, tokenizer: Tokenizer | None = None) -> PromptStyle:
        """The prompt style in use: the explicit one, else the one matching the tokenizer's checkpoint name."""
        if isinstance(self.prompt_style, PromptStyle):
            return self.prompt_style
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise ValueError("Pass a tokenizer (or call `connect`) or set `prompt_style` to pick a prompt style.")
        return model_name_to_prompt_style(tokenizer.model_name)

    def setup(self, stage: str = "") -> None:
        if self.tokenizer is None:
            raise ValueError("Call `connect(tokenizer=...)` before `setup()`.")
        prompt_style = self.resolve_prompt_style()
        datasets = {}
        for split in ("train", "val"):
            datasets[split] = SFTDataset(
                data=[{"instruction": item["question"], "output": item["answer"]} for item in self.items(split)],
                tokenizer=self.tokenizer,
                prompt_style=prompt_style,
                max_seq_length=self.max_seq_length,
                mask_prompt=self.mask_prompt,
                ignore_index=self.ignore_index,
            )
        self.train_dataset, self.test_dataset = datasets["train"], datasets["val"]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            collate_fn=get_sft_collate_fn(max_seq_length=self.max_seq_length, ignore_index=self.ignore_index),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.test_dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=get_sft_collate_fn(max_seq_length=self.max_seq_length, ignore_index=self.ignore_index),
        )

    def items(self, split: Split = "val") -> list[dict[str, Any]]:
        """The raw reasoning-gym items (``question``, ``answer``, ``metadata``) of a split, for evaluation.

        Needs no tokenizer. The lists are generated once and cached.
        """
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if "val" not in self._items:
            self._items["val"] = self._generate(self.seed + VAL_SEED_OFFSET, self.val_size, exclude=set())
        if split == "train" and "train" not in self._items:
            held_out = {item["question"] for item in self._items["val"]}
            self._items["train"] = self._generate(self.seed, self.train_size, exclude=held_out)
        return self._items[split]

    def prompts(self, split: Split = "train", tokenizer: Tokenizer | None = None) -> list[str]:
        """The questions of a split formatted with the prompt style, e.g. as calibration inputs."""
        prompt_style = self.resolve_prompt_style(tokenizer)
        return [prompt_style.apply(item["question"]) for item in self.items(split)]

    def scorer(self) -> Scorer:
        """A reasoning-gym dataset of this task whose ``score_answer`` scores answers to this module's items."""
        import reasoning_gym

        return reasoning_gym.create_dataset(self.task, size=1, seed=self.seed, **(self.task_config or {}))

    def _generate(self, seed: int, size: int, exclude: set[str]) -> list[dict[str, Any]]:
        import reasoning_gym

        # Room for skipped items; reasoning-gym builds items lazily, so a large `size` costs nothing.
        pool = reasoning_gym.create_dataset(self.task, size=2 * size + 100, seed=seed, **(self.task_config or {}))
        items = []
        for index in range(len(pool)):
            item = pool[index]
            if item["question"] in exclude:
                continue
            items.append(item)
            if len(items) == size:
                return items
        raise ValueError(
            f"Could not draw {size} items of {self.task!r} that differ from the held-out ones: the task's"
            " configuration allows too few distinct questions."
        )


@dataclass
class ItemResult:
    """The evaluation of one item."""

    question: str
    reference: str
    completion: str
    """The decoded generation after the prompt, up to (not including) the stop token."""
    answer: str
    """What was scored: ``extract_answer(completion)``."""
    score: float
    """The task's own score in [0, 1]; 1.0 is a correct answer, some tasks give partial credit."""


@dataclass
class AccuracyResult:
    """The evaluation of a list of items."""

    accuracy: float
    """Fraction of items scored 1.0 (exactly right)."""
    mean_score: float
    """Mean of the task's scores, partial credit included."""
    records: list[ItemResult]


def extract_answer(completion: str) -> str:
    """The answer in a completion: the whole text the model produced before its stop token, stripped.

    Deliberately strict: "The answer is 7." is not "7". reasoning-gym gives such answers partial credit only
    (the length ratio), which ``AccuracyResult.accuracy`` counts as wrong, so formatting is part of the skill.
    """
    return completion.strip()


def score_completion(completion: str, item: dict[str, Any], scorer: Scorer) -> ItemResult:
    """Extract the answer from ``completion`` and score it with the task's scorer."""
    answer = extract_answer(completion)
    score = float(scorer.score_answer(answer=answer, entry=item))
    return ItemResult(
        question=item["question"], reference=item["answer"], completion=completion, answer=answer, score=score
    )


@torch.no_grad()
def generate_completion(
    model: GPT, tokenizer: Tokenizer, prompt: str, prompt_style: PromptStyle, max_new_tokens: int
) -> str:
    """Greedy completion of an already formatted ``prompt``, decoded without the prompt and the stop token.

    The model must have a KV cache long enough for the prompt plus ``max_new_tokens`` (see ``evaluate_accuracy``).
    """
    device = model.transformer.wte.weight.device
    encoded = tokenizer.encode(prompt, device=device)
    tokens = generate_fn(
        model,
        encoded,
        max_returned_tokens=len(encoded) + max_new_tokens,
        temperature=0.0,  # greedy: `litgpt.generate.base.sample` takes the argmax
        stop_tokens=prompt_style.stop_tokens(tokenizer),
        include_prompt=False,
        include_eos=False,
    )
    generated = list(tokens)
    if not generated:
        return ""
    return tokenizer.decode(torch.cat(generated))


def generate_completions(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    prompt_style: PromptStyle,
    max_new_tokens: int,
    batch_size: int = 1,
) -> list[str]:
    """Greedy completions of formatted ``prompts``, in order, up to ``batch_size`` prompts per forward pass.

    A batch only ever holds prompts of the same token length, so nothing is padded and every prompt sees exactly
    the context it would see alone; the answers can differ from one-by-one decoding only where a batched matmul's
    rounding flips a near-tie between the two likeliest tokens. Prompt styles whose stop sequences are longer
    than one token are decoded one by one (LitGPT's batched decoding would return the start of such a sequence).
    The model needs a KV cache for ``min(batch_size, len(prompts))`` sequences of the longest prompt plus
    ``max_new_tokens``.
    """
    stop_tokens = prompt_style.stop_tokens(tokenizer)
    if batch_size == 1 or any(len(sequence) > 1 for sequence in stop_tokens):
        return [generate_completion(model, tokenizer, prompt, prompt_style, max_new_tokens) for prompt in prompts]
    device = model.transformer.wte.weight.device
    encoded = [tokenizer.encode(prompt, device=device) for prompt in prompts]
    by_length: dict[int, list[int]] = {}
    for index, tokens in enumerate(encoded):
        by_length.setdefault(len(tokens), []).append(index)
    completions = [""] * len(prompts)
    for length, indices in sorted(by_length.items()):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            generated: list[list[torch.Tensor]] = [[] for _ in chunk]
            steps = batched_generate_fn(
                model,
                torch.stack([encoded[index] for index in chunk]),
                max_returned_tokens=length + max_new_tokens,
                sample_args={"temperature": 0.0},  # greedy, as in `generate_completion`
                stop_tokens=stop_tokens,
                include_prompt=False,
                include_eos=False,
            )
            for step in steps:  # one token per prompt, None once a prompt has stopped
                for tokens, token in zip(generated, step):
                    if token is not None:
                        tokens.append(token.view(-1))
            for index, tokens in zip(chunk, generated):
                completions[index] = tokenizer.decode(torch.cat(tokens)) if tokens else ""
    return completions


@torch.no_grad()
def evaluate_accuracy(
    model: GPT,
    tokenizer: Tokenizer,
    items: Sequence[dict[str, Any]],
    scorer: Scorer | str,
    prompt_style: PromptStyle | str,
    max_new_tokens: int = 32,
    batch_size: int = 1,
) -> AccuracyResult:
    """Answer every item greedily and score the answers with the task's own scorer.

    Works for ``litgpt.model.GPT`` and ``litgpt.lora.GPT``. The model is put in eval mode (no dropout) and its
    previous mode, ``max_seq_length`` and an absent KV cache are restored afterwards. ``torch.no_grad`` rather than
    ``inference_mode``: a rope cache rebuilt in inference mode could not be used for training afterwards.

    Args:
        items: reasoning-gym items (``question``, ``answer``), e.g. ``ReasoningGym.items("val")``.
        scorer: an object with ``score_answer`` (any reasoning-gym dataset of the task) or the task name.
        prompt_style: how questions are formatted; must match the finetuning data (``ReasoningGym.prompt_style``).
        max_new_tokens: generation budget per item; answers are short, and unfinished answers are scored as is.
        batch_size: items answered together (see ``generate_completions``); 1 answers them one by one.
    """
    if isinstance(scorer, str):
        import reasoning_gym

        scorer = reasoning_gym.create_dataset(scorer, size=1, seed=0)
    if isinstance(prompt_style, str):
        prompt_style = PromptStyle.from_name(prompt_style)
    if not items:
        raise ValueError("No items to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    prompts = [prompt_style.apply(item["question"]) for item in items]
    cache_length = max(len(tokenizer.encode(prompt)) for prompt in prompts) + max_new_tokens
    was_training = model.training
    previous_max_seq_length = model.max_seq_length
    disable_cpu_repack(model.modules())
    model.eval()
    try:
        # Only ever extend: the rope cache must cover prompt + answer; a training length may be shorter.
        model.max_seq_length = max(model.max_seq_length, cache_length)
        weight = model.transformer.wte.weight
        cache_batch = min(batch_size, len(prompts))
        model.set_kv_cache(batch_size=cache_batch, max_seq_length=cache_length, device=weight.device, dtype=weight.dtype)
        completions = generate_completions(model, tokenizer, prompts, prompt_style, max_new_tokens, batch_size)
        records = [score_completion(completion, item, scorer) for item, completion in zip(items, completions)]
    finally:
        model.clear_kv_cache()
        if model.max_seq_length != previous_max_seq_length:
            model.max_seq_length = previous_max_seq_length
        model.train(was_training)

    accuracy = sum(record.score == 1.0 for record in records) / len(records)
    mean_score = sum(record.score for record in records) / len(records)
    return AccuracyResult(accuracy=accuracy, mean_score=mean_score, records=records)

"""Calibration prompts: read from a file or taken from a LitGPT data module's training set, a seeded subset,
tokenized (the prompt only, never the response)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from litgpt.prompts import PromptStyle
from litgpt.tokenizer import Tokenizer

from litgpt_plop.errors import InputError
from litgpt_plop.args import CalibrationArgs


def read_prompts(path: Path | str) -> list[dict[str, str]]:
    """Read calibration prompts from a file, as examples with an ``instruction`` (and maybe an ``input``).

    ``.txt``: one prompt per non-blank line. ``.jsonl``: one JSON object per line with a ``text`` or an
    ``instruction`` field (``input`` is kept when present). ``.json``: a list of such objects (LitGPT's JSON
    data format). Raises ``ValueError`` naming the file when it does not exist, is empty, or a line has neither
    field.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Calibration file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".txt":
        examples = [{"instruction": line} for line in text.splitlines() if line.strip()]
    elif suffix in (".jsonl", ".json"):
        if suffix == ".jsonl":
            records = []
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise InputError(f"Calibration file {str(path)!r}, line {number}: not valid JSON ({e})") from None
        else:
            try:
                data = json.loads(text) if text.strip() else []
            except json.JSONDecodeError as e:
                raise InputError(f"Calibration file {str(path)!r} is not valid JSON ({e})") from None
            if not isinstance(data, list):
                raise InputError(f"Calibration file {str(path)!r} must hold a list of objects")
            records = list(enumerate(data, start=1))
        examples = [_example_from_record(record, path, number) for number, record in records]
    else:
        raise InputError(f"Calibration file {str(path)!r}: use a .txt (one prompt per line), .jsonl or .json file")
    if not examples:
        raise InputError(f"Calibration file {str(path)!r} is empty: it holds no prompts")
    return examples


def _example_from_record(record: Any, path: Path, number: int) -> dict[str, str]:
    if not isinstance(record, dict) or not any(isinstance(record.get(key), str) for key in ("text", "instruction")):
        raise InputError(
            f"Calibration file {str(path)!r}, record {number}: expected an object with a 'text' or 'instruction' field"
        )
    if isinstance(record.get("instruction"), str):
        example = {"instruction": record["instruction"]}
        if isinstance(record.get("input"), str) and record["input"]:
            example["input"] = record["input"]
        return example
    return {"instruction": record["text"]}


def select_samples(items: Sequence[Any], num_samples: int, seed: int) -> list[Any]:
    """At most ``num_samples`` items: all of them if there are few enough, else a seeded random subset kept
    in the original order (so the same seed and data always give the same calibration set)."""
    if len(items) <= num_samples:
        return list(items)
    indices = sorted(random.Random(seed).sample(range(len(items)), num_samples))
    return [items[i] for i in indices]


def tokenize_prompts(
    prompts: Sequence[str | Mapping[str, str]],
    tokenizer: Tokenizer,
    prompt_style: str | PromptStyle | None = None,
) -> list[torch.Tensor]:
    """Token ids of each prompt, as LitGPT's ``SFTDataset`` encodes the prompt part of a sample.

    Args:
        prompts: strings, or examples with an ``instruction`` (and optional ``input`` and other fields).
        tokenizer: the model's LitGPT tokenizer (adds BOS as the checkpoint says).
        prompt_style: a LitGPT prompt style (name or object) applied first; None uses the text as it is
            (an example's ``input`` is appended after a blank line).
    """
    if isinstance(prompt_style, str):
        prompt_style = PromptStyle.from_name(prompt_style)
    token_ids = []
    for prompt in prompts:
        example = {"instruction": prompt} if isinstance(prompt, str) else dict(prompt)
        if prompt_style is not None:
            text = prompt_style.apply(prompt=example["instruction"], **example)
        else:
            text = example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")
        token_ids.append(tokenizer.encode(text).long())
    return token_ids


def data_module_prompts(
    data_module: Any,
    tokenizer: Tokenizer,
    num_samples: int,
    seed: int = 42,
    prompt_style: str | PromptStyle | None = None,
) -> list[torch.Tensor]:
    """Token ids of the prompt part of ``num_samples`` training examples of a LitGPT ``DataModule``.

    A data module that is not set up yet is set up on a shallow copy (the caller's keeps its batch size and
    sequence length). For SFT data (``train_dataset.data`` a list of examples, as in ``litgpt.data.SFTDataset``) the prompt is
    built exactly as the dataset builds it (its ``transform``, then its prompt style, or ``prompt_style`` when
    given) and the response is left out. Other datasets whose items are dicts with ``input_ids`` give the
    leading tokens whose ``labels`` are masked (the prompt), or the whole sequence when nothing is masked.
    """
    name = type(data_module).__name__
    dataset = getattr(data_module, "train_dataset", None)
    if dataset is None:
        # Set up a shallow copy: ``connect`` would change the batch size and sequence length of a data module
        # that may also be the one training uses.
        data_module = copy.copy(data_module)
        data_module.connect(tokenizer=tokenizer, batch_size=1, max_seq_length=-1)
        data_module.prepare_data()
        data_module.setup()
        dataset = getattr(data_module, "train_dataset", None)
    if dataset is None:
        raise InputError(f"Data module {name} has no `train_dataset` after setup(); pass --calibration.file instead")
    try:
        size = len(dataset)
    except TypeError:
        raise InputError(
            f"Data module {name}'s training set has no length (a streaming dataset?); pass --calibration.file instead"
        ) from None
    if size == 0:
        raise InputError(f"Data module {name} has an empty training set: no calibration prompts")
    indices = select_samples(range(size), num_samples, seed)

    raw = getattr(dataset, "data", None)
    # SFTDataset keeps the raw examples (a list, or a torch Subset after a random split) and its prompt style.
    if hasattr(raw, "__getitem__") and hasattr(raw, "__len__") and len(raw) == size and hasattr(dataset, "prompt_style"):
        style = dataset.prompt_style if prompt_style is None else prompt_style
        if isinstance(style, str):
            style = PromptStyle.from_name(style)
        transform = getattr(dataset, "transform", None)
        examples = [transform(raw[i]) if transform is not None else raw[i] for i in indices]
        return tokenize_prompts(examples, tokenizer, style)

    token_ids = []
    for i in indices:
        item = dataset[i]
        if isinstance(item, torch.Tensor):
            token_ids.append(item.long())
            continue
        if not isinstance(item, Mapping) or "input_ids" not in item:
            raise InputError(
                f"Data module {name}: cannot find a prompt in training item {i} (type {type(item).__name__});"
                " pass --calibration.file instead"
            )
        input_ids = item["input_ids"].long()
        labels = item.get("labels")
        ignore_index = getattr(dataset, "ignore_index", -100)
        if labels is not None:
            masked = (labels == ignore_index).long()
            prompt_length = int(masked.cumprod(0).sum())  # leading masked tokens
            if prompt_length > 0:
                input_ids = input_ids[:prompt_length]
        token_ids.append(input_ids)
    return token_ids


def calibration_token_ids(
    args: CalibrationArgs, tokenizer: Tokenizer, data_module: Any | None = None
) -> list[torch.Tensor]:
    """The calibration prompts the options ask for, tokenized: ``args.file`` if set, else the data module's
    training prompts; at most ``args.num_samples`` of them (seeded subset)."""
    if args.file is not None:
        examples = select_samples(read_prompts(args.file), args.num_samples, args.seed)
        return tokenize_prompts(examples, tokenizer, args.prompt_style)
    if data_module is None:
        raise InputError("No calibration data: set --calibration.file or give a data module")
    return data_module_prompts(data_module, tokenizer, args.num_samples, args.seed, args.prompt_style)

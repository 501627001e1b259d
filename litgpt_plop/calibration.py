"""The calibration pass: run task prompts through a frozen LitGPT model and feed what the linears and blocks
see to the scorers (``litgpt_plop.scoring``), without storing activations.

The pass
    * works on ``litgpt.model.GPT`` and ``litgpt.lora.GPT``, dense or with bitsandbytes ``Linear4bit`` base
      linears (found with ``litgpt_plop.modules``);
    * runs under ``torch.no_grad()`` in eval mode. Not ``torch.inference_mode()``: ``Linear4bit.forward`` casts
      its bias in place (``bias.data = ...``) and an inference-mode tensor stored in a parameter breaks training
      afterwards;
    * guards the bitsandbytes CPU hazard: on CPUs with avx512_bf16, a ``Linear4bit`` forward in eval mode on an
      input that does not require grad repacks its weight into a CPU-only layout for good (training then gets
      no input gradient and ``dequantize_4bit`` returns garbage). During the pass every ``Linear4bit`` gets
      ``support_avx512bf16_for_cpu = False``; the previous value is restored afterwards;
    * masks padding: batches are right-padded ``(input_ids, attention_mask)``; with causal attention the real
      tokens never see the right pads, every statistic only reads real tokens, and columns that are padding in
      every row are dropped before the forward, so a batch and the same batch with more (or no) padding give
      bit-identical scores. (Within a ragged batch, a short row's real tokens go through attention kernels
      sized for the longest row: the same values up to float rounding, ~1e-7);
    * stops before ``ln_f``/``lm_head`` unless a scorer needs the head (no vocabulary-sized logits);
    * removes its hooks and restores each module's train/eval mode even when it fails;
    * under ``torch.distributed`` each rank takes its share of the batches (batch ``i`` goes to rank
      ``i % world_size``) and the scorers sum their statistics over ranks at the end, so every rank ends with
      the same scores, equal to one process running all the batches. The model must be a full copy on every
      rank (DDP-style): the pass does no collective inside the forward, so ranks may run different numbers of
      batches. Not meant for FSDP-sharded models.
"""

from __future__ import annotations

import copy
import json
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from litgpt.prompts import PromptStyle
from litgpt.tokenizer import Tokenizer
from tqdm import tqdm

from litgpt_plop.args import CalibrationArgs
from litgpt_plop.modules import find_gpt
from litgpt_plop.quantize import no_cpu_repack

# ---- prompts ----------------------------------------------------------------------------------------------


def read_prompts(path: Path | str) -> list[dict[str, str]]:
    """Read calibration prompts from a file, as examples with an ``instruction`` (and maybe an ``input``).

    ``.txt``: one prompt per non-blank line. ``.jsonl``: one JSON object per line with a ``text`` or an
    ``instruction`` field (``input`` is kept when present). ``.json``: a list of such objects (LitGPT's JSON
    data format). Raises ``ValueError`` naming the file when it does not exist, is empty, or a line has neither
    field.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Calibration file {str(path)!r} does not exist")
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
                    raise ValueError(f"Calibration file {str(path)!r}, line {number}: not valid JSON ({e})") from None
        else:
            try:
                data = json.loads(text) if text.strip() else []
            except json.JSONDecodeError as e:
                raise ValueError(f"Calibration file {str(path)!r} is not valid JSON ({e})") from None
            if not isinstance(data, list):
                raise ValueError(f"Calibration file {str(path)!r} must hold a list of objects")
            records = list(enumerate(data, start=1))
        examples = [_example_from_record(record, path, number) for number, record in records]
    else:
        raise ValueError(f"Calibration file {str(path)!r}: use a .txt (one prompt per line), .jsonl or .json file")
    if not examples:
        raise ValueError(f"Calibration file {str(path)!r} is empty: it holds no prompts")
    return examples


def _example_from_record(record: Any, path: Path, number: int) -> dict[str, str]:
    if not isinstance(record, dict) or not any(isinstance(record.get(key), str) for key in ("text", "instruction")):
        raise ValueError(
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
        raise ValueError(f"Data module {name} has no `train_dataset` after setup(); pass --calibration.file instead")
    try:
        size = len(dataset)
    except TypeError:
        raise ValueError(
            f"Data module {name}'s training set has no length (a streaming dataset?); pass --calibration.file instead"
        ) from None
    if size == 0:
        raise ValueError(f"Data module {name} has an empty training set: no calibration prompts")
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
            raise ValueError(
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
        raise ValueError("No calibration data: set --calibration.file or give a data module")
    return data_module_prompts(data_module, tokenizer, args.num_samples, args.seed, args.prompt_style)


# ---- batches ----------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One right-padded calibration batch.

    Args:
        input_ids: ``(B, T)`` token ids; pad positions hold any valid id.
        mask: ``(B, T)`` bool, True on real tokens (a prefix of each row).
        index: the batch's position in the whole calibration set (the same on every rank).
    """

    input_ids: torch.Tensor
    mask: torch.Tensor
    index: int = 0

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)


def as_batch(input_ids: torch.Tensor, mask_or_lengths: torch.Tensor | None = None, index: int = 0) -> Batch:
    """A ``Batch`` from ``input_ids`` and an attention mask ``(B, T)`` or lengths ``(B,)`` (None: no padding).

    Raises ``ValueError`` for left padding or holes in the mask, and for a batch that is all padding.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"Calibration batch {index}: input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if mask_or_lengths is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
    elif mask_or_lengths.dim() == 1:
        lengths = mask_or_lengths.to(input_ids.device)
        mask = torch.arange(T, device=input_ids.device)[None, :] < lengths[:, None]
    else:
        if mask_or_lengths.shape != input_ids.shape:
            raise ValueError(
                f"Calibration batch {index}: attention mask shape {tuple(mask_or_lengths.shape)} does not match"
                f" input_ids shape {tuple(input_ids.shape)}"
            )
        mask = mask_or_lengths.to(device=input_ids.device, dtype=torch.bool)
    if T > 1 and (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError(f"Calibration batch {index}: only right padding is supported (the mask has a real token after a pad)")
    if not mask.any():
        raise ValueError(f"Calibration batch {index} is all padding: it has no real token")
    return Batch(input_ids=input_ids, mask=mask, index=index)


def make_batches(
    token_ids: Sequence[torch.Tensor], batch_size: int, max_seq_length: int, pad_id: int = 0
) -> tuple[list[Batch], int]:
    """Right-padded batches of ``batch_size`` prompts in the given order, each padded to its longest prompt.

    Prompts longer than ``max_seq_length`` are truncated to their first ``max_seq_length`` tokens (a warning
    says how many). Returns the batches and the number of truncated prompts. Raises ``ValueError`` for no
    prompts or an empty prompt.
    """
    if len(token_ids) == 0:
        raise ValueError("Calibration data is empty: no prompts to calibrate on")
    prompts = []
    truncated = 0
    for i, ids in enumerate(token_ids):
        ids = torch.as_tensor(ids).long().flatten()
        if ids.numel() == 0:
            raise ValueError(f"Calibration prompt {i} is empty (no tokens)")
        if ids.numel() > max_seq_length:
            ids = ids[:max_seq_length]
            truncated += 1
        prompts.append(ids)
    if truncated:
        warnings.warn(
            f"{truncated} of {len(prompts)} calibration prompts are longer than {max_seq_length} tokens and were"
            " truncated to their first tokens",
            stacklevel=2,
        )
    batches = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        lengths = torch.tensor([len(ids) for ids in chunk])
        input_ids = torch.full((len(chunk), int(lengths.max())), pad_id, dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = ids
        batches.append(as_batch(input_ids, lengths, index=len(batches)))
    return batches, truncated


# ---- data parallel ----------------------------------------------------------------------------------------


def distributed() -> bool:
    """True when running under an initialized ``torch.distributed`` process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo (and the rest) take CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (the tensor itself when not distributed). Reduce sums and counts,
    never means, so ranks with different amounts of data combine correctly."""
    if not distributed():
        return tensor
    reduced = tensor.to(_comm_device())
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(tensor.device)


def all_reduce_max(value: float) -> float:
    """The largest ``value`` over all ranks."""
    if not distributed():
        return value
    reduced = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return float(reduced.item())


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of ``tensor`` (``(n_rank, ...)``, ``n_rank`` may differ per rank) of every rank, concatenated in
    rank order, on every rank."""
    if not distributed():
        return tensor
    device = _comm_device()
    size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    largest = int(max(s.item() for s in sizes))
    padded = torch.zeros((largest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.to(device)
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)]).to(tensor.device)


def shard_batches(batches: Sequence[Batch]) -> list[Batch]:
    """This rank's share of the batches: batch ``i`` goes to rank ``i % world_size`` (all of them when not
    distributed). Sharding whole batches keeps every batch as one process would see it."""
    if not distributed():
        return list(batches)
    return list(batches[dist.get_rank() :: dist.get_world_size()])


# ---- the pass ---------------------------------------------------------------------------------------------

# A forward hook registered with ``with_kwargs=True``: (module, args, kwargs, output) -> None.
ForwardHook = Callable[[nn.Module, tuple, dict, Any], None]


class Scorer(Protocol):
    """What the pass needs from a scorer (see ``litgpt_plop.scoring``)."""

    needs_head: bool

    def hooks(self) -> list[tuple[nn.Module, ForwardHook]]:
        """The forward hooks to register for the pass."""

    def start_batch(self, batch: Batch) -> None:
        """Called before each forward, with the batch whose padding the hooks must mask."""

    def end_batch(self) -> None:
        """Called after each forward."""

    def reduce(self) -> None:
        """Called once after the last batch, on every rank: sum the statistics over ranks."""


@dataclass
class CalibrationStats:
    """What the pass saw, summed over ranks."""

    samples: int
    tokens: int
    batches: int
    seconds: float
    truncated: int = 0
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _StopForward(Exception):
    """Raised by a hook before ``ln_f`` when no scorer needs the head: skips the vocabulary-sized logits."""


def _stop_forward(module: nn.Module, args: tuple) -> None:
    raise _StopForward


def calibrate(
    model: nn.Module,
    batches: Sequence[Batch],
    scorers: Sequence[Scorer],
    progress: bool = True,
    truncated: int = 0,
) -> CalibrationStats:
    """Run ``batches`` through the LitGPT model inside ``model`` once, feeding every scorer.

    The batches are used as given (shard them first under data parallelism: ``shard_batches``). After the
    last batch each scorer sums its statistics over ranks, so call this on every rank.

    Raises ``ValueError`` for no batches, a batch that is all padding (see ``as_batch``), a batch longer than
    the model's ``max_seq_length``, and (from the scorers) non-finite activations.
    """
    gpt = find_gpt(model)
    if gpt is None:
        raise ValueError(f"No LitGPT GPT model inside {type(model).__name__}")
    if len(batches) == 0 and not distributed():
        raise ValueError("Calibration data is empty: no batches to calibrate on")
    device = gpt.transformer.wte.weight.device
    training = {module: module.training for module in gpt.modules()}
    handles = []
    samples = tokens = 0
    start = time.perf_counter()
    try:
        with no_cpu_repack(gpt):
            gpt.eval()
            for scorer in scorers:
                for module, hook in scorer.hooks():
                    handles.append(module.register_forward_hook(hook, with_kwargs=True))
            if not any(scorer.needs_head for scorer in scorers):
                handles.append(gpt.transformer.ln_f.register_forward_pre_hook(_stop_forward))
            show = progress and (not distributed() or dist.get_rank() == 0)
            with torch.no_grad():
                for batch in tqdm(batches, desc="Calibrating", unit="batch", disable=not show):
                    if not batch.mask.any():
                        raise ValueError(f"Calibration batch {batch.index} is all padding: it has no real token")
                    # Columns that are padding in every row change nothing but the attention kernel's rounding:
                    # drop them, so a batch with extra padding gives bit-identical scores (and costs less).
                    width = int(batch.lengths.max())
                    if width > gpt.max_seq_length:
                        raise ValueError(
                            f"Calibration batch {batch.index} has prompts of {width} tokens, more than the model's"
                            f" max_seq_length {gpt.max_seq_length}"
                        )
                    batch = Batch(batch.input_ids[:, :width].to(device), batch.mask[:, :width].to(device), batch.index)
                    for scorer in scorers:
                        scorer.start_batch(batch)
                    try:
                        gpt(batch.input_ids)
                    except _StopForward:
                        pass
                    for scorer in scorers:
                        scorer.end_batch()
                    samples += int((batch.lengths > 0).sum())
                    tokens += int(batch.mask.sum())
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in training.items():
            module.training = mode
    for scorer in scorers:
        scorer.reduce()
    counts = all_reduce_sum(torch.tensor([samples, tokens, len(batches)], dtype=torch.float64))
    if counts[1] == 0:
        raise ValueError("Calibration data is empty: no real tokens on any rank")
    return CalibrationStats(
        samples=int(counts[0]),
        tokens=int(counts[1]),
        batches=int(counts[2]),
        seconds=round(all_reduce_max(time.perf_counter() - start), 3),
        truncated=truncated,
        world_size=dist.get_world_size() if distributed() else 1,
    )


def run_calibration(
    model: nn.Module,
    token_ids: Sequence[torch.Tensor],
    scorers: Sequence[Scorer],
    args: CalibrationArgs | None = None,
    shard: bool = True,
) -> CalibrationStats:
    """The whole pass from tokenized prompts: pick at most ``args.num_samples`` (seeded), batch them (prompts
    longer than ``min(args.max_seq_length, model.max_seq_length)`` are truncated, with a warning), give each
    rank its share of the batches when ``shard`` and distributed, and calibrate.

    Under data parallelism pass the same ``token_ids`` on every rank (``shard=True``), or each rank's own
    prompts with ``shard=False``.
    """
    args = CalibrationArgs() if args is None else args
    gpt = find_gpt(model)
    if gpt is None:
        raise ValueError(f"No LitGPT GPT model inside {type(model).__name__}")
    if len(token_ids) == 0:
        raise ValueError("Calibration data is empty: no prompts to calibrate on")
    token_ids = select_samples(token_ids, args.num_samples, args.seed)
    max_seq_length = min(args.max_seq_length, gpt.max_seq_length)
    batches, truncated = make_batches(token_ids, args.batch_size, max_seq_length)
    if shard:
        batches = shard_batches(batches)  # every rank truncated the same prompts: its count is the total
    else:
        truncated = int(all_reduce_sum(torch.tensor([truncated], dtype=torch.float64))[0])
    return calibrate(model, batches, scorers, progress=args.progress, truncated=truncated)

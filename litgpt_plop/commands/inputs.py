"""Checks of what the user gave, made before any weight is loaded or any prompt calibrated.

Each raises ``InputError`` naming the flag or file and what would be valid, so a command fails in its first second
with one line instead of after minutes of work, and leaves every existing output as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from litgpt import Config
from litgpt.model import GPT

from litgpt_plop.args import CkaArgs
from litgpt_plop.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, MappedCheckpoint, check_checkpoint_dir
from litgpt_plop.errors import InputError
from litgpt_plop.selection.methods import Method


def check_checkpoint(checkpoint_dir: Path, tokenizer: bool) -> Config:
    """The checkpoint's files are there (the tokenizer's too, with ``tokenizer``), its weights are a complete,
    readable checkpoint, and they are the weights of the model its ``model_config.yaml`` describes: the same
    parameter names and shapes. Reads only the file's index (memory-mapped), not the weights. Returns the config."""
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir, tokenizer=tokenizer)
    try:
        config = Config.from_file(checkpoint_dir / CONFIG_FILE)
    except Exception as e:  # a YAML or field error: the file, not our code, is wrong
        raise InputError(f"{str(checkpoint_dir / CONFIG_FILE)!r} is not a LitGPT model config: {e}") from None
    path = checkpoint_dir / WEIGHTS_FILE
    try:
        checkpoint = MappedCheckpoint(path)
    except Exception as e:  # truncated or corrupt: torch reports it in many ways
        raise InputError(f"{str(path)!r} is not a complete PyTorch checkpoint (truncated or corrupt?): {e}") from None
    state_dict = checkpoint.state_dict
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(config).state_dict().items()}
    found = {k: v.shape for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or unexpected or wrong:
        details = [f"{what} {_few(keys)}" for what, keys in
                   (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)) if keys]  # fmt: skip
        raise InputError(
            f"{str(path)!r} does not hold the weights {CONFIG_FILE} describes ({config.n_layer} layers, width"
            f" {config.n_embd}): parameters {'; '.join(details)}"
        )
    check_finite_weights(checkpoint)
    return config


def check_finite_weights(checkpoint: MappedCheckpoint, chunk: int = 1 << 22) -> None:
    """Every floating-point weight of the checkpoint is finite; else name the first that is not (its layer and
    matrix). Reads the file once, in chunks, each tensor's pages handed back once read.

    A chunk's float32 sum is finite only if every value in it is (an infinity or a NaN makes the sum infinite or
    NaN), so one reduction without temporaries clears it; only a chunk whose sum is not finite (a bad value, or
    finite values whose sum overflows) is counted value by value: 4.4 s instead of 24.6 s on a 1B checkpoint,
    where counting every value took about 170 s of an 8B plan."""
    for name, tensor in checkpoint.state_dict.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        flat = tensor.reshape(-1)
        bad = 0
        for part in flat.split(chunk):
            if not torch.isfinite(part.sum(dtype=torch.float32)):
                bad += int((~torch.isfinite(part)).sum())
        checkpoint.release(tensor)
        if bad:
            parts = name.split(".")
            where = f"layer {parts[2]}, {'.'.join(parts[3:-1])}" if parts[:2] == ["transformer", "h"] else name
            raise InputError(
                f"{str(checkpoint.path)!r}: {name} ({where}) has {bad:,} of {flat.numel():,} values NaN or infinite;"
                " the checkpoint is damaged: re-download or re-convert it"
            )


def check_out_dir(out_dir: Path, flag: str = "--out_dir") -> Path:
    """``out_dir`` is a directory or can be created as one: a directory is really made (and removed) in its nearest
    existing ancestor, so a read-only filesystem, missing permission or a full disk is found now, not at the end."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{flag} {str(out_dir)!r} is an existing file; give a directory")
    parent = out_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {str(out_dir)!r} cannot be created: {str(parent)!r} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".litgpt-plop-probe-", dir=parent))
    except OSError as e:
        raise InputError(f"{flag} {str(out_dir)!r} cannot be written: {e.strerror} in {str(parent)!r}") from None
    return out_dir


def check_precision(precision: str | None, allowed: Iterable[str], flag: str = "--precision") -> None:
    """``precision`` is one this command takes (None: the command's default)."""
    allowed = list(allowed)
    if precision is not None and precision not in allowed:
        raise InputError(f"{flag} {precision!r} is not a precision this command takes; choose one of {allowed}")


def check_calibration_prompts(method: Method, cka: CkaArgs, count: int, flag: str) -> None:
    """Enough calibration prompts for the method: CKA over last tokens compares the prompts with one another,
    so it needs two or more (``count``: the prompts asked for or found)."""
    if method.uses_cka and cka.pooling == "last" and count < 2:
        raise InputError(
            f"{flag} {method.name!r} needs at least 2 calibration prompts (CKA over last tokens compares prompts with"
            f" one another), got {count}: raise --calibration.num_samples or give more prompts"
        )


def check_lora(lora_r: int, lora_alpha: int, lora_dropout: float | None = None) -> None:
    """LoRA's rank, alpha and dropout are in range."""
    if isinstance(lora_r, bool) or not isinstance(lora_r, int) or lora_r < 1:
        raise InputError(f"--lora_r must be a positive integer (the LoRA rank), got {lora_r!r}")
    if lora_alpha <= 0:
        raise InputError(f"--lora_alpha must be positive, got {lora_alpha!r}")
    if lora_dropout is not None and not 0.0 <= lora_dropout < 1.0:
        raise InputError(f"--lora_dropout must be in [0, 1), got {lora_dropout!r}")


def check_text_file(path: Path, flag: str) -> None:
    """``path`` exists, is UTF-8 text and holds something."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{flag} {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{flag} {str(path)!r} is not UTF-8 text (byte {e.start}): give a .txt, .jsonl or .json file") from None
    if not text.strip():
        raise InputError(f"{flag} {str(path)!r} is empty: it must hold at least one prompt")


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_devices(
    devices: int, num_nodes: int, quantize: str | None, global_batch_size: int, micro_batch_size: int
) -> None:
    """``--devices``/``--num_nodes`` are positive, every device gets at least one micro-batch of the global batch,
    and quantization runs on one device only, as in ``litgpt finetune_lora``: bitsandbytes' 4-bit weights cannot be
    replicated or sharded by the data-parallel wrapper."""
    if devices < 1 or num_nodes < 1:
        raise InputError(f"--devices and --num_nodes must be at least 1, got {devices} and {num_nodes}")
    if quantize is not None and devices * num_nodes > 1:
        raise InputError(
            f"--quantize {quantize} runs on one device only, as in `litgpt finetune_lora`: it is not supported with"
            f" --devices {devices} --num_nodes {num_nodes}. Drop --quantize to train on {devices * num_nodes} devices,"
            " or set --devices 1 --num_nodes 1 to quantize"
        )
    world_size = devices * num_nodes
    if global_batch_size < world_size * micro_batch_size:
        raise InputError(
            f"--train.global_batch_size {global_batch_size} is smaller than one --train.micro_batch_size"
            f" ({micro_batch_size}) on each of the {world_size} devices (--devices {devices} x --num_nodes"
            f" {num_nodes}): use a global batch of {world_size * micro_batch_size} or more"
        )


def check_lr_schedule(warmup_steps: int | None, max_steps: int | float | None) -> None:
    """LitGPT's schedule (linear warm-up, then cosine over the remaining steps) divides by both lengths."""
    if warmup_steps is None or warmup_steps < 1:
        raise InputError(f"--train.lr_warmup_steps must be at least 1 (LitGPT's warm-up divides by it), got {warmup_steps}")
    if max_steps is not None and warmup_steps >= max_steps:
        raise InputError(
            f"--train.lr_warmup_steps ({warmup_steps}) must be smaller than the number of optimizer steps ({max_steps}:"
            " --train.max_steps, or --train.epochs over the data): LitGPT's cosine phase lasts the difference"
        )

"""Loading a LitGPT checkpoint directory into a frozen base model: the one loader every command and API uses.

The model is built on the meta device and the checkpoint's tensors, memory-mapped, are assigned to it, so loading
never holds a second dense copy of the model. What is converted (``precision``) or quantized (``quantize``) is
done one tensor at a time straight from the mapping, and the pages of each tensor done with are handed back to
the kernel (``MappedCheckpoint.release``): on Linux, the pages of a file mapping that a process touched count in
its RSS for as long as the mapping lives, so without this, quantizing a model would leave the whole dense file
resident. Peak memory of a 4-bit load: about the 4-bit model plus one layer's quantization temporaries
(bitsandbytes works on float32 copies and int32 codes: about 240 MiB for a 1B-shaped model's largest linear); what
malloc keeps of them is handed back after each layer (``litgpt_plop.memory``).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from litgpt import Config
from litgpt.model import GPT
from litgpt.utils import check_valid_checkpoint_dir

from litgpt_plop.errors import InputError
from litgpt_plop.model.quantize import QUANTIZE_CHOICES, quantize_choice, quantize_linears_4bit

PRECISION_DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}
WEIGHTS_FILE = "lit_model.pth"
CONFIG_FILE = "model_config.yaml"
_MADV_DONTNEED = 4  # Linux <sys/mman.h>


def check_checkpoint_dir(checkpoint_dir: Path, tokenizer: bool = False) -> Path:
    """Raise ``ValueError`` naming what is missing unless ``checkpoint_dir`` holds LitGPT weights and config (and,
    with ``tokenizer``, the tokenizer files)."""
    checkpoint_dir = Path(checkpoint_dir)
    try:
        check_valid_checkpoint_dir(checkpoint_dir, verbose=False, raise_error=True, ignore_tokenizer_files=not tokenizer)
    except FileNotFoundError:
        needs = f"{WEIGHTS_FILE}, {CONFIG_FILE}" + (" and the tokenizer files" if tokenizer else "")
        raise InputError(
            f"{str(checkpoint_dir)!r} is not a LitGPT checkpoint directory: it needs {needs} (make one with"
            " `litgpt download` or `litgpt convert_to_litgpt`)"
        ) from None
    return checkpoint_dir


class MappedCheckpoint:
    """A ``lit_model.pth`` memory-mapped by ``torch.load(mmap=True)``, and the address ranges of its mapping.

    ``release(tensor)`` drops the pages under a tensor read from the file out of this process (``madvise`` with
    ``MADV_DONTNEED``): the file is mapped private and never written, so a later access reads the same bytes back
    from the page cache. Only addresses inside the file's own mapping (from ``/proc/self/maps``) are touched, never
    anonymous memory; elsewhere than Linux it does nothing.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        state = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        self.state_dict: dict[str, Any] = state.get("model", state)
        self.ranges = self._mapped_ranges()
        self._madvise = None
        if self.ranges:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self._madvise = libc.madvise

    def _mapped_ranges(self) -> list[tuple[int, int]]:
        if not sys.platform.startswith("linux"):
            return []
        target = str(self.path.resolve())
        ranges = []
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].strip() == target:
                        start, end = (int(value, 16) for value in fields[0].split("-"))
                        ranges.append((start, end))
        except OSError:
            return []
        return ranges

    def release(self, tensor: torch.Tensor) -> None:
        """Hand back the pages of ``tensor``'s storage that lie in the mapped file (whole pages only)."""
        if self._madvise is None or tensor.device.type != "cpu":
            return
        storage = tensor.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        for low, high in self.ranges:
            # a page shared with a neighbouring tensor is dropped too: harmless, it is read back on its next access
            first = max(start // mmap.PAGESIZE * mmap.PAGESIZE, low)
            last = min(-(-end // mmap.PAGESIZE) * mmap.PAGESIZE, high)
            if first < last:
                self._madvise(first, last - first, _MADV_DONTNEED)


def convert_floats(model: nn.Module, dtype: torch.dtype, checkpoint: MappedCheckpoint | None = None) -> None:
    """``model.to(dtype)`` one tensor at a time (parameters keep their identity, so tied weights stay tied), handing
    each converted source's pages back to ``checkpoint``: the same numbers, without holding every source and
    every copy at once."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype and not param.is_meta:
                source = param.data
                param.data = source.to(dtype)
                if checkpoint is not None:
                    checkpoint.release(source)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != dtype and not buffer.is_meta:
                setattr(module, name, buffer.to(dtype))
                if checkpoint is not None:
                    checkpoint.release(buffer)


def stream_checkpoint(
    model: GPT, checkpoint_dir: Path, dtype: torch.dtype | None = None, quantize: str | None = None, strict: bool = True
) -> int:
    """Fill ``model`` (a ``litgpt.model.GPT`` or ``litgpt.lora.GPT`` built on the meta device) with the checkpoint's
    weights: assigned from the memory-mapped file, the block linears quantized to 4-bit one at a time when
    ``quantize`` asks, then every other float tensor converted to ``dtype``, each source's pages handed back as it
    is done. ``strict=False`` leaves parameters the checkpoint lacks (LoRA adapters) on the meta device for the
    caller. Returns how many linears were quantized."""
    checkpoint = MappedCheckpoint(Path(checkpoint_dir) / WEIGHTS_FILE)
    model.load_state_dict(checkpoint.state_dict, strict=strict, assign=True)
    checkpoint.state_dict = {}  # the model holds the tensors it uses now
    # the rope cache is a non-persistent buffer, so it is still on the meta device: build it for real
    model.cos, model.sin = model.rope_cache(device=torch.device("cpu"))
    count = 0
    if quantize is not None:
        quant_type, double_quant = quantize_choice(quantize)
        count = quantize_linears_4bit(
            model, quant_type=quant_type, double_quant=double_quant, dtype=dtype, release=checkpoint.release
        )
    if dtype is not None:
        convert_floats(model, dtype, checkpoint)
    return count


def create_missing_adapters(model: nn.Module, dtype: torch.dtype) -> None:
    """Create the LoRA parameters ``stream_checkpoint(strict=False)`` left on the meta device (a checkpoint has no
    adapters), initialised as ``litgpt.lora`` does: kaiming-uniform A, zero B. Any other parameter still on the meta
    device means the checkpoint lacks a base weight: that is an error, not something to draw at random."""
    for module in model.modules():
        metas = [name for name, param in module.named_parameters(recurse=False) if param.is_meta]
        if not metas:
            continue
        if not all(name.startswith("lora_") for name in metas):
            raise RuntimeError(f"The checkpoint has no weights for {type(module).__name__} parameters {metas}")
        for name in metas:
            meta = getattr(module, name)
            setattr(module, name, nn.Parameter(torch.empty(meta.shape, dtype=dtype), meta.requires_grad))
        module.reset_parameters()


def load_checkpoint_model(
    checkpoint_dir: Path,
    precision: str | None = None,
    quantize: str | None = None,
    device: torch.device | str | None = None,
) -> GPT:
    """A frozen ``litgpt.model.GPT`` with the checkpoint's weights.

    Args:
        checkpoint_dir: a LitGPT checkpoint directory (``lit_model.pth`` and ``model_config.yaml``).
        precision: ``32-true``, ``bf16-true`` or ``16-true``; None keeps the dtype the weights are stored in.
        quantize: ``bnb.nf4``, ``bnb.nf4-dq``, ``bnb.fp4`` or ``bnb.fp4-dq``: swap the block linears for
            bitsandbytes 4-bit ones, quantized as they load (this works on CPU as well as GPU).
        device: where the model goes; None: the GPU if there is one, else the CPU.
    """
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    if precision is not None and precision not in PRECISION_DTYPES:
        raise InputError(f"Unsupported --precision {precision!r}; choose one of {list(PRECISION_DTYPES)}")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise InputError(f"Unsupported --quantize {quantize!r}; choose one of {list(QUANTIZE_CHOICES)}")
    config = Config.from_file(checkpoint_dir / CONFIG_FILE)
    with torch.device("meta"):
        model = GPT(config)
    stream_checkpoint(model, checkpoint_dir, PRECISION_DTYPES[precision] if precision is not None else None, quantize)
    model.requires_grad_(False)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device)

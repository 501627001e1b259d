"""Loading a LitGPT checkpoint directory into a frozen base model: the one loader every command and API uses.

The weights are memory-mapped and assigned to a model built on the meta device, so loading never holds a second
dense copy of the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from litgpt import Config
from litgpt.model import GPT
from litgpt.utils import check_valid_checkpoint_dir

from litgpt_plop.errors import InputError
from litgpt_plop.quantize import QUANTIZE_CHOICES, quantize_choice, quantize_linears_4bit

PRECISION_DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}
WEIGHTS_FILE = "lit_model.pth"
CONFIG_FILE = "model_config.yaml"


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
            bitsandbytes 4-bit ones (this works on CPU as well as GPU).
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
    state_dict = torch.load(checkpoint_dir / WEIGHTS_FILE, map_location="cpu", mmap=True, weights_only=True)
    state_dict = state_dict.get("model", state_dict)
    model.load_state_dict(state_dict, assign=True)
    # the rope cache is a non-persistent buffer, so it is still on the meta device: build it for real
    model.cos, model.sin = model.rope_cache(device=torch.device("cpu"))
    if precision is not None:
        model.to(PRECISION_DTYPES[precision])
    model.requires_grad_(False)
    if quantize is not None:
        quant_type, double_quant = quantize_choice(quantize)
        quantize_linears_4bit(model, quant_type=quant_type, double_quant=double_quant)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device)

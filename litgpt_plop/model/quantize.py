"""4-bit base weights without Lightning's bitsandbytes plugin (which refuses to run on CPU).

``quantize_linears_4bit`` swaps the linears inside the transformer blocks for bitsandbytes ``Linear4bit``
modules holding the same weights, quantized where the weights are (CPU included). The embedding and the head
stay as they are, as in QLoRA.

CPU repack hazard (bitsandbytes 0.49/0.50): on a CPU with avx512_bf16, ``Linear4bit.forward`` in eval mode with an
input that does not require grad repacks the weight into a CPU-only layout (``quant_state.packing_format_for_cpu``)
and leaves it so; afterwards the layer gives no input gradient (adapters in earlier blocks silently stop
learning) and ``dequantize_4bit`` returns garbage. The switch bitsandbytes 0.50.2 reads is the instance
attribute ``support_avx512bf16_for_cpu`` (set in ``Linear4bit.__init__`` from ``has_avx512bf16()``); every
module made here gets it set to False, and ``apply_placement`` does the same for each 4-bit linear it wraps.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Literal, get_args

import torch
import torch.nn as nn

from litgpt_plop.model.modules import gpt_of
from litgpt_plop.memory import release_free_memory

QuantizeChoice = Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq"]
QUANTIZE_CHOICES = get_args(QuantizeChoice)

# bitsandbytes' CPU backend logs this warning when it is imported on a CPU with avx512_bf16 and the optional
# `kernels` package is absent. It reads as an error, and `kernels` fetches its kernel from a model hub; without it
# the 4-bit results are the same (bitsandbytes' own CPU kernels), only that one fused matmul is not used.
BNB_KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _WithoutKernelsNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BNB_KERNELS_NOTICE)


def silence_kernels_notice() -> None:
    """Keep bitsandbytes' notice about the optional ``kernels`` package from printing (see ``BNB_KERNELS_NOTICE``).
    Only that one message of that one logger is dropped; a filter on a logger by name works before bitsandbytes
    is imported, which is when it logs it."""
    logger = logging.getLogger(BNB_KERNELS_LOGGER)
    if not any(isinstance(f, _WithoutKernelsNotice) for f in logger.filters):
        logger.addFilter(_WithoutKernelsNotice())


silence_kernels_notice()  # importing this module comes before any import of bitsandbytes by this package


def disable_cpu_repack(modules: Iterable[nn.Module]) -> None:
    """Stop every bitsandbytes ``Linear4bit`` among ``modules`` from repacking its weight into the CPU-only
    inference layout (the hazard in the module docstring). Other modules are left alone."""
    for module in modules:
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@contextmanager
def no_cpu_repack(model: nn.Module) -> Iterator[None]:
    """Keep bitsandbytes ``Linear4bit`` weights in their normal layout during an eval-mode, no-grad pass.

    Applies ``disable_cpu_repack`` to every ``Linear4bit`` of ``model`` and restores each previous value on exit. A
    weight already repacked by an earlier pass is unpacked first (as bitsandbytes' own ``_save_to_state_dict``
    does), with a warning.
    """
    saved = {}
    for name, module in model.named_modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        quant_state = getattr(module.weight, "quant_state", None)
        if getattr(quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, quant_state
            )
            warnings.warn(
                f"{name}: the 4-bit weight had been repacked into bitsandbytes' CPU inference layout by an earlier"
                " eval-mode forward; unpacked it back to the normal layout",
                stacklevel=3,
            )
        saved[module] = module.support_avx512bf16_for_cpu
    disable_cpu_repack(saved)
    try:
        yield
    finally:
        for module, value in saved.items():
            module.support_avx512bf16_for_cpu = value


def quantize_choice(quantize: str) -> tuple[str, bool]:
    """``bnb.nf4-dq`` -> (``nf4``, double quantization on)."""
    return quantize[len("bnb.") :].removesuffix("-dq"), quantize.endswith("-dq")


def quantize_linears_4bit(
    model: nn.Module,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = True,
    blocksize: int = 64,
    dtype: torch.dtype | None = None,
    release: Callable[[torch.Tensor], None] | None = None,
) -> int:
    """Replace every ``nn.Linear`` in the model's blocks (not ``lm_head``, not ``wte``) by a ``Linear4bit``, one at a
    time: at most one layer's dense weight (and its ``dtype`` copy) is alive beside the 4-bit ones. On CPU, the
    memory malloc keeps from each layer's quantization temporaries is handed back after it
    (``litgpt_plop.memory.release_free_memory``): else the holes between the 4-bit weights stay resident.

    Args:
        model: a LitGPT ``GPT`` (plain or ``litgpt.lora``; a LoRA wrapper's ``.linear`` is replaced, its adapter kept),
            or a module containing one.
        quant_type: ``"nf4"`` or ``"fp4"``.
        compute_dtype: the dtype the 4-bit matmul runs in; default: each weight's own dtype (after ``dtype``).
        double_quant: also quantize the quantization constants (QLoRA's double quantization).
        blocksize: quantization block size.
        dtype: convert each weight (and bias) to this dtype just before quantizing it; None keeps its dtype.
        release: called with each dense weight (and converted bias) once it is no longer needed, e.g. to hand the
            pages of a memory-mapped checkpoint back (``litgpt_plop.model.checkpoint``).

    Returns:
        How many linears were quantized.
    """
    import bitsandbytes as bnb

    gpt = gpt_of(model)
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    count = 0
    for block in gpt.transformer.h:
        for name, linear in list(block.named_modules()):
            if type(linear) is not nn.Linear:  # exactly nn.Linear: skips LoRA wrappers and what is already 4-bit
                continue
            source = linear.weight.data
            if not source.dtype.is_floating_point:
                raise ValueError(f"Cannot quantize {name}: its weight has dtype {source.dtype}")
            weight = source.to(dtype) if dtype is not None else source
            with torch.device("meta"):  # the constructor's own random weight is never allocated
                quantized = bnb.nn.Linear4bit(
                    linear.in_features,
                    linear.out_features,
                    bias=False,
                    compute_dtype=compute_dtype or weight.dtype,
                    compress_statistics=double_quant,
                    quant_type=quant_type,
                )
            quantized.weight = bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                blocksize=blocksize,
                compress_statistics=double_quant,
                quant_type=quant_type,
                module=quantized,
            )
            # Params4bit quantizes on its first move to a real device (CPU included); it returns itself.
            quantized.weight = quantized.weight.to(weight.device)
            bias = linear.bias
            if bias is not None and dtype is not None and bias.dtype != dtype:
                quantized.bias = nn.Parameter(bias.data.to(dtype), requires_grad=bias.requires_grad)
                if release is not None:
                    release(bias.data)
            else:
                quantized.bias = bias
            disable_cpu_repack([quantized])
            parent_name, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, attr, quantized)
            del linear, weight
            if release is not None:
                release(source)
            if source.device.type == "cpu":
                release_free_memory()
            count += 1
    return count

"""Where each kind lives in a LitGPT model: the one place that maps kinds to module attributes.

Works on ``litgpt.model.GPT`` (plain ``nn.Linear`` or bitsandbytes ``Linear4bit``) and on ``litgpt.lora.GPT``
(whose ``LoRALinear`` wraps the base linear as ``.linear``).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from litgpt import GPT as BaseGPT
from litgpt.lora import LoRALinear

from litgpt_plop.placement import PlacementError, qkv_part_sizes

# kind -> attribute path inside a block. The fused qkv holds query, key and value as row slices.
KIND_TO_PATH = {
    "query": "attn.qkv",
    "key": "attn.qkv",
    "value": "attn.qkv",
    "projection": "attn.proj",
    "mlp_fc_1": "mlp.fc_1",
    "mlp_fc_2": "mlp.fc_2",
    "mlp_fc": "mlp.fc",
    "mlp_proj": "mlp.proj",
}


def find_gpt(module: nn.Module, attr: str | None = None) -> BaseGPT | None:
    """The first LitGPT ``GPT`` inside ``module`` (itself included), or None; with ``attr`` (a dotted attribute
    path such as ``"model"``), the first one inside that attribute."""
    for name in attr.split(".") if attr else ():
        module = getattr(module, name, None)
        if module is None:
            return None
    for m in module.modules():
        if isinstance(m, BaseGPT):
            return m
    return None


def gpt_of(module: nn.Module, attr: str | None = None) -> BaseGPT:
    """``find_gpt``, but a missing model is a ``PlacementError`` naming what was searched."""
    gpt = find_gpt(module, attr)
    if gpt is None:
        where = f" at {attr!r}" if attr else ""
        raise PlacementError(
            f"No LitGPT GPT model found in {type(module).__name__}{where}: pass a litgpt.model.GPT or litgpt.lora.GPT,"
            " or a module holding one"
        )
    return gpt


def site_module(model: BaseGPT, layer: int, kind: str) -> nn.Module:
    """The module that computes ``kind`` in block ``layer`` (a ``LoRALinear`` on a LoRA model)."""
    if kind == "head":
        return model.lm_head
    module = model.transformer.h[layer]
    for name in KIND_TO_PATH[kind].split("."):
        module = getattr(module, name)
    return module


def base_linear(module: nn.Module) -> nn.Module:
    """The frozen linear under a LoRA wrapper (or the module itself): ``nn.Linear`` or ``bnb.nn.Linear4bit``."""
    return module.linear if isinstance(module, LoRALinear) else module


def qkv_row_slices(owner: Any, parts: tuple[str, ...] = ("query", "key", "value")) -> dict[str, slice]:
    """The rows each of ``parts`` occupies when only those parts are stacked in query, key, value order.

    With every part, these are the rows of the fused ``attn.qkv`` weight; with the enabled parts of a LitGPT
    ``LoRAQKVLinear``, the rows of its ``lora_B``. ``owner`` is a config or a qkv module (anything with
    ``n_head``, ``n_query_groups`` and ``head_size``).
    """
    sizes = qkv_part_sizes(owner)
    slices, start = {}, 0
    for part in ("query", "key", "value"):
        if part in parts:
            slices[part] = slice(start, start + sizes[part])
            start += sizes[part]
    return slices

"""Where each kind lives in a LitGPT model: the one place that maps kinds to module attributes.

Works on ``litgpt.model.GPT`` (plain ``nn.Linear`` or bitsandbytes ``Linear4bit``) and on ``litgpt.lora.GPT``
(whose ``LoRALinear`` wraps the base linear as ``.linear``).
"""

from __future__ import annotations

from typing import Iterator

import torch.nn as nn
from litgpt import GPT as BaseGPT
from litgpt.lora import LoRALinear

from litgpt_plop.placement import HEAD_LAYER, check_supported

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


def iter_site_modules(model: BaseGPT, kinds: tuple[str, ...]) -> Iterator[tuple[int, str, nn.Module]]:
    """``(layer, path, module)`` for each block and each distinct module path that holds one of ``kinds``.

    The fused qkv is yielded once per block with path ``"attn.qkv"``; the head with layer ``HEAD_LAYER``.
    """
    check_supported(model.config)
    paths = list(dict.fromkeys(KIND_TO_PATH[k] for k in kinds if k != "head"))
    for layer in range(model.config.n_layer):
        for path in paths:
            yield layer, path, site_module(model, layer, next(k for k in kinds if KIND_TO_PATH.get(k) == path))
    if "head" in kinds:
        yield HEAD_LAYER, "lm_head", model.lm_head

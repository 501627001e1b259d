"""Where each kind lives in a LitGPT model: the one place that maps kinds to module attributes.

Works on ``litgpt.model.GPT`` (plain ``nn.Linear`` or bitsandbytes ``Linear4bit``) and on ``litgpt.lora.GPT``
(whose ``LoRALinear`` wraps the base linear as ``.linear``). In a mixture of experts (``LLaMAMoE``) an MLP kind's
site is one linear per expert (``site_modules``, ``site_experts``), and the router is ``mlp.gate``.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from litgpt import GPT as BaseGPT
from litgpt.lora import LoRALinear

from litgpt_plop.selection.placement import EXPERT_KINDS, ROUTER_KIND, PlacementError, is_moe, qkv_part_sizes

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
    ROUTER_KIND: "mlp.gate",
}
# In a mixture of experts the MLP kinds live in every expert: ``mlp.experts.<e>.<attribute>``.
EXPERT_ATTR = {"mlp_fc_1": "fc_1", "mlp_fc_2": "fc_2", "mlp_proj": "proj"}


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


def is_expert_site(model: BaseGPT, kind: str) -> bool:
    """Whether a site of ``kind`` is one matrix in every expert (an MLP kind of a mixture of experts)."""
    return kind in EXPERT_KINDS and is_moe(model.config)


def site_module(model: BaseGPT, layer: int, kind: str, expert: int | None = None) -> nn.Module:
    """The module that computes ``kind`` in block ``layer`` (a ``LoRALinear`` on a LoRA model); in a mixture of
    experts, an MLP kind's module in expert ``expert`` (which must then be given)."""
    if kind == "head":
        return model.lm_head
    block = model.transformer.h[layer]
    if is_expert_site(model, kind):
        if expert is None:
            raise ValueError(f"Site {layer}.{kind} is in every expert of a mixture of experts: name the expert")
        return getattr(block.mlp.experts[expert], EXPERT_ATTR[kind])
    return block.get_submodule(KIND_TO_PATH[kind])


def site_parent(model: BaseGPT, layer: int, kind: str, expert: int | None = None) -> tuple[nn.Module, str]:
    """The module holding the site's module, and the attribute it holds it as (to replace it); not for the head."""
    block = model.transformer.h[layer]
    if is_expert_site(model, kind):
        return block.mlp.experts[expert], EXPERT_ATTR[kind]
    parent, _, attr = KIND_TO_PATH[kind].rpartition(".")
    return block.get_submodule(parent), attr


def site_modules(model: BaseGPT, layer: int, kind: str) -> list[nn.Module]:
    """Every module a site spans: one per expert for an MLP kind of a mixture of experts, else the one module."""
    if is_expert_site(model, kind):
        return [site_module(model, layer, kind, e) for e in range(model.config.n_expert)]
    return [site_module(model, layer, kind)]


def site_experts(model: BaseGPT, kind: str) -> list[int | None]:
    """The ``expert`` arguments of a site's modules: ``[0, ..., n_expert - 1]`` or ``[None]``."""
    return list(range(model.config.n_expert)) if is_expert_site(model, kind) else [None]


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

"""The stock LitGPT layout of a placed model's adapters, both ways.

Stock ``litgpt merge_lora`` (then ``generate``, ``chat``, ``evaluate``) builds a ``litgpt.lora.GPT`` from the
global ``lora_*`` flags and one ``lora_r`` found in ``hyperparameters.yaml`` and loads ``lit_model.pth.lora``
strictly. ``to_stock_state_dict`` writes the adapters in that layout for the placement's union of flags and
``lora_r`` = its largest rank (docs/methods.md, last section):

- a site without an adapter gets zero A and zero B, so its update ``B A`` is exactly zero;
- a site of rank r < r_max is zero-padded: A gets zero rows, B zero columns, and B is multiplied by
  ``site scaling / stock scaling`` = ``(alpha / r) / (alpha / r_max)`` = ``r_max / r``, so that stock's
  ``alpha / r_max * B_pad A_pad`` equals the site's ``alpha / r * B A``;
- the fused qkv follows ``LoRAQKVLinear``: ``lora_A`` is (r_max * n_enabled, d_in), one chunk of r_max rows per
  enabled part in query, key, value order; ``lora_B`` is (sum of the enabled parts' sizes, r_max).

``unpad_stock_state_dict`` undoes the padding, given the real placement (``placement.json``).
"""

from __future__ import annotations

from typing import Any

import litgpt.lora
import torch
import torch.nn as nn
from litgpt import Config

from litgpt_plop.model.adapt import current_placement, lora_config, site_adapter
from litgpt_plop.model.modules import EXPERT_ATTR, KIND_TO_PATH, gpt_of, site_experts
from litgpt_plop.selection.placement import (
    HEAD_KIND,
    HEAD_LAYER,
    QKV_KINDS,
    Placement,
    PlacementError,
    model_kinds,
    site_shape,
)

# A site's adapter in stock layout: (layer, kind), or (layer, kind, expert) for one expert of a mixture of experts.
PieceKey = tuple


def _stock_modules(
    config: Config, flags: dict[str, Any]
) -> dict[str, tuple[int, list[str], int | None, dict[str, torch.Size]]]:
    """For each module that stock LitGPT gives adapters under ``flags``: (layer, the kinds it holds in stock's
    order, its expert in a mixture of experts or None, {parameter key: shape}). Read off a ``litgpt.lora.GPT``
    built on the meta device, so the keys and shapes are LitGPT's own."""
    with torch.device("meta"):
        reference = litgpt.lora.GPT(lora_config(config, flags))
    kinds = model_kinds(config, include_router=True)
    kinds_at = {path: [k for k in kinds if KIND_TO_PATH[k] == path] for path in set(KIND_TO_PATH.values())}
    expert_kind = {attr: kind for kind, attr in EXPERT_ATTR.items()}
    result = {}
    for name, module in reference.named_modules():
        params = {f"{name}.{p}": q.shape for p, q in module.named_parameters(recurse=False) if p.startswith("lora_")}
        if not params:
            continue
        expert = None
        if name == "lm_head":
            layer, kinds = HEAD_LAYER, [HEAD_KIND]
        else:  # transformer.h.<layer>.<path>, or transformer.h.<layer>.mlp.experts.<expert>.<attribute>
            _, _, layer_str, path = name.split(".", 3)
            layer = int(layer_str)
            if path.startswith("mlp.experts."):
                _, _, expert_str, attr = path.split(".")
                expert, kinds = int(expert_str), [expert_kind[attr]]
            else:
                kinds = kinds_at[path]
            if path == KIND_TO_PATH["query"]:
                kinds = [k for k, on in zip(QKV_KINDS, module.enable_lora) if on]
        result[name] = (layer, kinds, expert, params)
    return result


def to_stock_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's adapters as stock LitGPT's ``lit_model.pth.lora`` state dict (union flags, one rank, padded)."""
    gpt = gpt_of(model)
    placement = current_placement(gpt)
    if not placement.sites:
        raise PlacementError("The model has no adapters to save")
    flags = placement.flags()
    r_max, stock_scaling = flags["lora_r"], flags["lora_alpha"] / flags["lora_r"]
    site = placement.sites[0]
    first = site_adapter(gpt, site.layer, site.kind, site_experts(gpt, site.kind)[0])
    dtype, device = first.A.dtype, first.A.device
    state_dict = {}
    for name, (layer, kinds, expert, params) in _stock_modules(gpt.config, flags).items():
        A_parts, B_parts = [], []
        for kind in kinds:
            d_in = params[f"{name}.lora_A"][1]
            d_out = _part_rows(gpt.config, kind)
            A_pad = torch.zeros(r_max, d_in, dtype=dtype, device=device)
            B_pad = torch.zeros(d_out, r_max, dtype=dtype, device=device)
            adapter = site_adapter(gpt, layer, kind, expert)
            if adapter is not None:
                r = adapter.A.shape[0]
                A_pad[:r] = adapter.A
                # fold alpha/r into B (in float32, so a bf16 B is rounded once)
                B_pad[:, :r] = adapter.B.float() * (adapter.scaling / stock_scaling)
            A_parts.append(A_pad)
            B_parts.append(B_pad)
        state_dict[f"{name}.lora_A"] = torch.cat(A_parts, dim=0).cpu()
        state_dict[f"{name}.lora_B"] = torch.cat(B_parts, dim=0).cpu()
        for key, shape in params.items():
            assert state_dict[key].shape == shape, (key, state_dict[key].shape, shape)
    return state_dict


def load_stock_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a stock-layout adapter state dict into a model that already carries the matching placement
    (``apply_placement``): un-pad every site back to its rank and un-fold the scaling from B.

    Raises ``PlacementError``, leaving the model as it was, if the keys or shapes are not those of the placement's
    union flags, or if the file holds a non-zero update the placement's sites cannot hold.
    """
    gpt = gpt_of(model)
    copy_into(gpt, unpad_stock_state_dict(state_dict, gpt.config, current_placement(gpt)))


def unpad_stock_state_dict(
    state_dict: dict[str, torch.Tensor], config: Config, placement: Placement
) -> dict[PieceKey, tuple[torch.Tensor, torch.Tensor]]:
    """Per site of ``placement`` (per expert in a mixture of experts: key ``(layer, kind, expert)``): (A, B) cut back
    to the site's rank, B un-folded by ``r / r_max``. Checks it all."""
    flags = placement.flags()
    modules = _stock_modules(config, flags)
    _check_stock_keys(state_dict, modules)
    r_max = flags["lora_r"]
    ranks = {(s.layer, s.kind): s.rank for s in placement.sites}
    result = {}
    for name, (layer, kinds, expert, _) in modules.items():
        A_chunks = state_dict[f"{name}.lora_A"].split(r_max, dim=0)
        B_blocks = state_dict[f"{name}.lora_B"].split([_part_rows(config, kind) for kind in kinds], dim=0)
        for kind, A_pad, B_pad in zip(kinds, A_chunks, B_blocks):
            r = ranks.get((layer, kind), 0)
            if B_pad[:, r:].count_nonzero():
                raise PlacementError(
                    f"{name}: the saved adapter has a non-zero update beyond rank {r} at site {layer}.{kind}, which"
                    " the placement does not hold; placement.json and the adapter file do not belong together"
                )
            if r:
                # stock scaling / site scaling = (alpha / r_max) / (alpha / r)
                key = (layer, kind) if expert is None else (layer, kind, expert)
                result[key] = (A_pad[:r], B_pad[:, :r].float() * (r / r_max))
    return result


def copy_into(gpt: nn.Module, pieces: dict[PieceKey, tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for key, (A, B) in pieces.items():
            adapter = site_adapter(gpt, *key)
            adapter.A.copy_(A)
            adapter.B.copy_(B)


def _check_stock_keys(state_dict: dict[str, torch.Tensor], modules: dict[str, Any]) -> None:
    expected = {key: shape for *_, params in modules.values() for key, shape in params.items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise PlacementError(
            f"The adapter file does not match the placement: missing keys {_few(missing)},"
            f" unexpected keys {_few(unexpected)}"
        )
    for key, shape in expected.items():
        if state_dict[key].shape != shape:
            raise PlacementError(
                f"The adapter file does not match the placement and model: {key} has shape"
                f" {tuple(state_dict[key].shape)}, expected {tuple(shape)}"
            )


def _few(keys: list[str]) -> str:
    return str(keys[:4])[:-1] + (", ...]" if len(keys) > 4 else "]")


def _part_rows(config: Config, kind: str) -> int:
    """Rows of B for one kind in stock layout: the part's size for q/k/v (a row slice of the fused qkv), the
    output size otherwise; ``site_shape`` gives both."""
    return site_shape(config, kind)[0]

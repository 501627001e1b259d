"""WeightLoRA's gates on the model: one scalar per candidate adapter, multiplying the rows of its ``lora_B``.

A ``torch.nn.utils.parametrize`` parametrization (``SiteGates``) makes every read of a gated ``lora_B`` return
``B * g[:, None]``, where ``g`` holds, for every row of the stored B, the gate of the adapter that row belongs to.
LitGPT's LoRA modules only ever read ``self.lora_B``, so they compute with the gated B unchanged; in the fused qkv
each enabled part owns its own block of rows, so each part has its own gate. Why this is exact and why the gates
live outside the model: docs/methods.md, section 3, and the ``litgpt_plop.weightlora`` docstring.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from litgpt_plop.model.adapt import SiteParameters, site_parameters
from litgpt_plop.model.modules import gpt_of, site_experts, site_module
from litgpt_plop.selection.placement import PlacementError
from litgpt_plop.weightlora.surgery import rescale_state_rows


class _GateBank:
    """Holds the gate vector for the parametrizations. A plain object, not an ``nn.Module``: a tensor stored on it
    is not registered in the model, so neither the model's optimizer nor its state dict ever sees the gates."""

    def __init__(self, values: nn.Parameter) -> None:
        self.values = values


class SiteGates(nn.Module):
    """Parametrization of a ``lora_B``: multiplies row ``j`` by the gate ``index[j]`` of the adapter it belongs to."""

    def __init__(self, bank: _GateBank, index: torch.Tensor) -> None:
        super().__init__()
        self.bank = bank
        self.register_buffer("index", index, persistent=False)  # moves with the model, not saved

    def forward(self, B: torch.Tensor) -> torch.Tensor:
        gates = self.bank.values.to(device=B.device, dtype=B.dtype)
        return B * gates[self.index].unsqueeze(-1)


def attach_gates(model: nn.Module, sites: dict[tuple[int, str], int], gates: nn.Parameter) -> None:
    """Gate the adapters at ``sites`` ((layer, kind) -> index into ``gates``): every one of their ``lora_B`` rows
    is multiplied by its adapter's gate. Every adapter on the model must be listed (an ungated adapter sharing a
    fused ``lora_B`` would otherwise be left without a gate). In a mixture of experts an MLP site's one gate
    multiplies its adapter in every expert: the placement is per (layer, kind)."""
    gpt = gpt_of(model)
    bank = _GateBank(gates)
    rows: dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor]] = {}
    for (layer, kind), gate in sites.items():
        for expert in site_experts(gpt, kind):
            sp = site_parameters(gpt, layer, kind, expert)
            if sp is None:
                raise PlacementError(f"Site {layer}.{kind} has no adapter to gate")
            module = site_module(gpt, layer, kind, expert)
            name = next(n for n, p in module.named_parameters(recurse=False) if p is sp.B)
            _, _, index = rows.setdefault((id(module), name), (module, name, torch.full((sp.B.shape[0],), -1)))
            index[sp.B_rows] = gate
    for module, name, index in rows.values():
        if (index < 0).any():
            raise PlacementError(f"Some rows of {type(module).__name__}.{name} belong to no gated adapter")
        parametrize.register_parametrization(module, name, SiteGates(bank, index.to(getattr(module, name).device)))


def detach_gates(model: nn.Module) -> None:
    """Remove every gate parametrization, restoring the stored (ungated) B tensors: the same parameter objects."""
    for module in gpt_of(model).modules():
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations.keys()):
            if any(isinstance(p, SiteGates) for p in module.parametrizations[name]):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)


def top_k_mask(gates: torch.Tensor, alive: list[bool], k: int) -> torch.Tensor:
    """Which k of the ``alive`` gates have the largest |w| (ties: the earlier candidate), as a CPU bool mask.

    The magnitude, because a gate's sign can be absorbed by B: a gate of -2 matters as much as one of 2."""
    magnitude = gates.detach().abs().cpu()
    magnitude[~torch.tensor(alive)] = -1.0  # removed adapters never come back
    order = torch.sort(magnitude, descending=True, stable=True).indices
    keep = torch.zeros(len(alive), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def gates_moved(gates: torch.Tensor, settled: torch.Tensor, alive: list[bool]) -> bool:
    """Whether any ``alive`` gate differs from ``settled`` (its value when the previous step was done). A gate
    gradient can be non-zero and still too small to change a float32 gate near 1, so this compares the values:
    a choice among gates that did not move would be a choice by candidate order."""
    mask = torch.tensor(alive)
    return bool((gates.detach().cpu()[mask] != settled[mask]).any())


def step_gates(gates: nn.Parameter, optimizer: torch.optim.Optimizer, clip: float, grad_scale: float = 1.0) -> bool:
    """One step of the gates' own ``optimizer``, their gradient first divided by ``grad_scale`` (the fp16 loss
    scale) and its norm clipped to ``clip`` (0: not clipped). Returns whether the gradient was finite and not all
    zero: until it is, the gates are tied and thresholding them would choose by candidate order."""
    grad = gates.grad
    if grad is None:  # no forward through the gates since the last step
        return False
    if grad_scale != 1.0:
        grad.div_(grad_scale)
    finite = bool(torch.isfinite(grad).all())
    if finite:  # an fp16 overflow step is skipped by the main optimizer too
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([gates], clip)
        optimizer.step()
    informative = finite and bool(grad.abs().max() > 0)
    optimizer.zero_grad(set_to_none=True)
    return informative


def fold_gates(
    adapters: dict[tuple, SiteParameters],
    weights: dict[tuple[int, str], float],
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """``B *= w`` for each adapter of ``weights`` (its ungated parameters in ``adapters``, keyed by site or, in a
    mixture of experts, by ``(layer, kind, expert)``: ``adapt.unit_parameters``), and ``optimizer``'s running
    averages of those rows to match (``rescale_state_rows``): the gates are then no longer needed."""
    with torch.no_grad():
        for key, sp in adapters.items():
            w = weights.get(key[:2])
            if w is None:
                continue
            sp.B[sp.B_rows] *= w
            if optimizer is not None:
                rescale_state_rows(optimizer, sp.B, sp.B_rows, w)

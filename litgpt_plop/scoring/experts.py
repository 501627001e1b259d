"""Mixture-of-experts support for the calibration pass: which tokens each expert of a ``LLaMAMoE`` block receives,
and how per-expert scores are aggregated (docs/methods.md, "Mixture of experts"). The report's section on them is
``litgpt_plop.reports.experts``.

LitGPT's ``LLaMAMoE`` routes the flattened ``(B*T, C)`` tokens: ``indices = topk(gate(x), n_expert_per_token)``,
then expert e computes ``expert(x[token_idx])`` for ``token_idx, _ = torch.where(indices == e)``, in ascending
token order. A forward hook on an expert's linear therefore sees exactly the rows the router sent to it, but not
which tokens they are. ``ExpertRouting`` hooks each block's router (``mlp.gate``, after any LoRA update on it) and
recomputes the same top-k, so the scorer can put each expert row back at its token's position in the batch and
mask padding there as it does for dense linears.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from litgpt import GPT

from litgpt_plop.scoring.calibration import ForwardHook


class ExpertRouting:
    """Per mixture-of-experts block, the flat token positions (into the batch's ``(B*T)`` grid) each expert received
    in the current forward. Filled by forward hooks on the routers (``hooks``); read by the expert linears' hooks,
    which run after their block's router."""

    def __init__(self, gpt: GPT, layers: Sequence[int]) -> None:
        self.gpt = gpt
        self.layers = list(layers)
        self.tokens: dict[int, list[torch.Tensor]] = {}

    def hooks(self) -> list[tuple[nn.Module, ForwardHook]]:
        return [(self.gpt.transformer.h[layer].mlp.gate, self._make_hook(layer)) for layer in self.layers]

    def _make_hook(self, layer: int) -> ForwardHook:
        config = self.gpt.config

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            # LLaMAMoE.forward: probs, indices = torch.topk(router, n_expert_per_token); the same call, the same choice
            indices = torch.topk(output, config.n_expert_per_token).indices  # (B*T, k), distinct experts per token
            chosen = indices.unsqueeze(-1) == torch.arange(config.n_expert, device=indices.device)  # (B*T, k, E)
            routed = chosen.any(dim=1)  # (B*T, E)
            self.tokens[layer] = [routed[:, e].nonzero()[:, 0] for e in range(config.n_expert)]

        return hook

    def of(self, layer: int, expert: int, rows: int) -> torch.Tensor:
        """The flat token positions of the ``rows`` inputs expert ``expert`` of block ``layer`` just received."""
        tokens = self.tokens[layer][expert]
        if tokens.numel() != rows:  # the router hook and LitGPT's routing disagree: never score on misplaced tokens
            raise RuntimeError(
                f"Expert {expert} of block {layer} received {rows} tokens, but its router chose {tokens.numel()}"
            )
        return tokens

    def clear(self) -> None:
        self.tokens = {}


def token_weighted(values: Sequence[float | None], tokens: Sequence[int]) -> float:
    """The mean of per-expert ``values`` weighted by the tokens each expert saw; experts without a token (value
    None) have no weight. Raises ``ValueError`` when no expert saw a token."""
    total = sum(t for v, t in zip(values, tokens) if v is not None)
    if total == 0:
        raise ValueError("no expert received a calibration token")
    return sum(v * t for v, t in zip(values, tokens) if v is not None) / total


def unused_experts(expert_tokens: dict[str, list[int]]) -> dict[str, list[int]]:
    """Per MoE block (``"<layer>"``), the experts that received no token at any of its scored sites (``expert_tokens``:
    per ``"<layer>.<kind>"``, the tokens of each expert; its kinds agree but for tokens whose input is exactly zero)."""
    unused: dict[str, set[int]] = {}
    for key, counts in expert_tokens.items():
        idle = {e for e, count in enumerate(counts) if count == 0}
        if idle:
            unused.setdefault(key.split(".", 1)[0], set()).update(idle)
    return {layer: sorted(experts) for layer, experts in unused.items()}

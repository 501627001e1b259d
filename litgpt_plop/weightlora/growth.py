"""WeightLoRA+'s rank growth (docs/methods.md, section 3): a higher-rank adapter that computes the same update."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from litgpt_plop.model.adapt import SiteParameters, apply_placement, current_placement, site_parameters, unit_parameters
from litgpt_plop.model.modules import gpt_of
from litgpt_plop.selection.placement import Placement, PlacementError, Site
from litgpt_plop.weightlora.surgery import remap_optimizer

SiteKey = tuple[int, str]  # (layer, kind)
UnitKey = tuple  # (layer, kind), or (layer, kind, expert) for one expert's adapter of a mixture-of-experts site


def extended_adapter(
    A: torch.Tensor, B: torch.Tensor, new_rank: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank ``new_rank`` with ``alpha/new_rank * B' A' == alpha/r * B A`` (r = ``A.shape[0]``).

    A' = [A; N]: the new rows N are orthonormal to each other and to A's row space (QR of A^T, then a random
    Gaussian block with that space projected out and orthonormalised), scaled to the old rows' mean norm so
    they start at LitGPT's initialisation scale. B' = [B * new_rank / r, 0]: the new columns are zero, so B' A'
    only holds the old update, and the factor ``new_rank / r`` = (alpha/r) / (alpha/new_rank) undoes the smaller
    scaling of the larger rank. Computed in float64, returned in A's and B's dtypes and devices.
    """
    rank, d_in = A.shape
    if not rank < new_rank <= d_in:
        raise ValueError(
            f"Cannot extend a rank-{rank} adapter with {d_in} inputs to rank {new_rank}:"
            f" need {rank} < new rank <= {d_in}"
        )
    A64, B64 = A.detach().double().cpu(), B.detach().double().cpu()
    basis, _ = torch.linalg.qr(A64.T)  # (d_in, r): orthonormal columns spanning A's row space
    extra = torch.randn(d_in, new_rank - rank, generator=generator, dtype=torch.float64)
    for _ in range(2):  # project twice: one Gram-Schmidt pass can leave O(eps * cond) components behind
        extra -= basis @ (basis.T @ extra)
    new_rows, _ = torch.linalg.qr(extra)  # (d_in, new_rank - r), orthonormal columns
    row_norm = A64.norm(dim=1).mean()
    if row_norm == 0:
        row_norm = torch.tensor(1.0, dtype=torch.float64)
    A_new = torch.cat([A64, new_rows.T * row_norm], dim=0)
    B_new = torch.cat([B64 * (new_rank / rank), B64.new_zeros(B64.shape[0], new_rank - rank)], dim=1)
    return A_new.to(device=A.device, dtype=A.dtype), B_new.to(device=B.device, dtype=B.dtype)


def _extended_adapters(
    adapters: dict[UnitKey, SiteParameters], ranks: dict[SiteKey, int], generator: torch.Generator | None = None
) -> dict[UnitKey, tuple[torch.Tensor, torch.Tensor]]:
    """``extended_adapter`` of each adapter of a site in ``ranks`` (its parameters in ``adapters``; every expert's,
    in expert order, for a mixture-of-experts site), in ``ranks``' order: the order in which ``generator`` draws
    the new directions."""
    grown = {}
    for site, rank in ranks.items():
        for key in [key for key in adapters if key[:2] == site]:
            sp = adapters[key]
            grown[key] = extended_adapter(sp.A[sp.A_rows], sp.B[sp.B_rows], rank, generator)
    return grown


def _load_adapters(model: nn.Module, adapters: dict[UnitKey, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each (A, B) into the rows that hold its adapter on ``model`` (whose ranks must already match)."""
    gpt = gpt_of(model)
    with torch.no_grad():
        for key, (A, B) in adapters.items():
            sp = site_parameters(gpt, *key)
            sp.A[sp.A_rows] = A
            sp.B[sp.B_rows] = B


def reshape_adapters(
    model: nn.Module,
    placement: Placement,
    before: dict[UnitKey, SiteParameters],
    grow: dict[SiteKey, int],
    generator: torch.Generator | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[UnitKey, tuple[torch.Tensor, torch.Tensor]]:
    """Put ``placement`` on ``model``, whose adapters were ``before`` (``adapt.unit_parameters``) (their parameters, taken without gates): sites
    it drops are removed, those in ``grow`` get that rank (exactly, ``extended_adapter``; the generator draws in
    ``grow``'s order), the others keep their values. With ``optimizer``, it then holds the new tensors instead of
    the old ones (``remap_optimizer``; grown adapters start with no state). Returns the new (A, B) per grown site."""
    gpt = gpt_of(model)
    grown = _extended_adapters(before, grow, generator)
    apply_placement(gpt, placement)
    _load_adapters(gpt, grown)
    if optimizer is not None:
        kept = {(s.layer, s.kind) for s in placement.sites}
        after = {key: site_parameters(gpt, *key) for key in before if key[:2] in kept}
        remap_optimizer(optimizer, before, after, reset={key for key in before if key[:2] in grow})
    return grown


def grow_ranks(
    model: nn.Module, ranks: dict[SiteKey, int], generator: torch.Generator | None = None
) -> dict[SiteKey, tuple[torch.Tensor, torch.Tensor]]:
    """Raise the rank of the adapters at the given (layer, kind) sites in place, leaving each update ``s * B A``
    unchanged (``extended_adapter``); other adapters keep their tensors. Returns the new (A, B) per grown site.

    The grown sites get new parameter tensors (LitGPT's modules have one fixed rank); an optimizer holding the old
    ones must be updated (``remap_optimizer``). The model must carry no gates (``detach_gates``).
    """
    gpt = gpt_of(model)
    if any(parametrize.is_parametrized(m) for m in gpt.modules()):
        raise PlacementError("grow_ranks needs a model without parametrizations (detach the WeightLoRA gates first)")
    placement = current_placement(gpt)
    current = {(s.layer, s.kind) for s in placement.sites}
    for layer, kind in ranks:
        if (layer, kind) not in current:
            raise PlacementError(f"Site {layer}.{kind} has no adapter to grow")
    before = unit_parameters(gpt, ranks)
    new_sites = [Site(s.layer, s.kind, ranks.get((s.layer, s.kind), s.rank)) for s in placement.sites]
    return reshape_adapters(gpt, dataclasses.replace(placement, sites=new_sites), before, ranks, generator)

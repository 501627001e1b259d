"""Editing a running optimizer in place when adapters are removed, rebuilt or folded (docs/methods.md, section 3).

Removed parameters leave its ``param_groups`` and its ``state``; a re-created tensor (a fused qkv that loses a part,
a grown adapter) takes the place of the old one in the same param group, with the old state carried over row by
row (grown adapters start fresh); folding a gate ``B *= w`` rescales Adam's moments of those rows. Edits are in
place, so Lightning's and Fabric's optimizer wrappers and LR schedulers, which share ``param_groups``, stay valid.

Only torch: the adapters are given as anything with ``A``, ``A_rows``, ``B``, ``B_rows`` (``SiteParameters``), so
this works on plain tensors as well as on a LitGPT model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Hashable, Mapping

import torch

if TYPE_CHECKING:
    from litgpt_plop.model.adapt import SiteParameters

# Per-element state of the optimizers we know, and how it scales when its parameter is multiplied by w.
_FIRST_MOMENTS = ("exp_avg", "momentum_buffer")  # scale with the gradient: / w
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")  # scale with the squared gradient: / w^2

# Where a re-created tensor's rows come from: (old tensor, its rows, the new tensor's rows, start afresh).
_Source = tuple[torch.Tensor, slice, slice, bool]


def rescale_state_rows(optimizer: torch.optim.Optimizer, param: torch.Tensor, rows: slice, w: float) -> None:
    """After ``param[rows] *= w`` (a folded gate), make the optimizer's running averages of those rows describe the
    gradients of the new values (which are the old gradients / w). Unknown state: that tensor's state is reset."""
    state = optimizer.state.get(param)
    if not state:
        return
    for name, value in state.items():
        if not (torch.is_tensor(value) and value.shape == param.shape):
            continue
        if name not in _FIRST_MOMENTS + _SECOND_MOMENTS:
            state.clear()  # an optimizer whose state we cannot transform: start it afresh
            return
        if w == 0.0:
            value[rows] = 0
        else:
            value[rows] /= w if name in _FIRST_MOMENTS else w * w


def remap_optimizer(
    optimizer: torch.optim.Optimizer,
    before: Mapping[Hashable, SiteParameters],
    after: Mapping[Hashable, SiteParameters],
    reset: set[Hashable] = frozenset(),
) -> None:
    """Make ``optimizer`` hold the adapters of ``after`` instead of those of ``before``, in place.

    Parameters of ``before`` that are not in ``after`` leave the param groups and the state (freed). Parameters new
    in ``after`` take the place of the first old parameter their rows come from, in that parameter's group; their
    state is copied row by row from the old state (a fused qkv that lost a part keeps its other parts' Adam
    moments), or starts empty when one of their sites is in ``reset`` (grown adapters) or cannot be carried over.
    Parameters the optimizer did not hold before are not added. ``before`` and ``after`` share keys (sites).
    """
    position: dict[int, tuple[int, int]] = {}  # id(param) -> (group, index in group)
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            position[id(p)] = (g, i)
    new_ids = {id(t) for sp in after.values() for t in (sp.A, sp.B)}
    old = {id(t): t for sp in before.values() for t in (sp.A, sp.B)}
    new_params, sources = _new_parameters(before, after, reset, position)

    # sort key per group: kept params keep their index; a new one goes just before its first source
    entries: dict[int, list[tuple[float, int, torch.Tensor]]] = {g: [] for g in range(len(optimizer.param_groups))}
    for pid, param in new_params.items():
        held = [position[id(src)] for src, *_ in sources.get(pid, []) if id(src) in position]
        if not held:
            continue
        group, index = min(held)
        entries[group].append((index - 0.5, len(entries[group]), param))
        state = _carried_state(optimizer, param, sources[pid])
        if state:
            optimizer.state[param] = state
    removed = {pid for pid in old if pid not in new_ids and pid in position}
    for g, group in enumerate(optimizer.param_groups):
        kept = [(float(i), 0, p) for i, p in enumerate(group["params"]) if id(p) not in removed]
        group["params"] = [p for *_, p in sorted(kept + entries[g], key=lambda e: (e[0], e[1]))]
    for pid in removed:
        optimizer.state.pop(old[pid], None)


def _new_parameters(
    before: Mapping[Hashable, SiteParameters],
    after: Mapping[Hashable, SiteParameters],
    reset: set[Hashable],
    position: dict[int, tuple[int, int]],
) -> tuple[dict[int, torch.Tensor], dict[int, list[_Source]]]:
    """The tensors of ``after`` the optimizer does not hold yet (by id), and where each one's rows come from."""
    sources: dict[int, list[_Source]] = {}
    new_params: dict[int, torch.Tensor] = {}
    for key, sp in after.items():
        prev = before.get(key)
        for dst, dst_rows, src, src_rows in ((sp.A, sp.A_rows, prev and prev.A, prev and prev.A_rows),
                                             (sp.B, sp.B_rows, prev and prev.B, prev and prev.B_rows)):  # fmt: skip
            if id(dst) in position:
                continue  # an unchanged tensor: the optimizer already holds it, with its state
            new_params[id(dst)] = dst
            if src is not None:
                sources.setdefault(id(dst), []).append((src, src_rows, dst_rows, key in reset))
    return new_params, sources


def _carried_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, sources: list[_Source]) -> dict[str, Any]:
    """The state of a re-created tensor, assembled from the rows of its sources' states; {} if it cannot be."""
    if any(reset for *_, reset in sources):
        return {}
    if sum(dst.stop - dst.start for _, _, dst, _ in sources) != param.shape[0]:
        return {}  # some rows have no history
    states = [optimizer.state.get(src) for src, *_ in sources]
    if not all(states):
        return {}
    carried: dict[str, Any] = {}
    for name, value in states[0].items():
        if torch.is_tensor(value) and value.dim() > 0:
            merged = torch.zeros(param.shape, dtype=value.dtype, device=value.device)
            for (src, src_rows, dst_rows, _), state in zip(sources, states):
                other = state.get(name)
                if other is None or other.shape != src.shape:
                    return {}
                merged[dst_rows] = other[src_rows]
            carried[name] = merged
        else:  # step counters
            carried[name] = value.clone() if torch.is_tensor(value) else value
    return carried

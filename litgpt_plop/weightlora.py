"""WeightLoRA and WeightLoRA+ (methods.md section 3): keep only the K adapters that matter, while training.

Every candidate adapter i gets a trainable scalar gate ``w_i`` (initialised to 1) on its update,
``h = W x + w_i * s * B_i A_i x``. The gates have their own optimizer (plain SGD, the authors' learning rate 5.0 and
gradient clipping 1.0); after every optimizer step only the K gates of largest magnitude stay, the others are set
to exactly 0 (iterative hard thresholding). After ``warmup_steps`` optimizer steps the placement is final: the
adapters whose gate is 0 are removed (their parameters and their optimizer state are freed), the surviving gates
are folded into B (``B *= w``) and training continues as plain LoRA. WeightLoRA+ also halves K ``rounds`` times
during the warm-up and doubles the survivors' rank each time, so the parameter budget stays that of the K
adapters the run starts with (K/4 adapters at rank 4r = K adapters at rank r for two rounds).

How the gates are implemented. A gate multiplies rows of ``lora_B`` through a ``torch.nn.utils.parametrize``
parametrization (``SiteGates``): ``B_used = B * g[:, None]``, where ``g`` holds, for every row of the stored B,
the gate of the adapter that row belongs to. LitGPT's modules are not forked: ``LoRALinear``, the fused
``LoRAQKVLinear`` and ``LoRAQKVMixedRankLinear`` all compute ``s * B A x`` and only ever read ``self.lora_B``,
so they see the gated B. This is exact, not an approximation: the update is linear in B, so scaling the rows of
one adapter's B scales that adapter's update and nothing else. In the fused qkv, each enabled part (query, key,
value) owns its own block of rows of ``lora_B``, so each part is its own adapter with its own gate; the gate
vector is expanded over those rows. The gates are one ``nn.Parameter`` (one entry per candidate) held by the
controller, *not* registered in the model: ``configure_optimizers`` and LitGPT's "lora_ in the name trains"
rule therefore never hand them to the main optimizer, and the model's state dict has no gate in it.

Why the magnitude: the sign of a gate can be absorbed by B, so a gate of -2 matters as much as one of 2. The
authors' early code ranks the signed values (``topk(w)``), which would drop an adapter with a large negative
gate; we rank by ``|w|`` as methods.md says.

When the thresholding starts (a deviation from "after every step"): not before the gates have had a non-zero
gradient. LoRA starts with B = 0, so at the first step every gate's gradient ``<dL/dB_used, B>`` is exactly 0 and
all gates are still tied at 1; thresholding then would keep the first K candidates in candidate order (the first
layers), and once zeroed a gate practically never comes back: its B got one step of training, so its gradient is
small next to the kept gates' values. Our benchmark showed exactly that (the same first-15-layers placement in
every seed) before this rule. So the gates first learn with every adapter on: the first hard-thresholding waits
for a non-zero gate gradient, and the WeightLoRA+ rounds are spread over the steps after the first.

Schedule (step = number of optimizer steps done, counted from 1):

- every step during warm-up: SGD step of the gates (gradient norm clipped to ``gate_clip``), then keep the top K
  (from the first step whose gate gradient is not all zero on: step 2, or step 3 under LitGPT's schedule,
  whose linear warm-up gives the first step a learning rate of 0, so B is still 0 at the second);
- WeightLoRA+ round j = 1..rounds at step ``1 + floor((T - 1) * j / (rounds + 1))``: K becomes ``K0 // 2**j``, the top K
  adapters survive, the rest are removed, the survivors' rank doubles (``grow_ranks``, exact);
- step T (``warmup_steps``): removal of the zero-gated adapters, gates folded into B, gates gone.

The main optimizer is edited in place (``remap_optimizer``): removed parameters leave its ``param_groups`` and
its ``state``; tensors that are re-created (a fused qkv that loses a part, a grown adapter) take the place of
the old ones in the same param group; their state is carried over row by row, except for grown adapters, whose
state starts fresh. Folding ``B *= w`` rescales Adam's moments of B's rows (``exp_avg / w``, ``exp_avg_sq / w^2``)
so that the running averages describe the gradients of the folded B (in particular their sign, for negative
gates); an optimizer state this module does not know is reset instead.

``WeightLoRAController`` knows nothing of Lightning: ``litgpt_plop.callbacks.WeightLoRACallback`` drives it from a
``Trainer``; a plain loop calls ``on_optimizer_step`` after each optimizer step, or ``attach(optimizer)`` once.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import litgpt.model
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
from litgpt import Config
from torch.utils.hooks import RemovableHandle

from litgpt_plop.adapt import SiteParameters, apply_placement, current_placement, site_parameters
from litgpt_plop.modules import find_gpt, site_module
from litgpt_plop.atomic import write_bytes_atomic, write_text_atomic
from litgpt_plop.placement import Placement, PlacementError, Site, site_shape

PLACEMENT_FILE = "placement.json"
GATES_FILE = "gates.json"
GATES_PLOT = "gates.png"


@dataclass
class WeightLoRAArgs:
    """WeightLoRA / WeightLoRA+ (methods.md section 3): which K of the candidate adapters to keep, learned while
    training."""

    k: int | float = 1 / 3
    """How many adapters to keep: an int is a count (at least 1, at most the number of candidates), a float in
    (0, 1] a fraction of the candidates (rounded, at least 1). The authors keep about a third (20 of 60). With
    ``plus``, this is the number the run starts with; ``rounds`` halvings leave ``k // 2**rounds``."""
    warmup_steps: int = 100
    """Optimizer steps of gate training before the placement is final and the gates are folded away. Must not be
    longer than the run."""
    gate_lr: float = 5.0
    """Learning rate of the gates' own plain SGD (the authors' scripts: 5.0)."""
    gate_clip: float = 1.0
    """Gradient-norm clipping of the gates (over all gates together; the authors' scripts: 1.0). 0: no clipping."""
    plus: bool = False
    """WeightLoRA+: during the warm-up, ``rounds`` times halve K and double the surviving adapters' rank."""
    rounds: int = 2
    """WeightLoRA+ only: how many halvings (the authors: 2, so K/4 adapters at rank 4r)."""

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)):
            raise ValueError(f"`--weightlora.k` must be an int (a count) or a float (a fraction), got {self.k!r}")
        if isinstance(self.k, int) and self.k < 1:
            raise ValueError(f"`--weightlora.k` must keep at least 1 adapter, got K={self.k}")
        if isinstance(self.k, float) and not 0.0 < self.k <= 1.0:
            raise ValueError(
                f"`--weightlora.k` as a fraction of the candidates must be in (0, 1], got {self.k}"
                " (pass an int for a count)"
            )
        if self.warmup_steps < 2:
            raise ValueError(
                f"`--weightlora.warmup_steps` must be at least 2 (the gates learn nothing at the first step, where"
                f" every lora_B is still 0), got {self.warmup_steps}"
            )
        if self.gate_lr <= 0:
            raise ValueError(f"`--weightlora.gate_lr` must be positive, got {self.gate_lr}")
        if self.gate_clip < 0:
            raise ValueError(f"`--weightlora.gate_clip` must be >= 0 (0: no clipping), got {self.gate_clip}")
        if self.rounds < 0:
            raise ValueError(f"`--weightlora.rounds` must be >= 0, got {self.rounds}")

    @property
    def method(self) -> str:
        return "weightlora+" if self.plus else "weightlora"


def resolve_k(k: int | float, num_candidates: int) -> int:
    """K as a count: ``k`` itself for an int, ``round(k * num_candidates)`` (at least 1) for a fraction."""
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise ValueError(f"K as a fraction of the candidates must be in (0, 1], got {k}")
        return max(1, round(k * num_candidates))
    if k < 1:
        raise ValueError(f"K must be at least 1, got K={k}")
    if k > num_candidates:
        raise ValueError(f"K={k} is larger than the number of candidate adapters ({num_candidates})")
    return int(k)


def round_steps(warmup_steps: int, rounds: int) -> list[int]:
    """The optimizer steps after which WeightLoRA+ halves K: ``1 + floor((T - 1) * j / (rounds + 1))`` for
    j = 1..rounds, evenly spread over the warm-up steps after the first (whose gate gradients are all zero), so
    that every stage trains for about ``(T - 1) / (rounds + 1)`` steps."""
    return [1 + (warmup_steps - 1) * j // (rounds + 1) for j in range(1, rounds + 1)]


# ---- rank extension (WeightLoRA+) ---------------------------------------------------------------------------


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


def grow_ranks(
    model: nn.Module, ranks: dict[tuple[int, str], int], generator: torch.Generator | None = None
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Raise the rank of the adapters at the given (layer, kind) sites in place, leaving each update ``s * B A``
    unchanged (``extended_adapter``); other adapters keep their tensors. Returns the new (A, B) per grown site.

    The grown sites get new parameter tensors (LitGPT's modules have one fixed rank); an optimizer holding the old
    ones must be updated (``remap_optimizer``). The model must carry no gates (``detach_gates``).
    """
    gpt = _gpt(model)
    if any(parametrize.is_parametrized(m) for m in gpt.modules()):
        raise PlacementError("grow_ranks needs a model without parametrizations (detach the WeightLoRA gates first)")
    placement = current_placement(gpt)
    current = {(s.layer, s.kind): s.rank for s in placement.sites}
    grown = {}
    for (layer, kind), rank in ranks.items():
        if (layer, kind) not in current:
            raise PlacementError(f"Site {layer}.{kind} has no adapter to grow")
        sp = site_parameters(gpt, layer, kind)
        grown[(layer, kind)] = extended_adapter(sp.A[sp.A_rows], sp.B[sp.B_rows], rank, generator)
    new_sites = [Site(s.layer, s.kind, ranks.get((s.layer, s.kind), s.rank)) for s in placement.sites]
    apply_placement(gpt, Placement(**{**placement.__dict__, "sites": new_sites}))
    with torch.no_grad():
        for (layer, kind), (A, B) in grown.items():
            sp = site_parameters(gpt, layer, kind)
            sp.A[sp.A_rows] = A
            sp.B[sp.B_rows] = B
    return grown


# ---- gates --------------------------------------------------------------------------------------------------


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
    fused ``lora_B`` would otherwise be left without a gate)."""
    gpt = _gpt(model)
    bank = _GateBank(gates)
    rows: dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor]] = {}
    for (layer, kind), gate in sites.items():
        sp = site_parameters(gpt, layer, kind)
        if sp is None:
            raise PlacementError(f"Site {layer}.{kind} has no adapter to gate")
        module = site_module(gpt, layer, kind)
        name = next(n for n, p in module.named_parameters(recurse=False) if p is sp.B)
        _, _, index = rows.setdefault((id(module), name), (module, name, torch.full((sp.B.shape[0],), -1)))
        index[sp.B_rows] = gate
    for module, name, index in rows.values():
        if (index < 0).any():
            raise PlacementError(f"Some rows of {type(module).__name__}.{name} belong to no gated adapter")
        parametrize.register_parametrization(module, name, SiteGates(bank, index.to(getattr(module, name).device)))


def detach_gates(model: nn.Module) -> None:
    """Remove every gate parametrization, restoring the stored (ungated) B tensors: the same parameter objects."""
    for module in _gpt(model).modules():
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations.keys()):
            if any(isinstance(p, SiteGates) for p in module.parametrizations[name]):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)


# ---- the main optimizer -------------------------------------------------------------------------------------

# Per-element state of the optimizers we know, and how it scales when its parameter is multiplied by w.
_FIRST_MOMENTS = ("exp_avg", "momentum_buffer")  # scale with the gradient: / w
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")  # scale with the squared gradient: / w^2


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
    before: dict[tuple[int, str], SiteParameters],
    after: dict[tuple[int, str], SiteParameters],
    reset: set[tuple[int, str]] = frozenset(),
) -> None:
    """Make ``optimizer`` hold the adapters of ``after`` instead of those of ``before``, in place.

    Parameters of ``before`` that are not in ``after`` leave the param groups and the state (freed). Parameters new
    in ``after`` take the place of the first old parameter their rows come from, in that parameter's group; their
    state is copied row by row from the old state (a fused qkv that lost a part keeps its other parts' Adam
    moments), or starts empty when one of their sites is in ``reset`` (grown adapters) or cannot be carried over.
    Parameters the optimizer did not hold before are not added. Edited in place, so Lightning's and Fabric's
    optimizer wrappers and LR schedulers (which share ``param_groups``) stay valid.
    """
    position: dict[int, tuple[int, int]] = {}  # id(param) -> (group, index in group)
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            position[id(p)] = (g, i)
    new_ids = {id(t) for sp in after.values() for t in (sp.A, sp.B)}
    old = {id(t): t for sp in before.values() for t in (sp.A, sp.B)}

    sources: dict[int, list[tuple[torch.Tensor, slice, slice, bool]]] = {}
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


def _carried_state(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, sources: list[tuple[torch.Tensor, slice, slice, bool]]
) -> dict[str, Any]:
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


# ---- the controller -----------------------------------------------------------------------------------------


class WeightLoRAController:
    """Runs WeightLoRA / WeightLoRA+ on a LitGPT model, independent of the training loop.

    Construction puts the gated candidate adapters on the model (``apply_placement``, then gates): build it before
    the main optimizer, which must hold the model's trainable parameters (the gates are not among them). Then, after
    every main optimizer step, call ``on_optimizer_step(step, optimizer)``, or once ``attach(optimizer)``.

    Args:
        model: a module holding a LitGPT ``GPT`` (the GPT itself, a LightningModule, Fabric's wrapper).
        candidates: the adapters to choose from (e.g. ``preset("all", config)`` or PLoP's placement), with ranks.
        args: K, warm-up, gate optimizer, WeightLoRA+ rounds.
        max_steps: the run's length in optimizer steps, when known: a warm-up longer than that is refused.
        seed: seed of the random directions added to A when a rank grows.
    """

    def __init__(
        self,
        model: nn.Module,
        candidates: Placement,
        args: WeightLoRAArgs,
        max_steps: int | None = None,
        seed: int = 0,
        _state: dict[str, Any] | None = None,
    ) -> None:
        self.gpt = _gpt(model)
        self.args = args
        config = self.gpt.config
        if not candidates.sites:
            raise PlacementError(
                f"WeightLoRA chooses among candidate adapters, but the candidate placement {candidates.method!r} has"
                " no sites"
            )
        candidates.validate(config)
        self.candidates = candidates
        self.sites: list[Site] = list(candidates.sites)  # gate i belongs to sites[i]
        self.index = {(s.layer, s.kind): i for i, s in enumerate(self.sites)}
        n = len(self.sites)
        self.k = resolve_k(args.k, n)
        self.rounds = args.rounds if args.plus else 0
        if self.rounds and self.k >> self.rounds < 1:
            raise ValueError(
                f"WeightLoRA+ halves K={self.k} {self.rounds} times, which leaves no adapter: use K >= {2**self.rounds}"
                " or fewer rounds"
            )
        if args.warmup_steps < self.rounds + 2:
            raise ValueError(
                f"A warm-up of {args.warmup_steps} steps is too short for {self.rounds} WeightLoRA+ rounds: it needs"
                f" at least {self.rounds + 2} (one step for the gates to learn, then one per round and the end)"
            )
        if max_steps is not None and args.warmup_steps > max_steps:
            raise ValueError(
                f"The WeightLoRA warm-up ({args.warmup_steps} steps) is longer than the run ({max_steps} optimizer"
                " steps): the placement would never be final"
            )
        for site in self.sites:
            final_rank, d_in = site.rank << self.rounds, site_shape(config, site.kind)[1]
            if final_rank > d_in:
                raise ValueError(
                    f"WeightLoRA+ would grow site {site.key} to rank {final_rank}, more than its {d_in} inputs"
                )
        self.round_at = round_steps(args.warmup_steps, self.rounds)
        self.generator = torch.Generator().manual_seed(seed)

        self.step = 0  # optimizer steps seen
        self.rounds_done = 0
        self.finished = False
        self.gates_informed = False  # whether the gates have had a non-zero gradient (thresholding waits for it)
        self.k_now = self.k
        self.alive = [True] * n
        self.ranks = {(s.layer, s.kind): s.rank for s in self.sites}
        self.gates = nn.Parameter(torch.ones(n, device=self.gpt.transformer.wte.weight.device))
        self.gate_optimizer: torch.optim.Optimizer | None = torch.optim.SGD([self.gates], lr=args.gate_lr)
        self.history_steps: list[int] = []
        self.history: list[list[float]] = []  # gate values after each step's thresholding
        self.events: list[dict[str, Any]] = []
        if _state is None:
            apply_placement(self.gpt, self._placement_of(candidates.method))
            attach_gates(self.gpt, self._alive_index(), self.gates)
        else:
            self._restore(_state)

    # ---- what it holds -------------------------------------------------------------------------------------

    @property
    def num_candidates(self) -> int:
        return len(self.sites)

    @property
    def placement(self) -> Placement:
        """The adapters on the model now (the final placement once ``finished``), with method
        ``weightlora``/``weightlora+``; ``scores`` records K, the schedule and the gates."""
        return self._placement_of(self.args.method)

    def gate_values(self) -> dict[str, float]:
        """The current gate of every candidate (0 for removed ones), keyed ``"<layer>.<kind>"``."""
        return {s.key: float(w) for s, w in zip(self.sites, self.gates.detach().cpu().tolist())}

    def to(self, device: torch.device | str) -> "WeightLoRAController":
        """Move the gates next to the model (same parameter object, so the gate optimizer keeps working)."""
        self.gates.data = self.gates.data.to(device)
        if self.gates.grad is not None:
            self.gates.grad = self.gates.grad.to(device)
        return self

    # ---- the training-loop hook ----------------------------------------------------------------------------

    def on_optimizer_step(
        self, step: int, optimizer: torch.optim.Optimizer | None = None, grad_scale: float = 1.0
    ) -> list[str]:
        """Call after main optimizer step number ``step`` (counted from 1), with that optimizer, whose gradients the
        gates share. Steps the gates, thresholds them, and runs the WeightLoRA+ rounds and the end of the warm-up
        when ``step`` reaches them (editing ``optimizer`` in place). ``grad_scale``: the loss scale the gradients
        were computed with (fp16 mixed precision), to undo on the gates. Returns what happened (``"round 1"``,
        ``"final"``), so that the caller can log it or save the new placement.
        """
        self.step = step
        if self.finished:
            return []
        self.gates_informed = self._step_gates(grad_scale) or self.gates_informed
        happened = []
        if self.gates_informed:
            self._threshold(self.k_now)
        while self.gates_informed and self.rounds_done < self.rounds and step >= self.round_at[self.rounds_done]:
            self._round(optimizer)
            happened.append(f"round {self.rounds_done}")
        self.history_steps.append(step)
        self.history.append(self.gates.detach().cpu().tolist())
        if step >= self.args.warmup_steps:
            self._finish(optimizer)
            happened.append("final")
        for what in happened:
            self.events.append({"step": step, "event": what, "adapters": sum(self.alive), "k": self.k_now})
        return happened

    def attach(
        self, optimizer: torch.optim.Optimizer, on_change: Callable[[list[str]], None] | None = None
    ) -> RemovableHandle:
        """Call ``on_optimizer_step`` after every ``optimizer.step()`` (a torch step post-hook), counting steps from
        ``self.step``: for loops one cannot add a call to, such as ``litgpt.finetune.lora.fit``. Accepts Fabric's
        optimizer wrapper. ``on_change(events)`` runs after a step that changed the adapters (a WeightLoRA+ round,
        the end of the warm-up), e.g. to give a checkpoint saver the new ``placement``. Remove with the returned
        handle's ``remove()``."""
        raw = getattr(optimizer, "optimizer", optimizer)  # Fabric's _FabricOptimizer wraps the torch optimizer

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            events = self.on_optimizer_step(self.step + 1, opt)
            if events and on_change is not None:
                on_change(events)

        return raw.register_step_post_hook(hook)

    # ---- the steps -----------------------------------------------------------------------------------------

    def _step_gates(self, grad_scale: float) -> bool:
        """SGD step of the gates. Returns whether they had a finite, non-zero gradient."""
        grad = self.gates.grad
        if grad is None:  # no forward through the gates since the last step
            return False
        if grad_scale != 1.0:
            grad.div_(grad_scale)
        finite = bool(torch.isfinite(grad).all())
        if finite:  # an fp16 overflow step is skipped by the main optimizer too
            if self.args.gate_clip > 0:
                torch.nn.utils.clip_grad_norm_([self.gates], self.args.gate_clip)
            self.gate_optimizer.step()
        informative = finite and bool(grad.abs().max() > 0)
        self.gate_optimizer.zero_grad(set_to_none=True)
        return informative

    def _threshold(self, k: int) -> torch.Tensor:
        """Keep the k alive gates of largest |w| (ties: the earlier candidate), zero the rest. Returns the mask."""
        magnitude = self.gates.detach().abs().cpu()
        magnitude[~torch.tensor(self.alive)] = -1.0  # removed adapters never come back
        order = torch.sort(magnitude, descending=True, stable=True).indices
        keep = torch.zeros(len(self.sites), dtype=torch.bool)
        keep[order[:k]] = True
        with torch.no_grad():
            self.gates[~keep.to(self.gates.device)] = 0.0
        return keep

    def _round(self, optimizer: torch.optim.Optimizer | None) -> None:
        """WeightLoRA+: halve K, remove the adapters outside the new top K, double the survivors' rank."""
        self.rounds_done += 1
        self.k_now = self.k >> self.rounds_done
        keep = self._threshold(self.k_now)
        grow = {(s.layer, s.kind) for s, kept in zip(self.sites, keep.tolist()) if kept}
        self._restructure(optimizer, keep, grow=grow, fold=False)

    def _finish(self, optimizer: torch.optim.Optimizer | None) -> None:
        """End of warm-up: remove the zero-gated adapters, fold the gates into B, drop the gates."""
        keep = self._threshold(self.k_now)
        self._restructure(optimizer, keep, grow=set(), fold=True)
        self.finished = True
        self.gate_optimizer = None
        self.gates.grad = None

    def _restructure(
        self, optimizer: torch.optim.Optimizer | None, keep: torch.Tensor, grow: set[tuple[int, str]], fold: bool
    ) -> None:
        gpt = self.gpt
        before = {key: site_parameters(gpt, *key) for key, i in self._alive_index().items()}
        detach_gates(gpt)  # the stored B tensors again (same objects), so the layout code sees raw values
        gates = self.gates.detach().cpu()
        if fold:
            with torch.no_grad():
                for key, sp in before.items():
                    w = float(gates[self.index[key]])
                    if keep[self.index[key]]:
                        sp.B[sp.B_rows] *= w
                        if optimizer is not None:
                            rescale_state_rows(optimizer, sp.B, sp.B_rows, w)
        for i in range(len(self.sites)):
            self.alive[i] = self.alive[i] and bool(keep[i])
        for key in grow:
            self.ranks[key] *= 2
        apply_placement(gpt, self._placement_of(self.args.method, with_scores=False))
        with torch.no_grad():
            for key in grow:
                old = before[key]
                A, B = extended_adapter(old.A[old.A_rows], old.B[old.B_rows], self.ranks[key], self.generator)
                sp = site_parameters(gpt, *key)
                sp.A[sp.A_rows] = A
                sp.B[sp.B_rows] = B
        after = {key: site_parameters(gpt, *key) for key in self._alive_index()}
        if optimizer is not None:
            remap_optimizer(optimizer, before, after, reset=grow)
        if not fold:
            attach_gates(gpt, self._alive_index(), self.gates)
        del before  # the last references to the removed tensors here

    # ---- placement, state ----------------------------------------------------------------------------------

    def _alive_index(self) -> dict[tuple[int, str], int]:
        return {(s.layer, s.kind): i for i, s in enumerate(self.sites) if self.alive[i]}

    def _placement_of(self, method: str, with_scores: bool = True) -> Placement:
        c = self.candidates
        sites = [Site(s.layer, s.kind, self.ranks[(s.layer, s.kind)]) for s, a in zip(self.sites, self.alive) if a]
        scores: dict[str, Any] = {}
        if with_scores:
            scores = {
                "k": self.k,
                "k_now": self.k_now,
                "num_candidates": len(self.sites),
                "final": self.finished,
                "step": self.step,
                "warmup_steps": self.args.warmup_steps,
                "round_steps": self.round_at,
                "candidates": {"method": c.method, "sites": [[s.layer, s.kind, s.rank] for s in c.sites]},
                "gates": self.gate_values(),
                "events": list(self.events),
            }
        return Placement(
            sites=sites, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, method=method, model=c.model,
            n_layer=c.n_layer, n_embd=c.n_embd, scores=scores, calibration=c.calibration,
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the candidates and options, where the schedule is, which adapters are left with
        which rank, the gates (while warming up) and their history. The adapter weights are the model's."""
        return {
            "args": asdict(self.args),
            "candidates": self.candidates.to_dict(),
            "placement": self.placement.to_dict(),
            "step": self.step,
            "rounds_done": self.rounds_done,
            "finished": self.finished,
            "gates_informed": self.gates_informed,
            "k_now": self.k_now,
            "alive": list(self.alive),
            "gates": self.gates.detach().cpu().tolist(),
            "history_steps": list(self.history_steps),
            "history": [list(v) for v in self.history],
            "events": list(self.events),
        }

    @classmethod
    def from_state_dict(
        cls, model: nn.Module, state: dict[str, Any], max_steps: int | None = None, seed: int = 0
    ) -> "WeightLoRAController":
        """Resume: put the saved adapter structure (and gates, if still warming up) on ``model``, so that a checkpoint
        of the run's model and optimizer loads into it."""
        candidates = Placement.from_dict(state["candidates"])
        return cls(model, candidates, WeightLoRAArgs(**state["args"]), max_steps, seed, _state=state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the values of ``state`` (``state_dict``) into a controller whose model already has its structure."""
        saved = Placement.from_dict(state["placement"])
        if saved.sites != self.placement.sites or bool(state["finished"]) != self.finished:
            raise PlacementError(
                f"The saved WeightLoRA state has adapters {[f'{s.key}@{s.rank}' for s in saved.sites]}, but the model"
                f" has {[f'{s.key}@{s.rank}' for s in self.placement.sites]}"
            )
        self._load_values(state)

    def _restore(self, state: dict[str, Any]) -> None:
        self.alive = [bool(a) for a in state["alive"]]
        saved = Placement.from_dict(state["placement"])
        for site in saved.sites:
            self.ranks[(site.layer, site.kind)] = site.rank
        self.finished = bool(state["finished"])
        apply_placement(self.gpt, self._placement_of(self.args.method, with_scores=False))
        self._load_values(state)
        if self.finished:
            self.gate_optimizer = None
        else:
            attach_gates(self.gpt, self._alive_index(), self.gates)

    def _load_values(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.rounds_done = int(state["rounds_done"])
        self.gates_informed = bool(state.get("gates_informed", True))  # states saved before the rule: thresholded
        self.k_now = int(state["k_now"])
        self.history_steps = [int(s) for s in state["history_steps"]]
        self.history = [list(v) for v in state["history"]]
        self.events = list(state["events"])
        with torch.no_grad():
            self.gates.copy_(torch.tensor(state["gates"], dtype=self.gates.dtype))

    # ---- outputs -------------------------------------------------------------------------------------------

    def write_outputs(self, out_dir: Path | str, config: Config | None = None) -> list[Path]:
        """``placement.json`` (the placement now: the final one once ``finished``), ``gates.json`` (every gate at
        every warm-up step) and ``gates.png`` (their plot), each written atomically."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.placement.save(out_dir / PLACEMENT_FILE, config or self.gpt.config)
        history = {
            "method": self.args.method,
            "sites": [s.key for s in self.sites],
            "steps": self.history_steps,
            "gates": self.history,
            "events": self.events,
            "kept": [s.key for s, alive in zip(self.sites, self.alive) if alive],
        }
        write_text_atomic(out_dir / GATES_FILE, json.dumps(history) + "\n")
        write_bytes_atomic(out_dir / GATES_PLOT, self.gates_png())
        return [out_dir / PLACEMENT_FILE, out_dir / GATES_FILE, out_dir / GATES_PLOT]

    def gates_png(self) -> bytes:
        """Each candidate's gate over the warm-up: kept adapters in colour, removed ones in grey; rounds dotted,
        the end of the warm-up dashed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        values = torch.tensor(self.history) if self.history else torch.zeros(0, len(self.sites))
        kept = [i for i in range(len(self.sites)) if self.alive[i]]
        for i in range(len(self.sites)):
            if i not in kept:
                ax.plot(self.history_steps, values[:, i].tolist(), color="0.75", linewidth=0.8)
        for i in kept:
            label = f"{self.sites[i].key} (r={self.ranks[(self.sites[i].layer, self.sites[i].kind)]})"
            ax.plot(self.history_steps, values[:, i].tolist(), linewidth=1.6, label=label if len(kept) <= 16 else None)
        for step in self.round_at[: self.rounds_done]:
            ax.axvline(step, color="0.4", linestyle=":", linewidth=1)
        if self.finished:
            ax.axvline(self.args.warmup_steps, color="0.2", linestyle="--", linewidth=1)
        ax.axhline(0.0, color="0.5", linewidth=0.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("gate w")
        state = "final" if self.finished else f"step {self.step} of the {self.args.warmup_steps}-step warm-up"
        ax.set_title(f"{self.args.method}: {sum(self.alive)} of {len(self.sites)} adapters kept ({state})")
        if kept and len(kept) <= 16:
            ax.legend(fontsize=7, loc="best")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        return buffer.getvalue()


def _gpt(model: nn.Module) -> litgpt.model.GPT:
    gpt = find_gpt(model)
    if gpt is None:
        raise PlacementError(f"No LitGPT GPT model found in {type(model).__name__}")
    return gpt

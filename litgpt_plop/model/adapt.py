"""Put LoRA adapters exactly where a ``Placement`` says, on a LitGPT model, in place.

LitGPT builds adapters from global flags (every block the same, one rank). ``apply_placement`` starts from
either a plain ``litgpt.model.GPT`` or a ``litgpt.lora.GPT`` built with any flags, and leaves a model that *is* a
``litgpt.lora.GPT``: the same classes, the same state-dict keys (``...attn.qkv.linear.weight``, ``...lora_A``),
LitGPT's own ``LoRALinear`` / ``LoRAQKVLinear`` modules, and ``lora_*`` parameters only where the placement
puts an adapter, each with its own rank. Sites without an adapter hold a rank-0 wrapper, as LitGPT does for
disabled flags, so nothing there is trainable.

How a plain ``litgpt.model.GPT`` becomes a ``litgpt.lora.GPT``: the LoRA classes (``GPT``, ``Block``,
``CausalSelfAttention`` and the MLPs) are subclasses that only add a constructor and
``_load_from_state_dict`` key mappings, no state of their own. So we swap ``__class__`` on the existing module
objects and wrap the existing linears (their weight tensors are never copied or re-created). The alternative,
building a fresh ``litgpt.lora.GPT`` and moving tensors over, would need twice the memory at the peak and would
break every outside reference to the model and its modules; replacing attributes only would leave a model that
is not a ``litgpt.lora.GPT`` (no ``isinstance``, no loading of base checkpoints through LitGPT's mappings).

Adapter tensors live on the base weight's device. Their dtype is the base weight's dtype when that is a float
dtype (LitGPT's own rule: the whole model in one precision) and otherwise, for bitsandbytes 4-bit weights, the
dtype of the token embedding, which is the dtype the activations (the adapter's input) have.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable, NamedTuple

import litgpt.lora
import litgpt.model
import torch
import torch.nn as nn
import torch.nn.functional as F
from litgpt.lora import LoRALayer, LoRALinear, LoRAQKVLinear

from litgpt_plop.model.modules import (
    base_linear,
    gpt_of,
    qkv_row_slices,
    site_experts,
    site_module,
    site_modules,
    site_parent,
)
from litgpt_plop.model.quantize import disable_cpu_repack
from litgpt_plop.selection.placement import (
    HEAD_KIND,
    HEAD_LAYER,
    QKV_KINDS,
    Placement,
    PlacementError,
    Site,
    model_kinds,
    qkv_part_sizes,
    site_shape,
)

# A plain LitGPT class -> the ``litgpt.lora`` subclass a LoRA model is built from.
_TO_LORA_CLASS: dict[type, type] = {
    litgpt.model.GPT: litgpt.lora.GPT,
    litgpt.model.Block: litgpt.lora.Block,
    litgpt.model.CausalSelfAttention: litgpt.lora.CausalSelfAttention,
    litgpt.model.LLaMAMLP: litgpt.lora.LLaMAMLP,
    litgpt.model.GemmaMLP: litgpt.lora.GemmaMLP,
    litgpt.model.GptNeoxMLP: litgpt.lora.GptNeoxMLP,
    # a mixture of experts: its experts are LLaMAMLPs (swapped like any other), its router ``gate`` gets a
    # LoRALinear wrapper as litgpt.lora's constructor gives it (rank 0 unless the placement has the router site)
    litgpt.model.LLaMAMoE: litgpt.lora.LLaMAMoE,
}
_LORA_CLASSES = tuple(_TO_LORA_CLASS.values())


class SiteAdapter(NamedTuple):
    """The adapter at one site: update ``scaling * B @ A``. ``A`` and ``B`` are detached views of the
    parameters' storage: writing into them (under ``torch.no_grad``) changes the model."""

    A: torch.Tensor  # (rank, d_in)
    B: torch.Tensor  # (d_out, rank)
    scaling: float


class LoRAQKVMixedRankLinear(LoRAQKVLinear):
    """A fused qkv whose query, key and value adapters have different ranks.

    ``LoRAQKVLinear`` has one ``r`` for all three parts; WeightLoRA+ grows some parts and not others. Here every
    enabled part has its own ``lora_A_<part>`` (rank x d_in) and ``lora_B_<part>`` (part size x rank) and its own
    scaling ``lora_alpha / rank``, so the trainable parameter count is exactly the placement's. Used only when
    the enabled parts of one qkv have different ranks; every other qkv is LitGPT's ``LoRAQKVLinear``.
    Saving in stock LitGPT layout (``litgpt_plop.model.export``) zero-pads every part to the largest rank.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        head_size: int,
        n_head: int,
        n_query_groups: int,
        ranks: tuple[int, int, int],
        lora_alpha: int = 1,
        lora_dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        LoRALayer.__init__(self, r=max(ranks), lora_alpha=lora_alpha, lora_dropout=lora_dropout)
        self.linear = torch.nn.Linear(in_features, out_features, **kwargs)
        self.head_size = head_size
        self.n_head = n_head
        self.n_query_groups = n_query_groups
        self.ranks = tuple(int(r) for r in ranks)
        self.enable_lora = [r > 0 for r in self.ranks]
        self.part_sizes = tuple(qkv_part_sizes(self).values())
        self.qkv_shapes = [s for s, r in zip(self.part_sizes, self.ranks) if r > 0]
        for part, rank, size in zip(QKV_KINDS, self.ranks, self.part_sizes):
            if rank > 0:
                setattr(self, f"lora_A_{part}", nn.Parameter(torch.empty(rank, in_features)))
                setattr(self, f"lora_B_{part}", nn.Parameter(torch.empty(size, rank)))
        self.reset_parameters()

    def part_scaling(self, part: str) -> float:
        return self.lora_alpha / self.ranks[QKV_KINDS.index(part)]

    def reset_parameters(self) -> None:
        """A like ``nn.Linear`` (kaiming uniform, as LitGPT), B zero: the update starts at exactly zero."""
        for part, rank in zip(QKV_KINDS, self.ranks):
            if rank > 0:
                nn.init.kaiming_uniform_(getattr(self, f"lora_A_{part}"), a=math.sqrt(5))
                nn.init.zeros_(getattr(self, f"lora_B_{part}"))

    def get_lora_AB(self) -> torch.Tensor:
        """The full (out_features x in_features) update, zero for the parts without an adapter."""
        rows = []
        for part, rank, size in zip(QKV_KINDS, self.ranks, self.part_sizes):
            if rank > 0:
                A, B = getattr(self, f"lora_A_{part}").data, getattr(self, f"lora_B_{part}").data
                rows.append((B @ A) * self.part_scaling(part))
            else:
                rows.append(torch.zeros(size, self.linear.in_features, device=self.linear.weight.device))
        dtype = next(r.dtype for r, rank in zip(rows, self.ranks) if rank > 0)
        return torch.cat([r.to(dtype) for r in rows], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pretrained = self.linear(x)
        if self.r == 0 or self.merged:
            return pretrained
        x = self.lora_dropout(x)  # one dropout mask for all parts, as LoRAQKVLinear
        updates = []
        for part, rank, size in zip(QKV_KINDS, self.ranks, self.part_sizes):
            if rank > 0:
                after_A = F.linear(x, getattr(self, f"lora_A_{part}"))
                updates.append(F.linear(after_A, getattr(self, f"lora_B_{part}")) * self.part_scaling(part))
            else:
                updates.append(x.new_zeros(*x.shape[:-1], size))
        return pretrained + torch.cat(updates, dim=-1)


# ---- reading what is on a model ---------------------------------------------------------------------------


def _qkv_adapters(module: nn.Module) -> dict[str, SiteAdapter]:
    """The query/key/value adapters on a fused qkv module, keyed by part (absent parts left out).

    LitGPT's ``LoRAQKVLinear`` stores all enabled parts in one ``lora_A`` of shape (r * n_enabled, d_in) and one
    ``lora_B`` of shape (sum of enabled part sizes, r). Its grouped ``conv1d`` gives part i the i-th chunk of r
    rows of A and the i-th block of rows of B (split by part size), in query, key, value order.
    """
    if isinstance(module, LoRAQKVMixedRankLinear):
        return {
            part: SiteAdapter(
                getattr(module, f"lora_A_{part}").data,
                getattr(module, f"lora_B_{part}").data,
                module.part_scaling(part),
            )
            for part, rank in zip(QKV_KINDS, module.ranks)
            if rank > 0
        }
    if isinstance(module, LoRAQKVLinear) and module.r > 0 and hasattr(module, "lora_A"):
        enabled = tuple(part for part, on in zip(QKV_KINDS, module.enable_lora) if on)
        rows = qkv_row_slices(module, enabled)
        return {
            part: SiteAdapter(module.lora_A.data[i * module.r : (i + 1) * module.r], module.lora_B.data[rows[part]], module.scaling)
            for i, part in enumerate(enabled)
        }
    return {}


def site_adapter(model: nn.Module, layer: int, kind: str, expert: int | None = None) -> SiteAdapter | None:
    """The adapter at (layer, kind) of ``model`` (in expert ``expert`` of a mixture of experts), or None when the
    site has none."""
    gpt = gpt_of(model)
    module = site_module(gpt, layer, kind, expert)
    if kind in QKV_KINDS:
        return _qkv_adapters(module).get(kind)
    if isinstance(module, LoRALinear) and module.r > 0 and hasattr(module, "lora_A"):
        return SiteAdapter(module.lora_A.data, module.lora_B.data, module.scaling)
    return None


class SiteParameters(NamedTuple):
    """Where the adapter at one site is stored: rows ``A_rows`` of the parameter ``A`` and rows ``B_rows`` of the
    parameter ``B`` (all columns). Unlike ``SiteAdapter`` these are the ``nn.Parameter`` objects themselves, as an
    optimizer holds them; for a parametrized ``lora_B`` (``torch.nn.utils.parametrize``), its ``original``."""

    A: nn.Parameter
    A_rows: slice
    B: nn.Parameter
    B_rows: slice
    scaling: float


def _raw_parameter(module: nn.Module, name: str) -> nn.Parameter:
    """``module.<name>`` as stored: under a ``torch.nn.utils.parametrize`` parametrization, the original tensor."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and name in parametrizations:
        return parametrizations[name].original
    return getattr(module, name)


def site_parameters(model: nn.Module, layer: int, kind: str, expert: int | None = None) -> SiteParameters | None:
    """The parameters (and rows of them) that hold the adapter at (layer, kind) of ``model``, or None.

    Same layouts as ``site_adapter``: a ``LoRALinear`` owns its whole ``lora_A``/``lora_B``; in LitGPT's fused
    ``LoRAQKVLinear`` the i-th enabled part has the i-th chunk of ``r`` rows of ``lora_A`` and the i-th block of
    rows of ``lora_B``; ``LoRAQKVMixedRankLinear`` has one ``lora_A_<part>``/``lora_B_<part>`` per part.
    """
    module = site_module(gpt_of(model), layer, kind, expert)
    if isinstance(module, LoRAQKVMixedRankLinear):
        if kind not in QKV_KINDS or module.ranks[QKV_KINDS.index(kind)] == 0:
            return None
        A, B = _raw_parameter(module, f"lora_A_{kind}"), _raw_parameter(module, f"lora_B_{kind}")
        return SiteParameters(A, slice(0, A.shape[0]), B, slice(0, B.shape[0]), module.part_scaling(kind))
    if not (isinstance(module, LoRALinear) and module.r > 0 and hasattr(module, "lora_A")):
        return None
    A, B = _raw_parameter(module, "lora_A"), _raw_parameter(module, "lora_B")
    if not isinstance(module, LoRAQKVLinear):
        return SiteParameters(A, slice(0, A.shape[0]), B, slice(0, B.shape[0]), module.scaling)
    enabled = tuple(part for part, on in zip(QKV_KINDS, module.enable_lora) if on)
    if kind not in enabled:
        return None
    index = enabled.index(kind)
    A_rows = slice(index * module.r, (index + 1) * module.r)
    return SiteParameters(A, A_rows, B, qkv_row_slices(module, enabled)[kind], module.scaling)


def unit_parameters(model: nn.Module, sites: Iterable[tuple[int, str]]) -> dict[tuple, SiteParameters]:
    """``site_parameters`` of every adapter the ``(layer, kind)`` sites hold: keyed ``(layer, kind)``, or
    ``(layer, kind, expert)`` once per expert for an MLP site of a mixture of experts. Sites without one are left out."""
    gpt = gpt_of(model)
    units = {}
    for layer, kind in sites:
        for expert in site_experts(gpt, kind):
            sp = site_parameters(gpt, layer, kind, expert)
            if sp is not None:
                units[(layer, kind) if expert is None else (layer, kind, expert)] = sp
    return units


def current_placement(model: nn.Module, lora_alpha: int | None = None, method: str = "current") -> Placement:
    """The placement that is on ``model`` now: one site per adapter, with its rank, recorded as made by ``method``.

    ``lora_alpha`` defaults to the adapters' own (they must agree), else the config's, else 16.
    """
    gpt = gpt_of(model)
    config = gpt.config
    sites, alphas = [], set()
    locations = [(layer, kind) for layer in range(config.n_layer) for kind in model_kinds(config, include_router=True)]
    for layer, kind in locations + [(HEAD_LAYER, HEAD_KIND)]:
        experts = site_experts(gpt, kind)
        ranks = [adapter.A.shape[0] if adapter else 0 for adapter in (site_adapter(gpt, layer, kind, e) for e in experts)]
        if len(set(ranks)) > 1:  # a site is one (layer, kind): every expert of it carries the same adapter
            raise PlacementError(f"The experts of site {layer}.{kind} carry adapters of different ranks {ranks}")
        if ranks[0]:
            sites.append(Site(layer, kind, ranks[0]))
            alphas.update(site_module(gpt, layer, kind, e).lora_alpha for e in experts)
    if lora_alpha is None:
        if len(alphas) > 1:
            raise PlacementError(
                f"The model's adapters use different lora_alpha values {sorted(alphas)}; pass lora_alpha"
            )
        lora_alpha = alphas.pop() if alphas else getattr(config, "lora_alpha", 16)
    return Placement(
        sites=sites,
        lora_alpha=lora_alpha,
        lora_dropout=getattr(config, "lora_dropout", 0.0),
        method=method,
        model=config.name,
        n_layer=config.n_layer,
        n_embd=config.n_embd,
    )


# ---- applying a placement ---------------------------------------------------------------------------------


def lora_config(config: litgpt.Config, flags: dict[str, Any]) -> litgpt.lora.Config:
    """A ``litgpt.lora.Config`` with ``config``'s fields and the given ``lora_*`` values (a copy: ``config`` is
    not changed, and ``__post_init__`` is not run again)."""
    new = copy.copy(config)
    if not isinstance(new, litgpt.lora.Config):
        new.__class__ = litgpt.lora.Config
    for name, value in flags.items():
        setattr(new, name, value)
    return new


def apply_placement(model: nn.Module, placement: Placement) -> litgpt.lora.GPT:
    """Make ``model`` carry exactly the adapters of ``placement``, in place, and return its LitGPT ``GPT``.

    ``model`` is (or contains) a ``litgpt.model.GPT`` or a ``litgpt.lora.GPT`` with any flags; its base linears
    may be ``nn.Linear`` or bitsandbytes ``Linear4bit``. Adapters the placement leaves out are deleted; new or
    resized ones start as LitGPT's (A kaiming-uniform, B zero, scaling ``lora_alpha / rank``); an adapter that
    already has the asked rank and scaling is kept with its values, so applying the model's own placement
    changes nothing. Afterwards only ``lora_*`` parameters require grad and ``model.config`` is a
    ``litgpt.lora.Config`` with ``placement.flags()`` (the union of the sites' flags, ``lora_r`` = the largest rank).

    Raises ``PlacementError`` before anything is modified if the placement does not fit the model or the model
    is of a family this project does not adapt (mixture of experts, latent attention, unknown module types).
    """
    gpt = gpt_of(model)
    placement.validate(gpt.config)  # also refuses unsupported families (check_supported)
    _check_structure(gpt)
    # ---- from here on nothing can fail for a reason the checks above did not rule out ----

    old_config = gpt.config
    new_config = lora_config(old_config, placement.flags())
    for module in model.modules():  # every module of the model shares the one config object
        if getattr(module, "config", None) is old_config:
            module.config = new_config
    for module in gpt.modules():
        if not isinstance(module, _LORA_CLASSES) and type(module) in _TO_LORA_CLASS:
            module.__class__ = _TO_LORA_CLASS[type(module)]

    ranks = {(s.layer, s.kind): s.rank for s in placement.sites}
    alpha, dropout = placement.lora_alpha, placement.lora_dropout
    activation_dtype = gpt.transformer.wte.weight.dtype
    kinds = model_kinds(new_config, include_router=True)
    for layer, block in enumerate(gpt.transformer.h):
        qkv_ranks = tuple(ranks.get((layer, part), 0) for part in QKV_KINDS)
        block.attn.qkv = _placed_qkv(block.attn.qkv, qkv_ranks, alpha, dropout, new_config, activation_dtype)
        for kind in kinds:
            if kind in QKV_KINDS:
                continue
            rank = ranks.get((layer, kind), 0)
            for expert in site_experts(gpt, kind):  # every expert of a mixture of experts alike
                parent, attr = site_parent(gpt, layer, kind, expert)
                setattr(parent, attr, _placed_linear(getattr(parent, attr), rank, alpha, dropout, activation_dtype))
    head_rank = ranks.get((HEAD_LAYER, HEAD_KIND), 0)
    gpt.lm_head = _placed_linear(gpt.lm_head, head_rank, alpha, dropout, activation_dtype)

    # LitGPT's rule (``mark_only_lora_as_trainable``, bias="none"): a parameter trains iff "lora_" is in its name.
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    return gpt


def _check_structure(gpt: litgpt.model.GPT) -> None:
    """Every module ``apply_placement`` will change is one it knows, with the config's shapes. Changes nothing."""
    config = gpt.config
    experts = [e for b in gpt.transformer.h for e in getattr(b.mlp, "experts", ())]
    blocks = gpt.transformer.h
    for module in [gpt, *blocks, *(b.attn for b in blocks), *(b.mlp for b in blocks), *experts]:
        if not isinstance(module, _LORA_CLASSES) and type(module) not in _TO_LORA_CLASS:
            raise PlacementError(
                f"Cannot adapt module of type {type(module).__module__}.{type(module).__qualname__}: litgpt-plop adapts"
                f" LitGPT's own {sorted(c.__name__ for c in _TO_LORA_CLASS)} (plain or litgpt.lora)"
            )
    locations = [(layer, kind) for layer in range(config.n_layer) for kind in model_kinds(config, include_router=True)]
    for layer, kind, module in [(l, k, m) for l, k in locations + [(HEAD_LAYER, HEAD_KIND)] for m in site_modules(gpt, l, k)]:
        where = f"{kind!r} at layer {layer}"
        if kind in QKV_KINDS and isinstance(module, LoRALinear) and not isinstance(module, LoRAQKVLinear):
            raise PlacementError(
                f"The fused qkv ({where}) is a {type(module).__name__}, expected LoRAQKVLinear or a linear"
            )
        if isinstance(module, LoRALinear) and module.merged:
            raise PlacementError(f"The adapter at {where} is merged into its base weight; reload the unmerged model")
        linear = base_linear(module)
        if not isinstance(linear, nn.Linear):  # bitsandbytes' Linear4bit is an nn.Linear
            raise PlacementError(f"Cannot adapt {where}: {type(linear).__name__} is not a linear layer")
        d_out, d_in = site_shape(config, kind)
        if kind in QKV_KINDS:
            d_out = sum(qkv_part_sizes(config).values())
        if (linear.out_features, linear.in_features) != (d_out, d_in):
            raise PlacementError(
                f"The linear for {where} has shape {(linear.out_features, linear.in_features)}, but the model's config"
                f" says {(d_out, d_in)}"
            )


def _adapter_dtype(linear: nn.Module, activation_dtype: torch.dtype) -> torch.dtype:
    """The base weight's dtype if it is a float dtype, else (4-bit storage) the activations' dtype."""
    dtype = linear.weight.dtype
    if dtype.is_floating_point:
        return dtype
    return activation_dtype if activation_dtype.is_floating_point else torch.float32


def _materialize(module: nn.Module, activation_dtype: torch.dtype) -> nn.Module:
    """Give a wrapper built on the meta device real adapter tensors next to its base weight, then init them."""
    linear = module.linear
    device, dtype = linear.weight.device, _adapter_dtype(linear, activation_dtype)
    for name, param in list(module.named_parameters(recurse=False)):
        setattr(module, name, nn.Parameter(torch.empty(param.shape, device=device, dtype=dtype)))
    module.reset_parameters()
    return module


def _set_dropout(module: LoRALayer, dropout: float) -> None:
    # LoRALayer keeps either an nn.Dropout submodule or a plain function: delete whichever is there first.
    delattr(module, "lora_dropout")
    module.lora_dropout = nn.Dropout(p=dropout) if dropout > 0.0 else (lambda x: x)


def _placed_linear(
    module: nn.Module, rank: int, alpha: int, dropout: float, activation_dtype: torch.dtype
) -> LoRALinear:
    """A ``LoRALinear`` of ``rank`` (0: none) around ``module``'s base linear (``module`` itself if it fits)."""
    if isinstance(module, LoRALinear) and module.r == rank and (rank == 0 or module.scaling == alpha / rank):
        module.lora_alpha = alpha
        _set_dropout(module, dropout)
        return module
    linear = base_linear(module)
    disable_cpu_repack([linear])
    # Built on the meta device so that LitGPT's constructor allocates nothing; then the existing linear goes in.
    with torch.device("meta"):
        new = LoRALinear(
            linear.in_features, linear.out_features, r=rank, lora_alpha=alpha, lora_dropout=dropout, bias=False
        )
    new.linear = linear
    return _materialize(new, activation_dtype)


def _qkv_ranks(module: nn.Module) -> tuple[int, int, int]:
    adapters = _qkv_adapters(module)
    return tuple(adapters[p].A.shape[0] if p in adapters else 0 for p in QKV_KINDS)


def _placed_qkv(
    module: nn.Module,
    ranks: tuple[int, int, int],
    alpha: int,
    dropout: float,
    config: litgpt.Config,
    activation_dtype: torch.dtype,
) -> LoRAQKVLinear:
    """A fused-qkv wrapper with per-part ``ranks`` (0: no adapter on that part) around ``module``'s base linear.

    Equal ranks on the enabled parts give LitGPT's ``LoRAQKVLinear`` (one ``r``, ``enable_lora`` per part); different
    ranks give ``LoRAQKVMixedRankLinear``. Parts whose rank and scaling stay the same keep their A and B.
    """
    old = _qkv_adapters(module)
    unchanged = all(p not in old or old[p].scaling == alpha / old[p].A.shape[0] for p in QKV_KINDS)
    if isinstance(module, LoRAQKVLinear) and _qkv_ranks(module) == ranks and unchanged:
        module.lora_alpha = alpha
        _set_dropout(module, dropout)
        return module
    linear = base_linear(module)
    disable_cpu_repack([linear])
    enabled = {r for r in ranks if r > 0}
    common = dict(
        head_size=config.head_size, n_head=config.n_head, n_query_groups=config.n_query_groups, lora_alpha=alpha,
        lora_dropout=dropout, bias=False,
    )  # fmt: skip
    with torch.device("meta"):
        if len(enabled) <= 1:
            rank = enabled.pop() if enabled else 0
            enable_lora = tuple(r > 0 for r in ranks)
            new = LoRAQKVLinear(linear.in_features, linear.out_features, r=rank, enable_lora=enable_lora, **common)
        else:
            new = LoRAQKVMixedRankLinear(linear.in_features, linear.out_features, ranks=ranks, **common)
    new.linear = linear
    _materialize(new, activation_dtype)
    # Keep the parts whose adapter is unchanged (same rank, same scaling).
    new_adapters = _qkv_adapters(new)
    with torch.no_grad():
        for part, adapter in old.items():
            target = new_adapters.get(part)
            if target is not None and target.A.shape == adapter.A.shape and target.scaling == adapter.scaling:
                target.A.copy_(adapter.A)
                target.B.copy_(adapter.B)
    return new

"""What a placement is: which (layer, kind) sites get a LoRA adapter, and with what rank.

LitGPT can only say "this kind in every block, one rank" (its ``lora_*`` flags and ``lora_r``). A ``Placement``
can say anything finer: one MLP matrix, some layers only, a different rank per site. It knows nothing about
how adapters are put on a model (``litgpt_plop.model.adapt``) or saved (``litgpt_plop.model.export``); it only describes
the choice, counts what it costs and round-trips through JSON.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable

from litgpt import Config

from litgpt_plop.atomic import write_text_atomic
from litgpt_plop.errors import InputError
from litgpt_plop.selection.methods import METHODS, method_names

# The kinds of LoRA-able linear maps, in LitGPT terms (see docs/methods.md).
ATTENTION_KINDS = ("query", "key", "value", "projection")
LLAMA_MLP_KINDS = ("mlp_fc_1", "mlp_fc_2", "mlp_proj")
NEOX_MLP_KINDS = ("mlp_fc", "mlp_proj")  # GPT-NeoX (Pythia): dense_h_to_4h, dense_4h_to_h
HEAD_KIND = "head"
# The router of a mixture-of-experts MLP (``mlp.gate``, n_embd -> n_expert). Never a candidate of a method: it is
# a site only because stock LitGPT's ``lora_mlp`` gives it an adapter, which ``--plugin none`` must reproduce.
ROUTER_KIND = "mlp_router"
ALL_KINDS = ATTENTION_KINDS + ("mlp_fc_1", "mlp_fc_2", "mlp_fc", "mlp_proj", ROUTER_KIND, HEAD_KIND)
QKV_KINDS = ("query", "key", "value")

# The head is not inside a block; its site carries this layer index.
HEAD_LAYER = -1

# LitGPT's global flag for each kind. ``lora_mlp`` switches every MLP linear together.
KIND_TO_FLAG = {
    "query": "lora_query",
    "key": "lora_key",
    "value": "lora_value",
    "projection": "lora_projection",
    "mlp_fc_1": "lora_mlp",
    "mlp_fc_2": "lora_mlp",
    "mlp_fc": "lora_mlp",
    "mlp_proj": "lora_mlp",
    ROUTER_KIND: "lora_mlp",
    "head": "lora_head",
}
LORA_FLAGS = ("lora_query", "lora_key", "lora_value", "lora_projection", "lora_mlp", "lora_head")

# The MLP classes whose linears we know how to adapt, and the kinds each one has.
# In a mixture of experts (``LLaMAMoE``) each MLP kind is the same matrix in every expert of the block: a site
# (layer, kind) is that matrix in all ``n_expert`` experts, so a placement stays loadable by stock LitGPT's flags.
_MLP_KINDS = {
    "LLaMAMLP": LLAMA_MLP_KINDS, "GemmaMLP": LLAMA_MLP_KINDS, "GptNeoxMLP": NEOX_MLP_KINDS, "LLaMAMoE": LLAMA_MLP_KINDS,
}  # fmt: skip
EXPERT_KINDS = LLAMA_MLP_KINDS  # the kinds that live in every expert of a mixture-of-experts block


def is_moe(config: Config) -> bool:
    """Whether the model's MLPs are LitGPT's mixture of experts (``LLaMAMoE``: Mixtral, Qwen3-MoE, ...)."""
    return config.mlp_class_name == "LLaMAMoE"


def expert_count(config: Config, kind: str) -> int:
    """How many matrices one site of ``kind`` spans: ``n_expert`` for an MLP kind of a mixture of experts, else 1."""
    return config.n_expert if is_moe(config) and kind in EXPERT_KINDS else 1


class PlacementError(InputError):
    """A placement that cannot be built, applied or loaded, with the reason in its message."""


def check_supported(config: Config) -> None:
    """Refuse model families whose linears are not the ones this project knows how to adapt."""
    if config.mlp_class_name not in _MLP_KINDS:
        raise PlacementError(
            f"Model {config.name!r} uses MLP class {config.mlp_class_name!r}; litgpt-plop supports"
            f" {sorted(_MLP_KINDS)} (LLaMA/Qwen/SmolLM-style, Gemma-style, GPT-NeoX/Pythia-style and"
            " Mixtral/Qwen3-MoE-style mixture-of-experts models)."
        )
    if is_moe(config) and (config.n_shared_expert or config.n_expert_groups):
        raise PlacementError(
            f"Model {config.name!r} has shared experts or a grouped router (DeepSeek-style), which litgpt-plop does not"
            " support; Mixtral/Qwen3-MoE-style mixtures of experts are supported."
        )
    if getattr(config, "latent_attention", None):
        raise PlacementError(f"Model {config.name!r} uses multi-head latent attention, which litgpt-plop does not support.")


def model_kinds(config: Config, include_head: bool = False, include_router: bool = False) -> tuple[str, ...]:
    """The kinds a model of this config has, in a fixed order (attention first, then MLP). The router of a mixture
    of experts only with ``include_router``: it is never a candidate."""
    check_supported(config)
    kinds = ATTENTION_KINDS + _MLP_KINDS[config.mlp_class_name]
    if include_router and is_moe(config):
        kinds += (ROUTER_KIND,)
    return kinds + ((HEAD_KIND,) if include_head else ())


def kinds_from_flags(config: Config, **flags: bool) -> list[str]:
    """The kinds LitGPT's ``lora_*`` flags switch on for this model (``lora_mlp`` means every MLP linear)."""
    unknown = set(flags) - set(LORA_FLAGS)
    if unknown:
        raise PlacementError(f"Unknown LoRA flags {sorted(unknown)}; LitGPT's are {list(LORA_FLAGS)}")
    return [k for k in model_kinds(config, include_head=True) if flags.get(KIND_TO_FLAG[k], False)]


def qkv_part_sizes(owner: Any) -> dict[str, int]:
    """Rows of query, key and value in the fused qkv of ``owner`` (a config, or a qkv module: anything with
    ``n_head``, ``n_query_groups`` and ``head_size``). LitGPT's layout is ``[q | k | v]`` (docs/methods.md)."""
    kv_size = owner.n_query_groups * owner.head_size
    return {"query": owner.n_head * owner.head_size, "key": kv_size, "value": kv_size}


def site_shape(config: Config, kind: str) -> tuple[int, int]:
    """(d_out, d_in) of the weight a site of this kind adapts; for q/k/v, the row slice of the fused qkv."""
    sizes = qkv_part_sizes(config)
    q_size, kv_size = sizes["query"], sizes["key"]
    # one expert's matrix in a mixture of experts (LitGPT: moe_intermediate_size, or intermediate_size if unset)
    mlp_size = (config.moe_intermediate_size or config.intermediate_size) if is_moe(config) else config.intermediate_size
    shapes = {
        "query": (q_size, config.n_embd),
        "key": (kv_size, config.n_embd),
        "value": (kv_size, config.n_embd),
        "projection": (config.n_embd, q_size),
        "mlp_fc_1": (mlp_size, config.n_embd),
        "mlp_fc_2": (mlp_size, config.n_embd),
        "mlp_fc": (mlp_size, config.n_embd),
        "mlp_proj": (config.n_embd, mlp_size),
        ROUTER_KIND: (config.n_expert, config.n_embd),
        "head": (config.padded_vocab_size, config.n_embd),
    }
    if kind not in shapes:
        raise PlacementError(f"Unknown kind {kind!r}; known kinds: {list(ALL_KINDS)}")
    return shapes[kind]


def site_params(config: Config, kind: str, rank: int) -> int:
    """Trainable parameters of one adapter: A is (rank x d_in), B is (d_out x rank); in a mixture of experts an
    MLP site has one such adapter in every expert."""
    d_out, d_in = site_shape(config, kind)
    return rank * (d_in + d_out) * expert_count(config, kind)


@dataclass(frozen=True, order=True)
class Site:
    """One adapter: the ``kind`` of linear map in block ``layer`` (``HEAD_LAYER`` for the head), with its rank."""

    layer: int
    kind: str
    rank: int

    @property
    def key(self) -> str:
        """The name used in score tables: ``"<layer>.<kind>"``."""
        return f"{self.layer}.{self.kind}"


SCHEMA_VERSION = 2  # of placement.json; version 1 (no field) had free-form scores, still read


@dataclass
class Scores:
    """What a placement was decided from, with one fixed schema whatever the method (README, "placement.json").

    Every field is always written; a score the method did not compute is empty (``{}``, ``[]`` or ``None``).
    Layer keys are strings, as JSON has them.

    Args:
        candidate_kinds: the kinds the method could choose from.
        candidate_layers: the layers it could choose from.
        nfn_per_site: PLoP's NFN of each ``"<layer>.<kind>"`` site.
        nfn_per_kind: each kind's NFN, the mean over the candidate layers (what PLoP ranks).
        nfn_per_layer: each layer's NFN, the mean over its block kinds (for the report).
        cka_per_layer: each layer's CKA similarity of the hidden state entering and leaving the block.
        degenerate_layers: layers whose CKA says nothing (every calibration sample looks the same there).
        plop: PLoP's options as used (``denominator``, ``num_kinds``, ``budget``, ``budget_params``, ``granularity``).
        cka: CKA's options as used (``pooling``, ``ratio``, ``samples``).
        weightlora: WeightLoRA's record (K, the schedule, the gates at the last step, the events), for its methods.
        kappa_per_site: each ``"<layer>.<kind>"`` site's condition number (largest / smallest singular value of its
            weight; ``kappa`` chooses the lowest). Also computed by calibrated methods, for the data-free comparison.
        kappa_per_kind: each kind's geometric mean condition number over the candidate layers (what ``kappa`` ranks).
        kappa: the data-free choice the condition numbers make (``choice``: its site keys, or ``error`` when it
            cannot be made) and its options (``num_kinds``, ``budget``, ``budget_params``, ``granularity``, ``rank``),
            and how they were computed (``computed_as``).
        nfn_per_expert: in a mixture of experts, each candidate MLP site's NFN per expert (None: the expert received
            no calibration token); ``nfn_per_site`` holds their mean weighted by ``expert_tokens``.
        expert_tokens: the calibration tokens each expert of each such site received.
        unused_experts: per MoE block (``"<layer>"``), the experts that received no calibration token.
        kappa_per_expert: in a mixture of experts, each candidate MLP site's condition number per expert (``kappa_per_site``
            holds their geometric mean).
        stability: how often bootstrap resamples of the calibration prompts make the same choice
            (``litgpt_plop.selection.stability``): ``same_choice``, ``kind_frequency``, ``layer_frequency``, ...
        race: the race that chose it (``litgpt_plop.race``): ``candidates``, ``rounds``, ``winner``, ``overhead_steps``.
    """

    candidate_kinds: list[str] = field(default_factory=list)
    candidate_layers: list[int] = field(default_factory=list)
    nfn_per_site: dict[str, float] = field(default_factory=dict)
    nfn_per_kind: dict[str, float] = field(default_factory=dict)
    nfn_per_layer: dict[str, float] = field(default_factory=dict)
    cka_per_layer: dict[str, float] = field(default_factory=dict)
    degenerate_layers: list[int] = field(default_factory=list)
    plop: dict[str, Any] | None = None
    cka: dict[str, Any] | None = None
    weightlora: dict[str, Any] | None = None
    stability: dict[str, Any] | None = None
    kappa_per_site: dict[str, float] = field(default_factory=dict)
    kappa_per_kind: dict[str, float] = field(default_factory=dict)
    kappa: dict[str, Any] | None = None
    nfn_per_expert: dict[str, list[float | None]] = field(default_factory=dict)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    unused_experts: dict[str, list[int]] = field(default_factory=dict)
    kappa_per_expert: dict[str, list[float]] = field(default_factory=dict)
    race: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], method: str = "") -> "Scores":
        """Read a ``scores`` object; one of a version-1 file (``per_site``/``per_kind``/``per_layer``, whose
        ``per_layer`` meant CKA for ``cka``) is converted."""
        data = dict(data or {})
        if "per_kind" in data or "per_site" in data:
            per_layer = data.pop("per_layer", {}) or {}
            data["nfn_per_site"] = data.pop("per_site", {}) or {}
            data["nfn_per_kind"] = data.pop("per_kind", {}) or {}
            if method == "cka":
                data["cka_per_layer"] = per_layer
            else:
                data["nfn_per_layer"] = per_layer
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Placement:
    """Which sites get an adapter, with what rank, and why.

    Args:
        sites: the adapters, one per (layer, kind); kept sorted.
        lora_alpha: LoRA's alpha; each site scales its update by ``lora_alpha / rank`` as LitGPT does.
        lora_dropout: dropout on the adapter input, as LitGPT's ``lora_dropout``.
        method: what produced the placement (``"plop"``, ``"cka"``, ``"all"``, ...).
        model: the LitGPT config name of the model it was made for.
        n_layer: the model's number of blocks (checked when the placement is applied or loaded).
        n_embd: the model's width (checked likewise).
        scores: the scores the decision was based on (``Scores``).
        calibration: what the calibration pass saw (samples, tokens, seconds), if there was one.

    A placement is immutable: ``dataclasses.replace`` (or ``restricted``) makes a changed copy.
    """

    sites: list[Site]
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    method: str = "manual"
    model: str = ""
    n_layer: int = 0
    n_embd: int = 0
    scores: Scores = field(default_factory=Scores)
    calibration: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", sorted(self.sites))
        seen = set()
        for site in self.sites:
            if site.kind not in ALL_KINDS:
                raise PlacementError(f"Unknown kind {site.kind!r} at layer {site.layer}; known kinds: {list(ALL_KINDS)}")
            if site.rank <= 0:
                raise PlacementError(f"Rank must be positive, got {site.rank} for site {site.key}")
            if (site.layer, site.kind) in seen:
                raise PlacementError(f"Site {site.key} appears twice")
            seen.add((site.layer, site.kind))

    # ---- constructors -------------------------------------------------------------------------------------

    @classmethod
    def from_sites(
        cls, config: Config, sites: Iterable[tuple[int, str, int] | Site], lora_alpha: int = 16, **kwargs: Any
    ) -> "Placement":
        """Site by site: ``[(layer, kind, rank), ...]``."""
        placement = cls(
            sites=[s if isinstance(s, Site) else Site(*s) for s in sites],
            lora_alpha=lora_alpha,
            model=config.name,
            n_layer=config.n_layer,
            n_embd=config.n_embd,
            **kwargs,
        )
        placement.validate(config)
        return placement

    @classmethod
    def from_kinds(
        cls,
        config: Config,
        kinds: Iterable[str],
        layers: Iterable[int] | None = None,
        rank: int = 8,
        lora_alpha: int = 16,
        **kwargs: Any,
    ) -> "Placement":
        """Every kind in ``kinds`` on every layer in ``layers`` (default: all blocks), one rank."""
        layers = range(config.n_layer) if layers is None else list(layers)
        sites = []
        for kind in kinds:
            if kind == HEAD_KIND:
                sites.append(Site(HEAD_LAYER, kind, rank))
            else:
                sites.extend(Site(layer, kind, rank) for layer in layers)
        return cls.from_sites(config, sites, lora_alpha=lora_alpha, **kwargs)

    # ---- what it says -------------------------------------------------------------------------------------

    @property
    def kinds(self) -> list[str]:
        """The kinds that have at least one adapter, in LitGPT's order."""
        present = {s.kind for s in self.sites}
        return [k for k in ALL_KINDS if k in present]

    @property
    def layers(self) -> list[int]:
        """The blocks that have at least one adapter."""
        return sorted({s.layer for s in self.sites if s.layer != HEAD_LAYER})

    @property
    def max_rank(self) -> int:
        return max((s.rank for s in self.sites), default=0)

    def flags(self) -> dict[str, Any]:
        """The LitGPT ``lora_*`` flags needed to rebuild a model that can hold this placement (the union)."""
        flags: dict[str, Any] = {"lora_r": self.max_rank, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout}
        flags.update({flag: False for flag in LORA_FLAGS})
        for s in self.sites:
            flags[KIND_TO_FLAG[s.kind]] = True
        return flags

    def trainable_params(self, config: Config) -> int:
        """Exact number of trainable (adapter) parameters this placement puts on a model of ``config``."""
        return sum(site_params(config, s.kind, s.rank) for s in self.sites)

    def validate(self, config: Config, require_sites: bool = True) -> None:
        """Check that the placement fits a model of ``config``; raise ``PlacementError`` naming the problem."""
        kinds = model_kinds(config, include_head=True, include_router=True)
        if require_sites and not self.sites:
            raise PlacementError(f"Placement {self.method!r} has no sites: nothing would be trained")
        if self.n_layer and self.n_layer != config.n_layer:
            raise PlacementError(
                f"Placement was made for a model with {self.n_layer} layers ({self.model!r}), but this model"
                f" ({config.name!r}) has {config.n_layer}"
            )
        if self.n_embd and self.n_embd != config.n_embd:
            raise PlacementError(
                f"Placement was made for a model of width {self.n_embd} ({self.model!r}), but this model"
                f" ({config.name!r}) has width {config.n_embd}"
            )
        for s in self.sites:
            if s.kind not in kinds:
                raise PlacementError(
                    f"Site {s.key}: model {config.name!r} ({config.mlp_class_name}) has no {s.kind!r}; its kinds are {list(kinds)}"
                )
            if s.kind == HEAD_KIND:
                if s.layer != HEAD_LAYER:
                    raise PlacementError(f"The head is not in a block: its site must have layer {HEAD_LAYER}, got {s.layer}")
            elif not 0 <= s.layer < config.n_layer:
                raise PlacementError(f"Site {s.key}: layer {s.layer} is out of range for a model with {config.n_layer} layers")

    def restricted(self, kinds: Iterable[str] | None = None, layers: Iterable[int] | None = None) -> "Placement":
        """A copy keeping only sites of ``kinds`` and in ``layers`` (None: no restriction)."""
        kinds = None if kinds is None else set(kinds)
        layers = None if layers is None else set(layers)
        sites = [
            s
            for s in self.sites
            if (kinds is None or s.kind in kinds) and (layers is None or s.layer in layers or s.layer == HEAD_LAYER)
        ]
        return replace(self, sites=sites)

    # ---- JSON ---------------------------------------------------------------------------------------------

    def to_dict(self, config: Config | None = None) -> dict[str, Any]:
        """The ``placement.json`` schema. ``trainable_params`` needs the model config."""
        data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "method": self.method,
            "model": self.model,
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "sites": [{"layer": s.layer, "kind": s.kind, "rank": s.rank} for s in self.sites],
            "flags": self.flags(),
            "trainable_params": self.trainable_params(config) if config is not None else None,
            "scores": self.scores.to_dict(),
        }
        if self.calibration is not None:
            data["calibration"] = self.calibration
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Placement":
        try:
            sites = [Site(int(s["layer"]), str(s["kind"]), int(s["rank"])) for s in data["sites"]]
            flags = data.get("flags", {})
            return cls(
                sites=sites,
                lora_alpha=int(flags.get("lora_alpha", 16)),
                lora_dropout=float(flags.get("lora_dropout", 0.0)),
                method=data.get("method", "manual"),
                model=data.get("model", ""),
                n_layer=int(data.get("n_layer", 0)),
                n_embd=int(data.get("n_embd", 0)),
                scores=Scores.from_dict(data.get("scores", {}), data.get("method", "")),
                calibration=data.get("calibration"),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, PlacementError):
                raise
            raise PlacementError(f"Not a placement: {e!r}") from e

    def save(self, path: Path, config: Config | None = None) -> None:
        """Write ``placement.json`` atomically (temporary file, then rename)."""
        write_text_atomic(Path(path), json.dumps(self.to_dict(config), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path, config: Config | None = None) -> "Placement":
        """Read a ``placement.json``; with ``config``, also check it fits that model."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlacementError(f"No placement file at {str(path)!r}") from None
        except json.JSONDecodeError as e:
            raise PlacementError(f"{str(path)!r} is not valid JSON: {e}") from None
        placement = cls.from_dict(data)
        if config is not None:
            placement.validate(config)
        return placement


# ---- the fixed placements users compare against -----------------------------------------------------------

def preset(
    name: str,
    config: Config,
    rank: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    candidates: Iterable[str] | None = None,
    num_kinds: int | None = None,
    match_params: int | None = None,
    seed: int = 0,
) -> Placement:
    """A named fixed placement.

    Args:
        name: ``all`` (every linear but the head), ``attention`` (query, key, value, projection), ``qv``
            (LitGPT's default), ``mlp`` (every MLP linear), ``random`` (seeded random kinds), or an explicit
            comma-separated list of kinds such as ``"value,projection,mlp_proj"``.
        config: the model's config.
        rank: LoRA rank of every site.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        candidates: for ``random``, the kinds to draw from (default: every kind but the head).
        num_kinds: for ``random``, how many kinds to draw (default 3, PLoP's default).
        match_params: for ``random``, draw kinds until this many trainable parameters are reached instead.
        seed: for ``random``, the seed.
    """
    kinds = model_kinds(config)
    method = METHODS.get(name)
    if method is not None and method.kind == "preset" and method.kinds is not None:
        chosen = list(method.kinds)
    elif name == "all":
        chosen = list(kinds)
    elif name == "mlp":
        chosen = [k for k in kinds if k.startswith("mlp")]
    elif name == "random":
        pool = list(candidates) if candidates is not None else list(kinds)
        random.Random(seed).shuffle(pool)
        if match_params is not None:
            chosen, total = [], 0
            for kind in pool:
                if total >= match_params:
                    break
                chosen.append(kind)
                total += config.n_layer * site_params(config, kind, rank)
        else:
            chosen = pool[: num_kinds if num_kinds is not None else 3]
    else:
        chosen = [k.strip() for k in name.split(",") if k.strip()]
        unknown = [k for k in chosen if k not in kinds and k != HEAD_KIND]
        if not chosen or unknown:
            raise PlacementError(
                f"Unknown placement {name!r}: use one of {list(method_names('preset'))} or a comma-separated list of kinds from {list(kinds)}"
            )
    return Placement.from_kinds(config, chosen, rank=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, method=name)

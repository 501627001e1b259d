"""What a placement is: which (layer, kind) sites get a LoRA adapter, and with what rank.

LitGPT can only say "this kind in every block, one rank" (its ``lora_*`` flags and ``lora_r``). A ``Placement``
can say anything finer: one MLP matrix, some layers only, a different rank per site. It knows nothing about
how adapters are put on a model (``litgpt_plop.adapt``) or saved (``litgpt_plop.export``); it only describes
the choice, counts what it costs and round-trips through JSON.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from litgpt import Config

from litgpt_plop.atomic import write_text_atomic

# The kinds of LoRA-able linear maps, in LitGPT terms (see methods.md).
ATTENTION_KINDS = ("query", "key", "value", "projection")
LLAMA_MLP_KINDS = ("mlp_fc_1", "mlp_fc_2", "mlp_proj")
NEOX_MLP_KINDS = ("mlp_fc", "mlp_proj")  # GPT-NeoX (Pythia): dense_h_to_4h, dense_4h_to_h
HEAD_KIND = "head"
ALL_KINDS = ATTENTION_KINDS + ("mlp_fc_1", "mlp_fc_2", "mlp_fc", "mlp_proj", HEAD_KIND)
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
    "head": "lora_head",
}
LORA_FLAGS = ("lora_query", "lora_key", "lora_value", "lora_projection", "lora_mlp", "lora_head")

# The MLP classes whose linears we know how to adapt, and the kinds each one has.
_MLP_KINDS = {"LLaMAMLP": LLAMA_MLP_KINDS, "GemmaMLP": LLAMA_MLP_KINDS, "GptNeoxMLP": NEOX_MLP_KINDS}


class PlacementError(ValueError):
    """A placement that cannot be built, applied or loaded, with the reason in its message."""


def check_supported(config: Config) -> None:
    """Refuse model families whose linears are not the ones this project knows how to adapt."""
    if config.mlp_class_name not in _MLP_KINDS:
        raise PlacementError(
            f"Model {config.name!r} uses MLP class {config.mlp_class_name!r}; litgpt-plop supports"
            f" {sorted(_MLP_KINDS)} (LLaMA/Qwen/SmolLM-style, Gemma-style and GPT-NeoX/Pythia-style models)."
            " Mixture-of-experts models are not supported."
        )
    if getattr(config, "latent_attention", None):
        raise PlacementError(f"Model {config.name!r} uses multi-head latent attention, which litgpt-plop does not support.")


def model_kinds(config: Config, include_head: bool = False) -> tuple[str, ...]:
    """The kinds a model of this config has, in a fixed order (attention first, then MLP)."""
    check_supported(config)
    kinds = ATTENTION_KINDS + _MLP_KINDS[config.mlp_class_name]
    return kinds + ((HEAD_KIND,) if include_head else ())


def kinds_from_flags(config: Config, **flags: bool) -> list[str]:
    """The kinds LitGPT's ``lora_*`` flags switch on for this model (``lora_mlp`` means every MLP linear)."""
    unknown = set(flags) - set(LORA_FLAGS)
    if unknown:
        raise PlacementError(f"Unknown LoRA flags {sorted(unknown)}; LitGPT's are {list(LORA_FLAGS)}")
    return [k for k in model_kinds(config, include_head=True) if flags.get(KIND_TO_FLAG[k], False)]


def site_shape(config: Config, kind: str) -> tuple[int, int]:
    """(d_out, d_in) of the weight a site of this kind adapts; for q/k/v, the row slice of the fused qkv."""
    q_size = config.n_head * config.head_size
    kv_size = config.n_query_groups * config.head_size
    shapes = {
        "query": (q_size, config.n_embd),
        "key": (kv_size, config.n_embd),
        "value": (kv_size, config.n_embd),
        "projection": (config.n_embd, q_size),
        "mlp_fc_1": (config.intermediate_size, config.n_embd),
        "mlp_fc_2": (config.intermediate_size, config.n_embd),
        "mlp_fc": (config.intermediate_size, config.n_embd),
        "mlp_proj": (config.n_embd, config.intermediate_size),
        "head": (config.padded_vocab_size, config.n_embd),
    }
    if kind not in shapes:
        raise PlacementError(f"Unknown kind {kind!r}; known kinds: {list(ALL_KINDS)}")
    return shapes[kind]


def site_params(config: Config, kind: str, rank: int) -> int:
    """Trainable parameters of one adapter: A is (rank x d_in), B is (d_out x rank)."""
    d_out, d_in = site_shape(config, kind)
    return rank * (d_in + d_out)


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


@dataclass
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
        scores: the scores the decision was based on (free-form, JSON-serialisable).
        calibration: what the calibration pass saw (samples, tokens, seconds), if there was one.
    """

    sites: list[Site]
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    method: str = "manual"
    model: str = ""
    n_layer: int = 0
    n_embd: int = 0
    scores: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.sites = sorted(self.sites)
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

    @classmethod
    def from_flags(
        cls,
        config: Config,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        lora_query: bool = False,
        lora_key: bool = False,
        lora_value: bool = False,
        lora_projection: bool = False,
        lora_mlp: bool = False,
        lora_head: bool = False,
        **kwargs: Any,
    ) -> "Placement":
        """What LitGPT's flags say: each enabled kind in every block, rank ``lora_r``."""
        flags = dict(
            lora_query=lora_query,
            lora_key=lora_key,
            lora_value=lora_value,
            lora_projection=lora_projection,
            lora_mlp=lora_mlp,
            lora_head=lora_head,
        )
        kinds = kinds_from_flags(config, **flags)
        return cls.from_kinds(
            config, kinds, rank=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, method="flags", **kwargs
        )

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

    def site(self, layer: int, kind: str) -> Site | None:
        """The adapter at (layer, kind), or None."""
        for s in self.sites:
            if s.layer == layer and s.kind == kind:
                return s
        return None

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
        kinds = model_kinds(config, include_head=True)
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
        return Placement(**{**self.__dict__, "sites": sites})

    # ---- JSON ---------------------------------------------------------------------------------------------

    def to_dict(self, config: Config | None = None) -> dict[str, Any]:
        """The ``placement.json`` schema. ``trainable_params`` needs the model config."""
        data: dict[str, Any] = {
            "method": self.method,
            "model": self.model,
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "sites": [{"layer": s.layer, "kind": s.kind, "rank": s.rank} for s in self.sites],
            "flags": self.flags(),
            "trainable_params": self.trainable_params(config) if config is not None else None,
            "scores": self.scores,
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
                scores=data.get("scores", {}),
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

PRESETS = ("all", "attention", "qv", "mlp", "random")


def preset(
    name: str,
    config: Config,
    rank: int = 8,
    lora_alpha: int = 16,
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
        candidates: for ``random``, the kinds to draw from (default: every kind but the head).
        num_kinds: for ``random``, how many kinds to draw (default 3, PLoP's default).
        match_params: for ``random``, draw kinds until this many trainable parameters are reached instead.
        seed: for ``random``, the seed.
    """
    kinds = model_kinds(config)
    if name == "all":
        chosen = list(kinds)
    elif name == "attention":
        chosen = list(ATTENTION_KINDS)
    elif name == "qv":
        chosen = ["query", "value"]
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
                f"Unknown placement {name!r}: use one of {list(PRESETS)} or a comma-separated list of kinds from {list(kinds)}"
            )
    return Placement.from_kinds(config, chosen, rank=rank, lora_alpha=lora_alpha, method=name)

"""The method registry: what each placement method is, in one table that every command, callback and report reads.

A method is one of six kinds:

- ``calibrated``: runs a calibration pass over task prompts and chooses from the scores (``plop``,
  ``plop-inverse``, ``cka``, ``plop+cka``);
- ``weights``: scores the pretrained weights alone, no data, and chooses from the scores (``kappa``);
- ``preset``: a fixed placement the calibrated ones are compared against (``all``, ``attention``, ``qv``,
  ``mlp``, ``random``);
- ``gated``: learned while training, from a gate on every candidate adapter (``weightlora``, ``weightlora+``);
- ``race``: chosen by training candidate placements side by side and keeping the best on validation loss
  (``race``, ``litgpt_plop.race``);
- ``none``: exactly what LitGPT's own ``lora_*`` flags say.

Adding a method means adding a row here and, for a new scorer, the scorer and its selection rule.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from litgpt_plop.errors import InputError

MethodKind = Literal["calibrated", "weights", "preset", "gated", "race", "none"]
# The kinds whose placement is decided before training, by ``litgpt_plop.selection.rules.decide_placement``.
DECIDED_BEFORE_TRAINING: tuple[MethodKind, ...] = ("calibrated", "weights", "preset")


@dataclass(frozen=True)
class Method:
    """One placement method.

    Args:
        name: what the user types (``--plugin``, ``--method``).
        kind: ``calibrated``, ``weights``, ``preset``, ``gated``, ``race`` or ``none`` (see the module docstring).
        title: how reports and terminal tables name it.
        scorers: the scores a scored method needs, in the order they are computed: ``plop``, ``cka`` (from a
            calibration pass), ``kappa`` (from the weights).
        inverse: choose the HIGHEST PLoP scores first (PLoP's ablation baseline).
        kinds: for a preset, the kinds it puts LoRA on (``None``: decided per model or at random).
    """

    name: str
    kind: MethodKind
    title: str
    scorers: tuple[str, ...] = ()
    inverse: bool = False
    kinds: tuple[str, ...] | None = None

    @property
    def uses_plop(self) -> bool:
        return "plop" in self.scorers

    @property
    def uses_cka(self) -> bool:
        return "cka" in self.scorers

    @property
    def uses_kappa(self) -> bool:
        return "kappa" in self.scorers

    @property
    def calibrates(self) -> bool:
        return self.kind == "calibrated"

    @property
    def option_groups(self) -> tuple[str, ...]:
        """The ``--<group>.*`` option groups this method reads."""
        if self.kind == "calibrated":
            return ("calibration", *self.scorers)
        if self.kind == "weights":  # no data: only the scorers' own options
            return self.scorers
        if self.kind == "gated":
            return ("weightlora",)
        if self.kind == "race":  # its candidates' groups too
            return ("race", "calibration", "plop", "cka", "kappa")
        return ()


_ALL = (
    Method("plop", "calibrated", "PLoP", scorers=("plop",)),
    Method("plop-inverse", "calibrated", "PLoP^-1 (highest NFN, ablation baseline)", scorers=("plop",), inverse=True),
    Method("cka", "calibrated", "layer-wise CKA", scorers=("cka",)),
    Method("plop+cka", "calibrated", "PLoP kinds on CKA layers", scorers=("plop", "cka")),
    Method("kappa", "weights", "kappa (lowest condition number, no data)", scorers=("kappa",)),
    Method("all", "preset", "all linears"),
    Method("attention", "preset", "attention only", kinds=("query", "key", "value", "projection")),
    Method("qv", "preset", "query and value (LitGPT's default)", kinds=("query", "value")),
    Method("mlp", "preset", "MLP only"),
    Method("random", "preset", "random kinds"),
    Method("weightlora", "gated", "WeightLoRA"),
    Method("weightlora+", "gated", "WeightLoRA+"),
    Method("race", "race", "race (successive halving among candidate placements)"),
    Method("none", "none", "LitGPT's flags"),
)
METHODS: dict[str, Method] = {m.name: m for m in _ALL}
OPTION_GROUPS = ("calibration", "plop", "cka", "kappa", "weightlora", "race")


def method_names(*kinds: MethodKind) -> tuple[str, ...]:
    """The names of the methods of the given kinds (all methods when none is given), in registry order."""
    return tuple(m.name for m in _ALL if not kinds or m.kind in kinds)


def get_method(name: str, *kinds: MethodKind, what: str = "method") -> Method:
    """The method called ``name``; with ``kinds``, it must be of one of them. Raises ``ValueError`` naming the choices."""
    allowed = method_names(*kinds)
    if name not in allowed:
        raise InputError(f"Unknown {what} {name!r}; choose one of {list(allowed)}")
    return METHODS[name]


def title(name: str) -> str:
    """How reports name a method (the name itself for one not in the registry, e.g. a list of kinds)."""
    method = METHODS.get(name)
    return method.title if method is not None else name


def groups_users(group: str) -> tuple[str, ...]:
    """The methods that read the option group ``group`` (for hints such as "use --plugin plop")."""
    return tuple(m.name for m in _ALL if group in m.option_groups)


def check_option_groups(method: Method, flag: str, **groups: Any) -> None:
    """Refuse options (``--calibration.*`` ...) set away from their defaults for a method that does not read them,
    naming a method that does. ``flag`` is how the method was chosen (``--plugin``, ``--method``)."""
    unused = [name for name, group in groups.items() if name not in method.option_groups and _changed(group)]
    if unused:
        which = ", ".join(f"--{name}.*" for name in unused)
        it = "it" if len(unused) == 1 else "them"
        users = groups_users(unused[0])
        hint = f"pick a method that reads {it} (e.g. {flag} {users[0]})" if users else "nothing reads them"
        raise InputError(f"{which} {'does' if len(unused) == 1 else 'do'} not apply to {flag} {method.name!r}: {hint} or drop {it}")


def _changed(group: Any) -> bool:
    """Whether any option of the group differs from its default (``plus`` is the plugin's to set, not an option)."""
    default = type(group)()
    return any(getattr(group, f.name) != getattr(default, f.name) for f in fields(group) if f.name != "plus")

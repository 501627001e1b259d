"""The race's option group, ``--race.*`` (jsonargparse reads the field docstrings for ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass

from litgpt_plop.errors import InputError

# What races by default: PLoP's choice and the placements users pick by habit. ``kappa`` and ``cka`` join when
# their placement differs from PLoP's.
DEFAULT_CANDIDATES = ("plop", "attention", "mlp", "all", "qv")
OPTIONAL_CANDIDATES = ("kappa", "cka")


@dataclass
class RaceArgs:
    """The race (docs/methods.md section 6): candidate placements train side by side, the worse part of them is
    dropped at every round on validation loss (successive halving), the last one standing trains to the end."""

    candidates: list[str] | None = None
    """The methods that race: any placement decided before training (calibrated, ``kappa`` or a preset). None:
    ``plop``, ``attention``, ``mlp``, ``all``, ``qv``, plus ``kappa`` and ``cka`` where their placement differs
    from PLoP's."""
    budget: float = 0.25
    """The optimizer steps spent on candidates that lose, at most, as a fraction of the run's steps. The first round
    lasts as long as this allows, and ends after the learning-rate warm-up; each later round ``eta`` times longer."""
    eta: int = 2
    """Each round keeps 1/eta of the candidates (rounded up): 2 halves them. A budget too small for that after the
    warm-up gets fewer rounds (a larger eta)."""
    reference: str = "plop"
    """The candidate whose trainable parameters at ``--lora_r`` set the budget every candidate is matched to
    (its rank adjusted, alpha scaled with it)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.budget < 1.0:
            raise InputError(f"`--race.budget` must be a fraction of the run between 0 and 1, got {self.budget}")
        if self.eta < 2:
            raise InputError(f"`--race.eta` must be at least 2 (each round keeps 1/eta of the candidates), got {self.eta}")
        if self.candidates is not None and len(set(self.candidates)) < 2:
            raise InputError(f"`--race.candidates` needs at least two different methods, got {self.candidates}")

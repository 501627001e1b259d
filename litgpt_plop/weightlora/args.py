"""WeightLoRA's command-line options (``--weightlora.*``) and what K means for a given set of candidates."""

from __future__ import annotations

from dataclasses import dataclass

from litgpt_plop.errors import InputError


@dataclass
class WeightLoRAArgs:
    """WeightLoRA / WeightLoRA+ (docs/methods.md, section 3): which K of the candidate adapters to keep, learned while
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
            raise InputError(f"`--weightlora.k` must be an int (a count) or a float (a fraction), got {self.k!r}")
        if isinstance(self.k, int) and self.k < 1:
            raise InputError(f"`--weightlora.k` must keep at least 1 adapter, got K={self.k}")
        if isinstance(self.k, float) and not 0.0 < self.k <= 1.0:
            raise InputError(
                f"`--weightlora.k` as a fraction of the candidates must be in (0, 1], got {self.k}"
                " (pass an int for a count)"
            )
        if self.warmup_steps < 2:
            raise InputError(
                f"`--weightlora.warmup_steps` must be at least 2 (the gates learn nothing at the first step, where"
                f" every lora_B is still 0), got {self.warmup_steps}"
            )
        if self.gate_lr <= 0:
            raise InputError(f"`--weightlora.gate_lr` must be positive, got {self.gate_lr}")
        if self.gate_clip < 0:
            raise InputError(f"`--weightlora.gate_clip` must be >= 0 (0: no clipping), got {self.gate_clip}")
        if self.rounds < 0:
            raise InputError(f"`--weightlora.rounds` must be >= 0, got {self.rounds}")

    @property
    def method(self) -> str:
        return "weightlora+" if self.plus else "weightlora"


def resolve_k(k: int | float, num_candidates: int) -> int:
    """K as a count: ``k`` itself for an int, ``round(k * num_candidates)`` (at least 1) for a fraction."""
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise InputError(f"K as a fraction of the candidates must be in (0, 1], got {k}")
        return max(1, round(k * num_candidates))
    if k < 1:
        raise InputError(f"K must be at least 1, got K={k}")
    if k > num_candidates:
        raise InputError(f"K={k} is larger than the number of candidate adapters ({num_candidates})")
    return int(k)

"""WeightLoRA's command-line options (``--weightlora.*``), what K means for a given set of candidates, and the
warm-up LitGPT's schedule needs (``check_litgpt_warmup``)."""

from __future__ import annotations

from dataclasses import dataclass

from litgpt_plop.errors import InputError
from litgpt_plop.weightlora.schedule import LITGPT_FIRST_MOVING_STEP, shortest_warmup

DEFAULT_K = 1 / 3
"""K when neither ``k`` nor ``budget`` is set: the authors keep about a third (20 of 60)."""


@dataclass
class WeightLoRAArgs:
    """WeightLoRA / WeightLoRA+ (docs/methods.md, section 3): which of the candidate adapters to keep, learned while
    training."""

    k: int | float | None = None
    """How many adapters to keep: an int is a count (at least 1, at most the number of candidates), a float in
    (0, 1] a fraction of the candidates (rounded, at least 1). Unset: a third of the candidates (the authors keep
    about a third, 20 of 60), unless ``budget`` is set. With ``plus``, this is the number the run starts with;
    ``rounds`` halvings leave ``k // 2**rounds``."""
    budget: int | float | None = None
    """Instead of ``k``: keep the adapters of largest gate magnitude while their trainable parameters fit this
    budget (greedy, stopping at the first that does not fit, as ``--plop.budget``). An int is a parameter count,
    a float in (0, 1] that fraction of the ``all`` placement at the candidates' rank. ``k`` counts adapters, so the
    larger MLP matrices cost more than their share; a budget counts what is trained. Not with ``k`` (both say
    how many stay) nor with ``plus`` (WeightLoRA+ already keeps the budget of the K adapters it starts with)."""
    warmup_steps: int = 100
    """Optimizer steps of gate training before the placement is final and the gates are folded away. Must not be
    longer than the run; under LitGPT's schedule (``litgpt-plop finetune``) at least 3, plus 1 per WeightLoRA+
    round (the gates first move at step 3, and each round needs a step of its own after that)."""
    gate_lr: float = 5.0
    """Learning rate of the gates' own plain SGD (the authors' scripts: 5.0)."""
    gate_clip: float = 1.0
    """Gradient-norm clipping of the gates (over all gates together; the authors' scripts: 1.0). 0: no clipping."""
    plus: bool = False
    """WeightLoRA+: during the warm-up, ``rounds`` times halve K and double the surviving adapters' rank."""
    rounds: int = 2
    """WeightLoRA+ only: how many halvings (the authors: 2, so K/4 adapters at rank 4r)."""

    def __post_init__(self) -> None:
        _check_count_or_fraction(self.k, "k", "must keep at least 1 adapter, got K=", "of the candidates")
        _check_count_or_fraction(self.budget, "budget", "must be at least 1 parameter, got ", "of the `all` placement")
        if self.k is not None and self.budget is not None:
            raise InputError(
                f"`--weightlora.k` ({self.k}) and `--weightlora.budget` ({self.budget}) both say how many adapters"
                " stay: set one of them"
            )
        if self.budget is not None and self.plus:
            raise InputError(
                "`--weightlora.budget` does not apply to WeightLoRA+ (`--plugin weightlora+`), whose rounds halve K as"
                " they double the rank and so keep the budget of the K adapters it starts with: set `--weightlora.k`"
                " instead, or use `--plugin weightlora` with the budget"
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


def _check_count_or_fraction(value: int | float | None, name: str, too_small: str, fraction_of: str) -> None:
    """``--weightlora.<name>``: unset, an int count of at least 1, or a float fraction in (0, 1]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"`--weightlora.{name}` must be an int (a count) or a float (a fraction), got {value!r}")
    if isinstance(value, int) and value < 1:
        raise InputError(f"`--weightlora.{name}` {too_small}{value}")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise InputError(
            f"`--weightlora.{name}` as a fraction {fraction_of} must be in (0, 1], got {value}"
            " (pass an int for a count)"
        )


def resolve_k(k: int | float | None, num_candidates: int) -> int:
    """K as a count: ``k`` itself for an int, ``round(k * num_candidates)`` (at least 1) for a fraction, a third of
    the candidates for None."""
    if k is None:
        k = DEFAULT_K
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise InputError(f"K as a fraction of the candidates must be in (0, 1], got {k}")
        return max(1, round(k * num_candidates))
    if k < 1:
        raise InputError(f"K must be at least 1, got K={k}")
    if k > num_candidates:
        raise InputError(f"K={k} is larger than the number of candidate adapters ({num_candidates})")
    return int(k)


def check_litgpt_warmup(args: WeightLoRAArgs, run_steps: int | float | None = None) -> None:
    """Refuse, before anything loads, a warm-up that LitGPT's schedule would make cut among gates that never moved,
    or one longer than the run (``run_steps`` optimizer steps, when known).

    LitGPT's ``get_lr_scheduler`` starts its linear warm-up at learning rate 0, whatever ``--train.lr_warmup_steps``
    is: the first optimizer step leaves every lora_B at 0, so the gates' gradient ``<dL/dB_used, B>`` is 0 at steps
    1 and 2 and they first move at step 3 (``LITGPT_FIRST_MOVING_STEP``). The end of the warm-up, and each WeightLoRA+
    round before it, must come at that step or later, each on a step of its own (``shortest_warmup``), so that
    the end comes after step ``warmup_steps`` as promised (a round may wait a few steps for its own)."""
    rounds = args.rounds if args.plus else 0
    shortest = shortest_warmup(rounds, LITGPT_FIRST_MOVING_STEP)
    if args.warmup_steps < shortest:
        what = "the cut" if not rounds else f"the {rounds} WeightLoRA+ rounds and the cut"
        each = "" if not rounds else ", each on a step of its own after the gates moved"
        raise InputError(
            f"`--weightlora.warmup_steps` {args.warmup_steps} is too short under LitGPT's schedule: its first optimizer"
            f" step has learning rate 0, so every lora_B is still 0 after it and the gates first move at step"
            f" {LITGPT_FIRST_MOVING_STEP}; {what} would not fit from there to the end of the warm-up{each}. Use"
            f" `--weightlora.warmup_steps` {shortest} or more" + (" (or fewer `--weightlora.rounds`)" if rounds else "")
        )
    if run_steps is not None and args.warmup_steps > run_steps:
        raise InputError(
            f"`--weightlora.warmup_steps` {args.warmup_steps} is longer than the run ({int(run_steps)} optimizer steps:"
            f" --train.max_steps, or --train.epochs over the data): the placement would never be final. Use at most"
            f" {int(run_steps)}, or train longer"
        )

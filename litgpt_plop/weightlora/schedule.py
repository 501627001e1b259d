"""The WeightLoRA / WeightLoRA+ schedule as plain data: which optimizer step does what (docs/methods.md, section 3).

Steps count optimizer steps done, from 1. With a warm-up of T steps, K0 adapters to start with and ``rounds``
WeightLoRA+ halvings (0 for plain WeightLoRA):

- the gates are hard-thresholded to the top K after every warm-up step from the first on which they moved (step 2
  in a plain loop, step 3 under LitGPT's schedule, whose first step has learning rate 0);
- round j = 1..rounds runs after step ``1 + floor((T - 1) * j / (rounds + 1))`` (``round_steps``): K becomes
  ``K0 // 2**j`` and the survivors' rank doubles;
- after step T the placement is final: the zero-gated adapters go and the gates are folded into B.

Those steps are the earliest: a change of the adapters (a round, the end) never chooses among gates that have not
moved since the previous change (since the start, for the first), so it waits for them. Whether they moved depends
on the gradients, so the controller decides it. ``shortest_warmup`` is the shortest T for which nothing waits when
the gates first move at a given step; ``litgpt-plop finetune`` refuses shorter ones up front.

No torch here: the controller asks the schedule what is due, and this module can be checked on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

PLAIN_FIRST_MOVING_STEP = 2
"""Where the gates first move in a loop whose first step trains: lora_B leaves 0 at step 1, the gates' gradient
``<dL/dB_used, B>`` is then non-zero at step 2."""
LITGPT_FIRST_MOVING_STEP = 3
"""Where they first move under LitGPT's ``get_lr_scheduler``: its linear warm-up gives step 1 a learning rate of 0
(for every ``--train.lr_warmup_steps``), so lora_B leaves 0 only at step 2. Checked on real runs in
tests/test_weightlora_cut.py."""


def shortest_warmup(rounds: int, first_moving_step: int = PLAIN_FIRST_MOVING_STEP) -> int:
    """The shortest warm-up T that ends after step T when the gates first move at ``first_moving_step``: every
    change of the adapters (each round, then the end) needs a step of its own on which the gates have moved since
    the previous change, so the ``rounds + 1`` changes take the steps from ``first_moving_step`` on at the least.
    A round scheduled earlier (``round_steps``) waits for its step; the end, at T, need not wait."""
    return first_moving_step + rounds


def round_steps(warmup_steps: int, rounds: int) -> list[int]:
    """The optimizer steps after which WeightLoRA+ halves K: ``1 + floor((T - 1) * j / (rounds + 1))`` for
    j = 1..rounds, evenly spread over the warm-up steps after the first (whose gate gradients are all zero), so
    that every stage trains for about ``(T - 1) / (rounds + 1)`` steps."""
    return [1 + (warmup_steps - 1) * j // (rounds + 1) for j in range(1, rounds + 1)]


@dataclass(frozen=True)
class ScheduledEvent:
    """A change of the adapters: WeightLoRA+ round ``"round <j>"`` or the end of the warm-up ``"final"``."""

    name: str
    step: int
    """The optimizer step after which it runs, at the earliest (it waits for the gates to move: see above)."""
    k: int
    """How many adapters are kept from then on."""


@dataclass(frozen=True)
class WeightLoRASchedule:
    """When WeightLoRA / WeightLoRA+ changes the adapters, from the warm-up length, the number of WeightLoRA+
    rounds (0: plain WeightLoRA) and the number of adapters K0 the run starts with."""

    warmup_steps: int
    rounds: int
    k: int

    def __post_init__(self) -> None:
        if self.rounds and self.k >> self.rounds < 1:
            raise ValueError(
                f"WeightLoRA+ halves K={self.k} {self.rounds} times, which leaves no adapter: use K >= {2**self.rounds}"
                " or fewer rounds"
            )
        if self.warmup_steps < shortest_warmup(self.rounds):
            raise ValueError(
                f"A warm-up of {self.warmup_steps} steps is too short for {self.rounds} WeightLoRA+ rounds: it needs"
                f" at least {shortest_warmup(self.rounds)} (one step for the gates to learn, then one per round and"
                " the end)"
            )

    @property
    def round_steps(self) -> list[int]:
        return round_steps(self.warmup_steps, self.rounds)

    @property
    def final_k(self) -> int:
        """How many adapters the final placement has."""
        return self.k_after(self.rounds)

    def k_after(self, rounds_done: int) -> int:
        """K once ``rounds_done`` WeightLoRA+ rounds have run: each halves it."""
        return self.k >> rounds_done

    def events(self) -> list[ScheduledEvent]:
        """Every change of the adapters, in order: the rounds, then the end of the warm-up."""
        rounds = [ScheduledEvent(f"round {j}", step, self.k_after(j)) for j, step in enumerate(self.round_steps, 1)]
        return rounds + [ScheduledEvent("final", self.warmup_steps, self.final_k)]

    def rounds_due(self, step: int, rounds_done: int) -> list[ScheduledEvent]:
        """The rounds whose step has come, after optimizer step ``step`` when ``rounds_done`` have run (more than
        one when rounds waited for the gates to move; the controller runs them one step apart)."""
        return [e for e in self.events()[rounds_done : self.rounds] if e.step <= step]

    def is_final(self, step: int) -> bool:
        """Whether the warm-up's end has come after optimizer step ``step`` (it also waits for every round)."""
        return step >= self.warmup_steps

"""The race's rounds: train the surviving candidates to the round's end, compare their validation losses, keep
the best part.

Every candidate trains exactly as a run of its placement alone would: the same micro-batches in the same order
(drawn once from the run's training loader and replayed to each candidate), LitGPT's loss and step
(``litgpt.finetune.lora.fit``'s: chunked cross-entropy, gradient accumulation, optimizer then scheduler step),
its own optimizer and learning-rate schedule, and its own random stream (dropout) from the state its run would
start with. So the winner's adapter after the race is the adapter its own run has after as many steps, and
LitGPT's loop continues it from there (``ContinuedLoader`` hands that loop the rest of the same batches).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import lightning as L
import torch
from litgpt.args import EvalArgs
from litgpt.finetune import lora as litgpt_lora
from litgpt.utils import CycleIterator, chunked_cross_entropy

from litgpt_plop.model.devices import rewrap, setup_model, unwrapped
from litgpt_plop.race.adapter_sets import AdapterSet, build_adapter_sets, install, rng_state, set_rng_state
from litgpt_plop.race.schedule import RaceSchedule
from litgpt_plop.selection.placement import Placement


@dataclass
class Racer:
    """One candidate in the race: its adapters, optimizer, schedule and how far it has trained."""

    adapters: AdapterSet
    optimizer: Any
    scheduler: Any
    steps: int = 0
    val_losses: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.adapters.placement.method


@dataclass
class RaceResult:
    """What the race leaves: the model (in the wrapper several devices need), the winner (installed on it), the
    training iterator the rest of the run continues, and the record for ``placement.json`` (``scores.race``)."""

    model: Any
    winner: Racer
    train_iterator: CycleIterator
    record: dict[str, Any]


class CheckedValidationLoader:
    """The run's validation loader as LitGPT's loop gets it after a race: the loop's first pass over it, the check it
    makes before its first step, leaves the random stream as it was. The race already made that check for every
    candidate before its first step (``run_race``), so its draw (a DataLoader iterator's seed comes from the global
    random stream) is not made twice in the winner's stream."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.dataset, self._checked = loader, loader.dataset, False

    def __iter__(self) -> Iterator[Any]:
        if self._checked:
            return iter(self.loader)
        self._checked = True
        # Fabric's loader is a generator: its DataLoader iterator, and the draw, come with the first batch
        with torch.random.fork_rng(devices=cuda_devices()):
            iterator = iter(self.loader)
            first = next(iterator, None)
        return itertools.chain(() if first is None else (first,), iterator)

    def __len__(self) -> int:
        return len(self.loader)


def cuda_devices() -> list[int]:
    """The CUDA devices whose random state ``fork_rng`` saves and restores (none without CUDA)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


class ContinuedLoader:
    """The run's training loader, continued where the race stopped drawing from it: the first iteration is the rest
    of the race's current epoch, later ones are the loader's own (as ``CycleIterator`` in a run that never raced
    would see them). ``fit`` reads ``dataset`` and ``len`` of it too."""

    def __init__(self, loader: Any, iterator: CycleIterator) -> None:
        self.loader, self.dataset, self._live = loader, loader.dataset, iterator._iterator

    def __iter__(self) -> Iterator[Any]:
        live, self._live = self._live, None
        return live if live is not None else iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def candidate_record(racer: Racer, config: Any) -> dict[str, Any]:
    placement = racer.adapters.placement
    return {
        "name": racer.name,
        "sites": [s.key for s in placement.sites],
        "rank": placement.max_rank,
        "lora_alpha": placement.lora_alpha,
        "trainable_params": placement.trainable_params(config),
    }


def run_race(
    fabric: L.Fabric,
    model: Any,
    placements: list[Placement],
    schedule: RaceSchedule,
    make_optimizer: Callable[[list[torch.nn.Parameter]], tuple[Any, Any]],
    train_dataloader: Any,
    val_dataloader: Any,
    accumulation: int,
    eval: EvalArgs,
) -> RaceResult:
    """Race ``placements`` on ``model`` (the base model, ``unwrapped`` or in Fabric's wrapper; with several devices
    it is wrapped here) through the rounds of ``schedule``. ``make_optimizer(params)`` builds one candidate's
    (Fabric-set-up) optimizer and LR scheduler. Every rank takes the same decisions: the validation losses are
    averaged over ranks."""
    config = unwrapped(model).config
    racers = []
    for adapters in build_adapter_sets(unwrapped(model), placements):
        install(unwrapped(model), adapters)
        racers.append(Racer(adapters, *make_optimizer(adapters.parameters())))
        # LitGPT's loop checks two validation batches before its first step, drawing from the random stream
        set_rng_state(adapters.rng_state)
        litgpt_lora.validate(fabric, model, val_dataloader, replace(eval, max_iters=2), verbose=False)
        adapters.rng_state = rng_state()
    model = setup_model(fabric, model)
    iterator = CycleIterator(train_dataloader)
    batches = [next(iterator) for _ in range(schedule.ends[-1] * accumulation)]
    record: dict[str, Any] = {"candidates": [candidate_record(r, config) for r in racers], "rounds": []}
    # the racers dropped in a round are referenced nowhere else: their adapters and optimizer states are freed
    alive, current, count = racers, None, len(racers)
    del racers
    for end, keep in zip(schedule.ends, schedule.survivors):
        losses = {}
        for racer in alive:
            current = switch(fabric, model, current, racer)
            train_steps(fabric, model, racer, batches[racer.steps * accumulation : end * accumulation], accumulation)
            racer.steps = end
            losses[racer.name] = validation_loss(fabric, model, val_dataloader, eval)
            racer.val_losses.append(losses[racer.name])
        alive = sorted(alive, key=lambda r: losses[r.name])[:keep]  # stable: ties keep the candidates' order
        record["rounds"].append({"step": end, "val_loss": losses, "kept": [r.name for r in alive]})
        fabric.print(round_table(end, losses, [r.name for r in alive]))
    winner = alive[0]
    switch(fabric, model, current, winner)
    overhead = schedule.overhead_steps(count)
    record.update(winner=winner.name, overhead_steps=overhead, race_steps=schedule.ends[-1])
    return RaceResult(model, winner, iterator, record)


def switch(fabric: L.Fabric, model: Any, current: Racer | None, racer: Racer) -> Racer:
    """Make ``racer`` the candidate on the model: the current one keeps its random state for its next turn, the
    new one's modules go in and its random state is restored; several devices: a new DDP wrapper holds them."""
    if current is racer:
        return racer
    if current is not None:
        current.adapters.rng_state = rng_state()
    install(unwrapped(model), racer.adapters)
    set_rng_state(racer.adapters.rng_state)
    rewrap(fabric, model)
    return racer


def train_steps(fabric: L.Fabric, model: Any, racer: Racer, batches: list[dict], accumulation: int) -> None:
    """``litgpt.finetune.lora.fit``'s training step over ``batches`` (a whole number of optimizer steps)."""
    model.train()
    for i, batch in enumerate(batches, 1):
        is_accumulating = i % accumulation != 0
        input_ids, targets = batch["input_ids"], batch["labels"]
        with fabric.no_backward_sync(model, enabled=is_accumulating):
            logits = model(input_ids, lm_head_chunk_size=128)
            # shift the targets such that output n predicts token n+1
            logits[-1] = logits[-1][..., :-1, :]
            loss = chunked_cross_entropy(logits, targets[..., 1:])
            fabric.backward(loss / accumulation)
        if not is_accumulating:
            racer.optimizer.step()
            racer.optimizer.zero_grad()
            racer.scheduler.step()


def validation_loss(fabric: L.Fabric, model: Any, val_dataloader: Any, eval: EvalArgs) -> float:
    """LitGPT's validation loss (its first ``eval.max_iters`` batches), averaged over ranks. A run of the placement
    alone does not validate here, so the candidate's random stream is left as it was."""
    with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices()):
        loss = litgpt_lora.validate(fabric, model, val_dataloader, eval, verbose=False)
    return float(fabric.all_reduce(loss.to(fabric.device), reduce_op="mean"))


def round_table(step: int, losses: dict[str, float], kept: list[str]) -> str:
    lines = [f"Race: round ending at step {step}"]
    for name, loss in sorted(losses.items(), key=lambda item: item[1]):
        lines.append(f"  {name:<14} val loss {loss:.4f}{'  kept' if name in kept else ''}")
    return "\n".join(lines)

"""Inside Fabric, the run ``litgpt-plop finetune`` set up (``litgpt_plop.commands.finetune``): one named step each.

Load the base model (4-bit when ``--quantize`` asks); place the adapters (calibrate and decide, gate them for
WeightLoRA, take LitGPT's flags for ``none``, or race the candidates and keep the winner); train with LitGPT's own
loop (``litgpt.finetune.lora.fit``); save through the one crash-safe writer (``litgpt_plop.model.export.save_adapter``).
With several devices every rank calibrates its share and places the same adapters, then DDP trains them
(``litgpt_plop.model.devices``); rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from lightning.fabric.plugins import BitsandbytesPrecision
from litgpt.args import EvalArgs, TrainArgs
from litgpt.data import DataModule
from litgpt.finetune import lora as litgpt_lora
from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
from litgpt.tokenizer import Tokenizer
from litgpt.utils import (
    create_finetuning_performance_report,
    instantiate_bnb_optimizer,
    instantiate_torch_optimizer,
    load_checkpoint,
    num_parameters,
)
from torch.utils.data import ConcatDataset

from litgpt_plop.args import CalibrationArgs, CkaArgs, KappaArgs, PlopArgs
from litgpt_plop.atomic import recover_directory
from litgpt_plop.commands.inputs import check_calibration_prompts, check_lr_schedule
from litgpt_plop.decide import decide_placement
from litgpt_plop.model.adapt import apply_placement, current_placement, lora_config
from litgpt_plop.model.checkpoint import PRECISION_DTYPES, create_missing_adapters, stream_checkpoint
from litgpt_plop.model.devices import check_same_adapters, check_same_placement, rewrap, setup_model, unwrapped
from litgpt_plop.model.export import check_room_for_final, save_adapter, write_placement_files
from litgpt_plop.race import RaceArgs, race_schedule
from litgpt_plop.race.candidates import prompts_method, race_candidates
from litgpt_plop.race.runner import CheckedValidationLoader, ContinuedLoader, run_race
from litgpt_plop.reports.placement import summary_table
from litgpt_plop.scoring.prompts import calibration_token_ids
from litgpt_plop.selection.methods import Method, get_method
from litgpt_plop.selection.placement import LORA_FLAGS, Placement
from litgpt_plop.weightlora import WeightLoRAArgs, WeightLoRAController, check_litgpt_warmup

# Written beside the placement by a WeightLoRA run or a race; removed when another run starts in the same directory.
METHOD_FILES = ("gates.json", "gates.png", "race.png")


@dataclasses.dataclass
class Run:
    """Everything one finetune needs once the options are checked, and ``hparams``: what
    ``hyperparameters.yaml`` records so that ``--config`` on it repeats the run."""

    checkpoint_dir: Path
    out_dir: Path
    method: Method
    config: Config
    candidates: list[str]
    rank: int
    data: DataModule
    train: TrainArgs
    eval: EvalArgs
    optimizer: str | dict
    seed: int
    cpu_quantize: str | None
    calibration: CalibrationArgs
    plop: PlopArgs
    cka: CkaArgs
    kappa: KappaArgs
    weightlora: WeightLoRAArgs
    race: RaceArgs
    hparams: dict[str, Any]

    @property
    def calibrates(self) -> bool:
        """Whether the run scores calibration prompts: a calibrated method, or a race with one among its candidates."""
        if self.method.kind == "race":
            return any(get_method(name).calibrates for name in self.race.candidates)
        return self.method.calibrates


@dataclasses.dataclass
class Training:
    """What LitGPT's loop gets: the placed model, its placement, optimizer and LR schedule, the training loader and
    arguments (a race hands over what is left of both), and WeightLoRA's controller where it runs."""

    model: Any
    placement: Placement
    optimizer: Any
    scheduler: Any
    train_dataloader: Any
    train: TrainArgs
    controller: WeightLoRAController | None = None
    val_dataloader: Any = None  # None: the run's own


def main(fabric: L.Fabric, run: Run) -> None:
    litgpt_lora.validate_args(run.train, run.eval)
    tokenizer = Tokenizer(run.checkpoint_dir)
    train_dataloader, val_dataloader = litgpt_lora.get_dataloaders(fabric, run.data, tokenizer, run.train)
    steps_per_epoch = len(train_dataloader) // run.train.gradient_accumulation_iters(fabric.world_size, 1)
    lr_max_steps = min(run.train.epochs * steps_per_epoch, (run.train.max_steps or float("inf")))
    check_lr_schedule(run.train.lr_warmup_steps, lr_max_steps)
    if run.method.kind == "gated":  # the run's length is known now (--train.epochs over the data), the model not loaded
        check_litgpt_warmup(run.weightlora, lr_max_steps)
    if run.method.kind == "race":  # rounds after the warm-up within the budget, for as many candidates as named
        race_schedule(len(run.race.candidates), int(lr_max_steps), run.race.budget, run.race.eta, run.train.lr_warmup_steps)
    if fabric.global_rank == 0:  # the one writer: what it will write must fit before anything trains
        check_room(run, lr_max_steps)
    # the prompts before the weights: a file or data set with too few of them is refused before the model loads
    token_ids = calibration_token_ids(run.calibration, tokenizer, run.data) if run.calibrates else None
    if token_ids is not None:
        check_calibration_prompts(prompts_method(run.method, run.race), run.cka, len(token_ids), "--plugin")

    fabric.seed_everything(run.seed)
    model = load_base_model(fabric, run)
    if run.method.kind == "race":
        training = race(fabric, model, run, token_ids, train_dataloader, val_dataloader, lr_max_steps)
    else:
        training = place(fabric, model, run, token_ids, train_dataloader, lr_max_steps)
    model, saver, controller = training.model, AdapterSaver(run, training.placement), training.controller
    if controller is not None:
        # after every optimizer step: threshold the gates, grow ranks, and at the end of the warm-up prune and fold
        def placement_changed(events: list[str]) -> None:
            saver.placement = controller.placement
            rewrap(fabric, model)  # several devices: DDP must hold the adapters that are left
            fabric.print(f"WeightLoRA: {', '.join(events)}: {len(controller.placement.sites)} adapters")

        controller.attach(training.optimizer, on_change=placement_changed)
    train_time = time.perf_counter()
    with saver.inside_litgpt_fit():
        token_counts = litgpt_lora.fit(
            fabric=fabric, model=model, optimizer=training.optimizer, scheduler=training.scheduler,
            train_dataloader=training.train_dataloader, val_dataloader=training.val_dataloader or val_dataloader,
            devices=fabric.world_size,
            checkpoint_dir=run.checkpoint_dir, out_dir=run.out_dir, train=training.train, eval=run.eval, data=run.data,
        )  # fmt: skip
    fabric.print(create_finetuning_performance_report(time.perf_counter() - train_time, token_counts, fabric.device.type))
    if run.eval.final_validation:
        eval = dataclasses.replace(run.eval, max_iters=len(val_dataloader))
        val_loss = litgpt_lora.validate(fabric, model, val_dataloader, eval)
        val_loss = fabric.all_reduce(val_loss.to(fabric.device), reduce_op="mean")  # each rank saw its share
        fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)})
        fabric.print(f"Final evaluation | val loss: {val_loss.item():.3f} | val ppl: {math.exp(val_loss):.3f}")
    save_final(fabric, model, run, saver, controller)
    # LitGPT's CSV logger writes only every `log_interval` steps; flush what is left
    for logger in fabric.loggers:
        logger.finalize("success")


def check_room(run: Run, lr_max_steps: int | float) -> None:
    """The final merge, the adapter and the periodic saves fit on the output's filesystem."""
    train = run.train
    saves = int(lr_max_steps) // train.save_interval if train.save_interval and lr_max_steps < math.inf else 0
    dtype = PRECISION_DTYPES.get(run.hparams["precision"], torch.float32)  # mixed: float32 adapters and merge
    adapter = Placement.from_kinds(run.config, run.candidates, rank=run.rank).trainable_params(run.config)
    check_room_for_final(run.out_dir, run.config, run.checkpoint_dir, dtype, adapter, saves)


def place(
    fabric: L.Fabric, model: Any, run: Run, token_ids: list[torch.Tensor] | None, train_dataloader: Any,
    lr_max_steps: int | float,
) -> Training:  # fmt: skip
    """Every plugin but the race: place the adapters, say what was placed, then the optimizer and LR schedule."""
    placement, controller = place_adapters(fabric, model, run, token_ids, lr_max_steps)
    announce(fabric, model, run, placement)
    model = setup_model(fabric, model)  # several devices: wrapped once the adapters exist, so DDP averages them
    optimizer = fabric.setup_optimizers(build_optimizer(fabric, model, run.optimizer))
    scheduler = litgpt_lora.get_lr_scheduler(optimizer, warmup_steps=run.train.lr_warmup_steps, max_steps=lr_max_steps)
    return Training(model, placement, optimizer, scheduler, train_dataloader, run.train, controller)


def race(
    fabric: L.Fabric, model: Any, run: Run, token_ids: list[torch.Tensor] | None, train_dataloader: Any,
    val_dataloader: Any, lr_max_steps: int | float,
) -> Training:  # fmt: skip
    """``--plugin race``: the candidates' placements, the race, and the winner with what is left of the run."""
    t0 = time.perf_counter()
    config = run.config
    placements = race_candidates(
        unwrapped(model), run.race, token_ids, run.candidates, run.rank, config.lora_alpha, config.lora_dropout,
        run.calibration, run.plop, run.cka, run.kappa, run.seed,
    )  # fmt: skip
    schedule = race_schedule(len(placements), int(lr_max_steps), run.race.budget, run.race.eta, run.train.lr_warmup_steps)
    fabric.print(
        f"Race: {len(placements)} candidates ({', '.join(p.method for p in placements)}), rounds ending at steps"
        f" {list(schedule.ends)} keeping {list(schedule.survivors)}, {schedule.overhead_steps(len(placements))}"
        f" steps on candidates that lose"
    )
    # what LitGPT's loop sets before it trains, so that the race's steps are its steps
    longest, _ = litgpt_lora.get_longest_seq_length(ConcatDataset([train_dataloader.dataset, val_dataloader.dataset]))
    unwrapped(model).max_seq_length = min(longest, run.train.max_seq_length or float("inf"))
    if isinstance(fabric.strategy.precision, BitsandbytesPrecision):
        use_stable_embedding(unwrapped(model))  # before training, as LitGPT; the race's optimizers hold adapters only

    def make_optimizer(params: list[torch.nn.Parameter]) -> tuple[Any, Any]:
        optimizer = fabric.setup_optimizers(instantiate_optimizer(fabric, params, run.optimizer))
        warmup = run.train.lr_warmup_steps
        return optimizer, litgpt_lora.get_lr_scheduler(optimizer, warmup_steps=warmup, max_steps=lr_max_steps)

    accumulation = run.train.gradient_accumulation_iters(fabric.world_size, 1)
    result = run_race(
        fabric, model, placements, schedule, make_optimizer, train_dataloader, val_dataloader, accumulation, run.eval
    )
    winner = result.winner
    record = {**result.record, "candidate_kinds": run.candidates}
    placement = dataclasses.replace(
        winner.adapters.placement,
        scores=dataclasses.replace(winner.adapters.placement.scores, race=record),
        calibration={**(winner.adapters.placement.calibration or {}), "race_seconds": round(time.perf_counter() - t0, 3)},
    )
    announce(fabric, result.model, run, placement)
    train = dataclasses.replace(
        run.train, max_steps=int(lr_max_steps) - winner.steps, epochs=run.train.epochs - result.train_iterator.epoch
    )
    loader = ContinuedLoader(train_dataloader, result.train_iterator)
    checked = CheckedValidationLoader(val_dataloader)
    return Training(result.model, placement, winner.optimizer, winner.scheduler, loader, train, val_dataloader=checked)


def announce(fabric: L.Fabric, model: Any, run: Run, placement: Placement) -> None:
    """The placement's files (rank 0), its table, and the checks that every rank placed it and that exactly its
    adapters train."""
    config = unwrapped(model).config
    if fabric.global_rank == 0:
        write_run_outputs(run.out_dir, placement, config)
    fabric.print(summary_table(placement, config))
    check_same_placement(fabric, placement, "placement")
    check_trainable(fabric, model, placement)


def load_base_model(fabric: L.Fabric, run: Run) -> GPT:
    """The LoRA model with the base weights (4-bit on CPU when asked): with LitGPT's flags' adapters for ``none``,
    with none yet for a plugin, whose adapters are all created (and seeded) by the placement, whatever the
    candidate flags were."""
    config = run.config if run.method.kind == "none" else lora_config(run.config, dict.fromkeys(LORA_FLAGS, False))
    if run.cpu_quantize is not None:
        return load_base_model_4bit(fabric, run, config)
    with fabric.init_module(empty_init=False):
        model = GPT(config)
    if fabric.world_size > 1:  # several devices: wrapped after placement (litgpt_plop.model.devices.setup_model)
        load_checkpoint(fabric, model, run.checkpoint_dir / "lit_model.pth", strict=False)
        return model
    model = fabric.setup_module(model)
    # Unlike ``litgpt finetune_lora``, the weights load before the optimizer exists: calibration needs them, and
    # the optimizer must hold exactly the placed adapters.
    load_checkpoint(fabric, model, run.checkpoint_dir / "lit_model.pth", strict=False)
    return model


def load_base_model_4bit(fabric: L.Fabric, run: Run, config: Config) -> GPT:
    """The CPU 4-bit path: built on the meta device and filled from the memory-mapped checkpoint, each block linear
    quantized as it loads (``litgpt_plop.model.checkpoint.stream_checkpoint``), so the dense model never exists. The
    adapters LitGPT's flags ask for (``none``) are then created as ``litgpt.lora`` initialises them, in the run's
    precision; the base weights they start from are not drawn first as in the dense path, so their random values
    differ from it."""
    dtype = PRECISION_DTYPES.get(getattr(fabric.strategy.precision, "precision", ""))  # Fabric's "bf16-true", ...
    with torch.device("meta"):
        model = GPT(config)
    count = stream_checkpoint(model, run.checkpoint_dir, dtype=dtype, quantize=run.cpu_quantize, strict=False)
    create_missing_adapters(model, dtype or torch.float32)  # the adapters of LitGPT's flags (``none``)
    fabric.print(f"Quantized {count} linear layers to 4-bit ({run.cpu_quantize}) with bitsandbytes' CPU kernels, while loading")
    return fabric.setup_module(model)


def place_adapters(
    fabric: L.Fabric, model: Any, run: Run, token_ids: list[torch.Tensor] | None, lr_max_steps: int | float
) -> tuple[Placement, WeightLoRAController | None]:
    """Put the method's adapters on the model: LitGPT's flags (``none``), gated candidates (WeightLoRA), or the
    placement a calibrated method (on ``token_ids``) or preset decides."""
    config, method = run.config, run.method
    candidates = run.candidates
    if method.kind == "none":
        mark_only_lora_as_trainable(model)
        return current_placement(unwrapped(model), method="none"), None
    if method.kind == "gated":
        # Gated adapters on every candidate site; the K that survive the warm-up are the placement.
        placement = Placement.from_kinds(
            config, candidates, rank=run.rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            method=method.name,
        )  # fmt: skip
        controller = WeightLoRAController(model, placement, run.weightlora, max_steps=lr_max_steps, seed=run.seed)
        return controller.placement, controller
    t0 = time.perf_counter()
    placement = decide_placement(
        unwrapped(model), method.name, token_ids, candidates, run.rank, config.lora_alpha, config.lora_dropout,
        calibration=run.calibration, plop=run.plop, cka=run.cka, seed=run.seed, kappa=run.kappa,
    )  # fmt: skip
    fabric.print(f"Placement decided in {time.perf_counter() - t0:.1f}s:")
    apply_placement(unwrapped(model), placement)
    return placement, None


def write_run_outputs(out_dir: Path, placement: Placement, config: Config, extra_files: dict[str, bytes] | None = None) -> None:
    """The run's placement and report at the top of ``out_dir`` (``final/`` gets its own copy at the end), each file
    atomically. Gate files of an earlier WeightLoRA run there are removed, and a killed save's leftovers cleaned up."""
    extra_files = extra_files or {}
    for name in METHOD_FILES:
        if name not in extra_files:
            (out_dir / name).unlink(missing_ok=True)
    recover_directory(out_dir / "final")
    write_placement_files(placement, config, out_dir, extra_files)


def check_trainable(fabric: L.Fabric, model: Any, placement: Placement) -> None:
    trainable = num_parameters(model, requires_grad=True)
    fabric.print(f"Number of trainable parameters: {trainable:,}")
    fabric.print(f"Number of non-trainable parameters: {num_parameters(model, requires_grad=False):,}")
    fabric.log_dict({"trainable_params": trainable})
    expected = placement.trainable_params(model.config)
    if trainable != expected:
        raise RuntimeError(f"{trainable:,} parameters are trainable, but the placement implies {expected:,}")


def build_optimizer(fabric: L.Fabric, model: Any, optimizer: str | dict) -> torch.optim.Optimizer:
    """LitGPT's optimizer for the trainable parameters; under bitsandbytes precision, bitsandbytes' (paged)
    optimizer and stable embedding, in ``litgpt finetune_lora``'s order: the optimizer is built first, so the new
    (trainable) embedding never joins it and only the adapters train."""
    built = instantiate_optimizer(fabric, model.parameters(), optimizer)
    if isinstance(fabric.strategy.precision, BitsandbytesPrecision):
        use_stable_embedding(model)
    return built


def instantiate_optimizer(fabric: L.Fabric, params: Any, optimizer: str | dict) -> torch.optim.Optimizer:
    """LitGPT's optimizer over ``params``: bitsandbytes' (paged) one under bitsandbytes precision."""
    if isinstance(fabric.strategy.precision, BitsandbytesPrecision):
        return instantiate_bnb_optimizer(optimizer, params)
    return instantiate_torch_optimizer(optimizer, params)


def use_stable_embedding(model: Any) -> None:
    """Replace the token embedding with bitsandbytes' ``StableEmbedding`` holding the same weights, as
    ``litgpt finetune_lora`` does under bitsandbytes precision."""
    from bitsandbytes.nn import StableEmbedding

    old_embedding = model.transformer.wte
    model.transformer.wte = StableEmbedding(old_embedding.num_embeddings, old_embedding.embedding_dim)
    with torch.no_grad():
        model.transformer.wte.weight.copy_(old_embedding.weight)
    model.transformer.wte = model.transformer.wte.to(device=old_embedding.weight.device, dtype=old_embedding.weight.dtype)


def save_final(
    fabric: L.Fabric, model: Any, run: Run, saver: "AdapterSaver", controller: WeightLoRAController | None
) -> None:
    """``final/``: adapter, placement, report, hyperparameters and the merged model, swapped in all at once."""
    extra_files = {}
    if controller is not None:
        saver.placement = controller.placement
        extra_files = controller.report_files()
        if warning := controller.not_final_warning():
            fabric.print(f"Warning: {warning}", file=sys.stderr)
        if fabric.global_rank == 0:
            write_run_outputs(run.out_dir, saver.placement, model.config, extra_files)
    check_same_adapters(fabric, model)  # rank 0 writes what every rank trained
    check_same_placement(fabric, saver.placement, "final placement")
    final_dir = run.out_dir / "final"
    saver.save(fabric, model, final_dir, extra_files=extra_files, merge=True)
    if fabric.global_rank == 0:
        fabric.print(f"Saved the adapter, the merged model and the placement report to {str(final_dir)!r}")


class AdapterSaver:
    """Every save of the run, periodic or final, through ``save_adapter``, with the run's hyperparameters.

    LitGPT's ``fit`` saves periodic checkpoints through module-level ``save_lora_checkpoint``, then
    ``copy_config_files``, ``save_hyperparameters`` (which re-parses ``sys.argv`` against its own ``setup``, which our
    flags would break) and ``save_prompt_style``. ``inside_litgpt_fit`` routes the first to ``save_adapter``, which
    writes all of it at once, and makes the others no-ops for the duration of the loop.
    """

    def __init__(self, run: Run, placement: Placement) -> None:
        self.run = run
        self.placement = placement

    def save(self, fabric: L.Fabric, model: Any, out_dir: Path, extra_files: dict[str, bytes] | None = None, merge: bool = False) -> None:
        if fabric.global_rank == 0:
            save_adapter(
                unwrapped(model), self.placement, out_dir, self.run.checkpoint_dir,
                hparams=self.run.hparams, prompt_style=self.run.data.prompt_style, extra_files=extra_files, merge=merge,
            )  # fmt: skip
        fabric.barrier()

    @contextlib.contextmanager
    def inside_litgpt_fit(self) -> Iterator[None]:
        names = ("save_lora_checkpoint", "copy_config_files", "save_hyperparameters", "save_prompt_style")
        saved = {name: getattr(litgpt_lora, name) for name in names}
        litgpt_lora.save_lora_checkpoint = lambda fabric, model, file_path: self.save(fabric, model, file_path.parent)
        for name in names[1:]:
            setattr(litgpt_lora, name, lambda *args, **kwargs: None)
        try:
            yield
        finally:
            for name, function in saved.items():
                setattr(litgpt_lora, name, function)

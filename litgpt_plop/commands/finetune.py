"""``litgpt-plop finetune``: LitGPT's LoRA finetuning with the adapters placed by a plugin.

The flow, one named step each: check the options and build the run (``setup``), then, inside Fabric
(``main``): load the base model (4-bit when ``--quantize`` asks), place the adapters (calibrate and decide, or
gate them for WeightLoRA, or take LitGPT's flags for ``none``), train with LitGPT's own loop
(``litgpt.finetune.lora.fit``), and save through the one crash-safe writer (``litgpt_plop.model.export.save_adapter``).
``--plugin none`` trains exactly what ``litgpt finetune_lora`` trains with the same flags. With ``--devices N``
(``--num_nodes M``) every rank calibrates its share and places the same adapters, then DDP trains them
(``litgpt_plop.model.devices``); rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Literal

import lightning as L
import torch
from lightning.fabric.plugins import BitsandbytesPrecision
from litgpt.args import EvalArgs, LogArgs, TrainArgs
from litgpt.data import Alpaca, DataModule
from litgpt.finetune import lora as litgpt_lora
from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
from litgpt.tokenizer import Tokenizer
from litgpt.types import LoggerChoice
from litgpt.utils import (
    choose_logger,
    create_finetuning_performance_report,
    get_default_supported_precision,
    init_out_dir,
    instantiate_bnb_optimizer,
    instantiate_torch_optimizer,
    load_checkpoint,
    num_parameters,
    parse_devices,
)

from litgpt_plop.model.adapt import apply_placement, current_placement, lora_config
from litgpt_plop.args import CalibrationArgs, CkaArgs, PlopArgs
from litgpt_plop.atomic import recover_directory
from litgpt_plop.model.checkpoint import PRECISION_DTYPES, create_missing_adapters, stream_checkpoint
from litgpt_plop.model.devices import (
    FABRIC_PRECISIONS,
    check_same_adapters,
    check_same_placement,
    precision_and_quantization,
    rewrap,
    setup_model,
    strategy_for,
    unwrapped,
)  # fmt: skip
from litgpt_plop.errors import InputError
from litgpt_plop.model.export import check_room_for_final, save_adapter, write_placement_files
from litgpt_plop.commands.hparams import data_module_hparams, plain
from litgpt_plop.commands.inputs import (
    check_calibration_prompts,
    check_checkpoint,
    check_devices,
    check_lora,
    check_lr_schedule,
    check_out_dir,
    check_precision,
    check_text_file,
)  # fmt: skip
from litgpt_plop.args import KappaArgs
from litgpt_plop.selection.methods import Method, check_option_groups, get_method
from litgpt_plop.selection.placement import LORA_FLAGS, Placement, PlacementError, kinds_from_flags, model_kinds
from litgpt_plop.scoring.prompts import calibration_token_ids
from litgpt_plop.model.quantize import QuantizeChoice
from litgpt_plop.reports.placement import summary_table
from litgpt_plop.decide import decide_placement
from litgpt_plop.weightlora import WeightLoRAArgs, WeightLoRAController, check_litgpt_warmup

# LitGPT's own defaults for ``finetune_lora``: what an unset flag means with ``--plugin none``.
LITGPT_DEFAULT_FLAGS = {"lora_query": True, "lora_value": True}
# Written beside the placement by a WeightLoRA run; removed when another run starts in the same directory.
GATES_FILES = ("gates.json", "gates.png")


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
    hparams: dict[str, Any]


def setup(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/finetune/plop"),
    plugin: str = "plop",
    precision: str | None = None,
    quantize: QuantizeChoice | Literal["bnb.int8-training"] | None = None,
    devices: int | str = 1,
    num_nodes: int = 1,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_query: bool | None = None,
    lora_key: bool | None = None,
    lora_value: bool | None = None,
    lora_projection: bool | None = None,
    lora_mlp: bool | None = None,
    lora_head: bool | None = None,
    candidate_kinds: list[str] | None = None,
    candidate_rank: int | None = None,
    data: DataModule | None = None,
    train: TrainArgs = TrainArgs(
        save_interval=1000,
        log_interval=1,
        global_batch_size=16,
        micro_batch_size=1,
        lr_warmup_steps=100,
        epochs=5,
        max_seq_length=None,
        max_time=None,
    ),
    log: LogArgs = LogArgs(),
    eval: EvalArgs = EvalArgs(interval=100, max_new_tokens=100, max_iters=100),
    optimizer: str | dict = "AdamW",
    logger_name: LoggerChoice = "csv",
    seed: int = 1337,
    access_token: str | None = None,
    calibration: CalibrationArgs = CalibrationArgs(),
    plop: PlopArgs = PlopArgs(),
    cka: CkaArgs = CkaArgs(),
    kappa: KappaArgs = KappaArgs(),
    weightlora: WeightLoRAArgs = WeightLoRAArgs(),
) -> None:
    """Finetune a model with LoRA, the adapters placed by a plugin.

    Arguments:
        checkpoint_dir: The path to the base model's checkpoint directory to load for finetuning.
        out_dir: Directory in which to save checkpoints, logs, the placement and its report.
        plugin: How the adapters are placed: ``plop``, ``plop-inverse``, ``cka``, ``plop+cka`` (calibrated),
            ``kappa`` (the weights with the lowest condition number, no data),
            ``weightlora``, ``weightlora+`` (learned while training, from every candidate kind in every layer),
            ``all``, ``attention``, ``qv``, ``mlp``, ``random`` (fixed; ``random`` draws its kinds with ``seed``),
            or ``none`` (exactly LitGPT's flags).
        precision: The precision to use for finetuning. Possible choices: "bf16-true", "bf16-mixed", "32-true".
        quantize: Quantize the base model's linears with bitsandbytes (QLoRA). On a GPU through Lightning's
            precision plugin as ``litgpt finetune_lora`` does; on CPU with bitsandbytes' CPU kernels (4-bit only).
        devices: How many devices/GPUs to use: more than one trains with DDP (``litgpt_plop.model.devices`` says why
            not LitGPT's sharded strategy); not with ``--quantize``.
        num_nodes: How many nodes the code is being run on (each runs the same command with ``--devices``).
        lora_r: The LoRA rank.
        lora_alpha: The LoRA alpha.
        lora_dropout: The LoRA dropout value.
        lora_query: Whether the query is a candidate for LoRA. Unset: a candidate when a plugin places the
            adapters; with ``--plugin none``, LitGPT's default (query and value on, the rest off).
        lora_key: Whether the key is a candidate (see ``lora_query`` for the default).
        lora_value: Whether the value is a candidate (see ``lora_query`` for the default).
        lora_projection: Whether the attention output projection is a candidate (see ``lora_query``).
        lora_mlp: Whether the MLP linears are candidates (see ``lora_query``).
        lora_head: Whether the output head is a candidate. Unset: off.
        candidate_kinds: The kinds the plugin chooses from, instead of the ``lora_*`` flags (a run records them so
            that its ``hyperparameters.yaml``, whose ``lora_*`` flags describe the placement for stock LitGPT,
            repeats it).
        candidate_rank: The rank of every candidate adapter, instead of ``lora_r`` (recorded for the same reason:
            WeightLoRA+ grows ranks, and ``lora_r`` records the largest).
        data: Data-related arguments. If not provided, the default is ``litgpt.data.Alpaca``.
        train: Training-related arguments. See ``litgpt.args.TrainArgs`` for details.
        log: Logging-related arguments. See ``litgpt.args.LogArgs`` for details.
        eval: Evaluation-related arguments. See ``litgpt.args.EvalArgs`` for details.
        optimizer: An optimizer name (such as "AdamW") or config.
        logger_name: The name of the logger to send metrics to.
        seed: The random seed to use for reproducibility.
        access_token: Optional API token to access models with restrictions.
        calibration: The calibration pass (a plugin that calibrates only): prompts, how many, batch size, length.
        plop: PLoP's options (``plop``, ``plop-inverse``, ``plop+cka``).
        cka: Layer-wise CKA's options (``cka``, ``plop+cka``).
        kappa: kappa's options (``kappa``): how many kinds, or a budget, by kind or by site.
        weightlora: WeightLoRA's options (``weightlora``, ``weightlora+``): K, warm-up, gate learning rate, rounds.
    """
    # Everything that can be checked before loading weights is checked first.
    method = get_method(plugin, what="plugin")
    check_option_groups(method, "--plugin", calibration=calibration, plop=plop, cka=cka, kappa=kappa, weightlora=weightlora)
    if calibration.file is not None:
        check_text_file(calibration.file, "--calibration.file")
    check_lr_schedule(train.lr_warmup_steps, train.max_steps)
    if method.kind == "gated":  # LitGPT's first step has learning rate 0: refuse a cut before the gates can move
        check_litgpt_warmup(dataclasses.replace(weightlora, plus=plugin == "weightlora+"), train.max_steps)
    check_lora(lora_r, lora_alpha, lora_dropout)
    check_precision(precision, PRECISION_DTYPES if quantize else FABRIC_PRECISIONS)
    check_calibration_prompts(method, cka, calibration.num_samples, "--plugin")
    checkpoint_dir = Path(checkpoint_dir)
    check_checkpoint(checkpoint_dir, tokenizer=True)
    check_out_dir(out_dir)
    devices = parse_devices(devices)
    check_devices(devices, num_nodes, quantize, train.global_batch_size, train.micro_batch_size)
    flags = candidate_flags(
        method, lora_query=lora_query, lora_key=lora_key, lora_value=lora_value, lora_projection=lora_projection,
        lora_mlp=lora_mlp, lora_head=lora_head,
    )  # fmt: skip
    config = Config.from_file(
        checkpoint_dir / "model_config.yaml", lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, **flags
    )
    candidates = resolve_candidate_kinds(method, config, flags, candidate_kinds)
    rank = lora_r if candidate_rank is None else candidate_rank
    check_lora(rank, lora_alpha)
    data = Alpaca() if data is None else data
    precision = precision or get_default_supported_precision(training=True)
    plugins, fabric_precision, cpu_quantize = precision_and_quantization(precision, quantize)
    out_dir = init_out_dir(out_dir)
    hparams = {
        "checkpoint_dir": str(checkpoint_dir), "out_dir": str(out_dir), "plugin": plugin, "precision": precision,
        "quantize": quantize, "devices": devices, "num_nodes": num_nodes, "seed": seed, "data": data_module_hparams(data),
        "train": dataclasses.asdict(train), "log": dataclasses.asdict(log), "eval": dataclasses.asdict(eval),
        "optimizer": optimizer, "logger_name": logger_name,
        **({"candidate_kinds": candidates, "candidate_rank": rank} if method.kind != "none" else {}),
        **{name: plain(dataclasses.asdict(group)) for name, group in
           {"calibration": calibration, "plop": plop, "cka": cka, "kappa": kappa, "weightlora": weightlora}.items()
           if name in method.option_groups},
    }  # fmt: skip
    run = Run(
        checkpoint_dir=checkpoint_dir, out_dir=out_dir, method=method, config=config, candidates=candidates, rank=rank,
        data=data, train=train, eval=eval, optimizer=optimizer, seed=seed, cpu_quantize=cpu_quantize,
        calibration=calibration, plop=plop, cka=cka, kappa=kappa,
        weightlora=dataclasses.replace(weightlora, plus=plugin == "weightlora+"),
        hparams=hparams,
    )  # fmt: skip
    logger = choose_logger(
        logger_name, out_dir, name=f"finetune-{config.name}", log_interval=train.log_interval, log_args=dataclasses.asdict(log)
    )
    # Several devices: DDP (litgpt_plop.model.devices says why not FSDP). Its launcher re-runs this command line in one
    # process per further device, each of which gets here again and joins the run.
    fabric = L.Fabric(
        devices=devices, num_nodes=num_nodes, strategy=strategy_for(devices, num_nodes), precision=fabric_precision,
        loggers=logger, plugins=plugins,
    )  # fmt: skip
    fabric.launch(main, run)


def resolve_candidate_kinds(
    method: Method, config: Config, flags: dict[str, bool], candidate_kinds: list[str] | None
) -> list[str]:
    """The kinds the plugin chooses from: ``--candidate_kinds`` if given, else what the ``lora_*`` flags switch on."""
    if candidate_kinds is None:
        kinds = kinds_from_flags(config, **flags)
        if not kinds:
            raise PlacementError("Every --lora_* flag is off: there are no candidate kinds to place LoRA on")
        return kinds
    if method.kind == "none":
        raise InputError("--candidate_kinds does not apply to --plugin 'none', which trains exactly the --lora_* flags")
    known = model_kinds(config, include_head=True)
    unknown = [k for k in candidate_kinds if k not in known]
    if unknown or not candidate_kinds:
        raise InputError(f"--candidate_kinds {list(candidate_kinds)}: choose one or more of {list(known)}")
    return list(dict.fromkeys(candidate_kinds))


def candidate_flags(method: Method, **flags: bool | None) -> dict[str, bool]:
    """Resolve unset ``lora_*`` flags: every kind but the head is a candidate for a plugin; LitGPT's defaults for none."""
    resolved = {}
    for name in LORA_FLAGS:
        value = flags.get(name)
        if value is None:
            value = LITGPT_DEFAULT_FLAGS.get(name, False) if method.kind == "none" else name != "lora_head"
        resolved[name] = value
    return resolved


def main(fabric: L.Fabric, run: Run) -> None:
    train, eval = run.train, run.eval
    litgpt_lora.validate_args(train, eval)
    tokenizer = Tokenizer(run.checkpoint_dir)
    train_dataloader, val_dataloader = litgpt_lora.get_dataloaders(fabric, run.data, tokenizer, train)
    steps_per_epoch = len(train_dataloader) // train.gradient_accumulation_iters(fabric.world_size, 1)
    lr_max_steps = min(train.epochs * steps_per_epoch, (train.max_steps or float("inf")))
    check_lr_schedule(train.lr_warmup_steps, lr_max_steps)
    if run.method.kind == "gated":  # the run's length is known now (--train.epochs over the data), the model not loaded
        check_litgpt_warmup(run.weightlora, lr_max_steps)

    if fabric.global_rank == 0:  # the one writer: what it will write must fit before anything trains
        saves = int(lr_max_steps) // train.save_interval if train.save_interval and lr_max_steps < math.inf else 0
        dtype = PRECISION_DTYPES.get(run.hparams["precision"], torch.float32)  # mixed: float32 adapters and merge
        adapter = Placement.from_kinds(run.config, run.candidates, rank=run.rank).trainable_params(run.config)
        check_room_for_final(run.out_dir, run.config, run.checkpoint_dir, dtype, adapter, saves)
    # the prompts before the weights: a file or data set with too few of them is refused before the model loads
    token_ids = calibration_token_ids(run.calibration, tokenizer, run.data) if run.method.calibrates else None
    if token_ids is not None:
        check_calibration_prompts(run.method, run.cka, len(token_ids), "--plugin")

    fabric.seed_everything(run.seed)
    model = load_base_model(fabric, run)
    placement, controller = place_adapters(fabric, model, run, token_ids, lr_max_steps)
    if fabric.global_rank == 0:
        write_run_outputs(run.out_dir, placement, model.config)
    fabric.print(summary_table(placement, model.config))
    check_same_placement(fabric, placement, "placement")
    check_trainable(fabric, model, placement)
    model = setup_model(fabric, model)  # several devices: wrapped once the adapters exist, so DDP averages them

    optimizer = fabric.setup_optimizers(build_optimizer(fabric, model, run.optimizer))
    scheduler = litgpt_lora.get_lr_scheduler(optimizer, warmup_steps=train.lr_warmup_steps, max_steps=lr_max_steps)
    saver = AdapterSaver(run, placement)
    if controller is not None:
        # after every optimizer step: threshold the gates, grow ranks, and at the end of the warm-up prune and fold
        def placement_changed(events: list[str]) -> None:
            saver.placement = controller.placement
            rewrap(fabric, model)  # several devices: DDP must hold the adapters that are left
            fabric.print(f"WeightLoRA: {', '.join(events)}: {len(controller.placement.sites)} adapters")

        controller.attach(optimizer, on_change=placement_changed)
    train_time = time.perf_counter()
    with saver.inside_litgpt_fit():
        token_counts = litgpt_lora.fit(
            fabric=fabric, model=model, optimizer=optimizer, scheduler=scheduler, train_dataloader=train_dataloader,
            val_dataloader=val_dataloader, devices=fabric.world_size, checkpoint_dir=run.checkpoint_dir,
            out_dir=run.out_dir, train=train, eval=eval, data=run.data,
        )  # fmt: skip
    fabric.print(create_finetuning_performance_report(time.perf_counter() - train_time, token_counts, fabric.device.type))
    if eval.final_validation:
        val_loss = litgpt_lora.validate(fabric, model, val_dataloader, dataclasses.replace(eval, max_iters=len(val_dataloader)))
        val_loss = fabric.all_reduce(val_loss.to(fabric.device), reduce_op="mean")  # each rank saw its share
        fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)})
        fabric.print(f"Final evaluation | val loss: {val_loss.item():.3f} | val ppl: {math.exp(val_loss):.3f}")
    save_final(fabric, model, run, saver, controller)
    # LitGPT's CSV logger writes only every `log_interval` steps; flush what is left
    for logger in fabric.loggers:
        logger.finalize("success")


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
    for name in GATES_FILES:
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
    if not isinstance(fabric.strategy.precision, BitsandbytesPrecision):
        return instantiate_torch_optimizer(optimizer, model.parameters())
    from bitsandbytes.nn import StableEmbedding

    built = instantiate_bnb_optimizer(optimizer, model.parameters())
    old_embedding = model.transformer.wte
    model.transformer.wte = StableEmbedding(old_embedding.num_embeddings, old_embedding.embedding_dim)
    with torch.no_grad():
        model.transformer.wte.weight.copy_(old_embedding.weight)
    model.transformer.wte = model.transformer.wte.to(device=old_embedding.weight.device, dtype=old_embedding.weight.dtype)
    return built


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

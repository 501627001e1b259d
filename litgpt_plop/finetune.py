"""``litgpt-plop finetune``: LitGPT's LoRA finetuning with the adapters placed by a plugin.

The flow: load the base model (4-bit when ``--quantize`` asks), calibrate on the training prompts (or
``--calibration.file``), decide the placement, rewrite the LoRA flags, adapt the model, then train with LitGPT's
own loop (``litgpt.finetune.lora.fit``), validation, saving and merging. ``--plugin none`` trains exactly what
``litgpt finetune_lora`` trains with the same flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path
from pprint import pprint
from typing import Any, Iterator, Literal

import lightning as L
import torch
import yaml
from lightning.fabric.plugins import BitsandbytesPrecision
from litgpt.args import EvalArgs, LogArgs, TrainArgs
from litgpt.data import Alpaca, DataModule
from litgpt.finetune import lora as litgpt_lora
from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
from litgpt.prompts import save_prompt_style
from litgpt.scripts.merge_lora import merge_lora
from litgpt.tokenizer import Tokenizer
from litgpt.types import LoggerChoice
from litgpt.utils import (
    check_valid_checkpoint_dir,
    choose_logger,
    copy_config_files,
    create_finetuning_performance_report,
    get_default_supported_precision,
    init_out_dir,
    instantiate_bnb_optimizer,
    instantiate_torch_optimizer,
    load_checkpoint,
    num_parameters,
    parse_devices,
)

from litgpt_plop.adapt import apply_placement, current_placement
from litgpt_plop.args import CalibrationArgs, CkaArgs, PlopArgs
from litgpt_plop.calibration import calibration_token_ids
from litgpt_plop.export import to_stock_state_dict
from litgpt_plop.placement import LORA_FLAGS, Placement, PlacementError, kinds_from_flags
from litgpt_plop.plan import PLAN_METHODS, QuantizeChoice, decide_placement, write_outputs
from litgpt_plop.report import summary_table
from litgpt_plop.select import METHODS as CALIBRATED_METHODS
from litgpt_plop.weightlora import WeightLoRAArgs, WeightLoRAController

WEIGHTLORA_PLUGINS = ("weightlora", "weightlora+")
PLUGINS = PLAN_METHODS + WEIGHTLORA_PLUGINS + ("none",)
# LitGPT's own defaults for ``finetune_lora``: what an unset flag means with ``--plugin none``.
LITGPT_DEFAULT_FLAGS = {"lora_query": True, "lora_value": True}


def check_lr_schedule(warmup_steps: int | None, max_steps: int | float | None) -> None:
    """LitGPT's schedule (linear warm-up, then cosine over the remaining steps) divides by both lengths."""
    if warmup_steps is None or warmup_steps < 1:
        raise ValueError(f"--train.lr_warmup_steps must be at least 1 (LitGPT's warm-up divides by it), got {warmup_steps}")
    if max_steps is not None and warmup_steps >= max_steps:
        raise ValueError(
            f"--train.lr_warmup_steps ({warmup_steps}) must be smaller than the number of optimizer steps ({max_steps}:"
            " --train.max_steps, or --train.epochs over the data): LitGPT's cosine phase lasts the difference"
        )


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
    calibration: CalibrationArgs | None = None,
    plop: PlopArgs | None = None,
    cka: CkaArgs | None = None,
    weightlora: WeightLoRAArgs | None = None,
) -> None:
    """Finetune a model with LoRA, the adapters placed by a plugin.

    Arguments:
        checkpoint_dir: The path to the base model's checkpoint directory to load for finetuning.
        out_dir: Directory in which to save checkpoints, logs, the placement and its report.
        plugin: How the adapters are placed: ``plop``, ``plop-inverse``, ``cka``, ``plop+cka`` (calibrated),
            ``weightlora``, ``weightlora+`` (learned while training, from every candidate kind in every layer),
            ``all``, ``attention``, ``qv``, ``mlp``, ``random`` (fixed; ``random`` draws its kinds with ``seed``),
            or ``none`` (exactly LitGPT's flags).
        precision: The precision to use for finetuning. Possible choices: "bf16-true", "bf16-mixed", "32-true".
        quantize: Quantize the base model's linears with bitsandbytes (QLoRA). On a GPU through Lightning's
            precision plugin as ``litgpt finetune_lora`` does; on CPU with bitsandbytes' CPU kernels (4-bit only).
        devices: How many devices/GPUs to use.
        num_nodes: How many nodes the code is being run on.
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
        weightlora: WeightLoRA's options (``weightlora``, ``weightlora+``): K, warm-up, gate learning rate, rounds.
    """
    if plugin not in PLUGINS:
        raise ValueError(f"Unknown plugin {plugin!r}; choose one of {list(PLUGINS)}")
    groups = {"calibration": calibration, "plop": plop, "cka": cka, "weightlora": weightlora}
    used = {  # which option groups each plugin reads
        "plop": ("calibration", "plop"), "plop-inverse": ("calibration", "plop"), "cka": ("calibration", "cka"),
        "plop+cka": ("calibration", "plop", "cka"), "weightlora": ("weightlora",), "weightlora+": ("weightlora",),
    }.get(plugin, ())  # fmt: skip
    unused = [f"--{name}.*" for name, group in groups.items() if group is not None and name not in used]
    if unused:
        raise ValueError(
            f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to --plugin {plugin!r}: pick a plugin"
            f" that uses {'it' if len(unused) == 1 else 'them'} (e.g. --plugin plop) or drop {'it' if len(unused) == 1 else 'them'}"
        )
    calibration = calibration or CalibrationArgs()
    plop = plop or PlopArgs()
    cka = cka or CkaArgs()
    weightlora = dataclasses.replace(weightlora or WeightLoRAArgs(), plus=plugin == "weightlora+")
    if calibration.file is not None:
        calibration_file_check(calibration.file)
    check_lr_schedule(train.lr_warmup_steps, train.max_steps)

    pprint(locals())
    checkpoint_dir = Path(checkpoint_dir)
    try:
        check_valid_checkpoint_dir(checkpoint_dir, verbose=False, raise_error=True)
    except FileNotFoundError:
        raise ValueError(
            f"{str(checkpoint_dir)!r} is not a LitGPT checkpoint directory: it needs lit_model.pth, model_config.yaml"
            " and the tokenizer files (make one with `litgpt download` or `litgpt convert_to_litgpt`)"
        ) from None
    data = Alpaca() if data is None else data
    devices = parse_devices(devices)
    out_dir = init_out_dir(out_dir)

    flags = candidate_flags(
        plugin,
        lora_query=lora_query,
        lora_key=lora_key,
        lora_value=lora_value,
        lora_projection=lora_projection,
        lora_mlp=lora_mlp,
        lora_head=lora_head,
    )
    config = Config.from_file(
        checkpoint_dir / "model_config.yaml", lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, **flags
    )
    if not kinds_from_flags(config, **flags):
        raise PlacementError("Every --lora_* flag is off: there are no candidate kinds to place LoRA on")

    precision = precision or get_default_supported_precision(training=True)
    logger = choose_logger(
        logger_name,
        out_dir,
        name=f"finetune-{config.name}",
        log_interval=train.log_interval,
        log_args=dataclasses.asdict(log),
    )

    plugins = None
    cpu_quantize = None
    if quantize is not None:
        if "mixed" in precision:
            raise ValueError("Quantization and mixed precision is not supported.")
        if torch.cuda.is_available():
            dtype = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "32-true": torch.float32}[precision]
            plugins = BitsandbytesPrecision(quantize[4:], dtype)
            precision = None
        elif quantize == "bnb.int8-training":
            raise ValueError(
                "--quantize bnb.int8-training needs a CUDA GPU. On CPU, 4-bit works: --quantize bnb.nf4, bnb.nf4-dq,"
                " bnb.fp4 or bnb.fp4-dq"
            )
        else:
            # Lightning refuses bitsandbytes precision on CPU; bitsandbytes' own CPU kernels quantize instead.
            cpu_quantize = quantize

    if devices * num_nodes > 1:
        raise NotImplementedError(
            "litgpt-plop finetune runs on one device. For data-parallel training with automatic placement use"
            " `litgpt_plop.callbacks.PLoPCallback` with a Lightning Trainer (DDP), or `litgpt finetune_lora` with the"
            " flags from `litgpt-plop plan`."
        )

    fabric = L.Fabric(devices=devices, num_nodes=num_nodes, precision=precision, loggers=logger, plugins=plugins)
    hparams = {
        "checkpoint_dir": str(checkpoint_dir),
        "out_dir": str(out_dir),
        "plugin": plugin,
        "precision": precision,
        "quantize": quantize,
        "devices": devices,
        "seed": seed,
        "data": {"class_path": f"{type(data).__module__}.{type(data).__qualname__}"},
        "train": dataclasses.asdict(train),
        "eval": dataclasses.asdict(eval),
        "optimizer": optimizer,
        "calibration": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(calibration).items()},
        "plop": dataclasses.asdict(plop),
        "cka": dataclasses.asdict(cka),
        "weightlora": dataclasses.asdict(weightlora),
    }
    fabric.launch(
        main,
        seed,
        config,
        data,
        checkpoint_dir,
        out_dir,
        train,
        eval,
        optimizer,
        plugin,
        calibration,
        plop,
        cka,
        weightlora,
        cpu_quantize,
        hparams,
    )


def candidate_flags(plugin: str, **flags: bool | None) -> dict[str, bool]:
    """Resolve unset ``lora_*`` flags: every kind but the head is a candidate for a plugin; LitGPT's defaults for none."""
    resolved = {}
    for name in LORA_FLAGS:
        value = flags.get(name)
        if value is None:
            value = LITGPT_DEFAULT_FLAGS.get(name, False) if plugin == "none" else name != "lora_head"
        resolved[name] = value
    return resolved


def calibration_file_check(path: Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--calibration.file {str(path)!r} does not exist")
    if not path.read_text().strip():
        raise ValueError(f"--calibration.file {str(path)!r} is empty: it must hold at least one prompt")


def main(
    fabric: L.Fabric,
    seed: int,
    config: Config,
    data: DataModule,
    checkpoint_dir: Path,
    out_dir: Path,
    train: TrainArgs,
    eval: EvalArgs,
    optimizer: str | dict,
    plugin: str,
    calibration: CalibrationArgs,
    plop: PlopArgs,
    cka: CkaArgs,
    weightlora: WeightLoRAArgs,
    cpu_quantize: str | None,
    hparams: dict[str, Any],
) -> None:
    litgpt_lora.validate_args(train, eval)

    tokenizer = Tokenizer(checkpoint_dir)
    train_dataloader, val_dataloader = litgpt_lora.get_dataloaders(fabric, data, tokenizer, train)
    steps_per_epoch = len(train_dataloader) // train.gradient_accumulation_iters(fabric.world_size, 1)
    lr_max_steps = min(train.epochs * steps_per_epoch, (train.max_steps or float("inf")))
    check_lr_schedule(train.lr_warmup_steps, lr_max_steps)

    fabric.seed_everything(seed)
    if fabric.global_rank == 0:
        os.makedirs(out_dir, exist_ok=True)

    with fabric.init_module(empty_init=False):
        model = GPT(config)
    model = fabric.setup_module(model)
    # Unlike ``litgpt finetune_lora``, the weights load before the optimizer exists: calibration needs them, and
    # the optimizer must hold exactly the placed adapters.
    load_checkpoint(fabric, model, checkpoint_dir / "lit_model.pth", strict=False)
    if cpu_quantize is not None:
        from litgpt_plop.quantize import quantize_linears_4bit

        quant_type = cpu_quantize[len("bnb.") :].removesuffix("-dq")
        count = quantize_linears_4bit(model, quant_type=quant_type, double_quant=cpu_quantize.endswith("-dq"))
        fabric.print(f"Quantized {count} linear layers to 4-bit ({cpu_quantize}) with bitsandbytes' CPU kernels")

    candidates = kinds_from_flags(config, **{f: getattr(config, f) for f in LORA_FLAGS})
    controller = None
    if plugin == "none":
        mark_only_lora_as_trainable(model)
        placement = current_placement(model.module)
        placement.method = "none"
    elif plugin in WEIGHTLORA_PLUGINS:
        # Gated adapters on every candidate site; the K that survive the warm-up are the placement.
        placement = Placement.from_kinds(
            config, candidates, rank=config.lora_r, lora_alpha=config.lora_alpha, method=plugin
        )
        placement.lora_dropout = config.lora_dropout
        controller = WeightLoRAController(model, placement, weightlora, max_steps=lr_max_steps, seed=seed)
    else:
        token_ids = None
        if plugin in CALIBRATED_METHODS:
            token_ids = calibration_token_ids(calibration, tokenizer, data)
        t0 = time.perf_counter()
        placement = decide_placement(
            model.module, plugin, token_ids, candidates, config.lora_r, config.lora_alpha, calibration, plop, cka, seed
        )
        placement.lora_dropout = config.lora_dropout
        fabric.print(f"Placement decided in {time.perf_counter() - t0:.1f}s:")
        apply_placement(model.module, placement)
    if fabric.global_rank == 0:
        write_outputs(placement, model.config, out_dir)
    fabric.print(summary_table(placement, model.config))

    trainable = num_parameters(model, requires_grad=True)
    fabric.print(f"Number of trainable parameters: {trainable:,}")
    fabric.print(f"Number of non-trainable parameters: {num_parameters(model, requires_grad=False):,}")
    fabric.log_dict({"trainable_params": trainable})
    expected = placement.trainable_params(model.config)
    if trainable != expected:
        raise RuntimeError(f"{trainable:,} parameters are trainable, but the placement implies {expected:,}")

    if isinstance(fabric.strategy.precision, BitsandbytesPrecision):
        optimizer = instantiate_bnb_optimizer(optimizer, model.parameters())

        from bitsandbytes.nn import StableEmbedding

        old_embedding = model.transformer.wte
        model.transformer.wte = StableEmbedding(old_embedding.num_embeddings, old_embedding.embedding_dim)
        with torch.no_grad():
            model.transformer.wte.weight.copy_(old_embedding.weight)
        model.transformer.wte = model.transformer.wte.to(
            device=old_embedding.weight.device, dtype=old_embedding.weight.dtype
        )
    else:
        optimizer = instantiate_torch_optimizer(optimizer, model.parameters())
    optimizer = fabric.setup_optimizers(optimizer)
    scheduler = litgpt_lora.get_lr_scheduler(optimizer, warmup_steps=train.lr_warmup_steps, max_steps=lr_max_steps)

    save = AdapterSaver(placement, checkpoint_dir, data, hparams)
    if controller is not None:
        # after every optimizer step: threshold the gates, grow ranks, and at the end of the warm-up prune and fold
        def placement_changed(events: list[str]) -> None:
            save.placement = controller.placement
            fabric.print(f"WeightLoRA: {', '.join(events)}: {len(controller.placement.sites)} adapters")

        controller.attach(optimizer, on_change=placement_changed)
    train_time = time.perf_counter()
    with save.inside_litgpt_fit():
        token_counts = litgpt_lora.fit(
            fabric=fabric,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            train_dataloader=train_dataloader,
            val_dataloader=val_dataloader,
            devices=fabric.world_size,
            checkpoint_dir=checkpoint_dir,
            out_dir=out_dir,
            train=train,
            eval=eval,
            data=data,
        )
    fabric.print(create_finetuning_performance_report(time.perf_counter() - train_time, token_counts, fabric.device.type))

    if eval.final_validation:
        val_loss = litgpt_lora.validate(
            fabric, model, val_dataloader, dataclasses.replace(eval, max_iters=len(val_dataloader))
        )
        fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)})
        fabric.print(f"Final evaluation | val loss: {val_loss.item():.3f} | val ppl: {math.exp(val_loss):.3f}")

    if controller is not None:
        placement = save.placement = controller.placement
        if fabric.global_rank == 0:
            controller.write_outputs(out_dir)  # gates.json, gates.png
            write_outputs(placement, model.config, out_dir)
    final_dir = out_dir / "final"
    save(fabric, model, final_dir / "lit_model.pth.lora")
    fabric.barrier()
    if fabric.global_rank == 0:
        write_outputs(placement, model.config, final_dir)
        # Merging reads the dense base checkpoint, so a 4-bit run on CPU merges into full-precision weights too.
        merge_lora(checkpoint_dir=final_dir, pretrained_checkpoint_dir=checkpoint_dir, precision=hparams["precision"])
        fabric.print(f"Saved the adapter, the merged model and the placement report to {str(final_dir)!r}")
    fabric.barrier()
    # LitGPT's CSV logger writes only every `log_interval` steps; flush what is left
    for logger in fabric.loggers:
        logger.finalize("success")


class AdapterSaver:
    """Saves adapters in stock LitGPT layout with the placement's flags, wherever ``litgpt``'s loop saves.

    LitGPT's ``fit`` saves periodic checkpoints through module-level ``save_lora_checkpoint`` and
    ``save_hyperparameters`` (the latter re-parses ``sys.argv`` against its own ``setup``, which our flags would
    break). ``inside_litgpt_fit`` points both at this object for the duration of the loop, so every checkpoint,
    periodic or final, loads in stock ``litgpt merge_lora``/``generate``.
    """

    def __init__(self, placement: Placement, checkpoint_dir: Path, data: DataModule, hparams: dict[str, Any]) -> None:
        self.placement = placement
        self.checkpoint_dir = checkpoint_dir
        self.data = data
        self.hparams = hparams

    def __call__(self, fabric: L.Fabric, model: torch.nn.Module, file_path: Path) -> None:
        state_dict = to_stock_state_dict(model.module if hasattr(model, "module") else model)
        if fabric.global_rank != 0:
            return
        file_path.parent.mkdir(parents=True, exist_ok=True)
        # merged weights of an earlier save no longer match, and `merge_lora` would skip a directory that has them
        (file_path.parent / "lit_model.pth").unlink(missing_ok=True)
        tmp = file_path.with_name(file_path.name + ".tmp")
        torch.save({"model": {k: v.cpu() for k, v in state_dict.items()}}, tmp)
        os.replace(tmp, file_path)
        copy_config_files(self.checkpoint_dir, file_path.parent)
        self.save_hyperparameters(file_path.parent)
        save_prompt_style(self.data.prompt_style, file_path.parent)
        self.placement.save(file_path.parent / "placement.json", Config.from_file(self.checkpoint_dir / "model_config.yaml"))

    def save_hyperparameters(self, directory: Path) -> None:
        """``hyperparameters.yaml`` with the placement's ``lora_*`` flags, which is what stock loaders rebuild from."""
        text = yaml.safe_dump({**self.hparams, **self.placement.flags()}, sort_keys=False)
        tmp = directory / "hyperparameters.yaml.tmp"
        tmp.write_text(text)
        os.replace(tmp, directory / "hyperparameters.yaml")

    @contextlib.contextmanager
    def inside_litgpt_fit(self) -> Iterator[None]:
        saved = litgpt_lora.save_lora_checkpoint, litgpt_lora.save_hyperparameters
        litgpt_lora.save_lora_checkpoint = self
        litgpt_lora.save_hyperparameters = lambda _function, directory: self.save_hyperparameters(directory)
        try:
            yield
        finally:
            litgpt_lora.save_lora_checkpoint, litgpt_lora.save_hyperparameters = saved

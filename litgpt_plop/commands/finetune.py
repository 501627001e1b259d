"""``litgpt-plop finetune``: LitGPT's LoRA finetuning with the adapters placed by a plugin.

``setup`` checks the options, builds the ``Run`` and launches Fabric; what happens inside it (load, place, train,
save) is ``litgpt_plop.commands.training``. ``--plugin none`` trains exactly what ``litgpt finetune_lora`` trains
with the same flags.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import lightning as L
from litgpt.args import EvalArgs, LogArgs, TrainArgs
from litgpt.data import Alpaca, DataModule
from litgpt.lora import Config
from litgpt.types import LoggerChoice
from litgpt.utils import choose_logger, get_default_supported_precision, init_out_dir, parse_devices

from litgpt_plop.args import CalibrationArgs, CkaArgs, KappaArgs, PlopArgs
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
from litgpt_plop.commands.training import Run, main
from litgpt_plop.errors import InputError
from litgpt_plop.model.checkpoint import PRECISION_DTYPES
from litgpt_plop.model.devices import FABRIC_PRECISIONS, precision_and_quantization, strategy_for
from litgpt_plop.model.quantize import QuantizeChoice
from litgpt_plop.race import RaceArgs
from litgpt_plop.race.candidates import candidate_names, prompts_method
from litgpt_plop.selection.methods import Method, check_option_groups, get_method
from litgpt_plop.selection.placement import LORA_FLAGS, PlacementError, kinds_from_flags, model_kinds
from litgpt_plop.weightlora import WeightLoRAArgs, check_litgpt_warmup

# LitGPT's own defaults for ``finetune_lora``: what an unset flag means with ``--plugin none``.
LITGPT_DEFAULT_FLAGS = {"lora_query": True, "lora_value": True}


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
    race: RaceArgs = RaceArgs(),
) -> None:
    """Finetune a model with LoRA, the adapters placed by a plugin.

    Arguments:
        checkpoint_dir: The path to the base model's checkpoint directory to load for finetuning.
        out_dir: Directory in which to save checkpoints, logs, the placement and its report.
        plugin: How the adapters are placed: ``plop``, ``plop-inverse``, ``cka``, ``plop+cka`` (calibrated),
            ``kappa`` (the weights with the lowest condition number, no data),
            ``weightlora``, ``weightlora+`` (learned while training, from every candidate kind in every layer),
            ``all``, ``attention``, ``qv``, ``mlp``, ``random`` (fixed; ``random`` draws its kinds with ``seed``),
            ``race`` (candidate placements train side by side, the best on validation loss trains on),
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
        race: the race's options (``race``): the candidates, the steps spent on losers, how many each round drops.
    """
    # Everything that can be checked before loading weights is checked first.
    method = get_method(plugin, what="plugin")
    check_option_groups(
        method, "--plugin", calibration=calibration, plop=plop, cka=cka, kappa=kappa, weightlora=weightlora, race=race
    )
    if method.kind == "race":
        race = dataclasses.replace(race, candidates=candidate_names(race))
    if calibration.file is not None:
        check_text_file(calibration.file, "--calibration.file")
    check_lr_schedule(train.lr_warmup_steps, train.max_steps)
    if method.kind == "gated":  # LitGPT's first step has learning rate 0: refuse a cut before the gates can move
        check_litgpt_warmup(dataclasses.replace(weightlora, plus=plugin == "weightlora+"), train.max_steps)
    check_lora(lora_r, lora_alpha, lora_dropout)
    check_precision(precision, PRECISION_DTYPES if quantize else FABRIC_PRECISIONS)
    check_calibration_prompts(prompts_method(method, race), cka, calibration.num_samples, "--plugin")
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
           {"calibration": calibration, "plop": plop, "cka": cka, "kappa": kappa, "weightlora": weightlora,
            "race": race}.items()
           if name in method.option_groups},
    }  # fmt: skip
    run = Run(
        checkpoint_dir=checkpoint_dir, out_dir=out_dir, method=method, config=config, candidates=candidates, rank=rank,
        data=data, train=train, eval=eval, optimizer=optimizer, seed=seed, cpu_quantize=cpu_quantize,
        calibration=calibration, plop=plop, cka=cka, kappa=kappa,
        weightlora=dataclasses.replace(weightlora, plus=plugin == "weightlora+"), race=race, hparams=hparams,
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



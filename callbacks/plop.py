r"""
PLoP Callback
^^^^^^^^^^^^^

Place LoRA adapters on a LitGPT model automatically at the start of ``Trainer.fit``: calibrate on a few batches,
score the modules (PLoP, layer-wise CKA, both) or take a fixed preset, put adapters exactly there and freeze the
rest, all before the optimizers are built.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from litgpt import Config
from torch.utils.data import DataLoader

from litgpt_plop.model.adapt import apply_placement
from litgpt_plop.args import CalibrationArgs, CkaArgs, PlopArgs
from litgpt_plop.scoring.prompts import data_module_prompts
from litgpt_plop.model.export import write_placement_files
from litgpt_plop.args import KappaArgs
from litgpt_plop.selection.methods import DECIDED_BEFORE_TRAINING, get_method
from litgpt_plop.model.modules import find_gpt
from litgpt_plop.selection.placement import Placement, PlacementError, model_kinds
from litgpt_plop.reports.placement import summary_table
from litgpt_plop.decide import decide_placement

log = logging.getLogger(__name__)

# Strategies under which every rank holds the whole model, so the placement can be applied to it in place.
SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")


class PLoPCallback(Callback):
    r"""Decide where LoRA goes and put it there, before the optimizers exist.

    The LightningModule must hold a LitGPT ``GPT`` (``litgpt.model.GPT`` or ``litgpt.lora.GPT``, dense or
    bitsandbytes 4-bit): found automatically, or named by ``model_attr``. Before the optimizers are built the
    callback calibrates (for ``plop``, ``plop-inverse``, ``cka``, ``plop+cka``), applies the placement in place,
    leaves only the adapters trainable, writes ``placement.json``, ``report.md`` and ``scores.png`` to the
    Trainer's log directory and logs the scores and the chosen sites through the Trainer's loggers, as metrics at
    step 0 (``placement_metrics``). On a single device that happens right before
    ``configure_optimizers`` (so a model built in ``configure_model`` works, and calibration runs on the device, in
    4-bit under ``BitsandbytesPrecision``); under DDP in ``setup``, before the model is wrapped.

    Resuming from a checkpoint re-applies the checkpoint's placement before its weights load, so the adapter
    weights load into the same shapes; on a single device nothing is calibrated then (under DDP the fresh
    calibration in ``setup`` is replaced by the checkpoint's placement).

    Args:
        method: ``plop``, ``plop-inverse``, ``cka``, ``plop+cka``, ``kappa`` (from the weights alone: no
            calibration data is read), or a preset: ``all``, ``attention``, ``qv``, ``mlp``, ``random``.
        calibration_data: where calibration prompts come from: a ``DataLoader`` (batches of token ids, or dicts
            with ``input_ids``), a LitGPT ``DataModule`` (its training prompts, without responses; needs
            ``tokenizer``), an ``int`` (that many batches of the Trainer's own training data), or ``None`` (the
            Trainer's training data, up to ``calibration.num_samples`` sequences).
        tokenizer: a ``litgpt.Tokenizer``, needed only when ``calibration_data`` is a LitGPT ``DataModule``.
        model_attr: the attribute path of the LitGPT model in the LightningModule (e.g. ``"model"``); default:
            the first ``GPT`` found.
        lora_r: LoRA rank of every chosen site.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        candidate_kinds: the kinds the method may choose from; default every linear but the head.
        calibration: options of the calibration pass (``num_samples``, ``batch_size``, ``max_seq_length``, ``seed``).
        plop: PLoP's options.
        cka: layer-wise CKA's options.
        kappa: kappa's options (``kappa`` only).
        out_dir: where the placement and its report go; default ``trainer.log_dir``.
    """

    def __init__(
        self,
        method: str = "plop",
        calibration_data: DataLoader | Any | int | None = None,
        tokenizer: Any | None = None,
        model_attr: str | None = None,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        candidate_kinds: Iterable[str] | None = None,
        calibration: CalibrationArgs | None = None,
        plop: PlopArgs | None = None,
        cka: CkaArgs | None = None,
        out_dir: str | Path | None = None,
        kappa: KappaArgs | None = None,
    ) -> None:
        self._method = get_method(method, *DECIDED_BEFORE_TRAINING)
        if isinstance(calibration_data, int) and calibration_data <= 0:
            raise ValueError(f"calibration_data as a number of batches must be positive, got {calibration_data}")
        self.method = method
        self.calibration_data = calibration_data
        self.tokenizer = tokenizer
        self.model_attr = model_attr
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.candidate_kinds = None if candidate_kinds is None else list(candidate_kinds)
        self.calibration = calibration or CalibrationArgs()
        self.plop = plop or PlopArgs()
        self.cka = cka or CkaArgs()
        self.kappa = kappa or KappaArgs()
        self.out_dir = out_dir
        self.placement: Placement | None = None
        # read from a checkpoint being resumed: a placement to re-apply, not recalibrate
        self._restored: Placement | None = None
        self.calibrated = False
        self._intercepted: list[str] = []
        self._trainer: pl.Trainer | None = None
        self._pl_module: pl.LightningModule | None = None

    # ---- Lightning hooks -----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_strategy(trainer)
        self._trainer, self._pl_module = trainer, pl_module
        # Lightning restores a checkpoint's weights after ``setup`` and only then this callback's state, so a resumed
        # run's placement must be read from the checkpoint in the LightningModule's ``on_load_checkpoint``, which
        # runs just before the weights load. Both interceptions are undone in ``on_fit_start``.
        self._intercept(pl_module, "on_load_checkpoint", self._before_weights_load)
        if type(trainer.strategy).__name__ == "SingleDeviceStrategy":
            # Place as late as possible but before the optimizers exist: after a resume has restored the placement
            # (no calibration then), with the model already on its device and converted by the precision plugin.
            self._intercept(pl_module, "configure_optimizers", lambda: self._place_if_needed(trainer, pl_module))
        else:
            # DDP wraps the model before building the optimizers: the adapters must exist before that.
            self._place_if_needed(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_intercepted(pl_module)
        if self.placement is None:
            raise PlacementError(self._no_model_message(pl_module))

    def state_dict(self) -> dict[str, Any]:
        return {"placement": self.placement.to_dict() if self.placement is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("placement") is not None:
            self._restored = Placement.from_dict(state_dict["placement"])

    def _place_if_needed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.placement is not None:
            return
        gpt = find_gpt(pl_module, self.model_attr)
        if gpt is None:
            if type(trainer.strategy).__name__ == "SingleDeviceStrategy":
                raise PlacementError(self._no_model_message(pl_module))
            return  # maybe created in configure_model; ``on_fit_start`` says so if it never appears
        self._place(trainer, pl_module, gpt)

    def _before_weights_load(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None or state.get("placement") is None:
            return
        self._restored = Placement.from_dict(state["placement"])
        gpt = find_gpt(self._pl_module, self.model_attr)
        if gpt is None:
            raise PlacementError(self._no_model_message(self._pl_module))
        if self.placement is None or self.placement.sites != self._restored.sites:
            self._place(self._trainer, self._pl_module, gpt)

    def _intercept(self, pl_module: pl.LightningModule, hook: str, before: Any) -> None:
        """Run ``before`` ahead of the module's own ``hook`` for this fit (an instance attribute, removed later)."""
        original = getattr(pl_module, hook)

        def hook_with_placement(*args: Any, **kwargs: Any) -> Any:
            before(*args, **kwargs)
            return original(*args, **kwargs)

        setattr(pl_module, hook, hook_with_placement)
        self._intercepted.append(hook)

    def _restore_intercepted(self, pl_module: pl.LightningModule) -> None:
        for hook in self._intercepted:
            if hook in vars(pl_module):
                delattr(pl_module, hook)
        self._intercepted = []

    def _no_model_message(self, pl_module: pl.LightningModule) -> str:
        where = f" at {self.model_attr!r}" if self.model_attr else ""
        return (
            f"PLoPCallback found no LitGPT GPT model in {type(pl_module).__name__}{where}: hold a litgpt.model.GPT or"
            " litgpt.lora.GPT as an attribute (under DDP: created in __init__ or setup), or pass model_attr"
        )

    # ---- the work ------------------------------------------------------------------------------------------

    def _place(self, trainer: pl.Trainer, pl_module: pl.LightningModule, gpt: torch.nn.Module) -> None:
        if self._restored is not None:
            placement = self._restored
            rank_zero_info(f"PLoPCallback: re-applying the checkpoint's placement ({placement.method}), no calibration")
        else:
            self._prepare_for_calibration(trainer, pl_module)
            candidates = self.candidate_kinds or list(model_kinds(gpt.config))
            token_ids = self._calibration_token_ids(trainer) if self._method.calibrates else None
            placement = decide_placement(
                gpt, self.method, token_ids, candidates, self.lora_r, self.lora_alpha, self.lora_dropout,
                calibration=self.calibration, plop=self.plop, cka=self.cka, kappa=self.kappa,
            )  # fmt: skip
            self.calibrated = self._method.calibrates
        apply_placement(gpt, placement)
        # Only the adapters train: freeze whatever else the LightningModule holds too.
        for name, param in pl_module.named_parameters():
            param.requires_grad = "lora_" in name
        self.placement = placement
        self._report(trainer, gpt)

    def _prepare_for_calibration(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Calibrate where training will run and with the weights it will use: on the device, and in 4-bit under
        ``BitsandbytesPrecision`` (whose conversion would otherwise only happen after this hook)."""
        from lightning.pytorch.plugins.precision import BitsandbytesPrecision

        if isinstance(trainer.precision_plugin, BitsandbytesPrecision):
            trainer.precision_plugin.convert_module(pl_module)
        pl_module.to(trainer.strategy.root_device)

    def _calibration_token_ids(self, trainer: pl.Trainer) -> list[torch.Tensor]:
        source = self.calibration_data
        limit = self.calibration.num_samples
        if source is not None and not isinstance(source, (int, DataLoader)) and hasattr(source, "connect"):
            if self.tokenizer is None:
                raise ValueError("PLoPCallback: calibrating on a LitGPT DataModule needs `tokenizer=`")
            return data_module_prompts(source, self.tokenizer, limit, self.calibration.seed)
        if source is None or isinstance(source, int):
            max_batches = source if isinstance(source, int) else None
            source = self._trainer_train_dataloader(trainer)
        else:
            max_batches = None
            if hasattr(source, "train_dataloader"):  # a LightningDataModule
                source = source.train_dataloader()
        token_ids = token_ids_from_batches(source, limit, max_batches)
        if not token_ids:
            raise ValueError("PLoPCallback: the calibration data is empty (the loader yielded no sequences)")
        return token_ids

    @staticmethod
    def _trainer_train_dataloader(trainer: pl.Trainer) -> Iterable:
        if trainer.datamodule is not None:
            return trainer.datamodule.train_dataloader()
        # ``fit(model, train_dataloaders=...)``: the loader the fit loop will use; it is only set up after this hook
        source = trainer.fit_loop._data_source
        if source.is_defined():
            return source.dataloader()
        raise ValueError("PLoPCallback: no calibration_data given and the Trainer has no training data to take it from")

    def _report(self, trainer: pl.Trainer, gpt: torch.nn.Module) -> None:
        placement = self.placement
        config = gpt.config
        # ``trainer.log_dir`` broadcasts from rank 0, so every rank must ask for it
        out_dir = Path(self.out_dir or trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:  # every rank holds the same placement: rank 0 tells it
            for logger in trainer.loggers:
                logger.log_metrics(placement_metrics(placement, config), step=0)
                logger.log_hyperparams({"plop_placement": {"method": placement.method, **placement.flags()}})
            write_placement_files(placement, config, out_dir)
            rank_zero_info(summary_table(placement, config))
            rank_zero_info(f"PLoPCallback: wrote placement.json, report.md and scores.png to {str(out_dir)!r}")

    # ---- finding things ------------------------------------------------------------------------------------

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        name = type(trainer.strategy).__name__
        if name not in SUPPORTED_STRATEGIES:
            raise PlacementError(
                f"PLoPCallback supports {list(SUPPORTED_STRATEGIES)}, not {name}: sharded strategies (FSDP, DeepSpeed,"
                " model parallel) split the weights the placement must be applied to. Use strategy='ddp' or a single"
                " device"
            )


def placement_metrics(placement: Placement, config: Config) -> dict[str, float]:
    """What the callback logs, one number per name, so that CSV or TensorBoard shows the decision beside the loss:

    * ``plop/nfn/<kind>``: PLoP's NFN of each candidate kind (what PLoP ranks; calibrated PLoP methods);
    * ``plop/cka/<layer>``: each candidate layer's CKA (CKA methods);
    * ``plop/kappa/<kind>``: each kind's condition number (geometric mean over the layers), when computed;
    * ``plop/sites``: how many sites got an adapter; ``plop/trainable_params``: the adapters' parameters;
    * ``plop/adapted/<layer>.<kind>``: 1.0 for each site that got an adapter. Only those are logged: a 0.0 for
      every other candidate would add a column that never holds anything else (SmolLM2-135M has 210 candidate
      sites), and the chosen sites' ranks are in the hyperparameters (``lora_r``) and ``placement.json``.
    """
    scores = placement.scores
    metrics = {f"plop/nfn/{kind}": float(score) for kind, score in scores.nfn_per_kind.items()}
    metrics.update({f"plop/cka/{layer}": float(score) for layer, score in scores.cka_per_layer.items()})
    metrics.update({f"plop/kappa/{kind}": float(score) for kind, score in scores.kappa_per_kind.items()})
    metrics["plop/sites"] = float(len(placement.sites))
    metrics["plop/trainable_params"] = float(placement.trainable_params(config))
    metrics.update({f"plop/adapted/{site.key}": 1.0 for site in placement.sites})
    return metrics


def token_ids_from_batches(batches: Iterable, num_samples: int, max_batches: int | None = None) -> list[torch.Tensor]:
    """Unpadded token id rows from training batches, at most ``num_samples`` of them.

    A batch is a tensor of token ids or a mapping with ``input_ids``; the real length of each row comes from
    ``attention_mask``, or LitGPT's SFT ``token_counts["raw_plus_prompt_template"]``, or is the full row.
    """
    token_ids: list[torch.Tensor] = []
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        if isinstance(batch, Mapping):
            if "input_ids" not in batch:
                raise ValueError(f"Calibration batch {index} has no 'input_ids' (keys: {sorted(batch)})")
            input_ids = batch["input_ids"]
            if "attention_mask" in batch:
                lengths = batch["attention_mask"].sum(dim=-1)
            elif isinstance(batch.get("token_counts"), Mapping) and "raw_plus_prompt_template" in batch["token_counts"]:
                lengths = batch["token_counts"]["raw_plus_prompt_template"]
            else:
                lengths = None
        elif isinstance(batch, torch.Tensor):
            input_ids, lengths = batch, None
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            input_ids, lengths = batch[0], None
        else:
            raise ValueError(f"Calibration batch {index} is a {type(batch).__name__}; expected token ids or a dict")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        for row in range(input_ids.size(0)):
            length = int(lengths[row]) if lengths is not None else input_ids.size(1)
            token_ids.append(input_ids[row, :length].detach().long().cpu())
            if len(token_ids) >= num_samples:
                return token_ids
    return token_ids

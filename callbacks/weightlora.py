r"""
WeightLoRA Callback
^^^^^^^^^^^^^^^^^^^

Train gated LoRA adapters on every candidate site, keep only the K whose gates matter, and continue as plain LoRA
on those (WeightLoRA; WeightLoRA+ also spends the freed budget on higher ranks), all inside ``Trainer.fit``.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from litgpt_plop.model.adapt import current_placement
from litgpt_plop.model.export import write_placement_files
from litgpt_plop.model.modules import find_gpt
from litgpt_plop.selection.placement import Placement, PlacementError, preset
from litgpt_plop.weightlora import WeightLoRAArgs, WeightLoRAController

# Strategies under which every rank holds the whole model: pruning then runs identically on every rank (the gates'
# gradient is averaged over ranks by the controller) and, under DDP, the model gets a new DDP wrapper after each cut
# (``rewrap_ddp``). Sharded strategies split the parameters the cuts remove or grow.
SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")


class WeightLoRACallback(Callback):
    r"""Keep only the K LoRA adapters that matter, chosen by trainable gates during a warm-up.

    In ``setup`` (before the optimizers exist) the candidate adapters are put on the LitGPT model, each with a
    gate; the LightningModule's ``configure_optimizers`` then builds the main optimizer from the trainable (adapter)
    parameters as usual, while the gates get their own SGD here. After every optimizer step (detected in
    ``on_train_batch_end`` from ``trainer.global_step``, so gradient accumulation steps the gates once per
    optimizer step, on the accumulated gradients) the gates are stepped and, once they have moved, hard-thresholded
    to the top K (or, with ``WeightLoRAArgs.budget``, the largest that fit it). At the end of the warm-up (later if
    the gates have not moved since the previous change: a cut never chooses among gates that did not move) the
    zero-gated adapters are removed, their parameters and state leave ``trainer.optimizers[0]`` (edited in place,
    so LR schedulers keep working), the gates are folded into B and training continues as plain LoRA. Gate values
    go to the Trainer's loggers; ``placement.json``, ``gates.json`` and ``gates.png`` go to the log directory on
    rank 0 (after each WeightLoRA+ round, at the end of the warm-up and at the end of fit). Resuming from a
    checkpoint restores the adapter structure (the final placement, or the gated adapters and their gates
    mid-warm-up) before the weights load.

    Under DDP (``strategy="ddp"``, ``"ddp_spawn"``) the gates' gradient is averaged over ranks before each gate step,
    so every rank thresholds the same gates and cuts the same adapters, and after each cut the LightningModule gets
    a new DDP wrapper holding the adapters that are left (the old one's reducer waits for the removed parameters).

    Args:
        weightlora: K or a parameter budget, warm-up, gate optimizer, WeightLoRA+ (see ``WeightLoRAArgs``).
        candidates: the adapters to choose from: a ``Placement`` (e.g. PLoP's), a path to a ``placement.json``, a
            preset name (``all``, ``attention``, ``mlp``, ... at rank ``lora_r``) or ``"current"`` (the adapters
            already on the model when ``setup`` runs, e.g. a ``litgpt.lora.GPT`` built with flags; on one device
            ``PLoPCallback`` places later, so pass its saved ``placement.json`` instead).
        model_attr: the attribute path of the LitGPT model in the LightningModule; default: the first ``GPT`` found.
        lora_r: LoRA rank of every candidate, for a preset.
        lora_alpha: LoRA alpha, for a preset.
        lora_dropout: LoRA dropout, for a preset.
        out_dir: where the placement and the gates' plot go; default ``trainer.log_dir``.
        seed: seed of the random directions WeightLoRA+ adds when a rank grows.
    """

    def __init__(
        self,
        weightlora: WeightLoRAArgs | None = None,
        candidates: Placement | str | Path = "all",
        model_attr: str | None = None,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        out_dir: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        self.args = weightlora or WeightLoRAArgs()
        self.candidates = candidates
        self.model_attr = model_attr
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.out_dir = out_dir
        self.seed = seed
        self.controller: WeightLoRAController | None = None
        # set by ``load_state_dict`` or read from ``trainer.ckpt_path``: a saved state to rebuild instead of starting
        self._restored: dict[str, Any] | None = None
        self._last_step = 0
        self._grad_scale = 1.0

    @property
    def placement(self) -> Placement | None:
        """The adapters on the model now; the final placement once the warm-up is over."""
        return self.controller.placement if self.controller is not None else None

    # ---- Lightning hooks -----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_strategy(trainer)
        gpt = find_gpt(pl_module, self.model_attr)
        if gpt is None:
            raise PlacementError(
                f"WeightLoRACallback found no LitGPT GPT model in {type(pl_module).__name__}"
                + (f" at {self.model_attr!r}" if self.model_attr else "")
                + " during setup: hold a litgpt.model.GPT or litgpt.lora.GPT as an attribute created in __init__"
                " (models created in configure_model are not supported), or pass model_attr"
            )
        if self._restored is None and trainer.ckpt_path:
            self._restored = self._state_from_checkpoint(trainer.ckpt_path)
        max_steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps > 0 else None
        if self._restored is not None:
            self.controller = WeightLoRAController.from_state_dict(gpt, self._restored, max_steps, self.seed)
            c = self.controller
            rank_zero_info(f"WeightLoRACallback: resumed at step {c.step} ({c.placement.method})")
        else:
            candidates = self._candidates(gpt)
            self.controller = WeightLoRAController(gpt, candidates, self.args, max_steps, self.seed)
            c = self.controller
            keeping = f"{c.k >> c.rounds}" if c.budget is None else f"the largest gates within {c.budget:,} parameters"
            rank_zero_info(
                f"WeightLoRACallback: {c.num_candidates} gated candidate adapters ({candidates.method}); keeping"
                f" {keeping} after a {self.args.warmup_steps}-step warm-up (later if the gates have not moved)"
                + (f" ({c.rounds} WeightLoRA+ rounds at steps {c.round_at})" if c.rounds else "")
            )
        # Only the adapters train: freeze whatever else the LightningModule holds too.
        for name, param in pl_module.named_parameters():
            param.requires_grad = "lora_" in name

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.controller.to(pl_module.device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"WeightLoRACallback needs exactly one optimizer, the Trainer has {len(trainer.optimizers)}"
            )
        total = trainer.estimated_stepping_batches
        if not self.controller.finished and math.isfinite(total) and self.args.warmup_steps > total:
            raise ValueError(
                f"The WeightLoRA warm-up ({self.args.warmup_steps} steps) is longer than the run ({int(total)}"
                " optimizer steps): the placement would never be final"
            )
        self._last_step = trainer.global_step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Under fp16 mixed precision the gradients (the gates' too) carry the loss scale; Lightning unscales only
        # the main optimizer's. The scale used for this step is still the current one here (updated after the step).
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._grad_scale = float(scaler.get_scale()) if scaler is not None else 1.0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step <= self._last_step:  # accumulating gradients: no optimizer step on this batch
            return
        self._last_step = step
        controller = self.controller
        if controller.finished:
            return
        events = controller.on_optimizer_step(step, trainer.optimizers[0], self._grad_scale)
        self._grad_scale = 1.0
        if events or step % max(1, trainer.log_every_n_steps) == 0:
            self._log(trainer, controller)
        for event in events:
            rank_zero_info(
                f"WeightLoRACallback: step {step}, {event}: {sum(controller.alive)} adapters"
                f" {[f'{s.key}@{s.rank}' for s in controller.placement.sites]}"
            )
        if events:
            rewrap_ddp(trainer)
            self._write(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.controller is not None and (warning := self.controller.not_final_warning()):
            rank_zero_warn(f"WeightLoRACallback: {warning}")
        self._write(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict() if self.controller is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("controller")
        if state is None:
            return
        if self.controller is not None:
            self.controller.load_state_dict(state)
        else:
            self._restored = state

    # ---- the work ------------------------------------------------------------------------------------------

    def _candidates(self, gpt: torch.nn.Module) -> Placement:
        source = self.candidates
        if isinstance(source, Placement):
            return source
        if isinstance(source, Path) or (isinstance(source, str) and source.endswith(".json")):
            return Placement.load(Path(source), gpt.config)
        if source == "current":
            placement = current_placement(gpt, method="current")
            if not placement.sites:
                raise PlacementError(
                    "WeightLoRACallback(candidates='current'): the model has no adapters when this callback's setup"
                    " runs. On one device PLoPCallback places its adapters later (just before configure_optimizers),"
                    " so pass its decision instead: candidates=Placement.load('placement.json') from"
                    " `litgpt-plop plan`, or a Placement object"
                )
            return placement
        return preset(source, gpt.config, rank=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout)

    def _log(self, trainer: pl.Trainer, controller: WeightLoRAController) -> None:
        metrics = {
            "weightlora/adapters": float(sum(controller.alive)),
            "weightlora/k": float(controller.k_now),
            "weightlora/trainable_params": float(controller.placement.trainable_params(controller.gpt.config)),
        }
        metrics.update({f"weightlora/gate/{key}": value for key, value in controller.gate_values().items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _write(self, trainer: pl.Trainer) -> None:
        if self.controller is None:
            return
        # ``trainer.log_dir`` broadcasts from rank 0, so every rank must ask for it
        out_dir = Path(self.out_dir or trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        controller = self.controller
        write_placement_files(controller.placement, controller.gpt.config, out_dir, controller.report_files())

    # ---- finding things ------------------------------------------------------------------------------------

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        name = type(trainer.strategy).__name__
        if name not in SUPPORTED_STRATEGIES:
            raise PlacementError(
                f"WeightLoRACallback supports {list(SUPPORTED_STRATEGIES)}, not {name}: removing adapters during"
                " training changes the parameters a sharded strategy has split over the ranks. Use strategy='ddp' or a"
                " single device"
            )

    def _state_from_checkpoint(self, ckpt_path: str | Path) -> dict[str, Any] | None:
        """The controller state saved in a Lightning checkpoint. Lightning restores callback state only after
        ``setup``, and the adapters must have their saved shapes before the model's weights load, so read it here."""
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        return None if state is None else state.get("controller")


def rewrap_ddp(trainer: pl.Trainer) -> None:
    """Give the LightningModule a new DDP wrapper after adapters were removed or replaced: the old wrapper's reducer
    holds the parameters it was built with, would wait forever for the removed ones and never average new ones. The
    new wrapper checks that every rank has the same parameter shapes (ranks that cut differently fail loudly)."""
    strategy = trainer.strategy
    if not isinstance(strategy.model, DistributedDataParallel):
        return
    old = strategy.model
    strategy.model = strategy._setup_model(strategy.lightning_module)
    strategy._register_ddp_hooks()
    del old
    gc.collect()  # the old reducer's autograd hooks on the kept parameters go with it

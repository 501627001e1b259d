"""Save a placed model so that stock LitGPT can use it, and load it back with its exact placement.

``save_adapter`` is the one writer of an adapter directory: the command line, the callbacks and the Python API
all write through it. The directory is built whole in a staging directory and swapped in at the end
(``litgpt_plop.atomic.replace_directory``), merged model included: a run killed at any moment, SIGKILL
included, leaves ``out_dir`` either as the previous complete save left it or as the new complete save, never a
mixture, and never a half-written ``lit_model.pth`` that ``litgpt merge_lora`` would take for a finished merge.
The adapter file is in stock LitGPT layout (``litgpt_plop.model.stock``); ``placement.json`` records the real placement,
which ``load_adapter`` uses to undo the padding.
"""

from __future__ import annotations

import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import litgpt.lora
import litgpt.model
import torch
import torch.nn as nn
import yaml
from litgpt import Config
from litgpt.prompts import PromptStyle, save_prompt_style
from litgpt.utils import copy_config_files

from litgpt_plop.model.adapt import apply_placement, current_placement
from litgpt_plop.atomic import replace_directory, write_bytes_atomic
from litgpt_plop.errors import InputError
from litgpt_plop.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, check_checkpoint_dir, load_checkpoint_model
from litgpt_plop.model.merge import LORA_FILE, merge_streamed
from litgpt_plop.model.modules import gpt_of
from litgpt_plop.selection.placement import Placement, PlacementError
from litgpt_plop.reports.placement import write_report
from litgpt_plop.model.stock import copy_into, to_stock_state_dict, unpad_stock_state_dict

PLACEMENT_FILE = "placement.json"
HPARAMS_FILE = "hyperparameters.yaml"
MERGED_FILE = WEIGHTS_FILE  # what ``litgpt merge_lora`` writes

_PRECISION = {torch.float32: "32-true", torch.bfloat16: "bf16-true", torch.float16: "16-true"}


def save_adapter(
    model: nn.Module,
    placement: Placement,
    out_dir: Path,
    checkpoint_dir: Path | None = None,
    hparams: dict[str, Any] | None = None,
    prompt_style: PromptStyle | str | None = None,
    extra_files: dict[str, bytes] | None = None,
    merge: bool = False,
) -> Path:
    """Write ``out_dir`` so that stock ``litgpt merge_lora``/``generate`` work on it, all at once.

    Files: ``lit_model.pth.lora`` (stock layout), ``placement.json`` (``placement``, which must be what is on the
    model), ``report.md`` and ``scores.png``, ``extra_files`` as given (e.g. WeightLoRA's ``gates.json``), and, with
    ``checkpoint_dir`` (the base model's LitGPT checkpoint): its config and tokenizer files, ``prompt_style.yaml``
    (``prompt_style``, else the checkpoint's own if it has one), ``hyperparameters.yaml`` (``hparams`` plus
    ``checkpoint_dir``, ``precision`` and the placement's ``lora_*`` flags, which stock loaders rebuild from) and,
    with ``merge``, the merged ``lit_model.pth``, bit-identical to what LitGPT's ``merge_lora`` would write from the
    staged copy but streamed one tensor at a time (``litgpt_plop.model.merge``). Without ``checkpoint_dir`` only
    ``model_config.yaml`` is written from the model; ``merge_lora`` then needs one.

    Crash-safe: ``out_dir`` is replaced whole at the end (files of an earlier save that this one does not write are
    gone); a failure or a kill before that leaves it exactly as it was.
    """
    gpt = gpt_of(model)
    _check_on_model(gpt, placement)
    if checkpoint_dir is not None:
        checkpoint_dir = _check_base_checkpoint(Path(checkpoint_dir).resolve(), placement)
    elif merge:
        raise ValueError("Merging needs the base model's checkpoint_dir")
    state_dict = to_stock_state_dict(gpt)
    precision = _PRECISION.get(next(iter(state_dict.values())).dtype, "32-true")
    hparams = {"checkpoint_dir": str(checkpoint_dir), "precision": precision, **(hparams or {})}
    hparams.update(placement.flags())

    def fill(staging: Path) -> None:
        torch.save({"model": state_dict}, staging / LORA_FILE)
        write_placement_files(placement, gpt.config, staging, extra_files)
        if checkpoint_dir is None:
            base_fields = {f.name: getattr(gpt.config, f.name) for f in fields(Config)}
            (staging / CONFIG_FILE).write_text(yaml.safe_dump(base_fields, sort_keys=False))
            return
        copy_config_files(checkpoint_dir, staging)
        if prompt_style is not None:
            save_prompt_style(prompt_style, staging)
        elif (checkpoint_dir / "prompt_style.yaml").is_file():
            shutil.copy(checkpoint_dir / "prompt_style.yaml", staging)
        (staging / HPARAMS_FILE).write_text(yaml.safe_dump(hparams, sort_keys=False))
        if merge:
            merge_streamed(staging, checkpoint_dir)  # what litgpt merge_lora writes, one tensor at a time

    return replace_directory(Path(out_dir), fill)


def output_bytes(config: Config, checkpoint_dir: Path, dtype: torch.dtype, adapter_params: int, periodic_saves: int = 0) -> int:
    """About what a finetune writes: ``final/`` (the merged model in ``dtype``, the adapter, the checkpoint's config
    and tokenizer files, the placement and its report) plus ``periodic_saves`` adapter directories (all but the merged
    model). ``adapter_params``: an upper bound on the adapter's size in parameters (every candidate site)."""
    with torch.device("meta"):
        base_params = sum(p.numel() for p in litgpt.model.GPT(config).parameters())  # tied weights once
    files = sum(f.stat().st_size for f in Path(checkpoint_dir).iterdir() if f.is_file() and f.name != WEIGHTS_FILE)
    adapter_dir = adapter_params * dtype.itemsize + files + 2**20  # + placement.json, report.md, scores.png
    return base_params * dtype.itemsize + adapter_dir * (1 + periodic_saves)


def check_room_for_final(
    out_dir: Path, config: Config, checkpoint_dir: Path, dtype: torch.dtype, adapter_params: int, periodic_saves: int = 0
) -> None:
    """Refuse a run whose outputs (``output_bytes``) cannot fit on ``out_dir``'s filesystem, before it trains. The
    new ``final/`` is built whole beside the previous one, which stays until the swap: all of it must be free."""
    needed = output_bytes(config, checkpoint_dir, dtype, adapter_params, periodic_saves)
    what = "the merged model and adapter in final/" + (f", {periodic_saves} periodic adapter saves" if periodic_saves else "")
    check_free_space(out_dir, needed, what)


def check_free_space(out_dir: Path, needed: int, what: str, flag: str = "--out_dir") -> None:
    """The filesystem ``out_dir`` is on (its nearest existing ancestor's) has ``needed`` bytes free."""
    parent = Path(out_dir)
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise InputError(
            f"{flag} {str(out_dir)!r}: this run will write about {_mib(needed)} ({what}), but its filesystem has"
            f" {_mib(free)} free: free some space or choose another {flag}"
        )


def _mib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def write_placement_files(
    placement: Placement, config: Config, out_dir: Path, extra_files: dict[str, bytes] | None = None
) -> None:
    """``placement.json``, ``report.md``, ``scores.png`` and ``extra_files`` (e.g. WeightLoRA's gates) in ``out_dir``,
    each written atomically; the placement last, so a ``placement.json`` is never older than the files beside it."""
    write_report(placement, config, out_dir)
    for name, data in (extra_files or {}).items():
        write_bytes_atomic(Path(out_dir) / name, data)
    placement.save(Path(out_dir) / PLACEMENT_FILE, config)


def _check_on_model(gpt: nn.Module, placement: Placement) -> None:
    actual = current_placement(gpt)
    if actual.sites != placement.sites or actual.lora_alpha != placement.lora_alpha:
        raise PlacementError(
            f"The model's adapters {[f'{s.key}@{s.rank}' for s in actual.sites]} (alpha {actual.lora_alpha}) are not"
            f" the placement's {[f'{s.key}@{s.rank}' for s in placement.sites]} (alpha {placement.lora_alpha})"
        )


def _check_base_checkpoint(checkpoint_dir: Path, placement: Placement) -> Path:
    check_checkpoint_dir(checkpoint_dir)
    try:
        # litgpt.lora.Config reads a plain model_config.yaml and also one that carries lora_* fields.
        placement.validate(litgpt.lora.Config.from_file(checkpoint_dir / CONFIG_FILE))
    except PlacementError as e:
        raise PlacementError(f"The checkpoint {str(checkpoint_dir)!r} is not the model's: {e}") from None
    return checkpoint_dir


# ---- loading ----------------------------------------------------------------------------------------------


def load_adapter(model_or_checkpoint: nn.Module | Path | str | None, adapter_dir: Path) -> litgpt.lora.GPT:
    """Re-create the saved model: the base model with exactly the saved placement and trained adapter weights.

    Args:
        model_or_checkpoint: a model holding the base weights (plain or ``litgpt.lora`` GPT, dense or 4-bit; adapted in
            place), or the base model's LitGPT checkpoint directory, or None for the ``checkpoint_dir`` recorded
            in ``adapter_dir/hyperparameters.yaml``.
        adapter_dir: a directory written by ``save_adapter``.
    """
    adapter_dir = Path(adapter_dir)
    placement = Placement.load(adapter_dir / PLACEMENT_FILE)
    lora_path = adapter_dir / LORA_FILE
    if not lora_path.is_file():
        raise PlacementError(f"{str(adapter_dir)!r} has no {LORA_FILE}")
    if model_or_checkpoint is None:
        hparams_path = adapter_dir / HPARAMS_FILE
        if not hparams_path.is_file():
            raise PlacementError(f"{str(adapter_dir)!r} records no base checkpoint ({HPARAMS_FILE}): pass one")
        model_or_checkpoint = Path(yaml.safe_load(hparams_path.read_text())["checkpoint_dir"])
    if isinstance(model_or_checkpoint, (str, Path)):
        model = load_checkpoint_model(Path(model_or_checkpoint), device="cpu")
    else:
        model = model_or_checkpoint
    gpt = gpt_of(model)
    try:
        placement.validate(gpt.config)
    except PlacementError as e:
        raise PlacementError(f"The placement saved in {str(adapter_dir)!r} does not fit this model: {e}") from None
    state_dict = torch.load(lora_path, map_location="cpu", weights_only=True)
    state_dict = state_dict.get("model", state_dict)
    pieces = unpad_stock_state_dict(state_dict, gpt.config, placement)  # checks the file before the model is touched
    gpt = apply_placement(model, placement)
    copy_into(gpt, pieces)
    return gpt

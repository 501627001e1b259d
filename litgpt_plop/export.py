"""Save a placed model so that stock LitGPT can use it, and load it back with its exact placement.

Stock ``litgpt merge_lora`` (then ``generate``, ``chat``, ``evaluate``) builds a ``litgpt.lora.GPT`` from the
global ``lora_*`` flags and one ``lora_r`` found in ``hyperparameters.yaml`` and loads ``lit_model.pth.lora``
strictly. So ``save_adapter`` writes the adapters in that layout for the placement's union of flags and
``lora_r`` = its largest rank:

- a site without an adapter gets zero A and zero B, so its update ``B A`` is exactly zero;
- a site of rank r < r_max is zero-padded: A gets zero rows, B zero columns, and B is multiplied by
  ``site scaling / stock scaling`` = ``(alpha / r) / (alpha / r_max)`` = ``r_max / r``, so that stock's
  ``alpha / r_max * B_pad A_pad`` equals the site's ``alpha / r * B A``;
- the fused qkv follows ``LoRAQKVLinear``: ``lora_A`` is (r_max * n_enabled, d_in), one chunk of r_max rows per
  enabled part in query, key, value order; ``lora_B`` is (sum of the enabled parts' sizes, r_max).

``placement.json`` next to it records the real placement; ``load_adapter`` undoes the padding from it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Any

import litgpt.lora
import litgpt.model
import torch
import torch.nn as nn
import yaml
from litgpt import Config
from litgpt.utils import copy_config_files

from litgpt_plop.adapt import apply_placement, current_placement, lora_config, site_adapter
from litgpt_plop.modules import KIND_TO_PATH, find_gpt
from litgpt_plop.placement import HEAD_KIND, HEAD_LAYER, QKV_KINDS, Placement, PlacementError, model_kinds, site_shape

LORA_FILE = "lit_model.pth.lora"
PLACEMENT_FILE = "placement.json"
HPARAMS_FILE = "hyperparameters.yaml"
MERGED_FILE = "lit_model.pth"  # what ``litgpt merge_lora`` writes; stale once the adapter is re-saved

_PRECISION = {torch.float32: "32-true", torch.bfloat16: "bf16-true", torch.float16: "16-true"}


# ---- stock layout -----------------------------------------------------------------------------------------


def _stock_modules(config: Config, flags: dict[str, Any]) -> dict[str, tuple[int, list[str], dict[str, torch.Size]]]:
    """For each module that stock LitGPT gives adapters under ``flags``: (layer, the kinds it holds in stock's
    order, {parameter key: shape}). Read off a ``litgpt.lora.GPT`` built on the meta device, so the keys and
    shapes are LitGPT's own."""
    with torch.device("meta"):
        reference = litgpt.lora.GPT(lora_config(config, flags))
    paths = set(KIND_TO_PATH.values())
    kinds_at = {path: [k for k in model_kinds(config) if KIND_TO_PATH[k] == path] for path in paths}
    result = {}
    for name, module in reference.named_modules():
        params = {f"{name}.{p}": q.shape for p, q in module.named_parameters(recurse=False) if p.startswith("lora_")}
        if not params:
            continue
        if name == "lm_head":
            layer, kinds = HEAD_LAYER, [HEAD_KIND]
        else:  # transformer.h.<layer>.<path>
            _, _, layer_str, path = name.split(".", 3)
            layer, kinds = int(layer_str), kinds_at[path]
            if path == KIND_TO_PATH["query"]:
                kinds = [k for k, on in zip(QKV_KINDS, module.enable_lora) if on]
        result[name] = (layer, kinds, params)
    return result


def to_stock_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's adapters as stock LitGPT's ``lit_model.pth.lora`` state dict (union flags, one rank, padded)."""
    gpt = _gpt(model)
    placement = current_placement(gpt)
    if not placement.sites:
        raise PlacementError("The model has no adapters to save")
    flags = placement.flags()
    r_max, stock_scaling = flags["lora_r"], flags["lora_alpha"] / flags["lora_r"]
    first = site_adapter(gpt, placement.sites[0].layer, placement.sites[0].kind)
    dtype, device = first.A.dtype, first.A.device
    state_dict = {}
    for name, (layer, kinds, params) in _stock_modules(gpt.config, flags).items():
        A_parts, B_parts = [], []
        for kind in kinds:
            d_in = params[f"{name}.lora_A"][1]
            d_out = _part_rows(gpt.config, kind)
            A_pad = torch.zeros(r_max, d_in, dtype=dtype, device=device)
            B_pad = torch.zeros(d_out, r_max, dtype=dtype, device=device)
            adapter = site_adapter(gpt, layer, kind)
            if adapter is not None:
                r = adapter.A.shape[0]
                A_pad[:r] = adapter.A
                # fold alpha/r into B (in float32, so a bf16 B is rounded once)
                B_pad[:, :r] = adapter.B.float() * (adapter.scaling / stock_scaling)
            A_parts.append(A_pad)
            B_parts.append(B_pad)
        state_dict[f"{name}.lora_A"] = torch.cat(A_parts, dim=0).cpu()
        state_dict[f"{name}.lora_B"] = torch.cat(B_parts, dim=0).cpu()
        for key, shape in params.items():
            assert state_dict[key].shape == shape, (key, state_dict[key].shape, shape)
    return state_dict


def load_stock_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a stock-layout adapter state dict into a model that already carries the matching placement
    (``apply_placement``): un-pad every site back to its rank and un-fold the scaling from B.

    Raises ``PlacementError``, leaving the model as it was, if the keys or shapes are not those of the placement's
    union flags, or if the file holds a non-zero update the placement's sites cannot hold.
    """
    gpt = _gpt(model)
    _copy_into(gpt, _unpad(state_dict, gpt.config, current_placement(gpt)))


def _unpad(
    state_dict: dict[str, torch.Tensor], config: Config, placement: Placement
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Per site of ``placement``: (A, B) cut back to the site's rank, B un-folded by ``r / r_max``. Checks it all."""
    flags = placement.flags()
    modules = _stock_modules(config, flags)
    _check_stock_keys(state_dict, modules)
    r_max = flags["lora_r"]
    ranks = {(s.layer, s.kind): s.rank for s in placement.sites}
    result = {}
    for name, (layer, kinds, _) in modules.items():
        A_chunks = state_dict[f"{name}.lora_A"].split(r_max, dim=0)
        B_blocks = state_dict[f"{name}.lora_B"].split([_part_rows(config, kind) for kind in kinds], dim=0)
        for kind, A_pad, B_pad in zip(kinds, A_chunks, B_blocks):
            r = ranks.get((layer, kind), 0)
            if B_pad[:, r:].count_nonzero():
                raise PlacementError(
                    f"{name}: the saved adapter has a non-zero update beyond rank {r} at site {layer}.{kind}, which"
                    " the placement does not hold; placement.json and the adapter file do not belong together"
                )
            if r:
                # stock scaling / site scaling = (alpha / r_max) / (alpha / r)
                result[(layer, kind)] = (A_pad[:r], B_pad[:, :r].float() * (r / r_max))
    return result


def _copy_into(gpt: nn.Module, pieces: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for (layer, kind), (A, B) in pieces.items():
            adapter = site_adapter(gpt, layer, kind)
            adapter.A.copy_(A)
            adapter.B.copy_(B)


def _check_stock_keys(state_dict: dict[str, torch.Tensor], modules: dict[str, Any]) -> None:
    expected = {key: shape for _, _, params in modules.values() for key, shape in params.items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise PlacementError(
            f"The adapter file does not match the placement: missing keys {_few(missing)},"
            f" unexpected keys {_few(unexpected)}"
        )
    for key, shape in expected.items():
        if state_dict[key].shape != shape:
            raise PlacementError(
                f"The adapter file does not match the placement and model: {key} has shape"
                f" {tuple(state_dict[key].shape)}, expected {tuple(shape)}"
            )


def _few(keys: list[str]) -> str:
    return str(keys[:4])[:-1] + (", ...]" if len(keys) > 4 else "]")


def _part_rows(config: Config, kind: str) -> int:
    """Rows of B for one kind in stock layout: the part's size for q/k/v, the output size otherwise."""
    if kind in QKV_KINDS:
        return (config.n_head if kind == "query" else config.n_query_groups) * config.head_size
    return site_shape(config, kind)[0]


def _gpt(model: nn.Module) -> litgpt.model.GPT:
    gpt = find_gpt(model)
    if gpt is None:
        raise PlacementError(f"No LitGPT GPT model found in {type(model).__name__}")
    return gpt


# ---- saving -----------------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, placement: Placement, out_dir: Path, checkpoint_dir: Path | None = None) -> Path:
    """Write ``out_dir`` so that stock ``litgpt merge_lora out_dir`` works, plus ``placement.json``.

    Files: ``lit_model.pth.lora`` (stock layout, see the module docstring), ``placement.json`` (``placement``, which
    must be what is on the model), and, with ``checkpoint_dir`` (the base model's LitGPT checkpoint),
    ``hyperparameters.yaml`` (``checkpoint_dir``, ``precision``, ``lora_*`` as ``litgpt finetune lora`` writes them)
    and the config/tokenizer files copied from it as LitGPT does. Without ``checkpoint_dir`` only
    ``model_config.yaml`` is written from the model; ``merge_lora`` then needs one.

    Atomic: everything is written into a temporary directory next to ``out_dir`` and moved into place at the end; a
    failure leaves ``out_dir`` as it was. An existing ``out_dir`` keeps its other files, but a merged
    ``lit_model.pth`` from an earlier save is removed (it no longer matches; ``merge_lora`` would skip merging).
    """
    gpt = _gpt(model)
    out_dir = Path(out_dir)
    actual = current_placement(gpt)
    if actual.sites != placement.sites or actual.lora_alpha != placement.lora_alpha:
        raise PlacementError(
            f"The model's adapters {[f'{s.key}@{s.rank}' for s in actual.sites]} (alpha {actual.lora_alpha}) are not"
            f" the placement's {[f'{s.key}@{s.rank}' for s in placement.sites]} (alpha {placement.lora_alpha})"
        )
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir).resolve()
        for name in (MERGED_FILE, "model_config.yaml"):
            if not (checkpoint_dir / name).is_file():
                raise FileNotFoundError(f"{str(checkpoint_dir)!r} is not a LitGPT checkpoint: it has no {name}")
        try:
            # litgpt.lora.Config reads a plain model_config.yaml and also one that carries lora_* fields.
            placement.validate(litgpt.lora.Config.from_file(checkpoint_dir / "model_config.yaml"))
        except PlacementError as e:
            raise PlacementError(f"The checkpoint {str(checkpoint_dir)!r} is not the model's: {e}") from None
    state_dict = to_stock_state_dict(gpt)
    dtype = next(iter(state_dict.values())).dtype

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        torch.save({"model": state_dict}, staging / LORA_FILE)
        placement.save(staging / PLACEMENT_FILE, gpt.config)
        if checkpoint_dir is not None:
            copy_config_files(checkpoint_dir, staging)
            if (checkpoint_dir / "prompt_style.yaml").is_file():
                shutil.copy(checkpoint_dir / "prompt_style.yaml", staging)
            hparams = {
                "checkpoint_dir": str(checkpoint_dir),
                "precision": _PRECISION.get(dtype, "32-true"),
                **placement.flags(),
                "placement": PLACEMENT_FILE,
            }
            (staging / HPARAMS_FILE).write_text(yaml.safe_dump(hparams, sort_keys=False))
        else:
            base_fields = {f.name: getattr(gpt.config, f.name) for f in fields(Config)}
            (staging / "model_config.yaml").write_text(yaml.safe_dump(base_fields, sort_keys=False))
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Make ``staging`` become ``out_dir`` with directory renames (atomic on one file system)."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    written = {entry.name for entry in staging.iterdir()}
    for entry in out_dir.iterdir():  # keep what else is there (a rename: no copy), drop a stale merge
        if entry.name not in written and entry.name != MERGED_FILE:
            os.rename(entry, staging / entry.name)
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out_dir, old)
    os.rename(staging, out_dir)
    shutil.rmtree(old)


# ---- loading ----------------------------------------------------------------------------------------------


def load_base_model(checkpoint_dir: Path) -> litgpt.model.GPT:
    """A plain ``litgpt.model.GPT`` from a LitGPT checkpoint directory (``model_config.yaml`` + ``lit_model.pth``)."""
    checkpoint_dir = Path(checkpoint_dir)
    for name in (MERGED_FILE, "model_config.yaml"):
        if not (checkpoint_dir / name).is_file():
            raise FileNotFoundError(f"{str(checkpoint_dir)!r} is not a LitGPT checkpoint: it has no {name}")
    config = Config.from_file(checkpoint_dir / "model_config.yaml")
    state_dict = torch.load(checkpoint_dir / MERGED_FILE, map_location="cpu", weights_only=True)
    state_dict = state_dict.get("model", state_dict)
    model = litgpt.model.GPT(config)
    model.to(dtype=next(iter(state_dict.values())).dtype)
    model.load_state_dict(state_dict)
    return model


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
        model = load_base_model(Path(model_or_checkpoint))
    else:
        model = model_or_checkpoint
    gpt = _gpt(model)
    try:
        placement.validate(gpt.config)
    except PlacementError as e:
        raise PlacementError(f"The placement saved in {str(adapter_dir)!r} does not fit this model: {e}") from None
    state_dict = torch.load(lora_path, map_location="cpu", weights_only=True)
    state_dict = state_dict.get("model", state_dict)
    pieces = _unpad(state_dict, gpt.config, placement)  # checks the file before the model is touched
    gpt = apply_placement(model, placement)
    _copy_into(gpt, pieces)
    return gpt

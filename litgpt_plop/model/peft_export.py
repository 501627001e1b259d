"""A finished run's adapter as a Hugging Face PEFT LoRA adapter, for the model ``litgpt convert_from_litgpt`` writes.

PEFT and vLLM read ``adapter_config.json`` and ``adapter_model.safetensors``, with Hugging Face module names and
one LoRA pair (``lora_A`` (r x d_in), ``lora_B`` (d_out x r), update ``lora_alpha / r * B A``) per adapted linear.
``export_peft`` rebuilds every site's own (A, B) from the stock-layout ``lit_model.pth.lora`` and ``placement.json``
(``litgpt_plop.model.stock.unpad_stock_state_dict``: padding removed, scaling ``alpha / rank`` of the site) and
writes one pair per Hugging Face linear:

- Module names follow ``litgpt.scripts.convert_lit_checkpoint`` family by family (the same dispatch on the config's
  name), so the adapter fits the model that conversion writes.
- Where conversion splits LitGPT's fused qkv (LLaMA, Gemma, Qwen, OLMo-2, Phi-1.5/2), each of q/k/v is its own
  module and keeps its own A and B. Where the Hugging Face linear stays fused (GPT-NeoX/Pythia, Falcon and Phi-3/4's
  ``qkv_proj``, Phi-3/4's ``gate_up_proj`` = [fc_1; fc_2]) the parts' pairs are stacked: A is the parts' A one under
  the other, B is block-diagonal (each part's B in its own rows and its own columns), so ``B A`` holds every part's
  update in its rows and zeros elsewhere; rows are then put in the order conversion gives the fused weight
  (``qkv_reassemble``'s interleaving for GPT-NeoX and Falcon).
- Ranks: a module's rank is its parts' ranks summed (one part: the site's rank). The most common rank is
  ``r``; the others go in ``rank_pattern``. Scaling stays LitGPT's ``alpha / rank`` per site: a module whose parts
  all have rank r gets ``lora_alpha = alpha * (its rank) / r`` (``alpha_pattern`` where that differs from the
  most common), which is exact; a fused module whose parts have different ranks gets ``alpha`` and each part's B
  multiplied by ``(module rank) / (part rank)`` (computed in float32, rounded once).
- ``pad_rank``: every module zero-padded to the largest rank R (A zero rows, B zero columns), one ``r`` and one
  ``lora_alpha`` (both patterns empty), each part's B multiplied by ``R / (part rank)``. Servers that apply one
  ``lora_alpha / r`` to every module (vLLM) need this form.

``target_modules`` names a module's path inside a block (``self_attn.q_proj``) when every block has it adapted,
else each adapted module by its full name. Mixtures of experts are refused (their Hugging Face expert layout is
not one linear per LitGPT expert site).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import litgpt.lora
import torch
from litgpt.scripts.convert_lit_checkpoint import qkv_reassemble
from safetensors.torch import save_file

from litgpt_plop.atomic import replace_directory
from litgpt_plop.errors import InputError
from litgpt_plop.model.checkpoint import CONFIG_FILE
from litgpt_plop.model.export import LORA_FILE, PLACEMENT_FILE
from litgpt_plop.model.stock import unpad_stock_state_dict
from litgpt_plop.selection.placement import (
    ALL_KINDS,
    HEAD_KIND,
    HEAD_LAYER,
    Placement,
    PlacementError,
    is_moe,
    model_kinds,
    site_shape,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's key prefix of a causal LM's modules in adapter_model.safetensors (its PeftModel.base_model.model).
_KEY_PREFIX = "base_model.model."

_LLAMA = {
    "query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj", "projection": "self_attn.o_proj",
    "mlp_fc_1": "mlp.gate_proj", "mlp_fc_2": "mlp.up_proj", "mlp_proj": "mlp.down_proj",
}  # fmt: skip
_PHI = {
    "query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj", "projection": "self_attn.dense",
    "mlp_fc": "mlp.fc1", "mlp_proj": "mlp.fc2",
}  # fmt: skip
_PHI3 = {
    "query": "self_attn.qkv_proj", "key": "self_attn.qkv_proj", "value": "self_attn.qkv_proj",
    "projection": "self_attn.o_proj", "mlp_fc_1": "mlp.gate_up_proj", "mlp_fc_2": "mlp.gate_up_proj",
    "mlp_proj": "mlp.down_proj",
}  # fmt: skip
_NEOX = {
    "query": "attention.query_key_value", "key": "attention.query_key_value", "value": "attention.query_key_value",
    "projection": "attention.dense", "mlp_fc": "mlp.dense_h_to_4h", "mlp_proj": "mlp.dense_4h_to_h",
}  # fmt: skip
_FALCON = {kind: path.replace("attention.", "self_attention.") for kind, path in _NEOX.items()}


@dataclass(frozen=True)
class HFLayout:
    """Where a LitGPT model's linears are in the Hugging Face model ``convert_from_litgpt`` writes for it.

    ``paths``: kind -> module path inside block ``block.format(layer)``; kinds sharing a path are one fused
    linear holding their rows in LitGPT's order. ``interleaved_qkv``: the fused qkv's rows are in
    ``qkv_reassemble``'s order.
    """

    family: str
    block: str
    paths: dict[str, str]
    head: str = "lm_head"
    interleaved_qkv: bool = False


def hf_layout(config: litgpt.Config) -> HFLayout:
    """The layout for ``config``, chosen as ``convert_lit_checkpoint`` chooses its weight copier; ``InputError`` for
    a model whose adapters PEFT cannot hold as they are or that conversion does not convert."""
    name, lower = config.name, config.name.lower()
    if is_moe(config):
        raise InputError(
            f"{name!r} is a mixture of experts: export_peft cannot express its expert adapters in Hugging Face's"
            " expert layout; merge instead (final/lit_model.pth) and convert that with `litgpt convert_from_litgpt`"
        )
    if "falcon" in name:
        if not any(size in name for size in ("7b", "40b", "180B")):
            raise InputError(f"{name!r}: `litgpt convert_from_litgpt` converts only the 7b, 40b and 180B Falcons")
        return HFLayout("Falcon", "transformer.h.{}", _FALCON, interleaved_qkv=True)
    if lower.startswith(("phi-3", "phi-4")):
        return HFLayout("Phi-3", "model.layers.{}", _PHI3)
    if lower.startswith("phi"):
        return HFLayout("Phi", "model.layers.{}", _PHI)
    llama_named = name.startswith(("Gemma-2", "Gemma-3")) or lower.startswith(("qwen2.5", "qwq", "olmo-2-", "qwen3"))
    if llama_named or config.mlp_class_name in ("LLaMAMLP", "GemmaMLP"):
        return HFLayout("LLaMA", "model.layers.{}", _LLAMA)
    return HFLayout("GPT-NeoX", "gpt_neox.layers.{}", _NEOX, head="embed_out", interleaved_qkv=True)


class ModuleAdapter(NamedTuple):
    """One Hugging Face linear's LoRA pair, as PEFT stores it: update ``lora_alpha / rank * B @ A``."""

    name: str  # full module name in the Hugging Face model
    path: str  # its path inside a block (the name itself for the head)
    layer: int | None
    A: torch.Tensor  # (rank, d_in)
    B: torch.Tensor  # (d_out, rank)
    lora_alpha: int


class _Part(NamedTuple):
    kind: str
    rows: int
    A: torch.Tensor | None  # the site's own pair (scaling alpha / rank), None where the site has no adapter
    B: torch.Tensor | None


def module_adapters(
    pieces: dict[tuple, tuple[torch.Tensor, torch.Tensor]],
    config: litgpt.Config,
    lora_alpha: int,
    layout: HFLayout,
    pad_rank: bool = False,
) -> list[ModuleAdapter]:
    """Every adapted Hugging Face linear's pair, from the sites' own pairs ``pieces`` ({(layer, kind): (A, B)},
    each with scaling ``lora_alpha / rank``), in the order of the sites."""
    groups: dict[str, tuple[int | None, str, list[_Part]]] = {}
    for layer, kind in sorted(pieces, key=lambda key: (key[0] == HEAD_LAYER, key[0], ALL_KINDS.index(key[1]))):
        A, B = pieces[(layer, kind)]
        if kind == HEAD_KIND:
            groups[layout.head] = (None, layout.head, [_Part(kind, B.shape[0], A, B)])
            continue
        path = layout.paths.get(kind)
        if path is None:
            raise InputError(f"{config.name!r} ({layout.family} layout): the {kind!r} adapters have no Hugging Face module")
        name = f"{layout.block.format(layer)}.{path}"
        if name not in groups:
            fused = [k for k in model_kinds(config) if layout.paths.get(k) == path]  # LitGPT's row order
            groups[name] = (layer, path, [_Part(k, site_shape(config, k)[0], None, None) for k in fused])
        parts = groups[name][2]
        index = next(i for i, part in enumerate(parts) if part.kind == kind)
        parts[index] = _Part(kind, parts[index].rows, A, B)
    ranks = {name: sum(p.A.shape[0] for p in parts if p.A is not None) for name, (_, _, parts) in groups.items()}
    padded = max(ranks.values()) if pad_rank else None
    result = []
    for name, (layer, path, parts) in groups.items():
        A, B, alpha = _stack(parts, padded or ranks[name], lora_alpha, exact_alpha=padded is None)
        if layout.interleaved_qkv and parts[0].kind == "query":
            B = B[qkv_reassemble(torch.arange(B.shape[0]), config)]
        result.append(ModuleAdapter(name, path, layer, A, B, alpha))
    return result


def _stack(parts: list[_Part], rank: int, lora_alpha: int, exact_alpha: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One linear's (A, B, lora_alpha) at ``rank`` from its parts in LitGPT's row order (see the module docstring).

    With ``exact_alpha`` and every adapted part of one rank r, the scaling is carried by ``lora_alpha = alpha *
    rank / r`` and B is copied as it is; otherwise ``lora_alpha`` is ``alpha`` and each part's B is multiplied by
    ``rank / r_part``, so that ``alpha / rank * B`` is the part's ``alpha / r_part * B``."""
    adapted = [p for p in parts if p.A is not None]
    part_ranks = {p.A.shape[0] for p in adapted}
    dtype, d_in = adapted[0].A.dtype, adapted[0].A.shape[1]
    if exact_alpha and len(part_ranks) == 1:
        alpha, fold = lora_alpha * rank // part_ranks.pop(), None
    else:
        alpha, fold = lora_alpha, rank
    A = torch.zeros(rank, d_in, dtype=dtype)
    B = torch.zeros(sum(p.rows for p in parts), rank, dtype=torch.float32)
    column, row = 0, 0
    for part in parts:
        if part.A is not None:
            r = part.A.shape[0]
            A[column : column + r] = part.A
            B[row : row + part.rows, column : column + r] = part.B.float() * (1.0 if fold is None else fold / r)
            column += r
        row += part.rows
    return A, B.to(dtype), alpha


def adapter_config(
    modules: list[ModuleAdapter], n_layer: int, lora_dropout: float, base_model: str | None
) -> dict[str, object]:
    """PEFT's ``adapter_config.json`` for ``modules``: the most common rank and alpha as ``r`` and ``lora_alpha``,
    the others in ``rank_pattern`` / ``alpha_pattern``; a block path where every block has it, else full names."""
    r = _most_common([m.A.shape[0] for m in modules])
    alpha = _most_common([m.lora_alpha for m in modules])
    by_path: dict[str, list[ModuleAdapter]] = {}
    for module in modules:
        by_path.setdefault(module.path, []).append(module)
    targets, rank_pattern, alpha_pattern = [], {}, {}
    for path, group in by_path.items():
        everywhere = group[0].layer is not None and len(group) == n_layer
        targets += [path] if everywhere else [m.name for m in group]
        rank_pattern.update(_pattern(path, group, [m.A.shape[0] for m in group], r, everywhere))
        alpha_pattern.update(_pattern(path, group, [m.lora_alpha for m in group], alpha, everywhere))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": lora_dropout,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def _pattern(path: str, group: list[ModuleAdapter], values: list[int], default: int, everywhere: bool) -> dict[str, int]:
    """The ``rank_pattern`` / ``alpha_pattern`` entries of one block path's modules: one entry for the path when
    every block has it with one value, else one per module whose value is not ``default``."""
    if everywhere and len(set(values)) == 1:
        return {path: values[0]} if values[0] != default else {}
    return {m.name: v for m, v in zip(group, values) if v != default}


def _most_common(values: list[int]) -> int:
    """The value that occurs most often; among equally common ones, the largest."""
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def read_final_dir(final_dir: Path) -> tuple[litgpt.Config, Placement, dict[tuple, tuple[torch.Tensor, torch.Tensor]]]:
    """A finished run's ``final/`` (or any ``save_adapter`` directory): its model config, its placement, and every
    site's own (A, B) with scaling ``alpha / rank`` (per site of ``placement.json``), all checked."""
    final_dir = Path(final_dir)
    if not final_dir.is_dir():
        raise InputError(f"FINAL_DIR {str(final_dir)!r} is not a directory: give a run's final/ directory")
    missing = [n for n in (LORA_FILE, PLACEMENT_FILE, CONFIG_FILE) if not (final_dir / n).is_file()]
    if missing:
        raise InputError(
            f"FINAL_DIR {str(final_dir)!r} has no {', '.join(missing)}: give the final/ directory of a litgpt-plop run"
        )
    # litgpt.lora.Config reads a plain model_config.yaml and also one that carries lora_* fields.
    config = litgpt.lora.Config.from_file(final_dir / CONFIG_FILE)
    placement = Placement.load(final_dir / PLACEMENT_FILE)
    try:
        placement.validate(config)
    except PlacementError as e:
        raise PlacementError(f"{str(final_dir)!r}: its placement.json does not fit its {CONFIG_FILE}: {e}") from None
    try:
        state_dict = torch.load(final_dir / LORA_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch raises several types
        raise InputError(f"{str(final_dir / LORA_FILE)!r} cannot be read as a LitGPT adapter: {e}") from None
    pieces = unpad_stock_state_dict(state_dict.get("model", state_dict), config, placement)
    return config, placement, pieces


def export_peft(final_dir: Path, out_dir: Path, pad_rank: bool = False) -> Path:
    """Write ``out_dir`` as a PEFT LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``, and the run's
    ``placement.json`` for the record) equal to the adapter of ``final_dir`` on the Hugging Face model that ``litgpt
    convert_from_litgpt`` makes of the same base; ``pad_rank``: one rank for every module (module docstring).

    ``out_dir`` is built whole in a staging directory and swapped in (``litgpt_plop.atomic``)."""
    final_dir, out_dir = Path(final_dir), Path(out_dir)
    resolved_final, resolved_out = final_dir.resolve(), out_dir.resolve()
    if resolved_out == resolved_final or resolved_out in resolved_final.parents:
        raise InputError(f"--out_dir {str(out_dir)!r} would replace FINAL_DIR {str(final_dir)!r}: choose another directory")
    config, placement, pieces = read_final_dir(final_dir)
    layout = hf_layout(config)  # refuses a mixture of experts, the only layout with (layer, kind, expert) pieces
    modules = module_adapters(pieces, config, placement.lora_alpha, layout, pad_rank)
    hf = getattr(config, "hf_config", None) or {}
    base_model = f"{hf['org']}/{hf['name']}" if hf.get("org") and hf.get("name") else None
    settings = adapter_config(modules, config.n_layer, placement.lora_dropout, base_model)
    tensors = {}
    for module in modules:
        tensors[f"{_KEY_PREFIX}{module.name}.lora_A.weight"] = module.A.contiguous()
        tensors[f"{_KEY_PREFIX}{module.name}.lora_B.weight"] = module.B.contiguous()

    def fill(staging: Path) -> None:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
        shutil.copy(final_dir / PLACEMENT_FILE, staging / PLACEMENT_FILE)

    return replace_directory(out_dir, fill)

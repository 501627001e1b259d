"""``litgpt-plop export_peft``: a finished run's adapter as a Hugging Face PEFT LoRA adapter, for PEFT and vLLM.

A thin command: it checks where it will write, converts (``litgpt_plop.model.peft_export``) and says what it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

from litgpt_plop.commands.inputs import check_out_dir
from litgpt_plop.model import peft_export


def export_peft(final_dir: Path, out_dir: Path | None = None, pad_rank: bool = False) -> Path:
    """Write a run's adapter as a PEFT LoRA adapter for the Hugging Face model ``litgpt convert_from_litgpt`` makes.

    Writes ``adapter_config.json``, ``adapter_model.safetensors`` and a copy of ``placement.json`` to ``out_dir``,
    replacing it whole. The adapter gives the same logits on the converted model as the run's model: per-site
    ranks go in ``rank_pattern``, LitGPT's scaling ``lora_alpha / rank`` is kept, the fused qkv is split into
    q/k/v where the Hugging Face model splits it.

    Arguments:
        final_dir: A finished run's ``final/`` directory (``lit_model.pth.lora``, ``placement.json``,
            ``model_config.yaml``), whatever the method.
        out_dir: Where the PEFT adapter goes. Default: ``peft`` beside ``final_dir``.
        pad_rank: Zero-pad every module's adapter to the largest rank, so that one ``r`` and one ``lora_alpha``
            hold for every module (``rank_pattern`` and ``alpha_pattern`` empty), as vLLM needs.
    """
    final_dir = Path(final_dir)
    out_dir = Path(out_dir) if out_dir is not None else final_dir.absolute().parent / "peft"
    check_out_dir(out_dir)
    written = peft_export.export_peft(final_dir, out_dir, pad_rank=pad_rank)
    settings = json.loads((written / peft_export.ADAPTER_CONFIG).read_text())
    ranks = [settings["r"], *settings["rank_pattern"].values()]
    print(
        f"Wrote a PEFT LoRA adapter to {str(written)!r}: {len(settings['target_modules'])} target entries, ranks"
        f" {min(ranks)}-{max(ranks)} (r {settings['r']}, {len(settings['rank_pattern'])} in rank_pattern), lora_alpha"
        f" {settings['lora_alpha']}. Load it with PeftModel.from_pretrained(model, {str(written)!r}) on the model"
        " `litgpt convert_from_litgpt` writes."
    )
    return written

"""The passes the calibration benchmarks measure, each run as ``litgpt-plop plan`` runs it: the calibration prompts
and batches, the model with its weights resident, a plain forward (whole model, or the blocks only, stopping where
the calibration pass stops), a calibration method's pass with its scores and selection (in one call, or batch by
batch and finished afterwards), and LoRA training steps.

``benchmarks.calibration_overhead`` compares them in time and memory; ``benchmarks.scaling`` and
``benchmarks.overhead`` use its batches, forward and resident model.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from litgpt_plop.selection.methods import get_method

FORWARDS = ("forward", "forward_blocks")
METHODS = {
    # what the benchmarks measure: name -> (calibrated method of litgpt_plop.selection.methods, CKA pooling)
    "plop": ("plop", "last"),
    "cka_last": ("cka", "last"),
    "cka_tokens": ("cka", "tokens"),
    "plop+cka": ("plop+cka", "last"),
}
MODES = FORWARDS + tuple(METHODS)


def token_ids(checkpoint_dir: Path, num_prompts: int, seed: int = 42) -> list:
    """The calibration prompts' token ids: reasoning-gym items in the model's chat style, tokenized as
    ``litgpt-plop plan`` tokenizes them."""
    from litgpt.tokenizer import Tokenizer

    from litgpt_plop.scoring.prompts import tokenize_prompts
    from litgpt_plop.data import ReasoningGym

    tokenizer = Tokenizer(checkpoint_dir)
    prompts = ReasoningGym(train_size=num_prompts, val_size=8, seed=seed).prompts("train", tokenizer)
    return tokenize_prompts(prompts, tokenizer)


def batches_of(ids: list, batch_size: int, max_seq_length: int = 256) -> list:
    """The batches the calibration pass runs, with the all-padding columns dropped as it drops them."""
    from litgpt_plop.scoring.calibration import Batch, make_batches

    batches, _ = make_batches(ids, batch_size, max_seq_length)
    out = []
    for b in batches:
        width = int(b.lengths.max())
        out.append(Batch(b.input_ids[:, :width], b.mask[:, :width], b.index))
    return out


def load_model(checkpoint_dir: Path, quantize: str | None) -> Any:
    """The model as ``litgpt-plop plan`` loads it, every weight copied into memory (not left mmapped from the
    checkpoint file, where touching it during the pass would count as the pass's memory)."""
    import torch

    from litgpt_plop.model.checkpoint import load_checkpoint_model

    model = load_checkpoint_model(checkpoint_dir, quantize=quantize)
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if param.dtype.is_floating_point:
                    param.data = param.data.clone()
            for name, buffer in list(module.named_buffers(recurse=False)):
                setattr(module, name, buffer.clone())
    return model


class _Stop(Exception):
    """Raised before ``ln_f`` to end a blocks-only forward where the calibration pass ends."""


def _raise_stop(module: Any, args: Any) -> None:
    raise _Stop


def run_forward(model: Any, batches: list, blocks_only: bool) -> None:
    """A no-grad forward over ``batches``: the whole model, or (``blocks_only``) up to ``ln_f`` as the calibration
    pass runs it, without the vocabulary-sized logits."""
    import torch

    handle = model.transformer.ln_f.register_forward_pre_hook(_raise_stop) if blocks_only else None
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(batch.input_ids)
                except _Stop:
                    pass
    finally:
        if handle is not None:
            handle.remove()


def run_method(model: Any, ids: list, mode: str, batch_size: int) -> Any:
    """``mode``'s whole ``plan_placement`` (pass, scores, selection) on the prompts ``ids``: its placement."""
    from litgpt_plop.args import CalibrationArgs, CkaArgs
    from litgpt_plop.decide import plan_placement

    method, pooling = METHODS[mode]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CKA's degenerate-layer warning: reported in the placement, not here
        return plan_placement(
            model,
            ids,
            method=method,
            cka=CkaArgs(pooling=pooling),
            calibration=CalibrationArgs(num_samples=len(ids), batch_size=batch_size, progress=False),
        )


def run_train_steps(model: Any, batches: list, kinds: list[str]) -> None:
    """One LoRA training step (forward, backward, AdamW step) per batch, LoRA (rank 8) on ``kinds`` in every layer."""
    import torch
    import torch.nn.functional as F

    from litgpt_plop.model.adapt import apply_placement
    from litgpt_plop.selection.placement import Placement

    gpt = apply_placement(model, Placement.from_kinds(model.config, kinds, rank=8, lora_alpha=16))
    gpt.train()
    optimizer = torch.optim.AdamW([p for p in gpt.parameters() if p.requires_grad], lr=1e-4)
    for batch in batches:
        logits = gpt(batch.input_ids)
        targets = batch.input_ids[:, 1:].masked_fill(~batch.mask[:, 1:], -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def make_scorers(model: Any, mode: str) -> list:
    """Fresh scorers for ``mode``, as ``plan_placement`` builds them (every kind but the head, every layer)."""
    from litgpt_plop.selection.placement import model_kinds
    from litgpt_plop.scoring.cka import CkaScorer
    from litgpt_plop.scoring.plop import PlopScorer

    method, pooling = METHODS[mode]
    layers = list(range(model.config.n_layer))
    scorers = []
    if get_method(method).uses_plop:
        scorers.append(PlopScorer(model, model_kinds(model.config), layers))
    if get_method(method).uses_cka:
        scorers.append(CkaScorer(model, layers, pooling))
    return scorers


def finish(model: Any, mode: str, scorers: list) -> Any:
    """Scores and selection from filled scorers: what ``plan_placement`` does after the pass."""
    from litgpt_plop.args import CkaArgs
    from litgpt_plop.scoring.cka import CkaScorer
    from litgpt_plop.scoring.plop import PlopScorer
    from litgpt_plop.decide import select_placement

    method, pooling = METHODS[mode]
    for scorer in scorers:  # the batches were fed with reduce=False, one calibrate call each
        scorer.reduce()
    plop = next((s for s in scorers if isinstance(s, PlopScorer)), None)
    cka = next((s for s in scorers if isinstance(s, CkaScorer)), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return select_placement(
            model.config,
            method,
            plop_scores=plop.result() if plop is not None else None,
            cka_scores=cka.result() if cka is not None else None,
            cka=CkaArgs(pooling=pooling),
        )

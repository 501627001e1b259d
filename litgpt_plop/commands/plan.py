"""``litgpt-plop plan``: calibrate a pretrained model on task prompts and show where LoRA would go. No training.

A thin command: it parses, loads the checkpoint (``litgpt_plop.model.checkpoint``), decides (``litgpt_plop.selection.rules``),
writes (``litgpt_plop.model.export``) and prints (``litgpt_plop.reports.placement``).
"""

from __future__ import annotations

import time
from pathlib import Path

from litgpt.data import DataModule
from litgpt.tokenizer import Tokenizer

from litgpt_plop.args import CalibrationArgs, CkaArgs, PlopArgs
from litgpt_plop.scoring.prompts import calibration_token_ids
from litgpt_plop.model.checkpoint import PRECISION_DTYPES, load_checkpoint_model
from litgpt_plop.model.export import write_placement_files
from litgpt_plop.commands.inputs import (
    check_calibration_prompts,
    check_checkpoint,
    check_lora,
    check_out_dir,
    check_precision,
    check_text_file,
)  # fmt: skip
from litgpt_plop.args import KappaArgs
from litgpt_plop.selection.methods import DECIDED_BEFORE_TRAINING, check_option_groups, get_method
from litgpt_plop.selection.placement import Placement, PlacementError, kinds_from_flags
from litgpt_plop.model.quantize import QuantizeChoice
from litgpt_plop.reports.placement import summary_table
from litgpt_plop.decide import decide_placement
from litgpt_plop.scoring.sequential import CheckpointBlocks


def plan(
    checkpoint_dir: Path,
    method: str = "plop",
    out_dir: Path = Path("out/plan"),
    data: DataModule | None = None,
    calibration: CalibrationArgs = CalibrationArgs(),
    plop: PlopArgs = PlopArgs(),
    cka: CkaArgs = CkaArgs(),
    kappa: KappaArgs = KappaArgs(),
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_query: bool = True,
    lora_key: bool = True,
    lora_value: bool = True,
    lora_projection: bool = True,
    lora_mlp: bool = True,
    lora_head: bool = False,
    precision: str | None = None,
    quantize: QuantizeChoice | None = None,
    sequential: bool = True,
) -> Placement:
    """Calibrate a pretrained model on task prompts and decide where LoRA goes, without training.

    Writes ``placement.json``, ``report.md`` and ``scores.png`` to ``out_dir`` and prints a summary.

    Arguments:
        checkpoint_dir: The LitGPT checkpoint directory of the pretrained model.
        method: ``plop``, ``plop-inverse``, ``cka``, ``plop+cka``, ``kappa`` (from the weights alone, no data), or
            a fixed placement (``all``, ``attention``, ``qv``, ``mlp``, ``random``) for comparison.
        out_dir: Where the placement and its report go.
        data: A LitGPT DataModule whose training prompts calibrate (ignored when ``--calibration.file`` is set).
        calibration: The calibration pass: prompts, how many, batch size, length.
        plop: PLoP's options.
        cka: Layer-wise CKA's options.
        kappa: kappa's options (the weights with the lowest condition number).
        lora_r: The LoRA rank of every chosen site.
        lora_alpha: The LoRA alpha.
        lora_query: Whether the query may be chosen (the ``lora_*`` flags are the candidate kinds).
        lora_key: Whether the key may be chosen.
        lora_value: Whether the value may be chosen.
        lora_projection: Whether the attention output projection may be chosen.
        lora_mlp: Whether the MLP linears may be chosen.
        lora_head: Whether the output head may be chosen.
        precision: ``32-true``, ``bf16-true`` or ``16-true``: the dtype the model is scored in.
        quantize: Score the model with its block linears in bitsandbytes 4-bit, as a QLoRA finetune would.
        sequential: Calibrate one block at a time, each loaded from the memory-mapped checkpoint and released after
            every batch went through it: memory holds one block and the prompts' hidden states, not the model. The
            same scores as loading the whole model (false), which ``kappa`` and the presets always do.
    """
    # Everything that can be checked before loading weights is checked first.
    spec = get_method(method, *DECIDED_BEFORE_TRAINING)
    check_option_groups(spec, "--method", calibration=calibration, plop=plop, cka=cka, kappa=kappa)
    if calibration.file is not None:
        check_text_file(calibration.file, "--calibration.file")
    check_lora(lora_r, lora_alpha)
    check_precision(precision, PRECISION_DTYPES)
    check_calibration_prompts(spec, cka, calibration.num_samples, "--method")
    checkpoint_dir = Path(checkpoint_dir)
    config = check_checkpoint(checkpoint_dir, tokenizer=spec.calibrates)
    check_out_dir(out_dir)
    candidate_kinds = kinds_from_flags(
        config, lora_query=lora_query, lora_key=lora_key, lora_value=lora_value, lora_projection=lora_projection,
        lora_mlp=lora_mlp, lora_head=lora_head,
    )  # fmt: skip
    if not candidate_kinds:
        raise PlacementError("Every --lora_* flag is off: there are no candidate kinds to choose from")
    token_ids = None
    if spec.calibrates:
        token_ids = calibration_token_ids(calibration, Tokenizer(checkpoint_dir), data)
        check_calibration_prompts(spec, cka, len(token_ids), "--method")  # a file or data set may hold fewer
    if spec.calibrates and sequential:
        model = CheckpointBlocks(checkpoint_dir, precision, quantize)
    else:
        model = load_checkpoint_model(checkpoint_dir, precision, quantize)
    t0 = time.perf_counter()
    placement = decide_placement(
        model, method, token_ids, candidate_kinds, lora_r, lora_alpha, calibration=calibration, plop=plop, cka=cka,
        kappa=kappa,
    )  # fmt: skip
    write_placement_files(placement, model.config, out_dir)
    print(summary_table(placement, model.config))
    print(f"Decided in {time.perf_counter() - t0:.1f}s. Wrote placement.json, report.md and scores.png to {str(out_dir)!r}")
    return placement

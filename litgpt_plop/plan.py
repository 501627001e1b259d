"""``litgpt-plop plan``: calibrate a pretrained model on task prompts and show where LoRA would go. No training.

Also the pieces ``finetune`` shares with it: loading the base model (optionally 4-bit), turning a method name
into a placement, and writing ``placement.json``, ``report.md`` and ``scores.png``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from litgpt import Config
from litgpt.data import DataModule
from litgpt.model import GPT
from litgpt.tokenizer import Tokenizer
from litgpt.utils import check_valid_checkpoint_dir

from litgpt_plop.args import CalibrationArgs, CkaArgs, PlopArgs
from litgpt_plop.calibration import calibration_token_ids
from litgpt_plop.placement import PRESETS, Placement, PlacementError, kinds_from_flags, preset
from litgpt_plop.report import summary_table, write_report
from litgpt_plop.select import METHODS, plan_placement

# Methods that calibrate, then the fixed placements they are compared against.
PLAN_METHODS = METHODS + PRESETS
QuantizeChoice = Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq"]
PRECISION_DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}


def check_plan_method(method: str) -> None:
    if method not in PLAN_METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {list(PLAN_METHODS)}")


def load_checkpoint_model(
    checkpoint_dir: Path, precision: str | None = None, quantize: QuantizeChoice | None = None
) -> GPT:
    """A frozen ``litgpt.model.GPT`` with the checkpoint's weights, on the GPU if there is one.

    ``quantize`` swaps the block linears for bitsandbytes 4-bit ones (this works on CPU as well as GPU).
    """
    checkpoint_dir = Path(checkpoint_dir)
    try:
        check_valid_checkpoint_dir(checkpoint_dir, verbose=False, raise_error=True, ignore_tokenizer_files=True)
    except FileNotFoundError:
        raise ValueError(
            f"{str(checkpoint_dir)!r} is not a LitGPT checkpoint directory: it needs lit_model.pth and"
            " model_config.yaml (make one with `litgpt download` or `litgpt convert_to_litgpt`)"
        ) from None
    if precision is not None and precision not in PRECISION_DTYPES:
        raise ValueError(f"Unsupported --precision {precision!r}; choose one of {list(PRECISION_DTYPES)}")
    config = Config.from_file(checkpoint_dir / "model_config.yaml")
    with torch.device("meta"):
        model = GPT(config)
    state_dict = torch.load(checkpoint_dir / "lit_model.pth", map_location="cpu", mmap=True, weights_only=True)
    state_dict = state_dict.get("model", state_dict)
    model.load_state_dict(state_dict, assign=True)
    # the rope cache is a non-persistent buffer, so it is still on the meta device: build it for real
    model.cos, model.sin = model.rope_cache(device=torch.device("cpu"))
    if precision is not None:
        model.to(PRECISION_DTYPES[precision])
    model.requires_grad_(False)
    if quantize is not None:
        from litgpt_plop.quantize import quantize_linears_4bit

        quant_type = quantize[len("bnb.") :].removesuffix("-dq")
        quantize_linears_4bit(model, quant_type=quant_type, double_quant=quantize.endswith("-dq"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device)


def decide_placement(
    model: torch.nn.Module,
    method: str,
    token_ids: list[torch.Tensor] | None,
    candidate_kinds: list[str],
    lora_r: int,
    lora_alpha: int,
    calibration: CalibrationArgs,
    plop: PlopArgs,
    cka: CkaArgs,
    seed: int | None = None,
) -> Placement:
    """Calibrate and decide for the scoring methods; build the named placement for the fixed presets.

    ``seed`` draws the ``random`` preset's kinds (default: ``calibration.seed``).
    """
    check_plan_method(method)
    if method in PRESETS:
        config = model.config
        seed = calibration.seed if seed is None else seed
        placement = preset(method, config, rank=lora_r, lora_alpha=lora_alpha, candidates=candidate_kinds, seed=seed)
        if method != "random":
            placement = placement.restricted(kinds=candidate_kinds)
        placement.validate(config)
        return placement
    if not token_ids:
        raise ValueError("Calibration data is empty: no prompts to score on")
    return plan_placement(
        model,
        token_ids,
        method=method,
        rank=lora_r,
        lora_alpha=lora_alpha,
        candidate_kinds=candidate_kinds,
        plop=plop,
        cka=cka,
        calibration=calibration,
    )


def write_outputs(placement: Placement, config: Config, out_dir: Path) -> None:
    """``placement.json``, ``report.md`` and ``scores.png``: built in a temporary directory, then moved into place."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".plan-"))
    try:
        placement.save(staging / "placement.json", config)
        write_report(placement, config, staging)
        for file in sorted(staging.iterdir()):
            os.replace(file, out_dir / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def plan(
    checkpoint_dir: Path,
    method: str = "plop",
    out_dir: Path = Path("out/plan"),
    data: DataModule | None = None,
    calibration: CalibrationArgs = CalibrationArgs(),
    plop: PlopArgs = PlopArgs(),
    cka: CkaArgs = CkaArgs(),
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
) -> Placement:
    """Calibrate a pretrained model on task prompts and decide where LoRA goes, without training.

    Writes ``placement.json``, ``report.md`` and ``scores.png`` to ``out_dir`` and prints a summary.

    Arguments:
        checkpoint_dir: The LitGPT checkpoint directory of the pretrained model.
        method: ``plop``, ``plop-inverse``, ``cka``, ``plop+cka``, or a fixed placement (``all``,
            ``attention``, ``qv``, ``mlp``, ``random``) for comparison.
        out_dir: Where the placement and its report go.
        data: A LitGPT DataModule whose training prompts calibrate (ignored when ``--calibration.file`` is set).
        calibration: The calibration pass: prompts, how many, batch size, length.
        plop: PLoP's options.
        cka: Layer-wise CKA's options.
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
    """
    check_plan_method(method)
    checkpoint_dir = Path(checkpoint_dir)
    model = load_checkpoint_model(checkpoint_dir, precision, quantize)
    candidate_kinds = kinds_from_flags(
        model.config,
        lora_query=lora_query,
        lora_key=lora_key,
        lora_value=lora_value,
        lora_projection=lora_projection,
        lora_mlp=lora_mlp,
        lora_head=lora_head,
    )
    if not candidate_kinds:
        raise PlacementError("Every --lora_* flag is off: there are no candidate kinds to choose from")
    token_ids = None
    if method not in PRESETS:
        tokenizer = Tokenizer(checkpoint_dir)
        token_ids = calibration_token_ids(calibration, tokenizer, data)
    t0 = time.perf_counter()
    placement = decide_placement(model, method, token_ids, candidate_kinds, lora_r, lora_alpha, calibration, plop, cka)
    write_outputs(placement, model.config, out_dir)
    print(summary_table(placement, model.config))
    print(f"Decided in {time.perf_counter() - t0:.1f}s. Wrote placement.json, report.md and scores.png to {str(out_dir)!r}")
    return placement

"""What the GPU check runs, and the worker that makes sure it can: the finetunes' settings and command lines, and
a worker process that records the environment (versions, the GPU, the bitsandbytes library that loads, a 4-bit
matmul on CUDA), parses every finetune command line with the commands' own parsers and builds the random-weight
checkpoints the finetunes train (memory and speed do not depend on the weights' values).

``benchmarks.gpu_check`` starts the worker with ``benchmarks.common.json_worker``, in the environment of the
installed kit (on the GPU machine) or of the staged packages (``--dry-run``)::

    report = json_worker("benchmarks.gpu_prepare", spec, "prepare", log=LOG, timeout=120)

where ``spec`` has ``tokenizer_dir``, ``checkpoints`` (shape label -> directory), ``build`` (the labels to build
for real; the others are built on the meta device only) and ``commands`` (name -> command line).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import answer_worker
from benchmarks.gpu_kit import TOKENIZER_FILES

# label -> LitGPT config name. The ratio the issue asks for is taken on the first (the larger model).
SHAPES: dict[str, str] = {"Llama-3.2-1B": "Llama-3.2-1B", "SmolLM2-135M": "SmolLM2-135M"}
CPU_SHAPE = "SmolLM2-135M"  # small enough for a dry run to build for real on CPU (326 MB in bf16)
KINDS = ("litgpt", "plugin-qv", "plugin-plop")
# issue #28: the device memory of a plan that brings one block at a time onto the GPU, on an 8B shape (16 GB)
PLAN_SHAPE = "Llama-3.1-8B"
PLAN_PROMPTS = 16  # as benchmarks.scaling plans the same shape on CPU (prompts of reasoning-gym items)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every finetune run gets: the same data, steps, batch and seed."""

    steps: int = 20
    micro_batch_size: int = 4
    train_size: int = 64
    val_size: int = 8
    max_seq_length: int = 256
    calibration_samples: int = 32
    seed: int = 1337


def finetune_argv(
    kind: str, checkpoint_dir: Path, out_dir: Path, settings: Settings, quantize: str | None = "bnb.nf4",
    precision: str = "bf16-true",
) -> list[str]:  # fmt: skip
    """The command line of one run (``litgpt ...`` or ``litgpt-plop ...``, as ``benchmarks.command_worker`` takes it).

    Every run trains the same micro-batches: reasoning-gym items in Alpaca's prompt style (not the one LitGPT
    would pick per model, so both shapes see the same tokens), no periodic save, no validation beyond the two
    batches LitGPT's loop always checks first, one CSV row per step.
    """
    s = settings
    common = [
        str(checkpoint_dir), "--out_dir", str(out_dir), "--precision", precision,
        "--data", "litgpt_plop.data.ReasoningGym", "--data.train_size", str(s.train_size),
        "--data.val_size", str(s.val_size), "--data.prompt_style", "alpaca",
        "--train.micro_batch_size", str(s.micro_batch_size), "--train.global_batch_size", str(s.micro_batch_size),
        "--train.max_steps", str(s.steps), "--train.max_seq_length", str(s.max_seq_length),
        "--train.lr_warmup_steps", "2", "--train.save_interval", "100000", "--train.log_interval", "1",
        "--eval.interval", "100000", "--eval.initial_validation", "false", "--eval.final_validation", "false",
        "--logger_name", "csv", "--seed", str(s.seed),
    ]  # fmt: skip
    if quantize:
        common += ["--quantize", quantize]
    if kind == "litgpt":
        return ["litgpt", "finetune_lora", *common]  # LitGPT's defaults: LoRA on query and value, rank 8
    if kind.startswith("plugin-"):  # plugin-qv, plugin-plop, ... (plugin-none: the tests)
        method = kind.removeprefix("plugin-")
        calibration = ["--calibration.num_samples", str(s.calibration_samples)] if method.startswith("plop") else []
        return ["litgpt-plop", "finetune", *common, "--plugin", method, *calibration]
    raise ValueError(f"unknown run kind {kind!r}: 'litgpt' or 'plugin-<method>'")


def plan_argv(checkpoint_dir: Path, out_dir: Path, prompts: int = PLAN_PROMPTS) -> list[str]:
    """``litgpt-plop plan`` as ``benchmarks.scaling`` runs it on CPU: PLoP in bf16, block by block (the default)."""
    return [
        "litgpt-plop", "plan", str(checkpoint_dir), "--precision", "bf16-true", "--method", "plop",
        "--data", "litgpt_plop.data.ReasoningGym", "--data.train_size", str(prompts), "--data.val_size", "2",
        "--calibration.num_samples", str(prompts), "--calibration.progress", "false", "--out_dir", str(out_dir),
    ]  # fmt: skip


# ---- the prepare worker: environment, command parsing, checkpoints ----------------------------------------


def parse_command(argv: list[str]) -> dict[str, Any]:
    """Parse a ``litgpt`` / ``litgpt-plop`` command line with that command's own jsonargparse parser (the same
    process-wide settings as its entry point) and instantiate its classes, without running it."""
    from jsonargparse import CLI, capture_parser, set_config_read_mode, set_docstring_parse_options

    set_docstring_parse_options(attribute_docstrings=True)
    set_config_read_mode(urls_enabled=True)
    if argv[0] == "litgpt":
        from litgpt.__main__ import PARSER_DATA as commands
    else:
        from litgpt_plop.commands.cli import parser_data

        commands = parser_data()
    parser = capture_parser(lambda: CLI(commands, args=argv[1:]))
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            cfg = parser.parse_args(argv[1:])
    except SystemExit:  # jsonargparse prints the usage and exits on a bad command line
        lines = errors.getvalue().strip().splitlines() or ["(no message)"]
        raise ValueError(f"`{shlex.join(argv[:2])} ...` does not parse: {lines[-1]}") from None
    init = parser.instantiate_classes(cfg)
    subcommand = cfg["subcommand"]
    data = init[subcommand].get("data")
    return {"subcommand": subcommand, "data": type(data).__name__, "quantize": cfg[subcommand].get("quantize")}


def build_random_checkpoint(config_name: str, checkpoint_dir: Path, tokenizer_dir: Path, device: str, real: bool) -> dict[str, Any]:
    """A LitGPT checkpoint shaped like ``config_name`` with random bf16 weights (N(0, 0.02); norm scales 1, biases
    0, so activations keep their scale) and SmolLM2's tokenizer files. ``real=False``: the shape only (meta
    device), nothing written."""
    import torch
    from litgpt import GPT, Config
    from litgpt.utils import save_config

    start = time.perf_counter()
    config = Config.from_name(config_name)
    with torch.device("meta"):
        model = GPT(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    figures: dict[str, Any] = {
        "config": config_name, "params": params, "bf16_bytes": 2 * params, "n_layer": config.n_layer,
        "n_embd": config.n_embd, "padded_vocab_size": config.padded_vocab_size, "built": real,
    }  # fmt: skip
    if not real:
        return figures
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device).manual_seed(0)
    state = {}
    for name, shape in shapes.items():
        tensor = torch.empty(shape, dtype=torch.bfloat16, device=device)
        if len(shape) == 1:
            tensor.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
        state[name] = tensor.cpu()
    torch.save(state, checkpoint_dir / "lit_model.pth")
    save_config(config, checkpoint_dir)
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_dir / name, checkpoint_dir / name)
    figures.update(path=str(checkpoint_dir), file_bytes=(checkpoint_dir / "lit_model.pth").stat().st_size,
                   seconds=round(time.perf_counter() - start, 1))  # fmt: skip
    return figures


def cuda_4bit_probe() -> dict[str, Any]:
    """A bitsandbytes NF4 round trip and a 4-bit linear forward and backward on CUDA in bf16: the kernels of the
    slimmed library, before any finetune depends on them."""
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    weight = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4")
    error = (bnb.functional.dequantize_4bit(packed, state) - weight).abs().mean() / weight.abs().mean()
    layer = bnb.nn.Linear4bit(128, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4")
    layer = layer.cuda()
    x = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().pow(2).sum().backward()
    return {"nf4_relative_error": float(error), "backward_finite": bool(torch.isfinite(x.grad).all())}


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """The prepare subprocess: environment, tokenizer, checkpoints, and every command line parsed."""
    import importlib.metadata as metadata

    import torch

    report: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable}
    for dist in ("torch", "lightning", "litgpt", "bitsandbytes", "jsonargparse", "reasoning-gym", "transformers"):
        try:
            report[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            report[dist] = None
    report["torch_cuda"] = torch.version.cuda
    cuda = torch.cuda.is_available()
    report["device"] = "cuda" if cuda else "cpu"
    if cuda:
        properties = torch.cuda.get_device_properties(0)
        report.update(gpu_name=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                      compute_capability=f"{properties.major}.{properties.minor}")  # fmt: skip
    import bitsandbytes
    import litgpt_plop

    try:  # which native library bitsandbytes loaded (the slimmed kit has the CUDA 13.0 one and the CPU one)
        report["bitsandbytes_library"] = Path(bitsandbytes.cextension.lib._lib._name).name
    except Exception as error:  # noqa: BLE001 - a record, not a requirement
        report["bitsandbytes_library"] = f"unknown ({error!r})"
    report["bitsandbytes_path"] = str(Path(bitsandbytes.__file__).parent)
    report["litgpt_plop_path"] = str(Path(litgpt_plop.__file__).parent)
    import litgpt_plop.callbacks  # noqa: F401  (the package-dir mapping: only an install or the staged copy has it)

    if cuda:
        try:  # recorded, not fatal: the finetunes below show the same failure in full
            report["cuda_4bit"] = cuda_4bit_probe()
        except Exception as error:  # noqa: BLE001
            report["cuda_4bit"] = {"error": repr(error)[:2000]}
    from litgpt.tokenizer import Tokenizer

    tokenizer_dir = Path(spec["tokenizer_dir"])
    report["tokenizer_ids"] = Tokenizer(tokenizer_dir).encode("What is 12 + 30?").tolist()
    device = "cuda" if cuda else "cpu"
    # a label outside SHAPES (the plan's, the tests' small ones) is itself a LitGPT config name
    report["checkpoints"] = {
        label: build_random_checkpoint(SHAPES.get(label, label), Path(path), tokenizer_dir, device, real=label in spec["build"])
        for label, path in spec["checkpoints"].items()
    }
    report["commands"] = {name: parse_command(argv) for name, argv in spec["commands"].items()}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--_worker", type=Path, required=True, help="the spec file (``json_worker`` writes it)")
    args = parser.parse_args(argv)
    answer_worker(args._worker, prepare)
    return 0


if __name__ == "__main__":
    sys.exit(main())

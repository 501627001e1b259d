"""Random-weight LitGPT checkpoints shaped like named LitGPT configs, for memory and time measurements at scale.

Memory and step time do not depend on the weights' values, so a checkpoint with the layer count, widths and
vocabulary of ``Llama-3.2-1B`` (say) measures what loading, calibrating and finetuning that model costs without
downloading it. The model is built on the meta device and each tensor is filled on its own (bf16 by default):
linear and embedding weights N(0, 0.02), norm weights 1, biases 0 (so activations keep a sensible scale).
SmolLM2-135M-Instruct's tokenizer files are copied beside it (its ids, < 49152, fit every Llama vocabulary),
which makes the directory usable by ``litgpt-plop plan`` and ``finetune``. Scores computed on such a model mean
nothing; only its costs do.

The checkpoints are large (1B: 3.0 GB, 3B: 6.4 GB in bf16) and never committed: they go under
``checkpoints/shaped/`` (git-ignored). Delete them after measuring (``--delete``).

A name ``<config>@<n>`` keeps the config's widths and vocabulary with ``n`` blocks: ``Llama-3.1-70B@4`` is four
blocks of Llama-3.1-70B (11 GB in bf16), enough to measure what one block of a 70B model costs without 140 GB.
Tensors are written as they are drawn (LitGPT's ``incremental_save``), so building holds about one tensor: an
8B shape (16 GB) builds on a 24 GB machine.

    python -m benchmarks.shaped Llama-3.2-1B              # -> checkpoints/shaped/Llama-3.2-1B
    python -m benchmarks.shaped Llama-3.1-70B@4           # -> checkpoints/shaped/Llama-3.1-70B@4
    python -m benchmarks.shaped Llama-3.2-3B --delete
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from benchmarks.common import DEFAULT_CHECKPOINT, REPO_ROOT

SHAPED_ROOT = REPO_ROOT / "checkpoints" / "shaped"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def shaped_dir(name: str, root: Path = SHAPED_ROOT) -> Path:
    return Path(root) / name


def config_of(name: str):
    """The LitGPT config a shape name stands for: ``<config>`` or ``<config>@<n_layer>``."""
    from litgpt import Config

    base, _, n_layer = name.partition("@")
    if n_layer and not n_layer.isdigit():
        raise SystemExit(f"{name!r}: the part after '@' is a number of blocks, e.g. Llama-3.1-70B@4")
    return Config.from_name(base, **({"n_layer": int(n_layer)} if n_layer else {}))


def checkpoint_bytes(name: str, dtype_bytes: int = 2) -> int:
    """The size of a shaped checkpoint's weights, from the config alone (no model built)."""
    import torch
    from litgpt.model import GPT

    with torch.device("meta"):
        model = GPT(config_of(name))
    return sum(p.numel() for p in model.parameters()) * dtype_bytes


def build(name: str, root: Path = SHAPED_ROOT, dtype: str = "bfloat16", seed: int = 0, tokenizer_dir: Path = DEFAULT_CHECKPOINT) -> Path:
    """Write ``root/name`` (``lit_model.pth``, ``model_config.yaml``, tokenizer files) unless it is already complete.

    Written into a temporary directory that is renamed when complete, so an interrupted build never looks done.
    """
    import torch
    from litgpt.model import GPT
    from litgpt.utils import incremental_save, save_config

    out = shaped_dir(name, root)
    if (out / "lit_model.pth").is_file() and (out / "model_config.yaml").is_file():
        return out
    config = config_of(name)
    with torch.device("meta"):
        model = GPT(config)
    generator = torch.Generator().manual_seed(seed)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with incremental_save(partial / "lit_model.pth") as saver:
        state = {}
        for key, param in model.state_dict().items():
            tensor = torch.empty(param.shape, dtype=getattr(torch, dtype))
            if key.endswith(".bias"):
                tensor.zero_()
            elif "norm" in key or key.startswith("transformer.ln_f"):
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, 0.02, generator=generator)
            state[key] = saver.store_early(tensor)  # written now; the tensor itself is dropped
        saver.save(state)
    save_config(config, partial)
    for file in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / file).is_file():
            shutil.copy(Path(tokenizer_dir) / file, partial / file)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def delete(name: str, root: Path = SHAPED_ROOT) -> None:
    shutil.rmtree(shaped_dir(name, root), ignore_errors=True)
    shutil.rmtree(shaped_dir(name, root).with_name(name + ".partial"), ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.shaped",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="+", help="LitGPT config names, e.g. Llama-3.2-1B, or <config>@<blocks>, e.g. Llama-3.1-70B@4")
    parser.add_argument("--root", type=Path, default=SHAPED_ROOT, help="where the checkpoints go (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--delete", action="store_true", help="delete the named checkpoints instead of building them")
    args = parser.parse_args(argv)
    for name in args.names:
        if args.delete:
            delete(name, args.root)
            print(f"deleted {shaped_dir(name, args.root)}")
            continue
        free = shutil.disk_usage(args.root.parent if not args.root.exists() else args.root).free
        needed = checkpoint_bytes(name, 2 if args.dtype != "float32" else 4)
        if free < 2 * needed:
            raise SystemExit(f"{name} needs {needed / 2**30:.1f} GiB; only {free / 2**30:.1f} GiB free")
        start = time.perf_counter()
        out = build(name, args.root, args.dtype)
        print(f"{out} ({needed / 1e9:.2f} GB of weights) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

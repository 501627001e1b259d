"""What the final merge of a finetune holds in memory: the pages it owns, and the checkpoint's file pages it maps.

A finetune ends by writing a merged dense ``lit_model.pth``: ``litgpt finetune_lora`` with LitGPT's
``merge_lora``, ``litgpt-plop finetune`` with the streamed merge (``litgpt_plop.model.merge``), which writes the
same tensors. ``merge_lora`` memory-maps the base checkpoint (``torch.load(mmap=True)``), casts the model to the
adapter's dtype, adds B·A into each adapted weight in place, and saves every tensor at once; the streamed merge
makes, writes and drops one tensor at a time. Their resident memory has two parts, which this script measures
apart in a worker process (``/proc/<pid>/status`` sampled every 10 ms by ``benchmarks.common.run_worker``):

- ``RssFile``: the checkpoint's pages, read through the mapping. They are clean copies of a file, which the
  kernel drops when memory runs short and reads again when needed: they make RSS large, not memory required.
- ``RssAnon``: memory the process owns. For ``merge_lora``, an in-place add on a private file mapping copies
  each adapted weight into anonymous pages (and a cast copies every weight), so this grows with the weights the
  placement adapts, plus the interpreter's own; for the streamed merge, about one weight.

For each placement (a LitGPT flag set: ``qv`` is LitGPT's default, ``all`` every block linear and the head off)
an adapter of random values in stock layout is merged into ``--checkpoint_dir`` by each of ``--mergers``:
``stock`` (LitGPT's ``merge_lora``) and ``streamed`` (``litgpt_plop.model.merge.merge_streamed``, which the
plugin's ``final/`` uses: the same tensors, written one at a time); ``import`` is a worker that only imports what
the merges import (the interpreter's own share). Results: ``merge_memory.{json,md}``.

Run (from the repository root; the shaped checkpoints come from ``python -m benchmarks.shaped``)::

    python -m benchmarks.merge_memory --checkpoint_dir checkpoints/shaped/Llama-3.2-1B
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_ROOT, answer_worker, benchmark_parser, checked_worker, command_line, git_commit, machine, write_results

GIB = 2**30
PLACEMENTS = {
    "qv": ("query", "value"),
    "attention": ("query", "key", "value", "projection"),
    "all": ("query", "key", "value", "projection", "mlp"),
}


def write_adapter(checkpoint_dir: Path, kinds: tuple[str, ...], out_dir: Path, rank: int = 8) -> int:
    """A stock adapter directory for ``kinds`` (random bf16 A and B, LitGPT's layout and hyperparameters.yaml) that
    ``merge_lora`` merges into ``checkpoint_dir``. Returns the bytes of the base weights the merge rewrites."""
    import litgpt.lora
    import torch
    import yaml

    flags = {f"lora_{kind}": kind in kinds for kind in ("query", "key", "value", "projection", "mlp", "head")}
    lora = {"lora_r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, **flags}
    config = litgpt.lora.Config.from_file(checkpoint_dir / "model_config.yaml", **lora)
    with torch.device("meta"):
        model = litgpt.lora.GPT(config)
    generator = torch.Generator().manual_seed(0)
    state = {
        name: (torch.randn(p.shape, generator=generator) * 0.01).to(torch.bfloat16)
        for name, p in model.state_dict().items()
        if "lora_" in name
    }
    adapted = {name.rsplit(".lora_", 1)[0] for name in state}
    # in bf16, the precision the merge runs in (the meta model is float32)
    rewritten = sum(
        2 * p.numel()
        for name, p in model.state_dict().items()
        if name.endswith(".linear.weight") and name.rsplit(".linear.", 1)[0] in adapted
    )
    out_dir.mkdir(parents=True)
    for name in ("model_config.yaml", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if (checkpoint_dir / name).is_file():  # merge_lora checks for the config and tokenizer files
            shutil.copy(checkpoint_dir / name, out_dir / name)
    torch.save(state, out_dir / "lit_model.pth.lora")
    hparams = {**lora, "checkpoint_dir": str(checkpoint_dir), "precision": "bf16-true"}
    (out_dir / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams))
    return rewritten


def merge_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: import stock ``merge_lora`` (it imports lightning, torch and ``litgpt.lora``) and the
    streamed merge and, unless ``spec["adapter_dir"]`` is None (the worker that measures the interpreter's own
    share), merge that adapter with ``spec["merger"]``."""
    import yaml
    from litgpt.scripts.merge_lora import merge_lora

    from litgpt_plop.model.merge import merge_streamed

    if spec["adapter_dir"] is not None:
        adapter_dir = Path(spec["adapter_dir"])
        if spec.get("merger", "stock") == "stock":
            merge_lora(adapter_dir)
        else:
            base = yaml.safe_load((adapter_dir / "hyperparameters.yaml").read_text())["checkpoint_dir"]
            merge_streamed(adapter_dir, Path(base))
    return {"merged": spec["adapter_dir"] is not None}


def peak_status(adapter_dir: Path | None, timeout_s: float = 1800, merger: str = "stock") -> dict[str, Any]:
    """``merge_worker`` in a fresh process: the peaks of its ``VmRSS``, ``RssAnon`` and ``RssFile`` (GiB, sampled
    every 10 ms) and its wall time; ``RuntimeError`` when it fails."""
    spec = {"adapter_dir": None if adapter_dir is None else str(adapter_dir), "merger": merger}
    what = "the import-only worker" if adapter_dir is None else f"the {merger} merge of {adapter_dir}"
    _, run = checked_worker("benchmarks.merge_memory", spec, what, timeout=timeout_s)
    peaks = {"VmRSS": run.peak_vmrss_mib, "RssAnon": run.peak_anon_mib, "RssFile": run.peak_file_mib}
    return {**{f"{k}_gib": (mib or 0.0) / 1024 for k, mib in peaks.items()}, "wall_s": run.wall_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = benchmark_parser("benchmarks.merge_memory", __doc__)
    parser.add_argument("--placements", nargs="+", choices=list(PLACEMENTS), default=["qv", "all"])
    parser.add_argument("--mergers", nargs="+", choices=["stock", "streamed"], default=["stock", "streamed"])
    parser.add_argument("--out_dir", type=Path, default=RESULTS_ROOT)
    parser.add_argument("--_worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        answer_worker(args._worker, merge_worker)
        return {}
    checkpoint_dir = args.checkpoint_dir.resolve()
    checkpoint_gib = (checkpoint_dir / "lit_model.pth").stat().st_size / GIB

    rows = [{"placement": "import", "merger": "-", "rewritten_gib": 0.0, **peak_status(None)}]
    for name in args.placements:
        for merger in args.mergers:
            with tempfile.TemporaryDirectory(prefix="merge_memory-") as tmp:
                adapter_dir = Path(tmp) / name
                rewritten = write_adapter(checkpoint_dir, PLACEMENTS[name], adapter_dir) / GIB
                rows.append({"placement": name, "merger": merger, "rewritten_gib": rewritten, **peak_status(adapter_dir, merger=merger)})
            print(rows[-1], flush=True)
    baseline = rows[0]["RssAnon_gib"]
    for row in rows[1:]:
        # what the merge owns beyond the interpreter, per GiB of weights it rewrote
        row["anon_over_rewritten"] = (row["RssAnon_gib"] - baseline) / row["rewritten_gib"]
        row["file_over_checkpoint"] = row["RssFile_gib"] / checkpoint_gib

    lines = [
        f"# Memory of the final merge (stock `litgpt merge_lora`, streamed) on {checkpoint_dir.name} ({checkpoint_gib:.2f} GiB checkpoint)",
        "",
        f"`{command_line('benchmarks.merge_memory', argv)}` at commit {git_commit()}. Peaks over the worker's life, GiB;",
        "RssAnon is memory the process owns, RssFile the checkpoint's clean file pages (reclaimable).",
        "",
        "| placement | merge | weights rewritten | peak VmRSS | peak RssAnon | peak RssFile | (anon - import) / rewritten | file / checkpoint | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratios = (
            f"{row['anon_over_rewritten']:.2f} | {row['file_over_checkpoint']:.2f}" if "anon_over_rewritten" in row else "- | -"
        )
        lines.append(
            f"| {row['placement']} | {row['merger']} | {row['rewritten_gib']:.2f} | {row['VmRSS_gib']:.2f} | {row['RssAnon_gib']:.2f} |"
            f" {row['RssFile_gib']:.2f} | {ratios} | {row['wall_s']:.1f} |"
        )
    data = {"checkpoint_dir": str(checkpoint_dir), "checkpoint_gib": checkpoint_gib, "rows": rows, "machine": machine()}
    print("\n".join(lines))
    write_results(args.out_dir, f"merge_memory-{checkpoint_dir.name}", data, "\n".join(lines))
    return data


if __name__ == "__main__":
    main()

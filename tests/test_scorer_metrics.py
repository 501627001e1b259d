"""The scorers' statistics as torchmetrics ``Metric``s (``litgpt_plop.scoring.metrics``): update, compute, reset on
one process; on two gloo processes, rows gathered in rank order (a rank with none included), dtypes kept, counts
summed, durations maxed, the scorers' per-prompt rows exactly one process's; and ``PLoPCallback`` logging its
placement's scores and sites through a real Trainer's CSVLogger."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.loggers import CSVLogger

from litgpt_plop.args import CalibrationArgs
from litgpt_plop.callbacks import PLoPCallback
from litgpt_plop.distributed import all_gather_rows
from litgpt_plop.scoring.calibration import calibrate, make_batches
from litgpt_plop.scoring.cka import CkaScorer
from litgpt_plop.scoring.metrics import HsicSums, PooledRows, PromptSums, Totals
from litgpt_plop.scoring.plop import PlopScorer
from litgpt_plop.selection.placement import model_kinds

from helpers import SCORING_MODEL, random_gpt, tiny_config, trainer
from test_callbacks import lit_module, loader

UNITS = 3


def rank_rows(rank: int) -> list[torch.Tensor]:
    """What rank ``rank`` adds to a ``PromptSums``: rank 0 two batches (2 and 1 prompts), rank 1 one of 3. Thirds are
    not float32 numbers: a float32 round trip anywhere would change them."""
    sizes = [2, 1] if rank == 0 else [3]
    start = 0 if rank == 0 else 100
    rows = []
    for size in sizes:
        rows.append(torch.arange(start, start + size * UNITS * 2, dtype=torch.float64).view(size, UNITS, 2) / 3)
        start += size * UNITS * 2
    return rows


def pooled_rows(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch)
    return torch.randn(batch + 2, 5, generator=generator), torch.randn(batch + 2, 5, generator=generator)


def scorers_and_batches():
    gpt = random_gpt(tiny_config(n_layer=2, **SCORING_MODEL))
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 100, (int(n),), generator=generator) for n in torch.randint(3, 20, (11,), generator=generator)]
    batches, _ = make_batches(prompts, batch_size=3, max_seq_length=64)  # 4 batches: 3, 3, 3 and 2 prompts
    layers = range(2)
    scorers = [PlopScorer(gpt, model_kinds(gpt.config), layers), CkaScorer(gpt, layers, "last"), CkaScorer(gpt, layers, "tokens")]
    return gpt, batches, scorers


def test_metrics_update_compute_and_reset_on_one_process():
    sums = PromptSums(UNITS)
    for rows in rank_rows(0):
        sums.update(rows)
    rows, batches = sums.compute()
    assert rows.dtype == torch.float64 and torch.equal(rows, torch.cat(rank_rows(0))) and batches == 2
    sums.reset()
    sums.update(rank_rows(1)[0])
    rows, batches = sums.compute()
    assert torch.equal(rows, rank_rows(1)[0]) and batches == 1  # nothing of before the reset
    sums.reset()
    assert sums.rows_of("rows").shape == (0, UNITS, 2) and int(sums.batches) == 0

    totals = Totals(counts=("samples", "tokens"), durations=("seconds",))
    totals.update(samples=3, tokens=40, seconds=1.5)
    totals.update(samples=2, tokens=7, seconds=0.5)
    assert totals.compute() == {"samples": 5, "tokens": 47, "seconds": 1.5}
    with pytest.raises(KeyError, match="'batches'"):
        totals.update(batches=1)

    hsic = HsicSums(2, 3)
    hsic.update(torch.full((2, 3), 1 / 3, dtype=torch.float64))
    hsic.update(torch.full((2, 3), 1 / 3, dtype=torch.float64), skipped=1)
    total, skipped = hsic.compute()
    assert torch.equal(total, torch.full((2, 3), 1 / 3, dtype=torch.float64) + 1 / 3) and skipped == 1

    gpt, batches, scorers = scorers_and_batches()
    calibrate(gpt, batches, scorers, progress=False)  # reduces: the local statistics are reset
    for scorer in scorers:
        with pytest.raises(RuntimeError, match="reduce was already called"):
            scorer.reduce()


def _two_ranks(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        out: dict = {}
        sums = PromptSums(UNITS)
        for rows in rank_rows(rank):
            sums.update(rows)
        out["rows"], out["batches"] = sums.gathered()
        out["local_after_compute"] = sums.rows_of("rows")  # compute gathers, then puts back this rank's own
        pooled = PooledRows(5)
        if rank == 0:  # rank 1 adds no row at all
            for batch in range(2):
                pooled.update(*pooled_rows(batch))
        out["pooled"] = pooled.gathered()
        hsic = HsicSums(2, 3)
        hsic.update(torch.full((2, 3), (rank + 1) / 3, dtype=torch.float64), skipped=rank)
        out["hsic"] = hsic.gathered()
        totals = Totals(counts=("samples",), durations=("seconds",))
        totals.update(samples=rank + 2, seconds=10.0 - rank)
        out["totals"] = totals.gathered()
        out["all_gather_rows"] = all_gather_rows(torch.arange(3 * rank, dtype=torch.int64).view(rank, 3))

        gpt, batches, scorers = scorers_and_batches()
        stats = calibrate(gpt, batches[rank::2], scorers, progress=False)
        out["plop_rows"], out["plop_batches"] = scorers[0].sample_sums, scorers[0].batches
        out["pooled_layer_1"] = [torch.cat(part) for part in scorers[1].pooled[1]]
        out["hsic_sums"] = scorers[2].sums
        out["stats"] = [stats.samples, stats.tokens, stats.batches, stats.world_size]
        torch.save(out, Path(tmp, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_gather_in_rank_order_keep_dtypes_and_match_one_process(tmp_path):
    mp.spawn(_two_ranks, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for rank, out in enumerate(ranks):
        assert out["rows"].dtype == torch.float64
        assert torch.equal(out["rows"], torch.cat(rank_rows(0) + rank_rows(1)))  # rank 0's rows, then rank 1's
        assert out["batches"] == 3
        assert torch.equal(out["local_after_compute"], torch.cat(rank_rows(rank)))
        inputs, outputs = out["pooled"]
        assert inputs.dtype == torch.float32 and inputs.shape == (5, 5)  # rank 0's 2 + 3 rows; rank 1 had none
        assert torch.equal(inputs, torch.cat([pooled_rows(0)[0], pooled_rows(1)[0]]))
        assert torch.equal(outputs, torch.cat([pooled_rows(0)[1], pooled_rows(1)[1]]))
        total, skipped = out["hsic"]
        assert torch.equal(total, torch.full((2, 3), 1 / 3, dtype=torch.float64) + 2 / 3) and skipped == 1
        assert out["totals"] == {"samples": 5, "seconds": 10.0}
        assert torch.equal(out["all_gather_rows"], torch.tensor([[0, 1, 2]]))
        assert out["stats"] == [11, ranks[0]["stats"][1], 4, 2]

    # one process on rank 0's batches then rank 1's: the very same per-prompt rows and pooled vectors, bit for bit
    gpt, batches, scorers = scorers_and_batches()
    stats = calibrate(gpt, batches[0::2] + batches[1::2], scorers, progress=False)
    assert ranks[0]["stats"] == [stats.samples, stats.tokens, stats.batches, 2]
    for out in ranks:
        assert torch.equal(out["plop_rows"], scorers[0].sample_sums) and out["plop_batches"] == 4
        assert all(torch.equal(a, torch.cat(b)) for a, b in zip(out["pooled_layer_1"], scorers[1].pooled[1]))
        # the HSIC sums add each rank's total: the same numbers up to the order of the float64 additions
        torch.testing.assert_close(out["hsic_sums"], scorers[2].sums, rtol=1e-12, atol=0)


def test_callback_logs_the_placements_scores_and_sites_as_metrics(tmp_path):
    callback = PLoPCallback(method="plop+cka", calibration=CalibrationArgs(num_samples=16, batch_size=4))
    module = lit_module()
    run = trainer(tmp_path, [callback], max_steps=1, logger=CSVLogger(tmp_path))
    run.fit(module, train_dataloaders=loader())
    placement = callback.placement
    with open(Path(run.logger.log_dir) / "metrics.csv") as f:
        (row,) = [r for r in csv.DictReader(f) if r.get("plop/sites")]
    logged = {name: float(value) for name, value in row.items() if name.startswith("plop/") and value != ""}
    scores = placement.scores
    assert scores.nfn_per_kind and scores.cka_per_layer  # both methods' scores were computed
    expected = {f"plop/nfn/{kind}": value for kind, value in scores.nfn_per_kind.items()}
    expected |= {f"plop/cka/{layer}": value for layer, value in scores.cka_per_layer.items()}
    expected |= {f"plop/kappa/{kind}": value for kind, value in scores.kappa_per_kind.items()}
    expected |= {f"plop/adapted/{site.layer}.{site.kind}": 1.0 for site in placement.sites}
    expected["plop/sites"] = float(len(placement.sites))
    expected["plop/trainable_params"] = float(placement.trainable_params(module.model.config))
    assert logged == expected  # every number exactly, and nothing else
    assert 0 < len(placement.sites) < len(scores.candidate_layers) * len(scores.candidate_kinds)

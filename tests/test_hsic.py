"""CKA over all tokens as the pass computes it (``litgpt_plop.scoring.hsic.BatchHsic``): one Gram matrix per block boundary,
computed a panel at a time, shared by the two blocks it joins.

* every HSIC term equals ``unbiased_hsic`` on the same rows to float64 rounding, with one panel or several, in the
  Gram form (fewer tokens than features) and the feature form, on right-padded batches;
* sharing a block's output with the next block changes nothing: the scores of the blocks scored either way are
  bit-identical whether their neighbours are scored too or not.
"""

from __future__ import annotations

import pytest
import torch

from helpers import random_gpt, tiny_config
from litgpt_plop.scoring.calibration import calibrate, make_batches
from litgpt_plop.scoring.hsic import BatchHsic, unbiased_hsic
from litgpt_plop.scoring.cka import CkaScorer


@pytest.mark.parametrize("batch, length, width", [(2, 5, 16), (8, 40, 576), (8, 70, 700), (4, 30, 32)])
def test_batch_hsic_terms_equal_unbiased_hsic(batch, length, width):
    generator = torch.Generator().manual_seed(batch * length)
    x = torch.randn(batch, length, width, generator=generator) * 2 + torch.randn(width, generator=generator)
    y = x + 0.5 * torch.randn(batch, length, width, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1:, length - 3 :] = False  # right padding
    hsic = BatchHsic(mask)
    x_side, y_side = hsic.side(x), hsic.side(y)
    assert hsic.side(y) is y_side  # the same tensor, unchanged: not computed again
    xs, ys = x[mask].double(), y[mask].double()
    xc, yc = xs - xs.mean(dim=0), ys - ys.mean(dim=0)
    expected = [unbiased_hsic(xc, yc), unbiased_hsic(xc, xc), unbiased_hsic(yc, yc)]
    got = [hsic.cross_hsic(x_side, y_side), x_side.self_hsic, y_side.self_hsic]
    for value, reference in zip(got, expected):
        assert float(value) == pytest.approx(float(reference), rel=1e-12, abs=1e-12)
    assert float(x_side.raw_sq) == pytest.approx(float(xs.square().sum()), rel=1e-12)
    assert float(x_side.centred_sq) == pytest.approx(float(xc.square().sum()), rel=1e-12)
    if hsic.n < width:
        assert (x_side.gram is not None) and hsic.panels == max(1, hsic.n // 96)


def test_sharing_block_outputs_does_not_change_scores():
    torch.manual_seed(0)
    gpt = random_gpt(tiny_config(n_layer=4))
    token_ids = [torch.randint(0, 64, (int(n),)) for n in torch.randint(5, 30, (12,))]
    batches, _ = make_batches(token_ids, batch_size=4, max_seq_length=32)
    every = CkaScorer(gpt, [0, 1, 2, 3], "tokens")
    some = CkaScorer(gpt, [0, 2], "tokens")  # block 2's input is computed on its own here
    calibrate(gpt, batches, [every], progress=False)
    calibrate(gpt, batches, [some], progress=False)
    for layer in (0, 2):
        assert every.result().per_layer[layer] == some.result().per_layer[layer]

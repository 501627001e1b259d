"""How sure a calibrated choice is: the same choice made again on bootstrap resamples of the calibration prompts.

A resample draws as many prompts as the pass saw, with replacement, and recomputes the scores from the per-prompt
statistics the scorers kept (no second forward pass). The share of resamples that choose exactly the same sites
tells a user whether the prompts were enough; how often each kind and layer is chosen shows which part of the
choice is firm. CKA over all tokens keeps no per-prompt state, so it is not resampled.
"""

from __future__ import annotations

import random
import warnings
from collections import Counter
from typing import Any, Callable, Sequence

from litgpt_plop.selection.placement import Placement, PlacementError


def choice_stability(
    choose: Callable[[Sequence[int] | None], Placement], num_prompts: int, resamples: int, seed: int
) -> dict[str, Any]:
    """Resample the prompts ``resamples`` times and report how often ``choose`` (the method's choice from the
    scores over the given prompts; ``None``: all of them) gives the same sites as on all prompts.

    Returns ``{"resamples", "prompts", "same_choice", "kind_frequency", "layer_frequency", "failed"}``; a resample on
    which the method cannot choose (e.g. too few usable CKA layers) counts as a different choice and in ``failed``.
    """
    actual = choose(None)
    key = {(s.layer, s.kind) for s in actual.sites}
    rng = random.Random(seed)
    same, failed = 0, 0
    kinds: Counter[str] = Counter()
    layers: Counter[int] = Counter()
    for _ in range(resamples):
        prompts = [rng.randrange(num_prompts) for _ in range(num_prompts)]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a resample repeats the full pass's warnings
                placement = choose(prompts)
        except PlacementError:
            failed += 1
            continue
        same += {(s.layer, s.kind) for s in placement.sites} == key
        kinds.update(placement.kinds)
        layers.update(placement.layers)
    share = 1.0 / resamples if resamples else 0.0
    return {
        "resamples": resamples,
        "prompts": num_prompts,
        "same_choice": same * share,
        "kind_frequency": {kind: kinds[kind] * share for kind in actual.scores.candidate_kinds},
        "layer_frequency": {str(layer): layers[layer] * share for layer in actual.scores.candidate_layers},
        "failed": failed,
    }

"""Option groups of the placement methods, as LitGPT's ``args.py`` does it.

Each dataclass is one ``--<group>.*`` group on the command line (jsonargparse reads the field docstrings for
``--help``). They only hold values and check them; the work is done in ``litgpt_plop.scoring.calibration``,
``litgpt_plop.scoring.plop``, ``litgpt_plop.scoring.cka`` and ``litgpt_plop.selection.rules``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from litgpt_plop.errors import InputError


@dataclass
class CalibrationArgs:
    """The calibration pass: which prompts, how many, in what batches."""

    file: Path | None = None
    """Prompts to calibrate on: a ``.txt`` file (one prompt per line) or a ``.jsonl`` file (a ``text`` or
    ``instruction`` field per line, plus an optional ``input``). Without it, the prompts of the data module's
    training set are used."""
    num_samples: int = 128
    """How many prompts to use (a seeded random subset when there are more). docs/methods.md: ~100 for PLoP (its
    kind ranking is stable from ~64), ~128 for CKA; 128 serves both in one pass."""
    batch_size: int = 8
    """Prompts per forward pass (per data-parallel rank)."""
    max_seq_length: int = 256
    """Tokens per prompt; longer prompts are truncated (keeping their beginning) with a warning."""
    prompt_style: str | None = None
    """LitGPT prompt style applied to each prompt before tokenizing (e.g. ``alpaca``, ``chatml``). None: the
    prompt text as it is (for a data module: the data module's own prompt style)."""
    seed: int = 42
    """Seed for the random subset of prompts, the Monte-Carlo denominator and the resamples."""
    resamples: int = 200
    """Bootstrap resamples of the calibration prompts, to tell how often the same choice comes out (the report's
    "How sure" section; the scores are recomputed from per-prompt statistics, no extra forward pass). 0: skip."""
    progress: bool = True
    """Show a progress bar (on rank 0 only)."""
    data_free: Literal["auto", "always", "never"] = "auto"
    """The report's comparison with what ``kappa`` chooses from the weights alone (their condition numbers,
    docs/methods.md section 4). ``auto``: computed unless it would cost more arithmetic than the calibration pass
    itself and more than a minute or so on one CPU core; on an 8B model with 16 short prompts it would take several
    times the pass. ``always`` / ``never``: as they say."""

    def __post_init__(self) -> None:
        if self.data_free not in ("auto", "always", "never"):
            raise InputError(f"`--calibration.data_free` must be 'auto', 'always' or 'never', got {self.data_free!r}")
        if self.num_samples <= 0:
            raise InputError(f"`--calibration.num_samples` must be positive, got {self.num_samples}")
        if self.batch_size <= 0:
            raise InputError(f"`--calibration.batch_size` must be positive, got {self.batch_size}")
        if self.resamples < 0:
            raise InputError(f"`--calibration.resamples` must be >= 0 (0 skips resampling), got {self.resamples}")
        if self.max_seq_length <= 0:
            raise InputError(f"`--calibration.max_seq_length` must be positive, got {self.max_seq_length}")


@dataclass
class PlopArgs:
    """PLoP (docs/methods.md section 1): which module kinds get LoRA, from their normalised feature norms (NFN)."""

    num_kinds: int = 3
    """How many kinds to choose (the lowest NFN; the highest for ``plop-inverse``). Ignored when ``budget``
    is set."""
    budget: int | float | None = None
    """Trainable-parameter budget instead of ``num_kinds``: a float in (0, 1] is a fraction of what the ``all``
    placement costs at the same rank, an int is a parameter count. Kinds (or sites) are added in score order
    and the first one that does not fit stops the selection."""
    granularity: Literal["kind", "site"] = "kind"
    """``kind``: choose whole kinds (every candidate layer). ``site``: choose individual (layer, kind) sites by
    their own NFN; needs ``budget``."""
    denominator: Literal["closed_form", "monte_carlo"] = "closed_form"
    """NFN denominator: ``closed_form`` is ``||W||_F / sqrt(d_in)`` (deterministic, identical on every rank);
    ``monte_carlo`` is ``mean ||W r||`` over seeded random unit vectors r (the authors' estimator)."""
    mc_samples: int = 1024
    """Random unit vectors per site for the ``monte_carlo`` denominator."""

    def __post_init__(self) -> None:
        if self.num_kinds <= 0:
            raise InputError(f"`--plop.num_kinds` must be positive, got {self.num_kinds}")
        if self.budget is not None:
            if isinstance(self.budget, bool):
                raise InputError(f"`--plop.budget` must be a number, got {self.budget!r}")
            if isinstance(self.budget, float) and not 0.0 < self.budget <= 1.0:
                raise InputError(
                    f"`--plop.budget` as a float is a fraction of the `all` placement and must be in (0, 1],"
                    f" got {self.budget}; pass an int for a parameter count"
                )
            if isinstance(self.budget, int) and self.budget <= 0:
                raise InputError(f"`--plop.budget` as an int is a parameter count and must be positive, got {self.budget}")
        if self.granularity not in ("kind", "site"):
            raise InputError(f"`--plop.granularity` must be 'kind' or 'site', got {self.granularity!r}")
        if self.denominator not in ("closed_form", "monte_carlo"):
            raise InputError(f"`--plop.denominator` must be 'closed_form' or 'monte_carlo', got {self.denominator!r}")
        if self.mc_samples <= 0:
            raise InputError(f"`--plop.mc_samples` must be positive, got {self.mc_samples}")


@dataclass
class CkaArgs:
    """Layer-wise CKA (docs/methods.md section 2): which layers get LoRA, from how much each block changes its input."""

    pooling: Literal["last", "tokens"] = "last"
    """``last``: one vector per prompt (its last non-padding token), linear CKA with the biased HSIC (the
    authors' choice). ``tokens``: every non-padding token is a sample, streaming minibatch CKA with the unbiased
    HSIC (Nguyen, Raghu, Kornblith 2021). The default is the authors' until benchmarks say otherwise."""
    ratio: float = 0.5
    """Fraction of the candidate layers to keep: those with the LOWEST CKA similarity (most changed)."""
    degenerate_tol: float = 1e-4
    """A layer is flagged degenerate (and never selected) when its centred input or output is this small
    relative to the uncentred one, i.e. every sample looks the same there."""

    def __post_init__(self) -> None:
        if self.pooling not in ("last", "tokens"):
            raise InputError(f"`--cka.pooling` must be 'last' or 'tokens', got {self.pooling!r}")
        if not 0.0 < self.ratio <= 1.0:
            raise InputError(f"`--cka.ratio` must be in (0, 1], got {self.ratio}")
        if self.degenerate_tol < 0:
            raise InputError(f"`--cka.degenerate_tol` must be >= 0, got {self.degenerate_tol}")


@dataclass
class KappaArgs:
    """kappa (docs/methods.md section 4): LoRA on the weights with the lowest condition number, no data needed."""

    num_kinds: int = 3
    """How many kinds to choose (the lowest geometric-mean condition number). Ignored when ``budget`` is set."""
    budget: int | float | None = None
    """Trainable-parameter budget instead of ``num_kinds``: a float in (0, 1] is a fraction of what the ``all``
    placement costs at the same rank, an int is a parameter count. Kinds (or sites) are added lowest first and
    the first one that does not fit stops the selection (PLoP's rule)."""
    granularity: Literal["kind", "site"] = "kind"
    """``kind``: choose whole kinds (every candidate layer). ``site``: choose individual (layer, kind) sites by
    their own condition number; needs ``budget``."""

    def __post_init__(self) -> None:
        if self.num_kinds <= 0:
            raise InputError(f"`--kappa.num_kinds` must be positive, got {self.num_kinds}")
        if self.budget is not None:
            if isinstance(self.budget, bool):
                raise InputError(f"`--kappa.budget` must be a number, got {self.budget!r}")
            if isinstance(self.budget, float) and not 0.0 < self.budget <= 1.0:
                raise InputError(
                    f"`--kappa.budget` as a float is a fraction of the `all` placement and must be in (0, 1],"
                    f" got {self.budget}; pass an int for a parameter count"
                )
            if isinstance(self.budget, int) and self.budget <= 0:
                raise InputError(f"`--kappa.budget` as an int is a parameter count and must be positive, got {self.budget}")
        if self.granularity not in ("kind", "site"):
            raise InputError(f"`--kappa.granularity` must be 'kind' or 'site', got {self.granularity!r}")
        if self.granularity == "site" and self.budget is None:
            raise InputError("`--kappa.granularity site` chooses sites until a budget is used: set `--kappa.budget`")

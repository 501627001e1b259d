"""The statistics the calibration pass accumulates, as torchmetrics ``Metric``s: each scorer updates its own per
batch, computes them once after the pass (summed, maxed or concatenated over every rank of a data-parallel run,
so each rank ends with what one process running every batch holds) and resets them.

Every state is a sum, a count, a maximum or a list of rows, never a mean, so ranks with different amounts of data
combine correctly. Rows are concatenated in rank order (rank 0's first, each rank's in the order it added them),
as the rows of one process would be if it ran rank 0's batches, then rank 1's. The states keep their dtypes
(float64 sums stay float64) and devices; the transfers run on the backend's device
(``litgpt_plop.distributed.gather_on_comm_device``).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torchmetrics import Metric

from litgpt_plop.distributed import distributed, gather_on_comm_device


class _Statistics(Metric):
    """A ``Metric`` whose states are synced through ``gather_on_comm_device`` when there is more than one rank.

    ``rows``: the list states (``dist_reduce_fx="cat"``) and their empty value, ``(0, *shape)`` of the state's
    dtype. A rank that added no rows (a share of zero batches) gathers that instead of torchmetrics' 1-d
    ``torch.tensor([])``, which has fewer dimensions than the other ranks' rows and could not be gathered with them.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self) -> None:
        super().__init__(dist_sync_fn=gather_on_comm_device, distributed_available_fn=distributed)
        self._empty_rows: dict[str, torch.Tensor] = {}

    def add_rows(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> None:
        """A list state of ``(n, *shape)`` rows of ``dtype``, concatenated over ranks in rank order."""
        self.add_state(name, default=[], dist_reduce_fx="cat")
        self._empty_rows[name] = torch.zeros((0, *shape), dtype=dtype)

    def rows_of(self, name: str) -> torch.Tensor:
        """The rows of the list state ``name`` concatenated (its empty value when there are none)."""
        rows = getattr(self, name)
        if isinstance(rows, torch.Tensor):  # inside ``compute`` after a sync: every rank's, concatenated
            return rows
        return torch.cat(rows) if rows else self._empty_rows[name].clone()

    def sync(
        self,
        dist_sync_fn: Any = None,
        process_group: Any = None,
        should_sync: bool = True,
        distributed_available: Any = None,
    ) -> None:
        if should_sync and distributed():
            for name, empty in self._empty_rows.items():
                if not getattr(self, name):
                    getattr(self, name).append(empty.clone())  # zero rows: nothing added to the gathered ones
        super().sync(dist_sync_fn, process_group, should_sync, distributed_available)

    def gathered(self) -> Any:
        """``compute()`` over every rank. A rank may hold a share of zero batches: torchmetrics' warning that the
        metric was never updated is expected there and left out."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric", category=UserWarning)
            return self.compute()


class PromptSums(_Statistics):
    """PLoP's state (``litgpt_plop.scoring.plop.PlopScorer``): per prompt and unit, the sum of the normalised output
    norms over the prompt's real tokens and their count, ``(prompts, units, 2)`` float64 rows; and the batches."""

    def __init__(self, units: int) -> None:
        super().__init__()
        self.add_rows("rows", (units, 2), torch.float64)
        self.add_state("batches", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, rows: torch.Tensor) -> None:
        """One batch's rows."""
        self.rows.append(rows)
        self.batches += 1

    def compute(self) -> tuple[torch.Tensor, int]:
        """Every prompt's rows and the number of batches."""
        return self.rows_of("rows"), int(self.batches)


class PooledRows(_Statistics):
    """CKA's state with ``last`` pooling, for one block: the pooled vector entering it and the one leaving it,
    one ``(width,)`` float32 row per prompt each."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.add_rows("inputs", (width,), torch.float32)
        self.add_rows("outputs", (width,), torch.float32)

    def update(self, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """One batch's pooled rows, ``(prompts, width)`` each."""
        self.inputs.append(inputs)
        self.outputs.append(outputs)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every prompt's pooled inputs and outputs."""
        return self.rows_of("inputs"), self.rows_of("outputs")


class HsicSums(_Statistics):
    """CKA's state with ``tokens`` pooling: per layer, sums over batches of the unbiased HSIC terms and the norms
    the degeneracy check needs, ``(layers, terms)`` float64 (``litgpt_plop.scoring.cka.CkaScorer``); and the
    batches skipped for having fewer than 4 real tokens."""

    def __init__(self, layers: int, terms: int) -> None:
        super().__init__()
        self.add_state("sums", default=torch.zeros(layers, terms, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("skipped", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, sums: torch.Tensor, skipped: int = 0) -> None:
        """One batch's terms (zero for the layers it skips) and whether it was skipped."""
        self.sums += sums
        self.skipped += skipped

    def compute(self) -> tuple[torch.Tensor, int]:
        """The sums and the number of skipped batches."""
        return self.sums, int(self.skipped)


class Totals(_Statistics):
    """Counts summed over ranks (``counts``: samples, tokens, batches, truncated prompts) and durations, the
    longest rank's (``durations``: the pass's seconds; every rank waits for the slowest)."""

    def __init__(self, counts: Sequence[str] = (), durations: Sequence[str] = ()) -> None:
        super().__init__()
        for name in counts:
            self.add_state(name, default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        for name in durations:
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="max")

    def update(self, **values: float) -> None:
        """Add to the named counts; raise the named durations to at least the given ones."""
        for name, value in values.items():
            if name not in self.metric_state:
                raise KeyError(f"{type(self).__name__} has no {name!r}; it has {sorted(self.metric_state)}")
            state = getattr(self, name)
            if state.dtype == torch.int64:
                setattr(self, name, state + int(value))
            else:
                setattr(self, name, torch.clamp(state, min=float(value)))

    def compute(self) -> dict[str, int | float]:
        """Every count (an ``int``) and duration (a ``float``) by name."""
        return {name: state.item() for name, state in self.metric_state.items()}

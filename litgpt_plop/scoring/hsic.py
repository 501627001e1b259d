"""The unbiased HSIC behind CKA with ``tokens`` pooling (docs/methods.md section 2), and its per-batch
computation in the calibration pass.

In the pass, block i's output is block i+1's input (the same tensor), so everything HSIC needs from one matrix
alone (its centred rows, Gram matrix, diagonal, row sums, self-HSIC) is computed once per block boundary and
serves both blocks: one n x n Gram matrix per block instead of the six the pairwise formula forms. The numbers
are the ones ``unbiased_hsic`` gives on the same rows, bit for bit (the same operations on the same tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _cross_frobenius(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||X^T Y||_F^2`` through whichever side is smaller (features or samples)."""
    n, d1 = x.shape
    if n < min(d1, y.shape[1]):
        return ((x @ x.T) * (y @ y.T)).sum()
    return (x.T @ y).square().sum()


def _gram_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(diag K, K~ 1)`` for K = X X^T with its diagonal zeroed in K~: O(n d), no n x n matrix."""
    diag = x.square().sum(dim=1)
    return diag, x @ x.sum(dim=0) - diag


def _hsic_of(n: int, trace_kl: torch.Tensor, k_rows: torch.Tensor, l_rows: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC from ``tr(K~L~)`` and the row sums ``K~ 1``, ``L~ 1`` (see ``unbiased_hsic``)."""
    k_sum = k_rows.sum()
    l_sum = l_rows.sum()
    return (trace_kl + k_sum * l_sum / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k_rows * l_rows).sum()) / (n * (n - 3))


def unbiased_hsic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC estimator (Song et al. 2012) with linear kernels K = X X^T, L = Y Y^T, for ``n >= 4``
    samples (rows), computed in feature space without forming n x n matrices when ``n > d``::

        HSIC = [tr(K~L~) + 1^T K~ 1 * 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) * 1^T K~ L~ 1] / (n(n-3))

    with K~, L~ the Gram matrices with zeroed diagonals.
    """
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"The unbiased HSIC needs at least 4 samples, got {n}")
    x = x.double()
    y = y.double()
    k_diag, k_rows = _gram_sums(x)
    l_diag, l_rows = _gram_sums(y)
    return _hsic_of(n, _cross_frobenius(x, y) - (k_diag * l_diag).sum(), k_rows, l_rows)


# Rows per panel of a Gram matrix computed a panel at a time (``BatchHsic``): large enough for full-speed GEMMs,
# small enough that skipping the lower triangle saves about a third of the work at n ~ 400.
GRAM_PANEL_ROWS = 96


@dataclass
class TokenSide:
    """One block input or output over a batch's n real tokens: what the HSIC terms need from it alone.

    Args:
        centred: the rows (float64) minus their mean (centring does not change HSIC; it keeps float64 sums precise).
        raw_sq, centred_sq: ``||X||_F^2`` and ``||X - mean||_F^2`` (for the degeneracy check only).
        diag, rows: ``diag K`` and ``K~ 1`` of the centred rows (``_gram_sums``).
        gram: when n is below the width (``_cross_frobenius``'s choice of side), ``K`` in ``BatchHsic``'s panel
            layout (upper block triangle, zeros below); else None.
        self_hsic: ``unbiased_hsic(X_c, X_c)`` when n >= 4, else None.
    """

    centred: torch.Tensor
    raw_sq: torch.Tensor
    centred_sq: torch.Tensor
    diag: torch.Tensor
    rows: torch.Tensor
    gram: torch.Tensor | None
    self_hsic: torch.Tensor | None


class BatchHsic:
    """``TokenSide``s of the block inputs and outputs of one calibration batch, and the HSIC between them.

    Work tensors: the real tokens are the same for every block of a batch, so the n x d and n x n tensors are
    allocated once per batch and reused (a fresh allocation that size per block costs a page fault per 4 KiB,
    about as much as the arithmetic). Two sides are live at a time (a block's input and output), so a side's
    own tensors alternate between two slots.

    Gram matrices: K is symmetric, so only its upper block triangle is computed, a panel of ``h`` rows at a time
    (``p`` panels; the centred rows are padded with zero rows to ``p * h``, which add nothing), and the lower
    block triangle stays zero. ``sum(K * L) = 2 * dot(K_upper, L_upper) - sum over the diagonal blocks``. This
    sums the same float64 products in another order than ``unbiased_hsic`` (and a panel GEMM may round an entry
    differently): the HSIC terms agree with it to float64 rounding, not bit for bit.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        self.real = mask.flatten().nonzero().squeeze(1)  # the real tokens' positions in the (B * T) grid
        self.n = n = int(self.real.numel())
        self.panels = max(1, n // GRAM_PANEL_ROWS)
        self.panel_rows = -(-n // self.panels)  # ceil: p panels of h rows cover n, with fewer than p rows of padding
        self._buffers: dict[str, torch.Tensor] = {}
        self._slot = 0
        self._last: tuple[torch.Tensor | None, int, TokenSide | None] = (None, 0, None)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, zero: bool = False) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != device:
            make = torch.zeros if zero else torch.empty
            buffer = self._buffers[name] = make(shape, dtype=dtype, device=device)
        return buffer

    def side(self, activations: torch.Tensor) -> TokenSide:
        """The side of ``activations`` ``(B, T, d)``; the tensor the previous call got, unchanged since, is not
        computed again (a block's input is the previous block's output)."""
        last, version, side = self._last
        if activations is last and activations._version == version:
            return side
        n, d, device, f64 = self.n, activations.shape[-1], activations.device, torch.float64
        gathered = self._buffer("gathered", (n, d), activations.dtype, device)
        torch.index_select(activations.reshape(-1, d), 0, self.real, out=gathered)  # = activations[mask]
        rows = self._buffer("rows", (n, d), f64, device).copy_(gathered)
        self._slot = 1 - self._slot  # the other slot than the side computed last, which may be this block's input
        padded = self._buffer(f"centred{self._slot}", (self.panels * self.panel_rows, d), f64, device, zero=True)
        centred = torch.sub(rows, rows.mean(dim=0), out=padded[:n])
        gram = None
        if n < d:
            gram = self._gram(padded, f"gram{self._slot}")
            diag = gram.diagonal()[:n].clone()  # ||x_i - mean||^2, as the GEMM summed them: no pass over the rows
        else:
            diag = torch.square(centred, out=self._buffer("squares", (n, d), f64, device)).sum(dim=1)
        row_sums = centred @ centred.sum(dim=0) - diag
        self_hsic = None
        if n >= 4:
            square = self._gram_dot(gram, gram) if gram is not None else (centred.T @ centred).square().sum()
            self_hsic = _hsic_of(n, square - (diag * diag).sum(), row_sums, row_sums)
        # The two squared norms only feed the degeneracy check (a threshold of 1e-4 on their ratio): summed in
        # whichever order costs least (a dot product; the sum of the diagonal), equal to the elementwise sums of
        # squares to float64 rounding.
        raw_sq = torch.dot(rows.view(-1), rows.view(-1))
        side = TokenSide(centred, raw_sq, diag.sum(), diag, row_sums, gram, self_hsic)
        self._last = (activations, activations._version, side)
        return side

    def _gram(self, padded: torch.Tensor, name: str) -> torch.Tensor:
        """The upper block triangle of ``padded @ padded.T``, panel by panel, zeros below."""
        size, h = padded.shape[0], self.panel_rows
        gram = self._buffer(name, (size, size), padded.dtype, padded.device, zero=True)
        for start in range(0, size, h):
            torch.mm(padded[start : start + h], padded[start:].T, out=gram[start : start + h, start:])
        return gram

    def _gram_dot(self, k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        """``sum(K * L)`` of two symmetric Gram matrices stored as upper block triangles (``_gram``)."""
        size, h = k.shape[0], self.panel_rows
        blocks = (self.panels, h, h), (h * size + h, size, 1)  # the diagonal blocks, as one (p, h, h) view
        diagonal = (k.as_strided(*blocks) * l.as_strided(*blocks)).sum()
        return 2 * torch.dot(k.view(-1), l.view(-1)) - diagonal

    def cross_hsic(self, x: TokenSide, y: TokenSide) -> torch.Tensor:
        """``unbiased_hsic(X_c, Y_c)`` (n >= 4), to float64 rounding."""
        if x.gram is not None and y.gram is not None:
            cross = self._gram_dot(x.gram, y.gram)
        else:
            cross = (x.centred.T @ y.centred).square().sum()
        return _hsic_of(self.n, cross - (x.diag * y.diag).sum(), x.rows, y.rows)

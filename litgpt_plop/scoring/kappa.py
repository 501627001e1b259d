"""``kappa``'s scores: the condition number of every candidate weight, from the weights alone (no data).

The criterion of KappaTune (O. Ludwig; its selector as integrated with PEFT): a matrix whose singular values are
spread evenly (low condition number ``kappa = sigma_max / sigma_min``) encodes nothing very specialised, so
adapting it should disturb the pretrained model least. Here it is a placement method like the others
(docs/methods.md section 4): every candidate site is scored here by its weight's condition number, and PLoP's
selection rules (``litgpt_plop.selection.rules``: ``num_kinds``, or a greedy budget, by kind or by site) choose the
LOWEST (``litgpt_plop.decide.kappa_placement``). A kind is ranked by the geometric mean of its sites' condition numbers over
the candidate layers: condition numbers are ratios spanning orders of magnitude (3.9 to 7.7e5 on
SmolLM2-135M), where an arithmetic mean would be one outlier layer's value.

Because it needs no data, every calibrated plan also computes it (``litgpt_plop.decide.with_data_free_choice``), so that its report
can say whether the task's prompts changed the choice (``litgpt_plop.reports.kappa``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from litgpt import GPT

from litgpt_plop.memory import release_free_memory
from litgpt_plop.model.modules import KIND_TO_PATH, base_linear, gpt_of, qkv_row_slices, site_experts, site_module
from litgpt_plop.selection.placement import HEAD_KIND, HEAD_LAYER, is_moe, model_kinds, site_shape
from litgpt_plop.model.quantize import no_cpu_repack
from litgpt_plop.scoring.plop import weight_matrix

# Above this condition number the Gram matrix's rounding (relative error about kappa^2 * 1e-16 on sigma_min^2)
# would show in the result, so the singular values are computed directly instead.
GRAM_KAPPA_LIMIT = 1e6
# Rows (or columns) of a weight turned into float64 at a time when forming its Gram matrix: bounds the memory
# for a tall matrix such as a vocabulary-sized head.
_GRAM_BLOCK = 8192
# Width of the strips of the Gram matrix computed at a time: only the strips on and above the diagonal are
# multiplied (the rest is their transpose), 10 of 16 products for a 4096-wide Gram matrix instead of 16.
_GRAM_STRIP = 1024
# Lanczos stops when its extreme Ritz value is within this relative distance of an eigenvalue (a bound from the
# residual), or after _LANCZOS_STEPS steps, when the full eigendecomposition is used instead.
_LANCZOS_TOL = 1e-10
_LANCZOS_STEPS = 300
_LANCZOS_SEED = 0
HOW = (
    "the extreme eigenvalues of the float64 Gram matrix of the smaller side (Lanczos, the smallest through its"
    " Cholesky factor); float64 svdvals where kappa > 1e6"
)


@dataclass
class KappaScores:
    """Condition numbers of the candidate sites.

    Args:
        per_site: ``sigma_max / sigma_min`` of each ``"<layer>.<kind>"`` site's weight (``inf`` if singular).
        per_kind: each kind's geometric mean over the candidate layers (what ``kappa`` ranks).
        seconds: how long computing them took.
        per_expert: in a mixture of experts, each MLP site's condition number per expert; ``per_site`` holds
            their geometric mean (every expert weighs the same: no data says how often each is used).
    """

    per_site: dict[str, float]
    per_kind: dict[str, float]
    seconds: float = 0.0
    per_expert: dict[str, list[float]] = field(default_factory=dict)


def gram_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The float64 Gram matrix of the smaller side of ``weight`` (``W W^T`` for a wide matrix, ``W^T W`` for a
    tall one), summed over blocks of the long side so that no float64 copy of a large weight is made. Only the
    strips on and above the diagonal are multiplied (``_GRAM_STRIP``); those below are their transposes."""
    long_side = weight if weight.shape[0] > weight.shape[1] else weight.T  # the Gram matrix is long_side^T long_side
    size = long_side.shape[1]
    gram = torch.zeros(size, size, dtype=torch.float64, device=weight.device)
    for block in long_side.split(_GRAM_BLOCK, dim=0):
        block = block.double()
        for start in range(0, size, _GRAM_STRIP):
            gram[start : start + _GRAM_STRIP, start:] += block[:, start : start + _GRAM_STRIP].T @ block[:, start:]
    for start in range(_GRAM_STRIP, size, _GRAM_STRIP):
        gram[start : start + _GRAM_STRIP, :start] = gram[:start, start : start + _GRAM_STRIP].T
    return gram


def largest_eigenvalue(apply: Callable[[torch.Tensor], torch.Tensor], size: int, device: torch.device) -> float | None:
    """The largest eigenvalue of the symmetric positive semidefinite ``size x size`` operator ``apply`` (a
    float64 vector to its product), by Lanczos with full reorthogonalization from a seeded start vector, so that
    the same matrix always gives the same number. It stops when the residual bound puts an eigenvalue within
    ``_LANCZOS_TOL`` (relative) of the largest Ritz value, which never exceeds the largest eigenvalue; None if
    that has not happened after ``_LANCZOS_STEPS`` steps."""
    generator = torch.Generator(device=device).manual_seed(_LANCZOS_SEED)
    steps = min(size, _LANCZOS_STEPS)
    basis = torch.empty(steps, size, dtype=torch.float64, device=device)
    start = torch.randn(size, dtype=torch.float64, device=device, generator=generator)
    basis[0] = start / start.norm()
    tridiagonal = torch.zeros(steps, steps, dtype=torch.float64)
    for k in range(steps):
        w = apply(basis[k])
        tridiagonal[k, k] = float(w @ basis[k])
        for _ in range(2):  # twice is enough to keep the basis orthonormal to working precision
            w -= basis[: k + 1].T @ (basis[: k + 1] @ w)
        beta = float(w.norm())
        ritz_values, ritz_vectors = torch.linalg.eigh(tridiagonal[: k + 1, : k + 1])
        theta = float(ritz_values[-1])
        # ||G y - theta y|| for the Ritz vector y: an eigenvalue of G lies within it of theta
        if beta * abs(float(ritz_vectors[-1, -1])) <= _LANCZOS_TOL * theta or k + 1 == size:
            return theta
        if k + 1 < steps:
            basis[k + 1] = w / beta
            tridiagonal[k, k + 1] = tridiagonal[k + 1, k] = beta
    return None


def extreme_eigenvalues(gram: torch.Tensor) -> tuple[float, float]:
    """``(smallest, largest)`` eigenvalue of a symmetric positive semidefinite float64 matrix: Lanczos on it for
    the largest and on its inverse (through its Cholesky factor: two triangular solves a step) for the smallest,
    the full ``eigvalsh`` where either does not converge. The smallest is 0 where the Cholesky factorization
    fails: the matrix is singular to working precision, far past ``GRAM_KAPPA_LIMIT``."""
    size, device = gram.shape[0], gram.device
    largest = largest_eigenvalue(gram.mv, size, device)
    if largest is None:
        eigenvalues = torch.linalg.eigvalsh(gram)
        return float(eigenvalues[0]), float(eigenvalues[-1])
    if not largest > 0:
        return 0.0, largest
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return 0.0, largest
    inverse_largest = largest_eigenvalue(lambda v: _cholesky_solve(factor, v), size, device)
    if inverse_largest is None:
        return float(torch.linalg.eigvalsh(gram)[0]), largest
    return 1.0 / inverse_largest, largest


def _cholesky_solve(factor: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``G^-1 v`` for ``G = L L^T``: two triangular solves (``torch.cholesky_solve`` copies the factor on every
    call, 13 times slower at d = 4096)."""
    half = torch.linalg.solve_triangular(factor, vector.unsqueeze(1), upper=False)
    return torch.linalg.solve_triangular(factor.T, half, upper=True).squeeze(1)


def condition_number(weight: torch.Tensor) -> float:
    """``sigma_max / sigma_min`` over the ``min(d_out, d_in)`` singular values of a ``(d_out, d_in)`` weight.

    The squared singular values are the eigenvalues of the Gram matrix of the smaller side, and a condition
    number needs only the two extreme ones (``extreme_eigenvalues``): Lanczos from a seeded start, the smallest
    through the Cholesky factor, instead of all of them (``eigvalsh``), whose cost at d = 4096 was that of
    forming the Gram matrix again (docs/methods.md section 4 has the timings). In float64, because the Gram
    matrix squares the condition number: its rounding relative to sigma_min^2 is about ``kappa^2 * eps``, which
    float32's eps (6e-8) would make noise for SmolLM2's worst query slice (kappa 7.7e5) and float64's keeps near
    1e-4. Above ``GRAM_KAPPA_LIMIT`` float64 svdvals is used instead. ``inf`` for a singular matrix; a
    ``ValueError`` for an all-zero one, whose condition number is undefined.
    """
    smallest, largest = extreme_eigenvalues(gram_matrix(weight))
    if not largest > 0:
        raise ValueError("The weight is all zeros: its condition number is undefined")
    if smallest > largest / GRAM_KAPPA_LIMIT**2:
        return math.sqrt(largest / smallest)
    singular_values = torch.linalg.svdvals(weight.double())
    smallest_sv = float(singular_values[-1])
    return float(singular_values[0]) / smallest_sv if smallest_sv > 0 else math.inf


def geometric_mean(values: Sequence[float]) -> float:
    return 10 ** (sum(math.log10(v) for v in values) / len(values))


# ---- scoring a model --------------------------------------------------------------------------------------


def site_weights(gpt: GPT, kinds: Sequence[str], layers: Sequence[int]):
    """``(layer, kind, expert, weight)`` for every candidate site, one dequantized module at a time (q/k/v: row
    slices; in a mixture of experts, an MLP site once per expert; expert None elsewhere)."""
    block_kinds = [k for k in kinds if k != HEAD_KIND]
    paths = list(dict.fromkeys(KIND_TO_PATH[k] for k in block_kinds))
    for layer in layers:
        for path in paths:
            path_kinds = [k for k in block_kinds if KIND_TO_PATH[k] == path]
            for expert in site_experts(gpt, path_kinds[0]):
                weight = weight_matrix(base_linear(site_module(gpt, layer, path_kinds[0], expert)))
                if path == "attn.qkv":
                    slices = qkv_row_slices(gpt.config)
                    for kind in path_kinds:
                        yield layer, kind, None, weight[slices[kind]]
                else:
                    yield layer, path_kinds[0], expert, weight
                on_cpu = weight.device.type == "cpu"
                del weight
                if on_cpu:
                    release_free_memory()  # else malloc keeps the copy's pages (litgpt_plop.memory)
    if HEAD_KIND in kinds:
        yield HEAD_LAYER, HEAD_KIND, None, weight_matrix(base_linear(site_module(gpt, HEAD_LAYER, HEAD_KIND)))


def score_weights(model: nn.Module, kinds: Sequence[str], layers: Sequence[int]) -> KappaScores:
    """The condition number of every candidate site of the LitGPT model in ``model`` (dense or 4-bit)."""
    gpt = gpt_of(model)
    t0 = time.perf_counter()
    per_site: dict[str, float] = {}
    per_expert: dict[str, list[float]] = {}
    # a 4-bit weight repacked by an earlier eval-mode forward is unpacked first (dequantizing it would be garbage)
    with torch.no_grad(), no_cpu_repack(gpt):
        for layer, kind, expert, weight in site_weights(gpt, kinds, layers):
            where = f"{layer}.{kind}" if expert is None else f"{layer}.{kind} (expert {expert})"
            try:
                value = condition_number(weight)
            except ValueError as e:
                raise ValueError(f"Site {where}: {e}") from None
            if expert is None:
                per_site[f"{layer}.{kind}"] = value
            else:
                per_expert.setdefault(f"{layer}.{kind}", []).append(value)
            del weight  # before the next site's weight is made: one dense copy at a time
    # a site spanning every expert: the geometric mean over them, as over layers for a kind
    per_site.update({key: geometric_mean(values) for key, values in per_expert.items()})
    per_kind = {}
    for kind in kinds:
        per_kind[kind] = geometric_mean([v for key, v in per_site.items() if key.split(".", 1)[1] == kind])
    return KappaScores(per_site=per_site, per_kind=per_kind, seconds=time.perf_counter() - t0, per_expert=per_expert)


# Below this much arithmetic (multiply-adds of the Gram matrices: well under a minute on one CPU core) the data-free
# comparison is always computed: every model up to SmolLM2-135M's size (5.9e10) keeps it whatever the prompts.
DATA_FREE_FLOOR_MACS = 5e11


def gram_macs(config: Any, kinds: Sequence[str], layers: Sequence[int]) -> float:
    """Multiply-adds of the Gram matrices of every candidate site (``d^2 D`` each, ``d`` the smaller side; every
    expert's own in a mixture of experts): what the condition numbers cost, their eigenvalues being cheaper."""
    total = 0.0
    for kind in kinds:
        d_out, d_in = site_shape(config, kind)
        experts = config.n_expert if is_moe(config) and kind.startswith("mlp_") else 1
        total += experts * min(d_out, d_in) ** 2 * max(d_out, d_in)
    return total * len(layers)


def forward_macs(config: Any, tokens: int) -> float:
    """Multiply-adds of the calibration pass's linears over ``tokens`` tokens (every block; routed experts at
    ``n_expert_per_token`` each)."""
    per_token = 0.0
    for kind in model_kinds(config):
        d_out, d_in = site_shape(config, kind)
        used = config.n_expert_per_token if is_moe(config) and kind.startswith("mlp_") else 1
        per_token += used * d_out * d_in
    return per_token * config.n_layer * tokens


def data_free_skipped(mode: str, config: Any, kinds: Sequence[str], layers: Sequence[int], tokens: int) -> str | None:
    """Why the data-free comparison is not computed (``--calibration.data_free``), or None when it is: ``auto``
    skips it when its Gram matrices cost more than the pass's linears and more than ``DATA_FREE_FLOOR_MACS``."""
    if mode == "always":
        return None
    if mode == "never":
        return "not asked for (--calibration.data_free never)"
    cost, forward = gram_macs(config, kinds, layers), forward_macs(config, tokens)
    if cost <= max(forward, DATA_FREE_FLOOR_MACS):
        return None
    return (
        f"its condition numbers would cost {cost / forward:.1f} times the calibration pass's arithmetic ({cost:.2g} against"
        f" {forward:.2g} multiply-adds over {tokens} prompt tokens); `--calibration.data_free always` computes them,"
        " `--plugin kappa` plans with them"
    )

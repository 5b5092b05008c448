"""The task-vector family: sparsify → weight → elect sign → combine → normalize → λ.

task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della and
della_linear are this one skeleton with different sparsifiers and consensus (mergekit
0.1.5 `generalized_task_arithmetic.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import sparsify


def sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    """m_i = [sign(δ_i) == sign(Σ_j δ_j)], with a zero sum counting as positive."""
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return deltas.sign() == majority


def combine(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """b + λ · Σ_i m_i w_i τ̃_i / Σ_i m_i w_i (the division only when normalizing).

    `deltas` are the sparsified task vectors stacked on dim 0; `weights` is shaped to
    broadcast against them. Modifies `deltas` in place; writes into `out` when given.
    """
    deltas.mul_(weights)
    if consensus:
        mask = sign_consensus(deltas)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    if out is not None and mixed.dtype == base.dtype == out.dtype:
        return torch.add(base, mixed, out=out)
    return (base + mixed).to(base.dtype)


def generalized_task_arithmetic(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    sparsification: str | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lambda_: float = 1.0,
    gamma: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    task_vectors: Sequence[torch.Tensor] | None = None,
    scratch: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """b + λ·combine(sparsify(x_i − b, d_i) · w_i): the skeleton shared by the family.

    A search passes precomputed `task_vectors` (x_i − b, computed exactly so) instead of
    `models`, a reusable `scratch` buffer and the live parameter as `out`: the arithmetic and
    its order are the same, so the result is bit for bit the one computed from `models`.
    """
    n = len(task_vectors) if task_vectors is not None else len(models)
    if not n:
        return base
    if scratch is not None and scratch.dtype == base.dtype and scratch.numel() >= n * base.numel():
        deltas = scratch[: n * base.numel()].view(n, *base.shape)
    else:
        deltas = base.new_empty((n, *base.shape))
    fn = None if sparsification is None else sparsify.SPARSIFIERS[sparsification]
    for i in range(n):
        tau = task_vectors[i] if task_vectors is not None else models[i] - base
        if fn is not None:
            tau = fn(
                tau,
                density[i],
                gamma[i] if gamma else None,
                epsilon[i] if epsilon else None,
                rescale,
                generator,
            )
        deltas[i] = tau
    w = torch.tensor(list(weight), dtype=deltas.dtype, device=deltas.device)
    w = w.reshape(-1, *([1] * base.dim()))
    return combine(base, deltas, w, consensus=consensus, normalize=normalize, lambda_=lambda_, out=out)

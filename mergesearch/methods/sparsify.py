"""Sparsifiers for task vectors, exactly as mergekit 0.1.5 (`mergekit/sparsify.py`) defines them."""

from __future__ import annotations

import torch


def work_dtype(t: torch.Tensor) -> torch.dtype:
    # torch.bernoulli has no fp16 kernel on CPU; mergekit upcasts to fp32 there.
    return t.dtype if t.device.type != "cpu" or t.dtype == torch.bfloat16 else torch.float32


def rescale_l1(tau: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """τ̃ = (τ⊙m)·‖τ‖₁/‖τ⊙m‖₁ when rescaling (skipped when either norm < eps), else τ⊙m."""
    masked = tau * mask
    if not rescale:
        return masked
    before, after = tau.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _band_mask(w: torch.Tensor, lo_rank: int, hi_rank: int) -> torch.Tensor | None:
    """Elements whose ascending rank (1-based) lies in [lo_rank, hi_rank], found with two
    O(N) selections instead of a sort; None when equal values straddle a bound, because
    then the set depends on how a sort orders ties and only the sort reproduces mergekit."""
    lo = torch.kthvalue(w, lo_rank).values
    hi = w.max() if hi_rank == w.numel() else torch.kthvalue(w, hi_rank).values
    mask = (w >= lo) & (w <= hi)
    return mask if int(mask.sum()) == hi_rank - lo_rank + 1 else None


def _few_ties(tau: torch.Tensor) -> bool:
    """16-bit task vectors have so few distinct magnitudes that ties are the rule: sort those."""
    return tau.dtype in (torch.float32, torch.float64)


def rank_window(sparsification: str, n: int, density: float, gamma: float = 0.0) -> tuple[int, int] | None:
    """The ascending |τ| ranks [r0, r1) (0-based) that a magnitude sparsifier keeps of N elements;
    None keeps everything. magnitude (TIES): the k = max(1, ⌊d·N⌋) largest (none at d ≤ 0);
    magnitude_outliers (breadcrumbs): ⌊d·N⌋ of them, below the top ⌊γ·N⌋. The reference here and
    the search's cuts (`candidates/cuts.py`) both take their window from this function."""
    if density >= 1 or n == 0:
        return None
    if sparsification == "magnitude":
        k = max(1, int(density * n)) if density > 0 else 0
        return (n - k, n) if k else (n, n)
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    return (n_bot, min(n, n_bot + target))


def magnitude(tau: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the k = max(1, ⌊d·N⌋) largest |τ| (TIES)."""
    window = rank_window("magnitude", tau.numel(), density)
    if window is None:
        return tau if density >= 1 else torch.zeros_like(tau)
    r0, n = window[0], tau.numel()
    if r0 >= n:
        return torch.zeros_like(tau)
    w = tau.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    band = _band_mask(w, r0 + 1, n) if _few_ties(tau) else None
    if band is not None:
        mask = band.to(tau.dtype)
    else:
        mask = torch.zeros(n, dtype=tau.dtype, device=tau.device)
        mask[torch.argsort(w, descending=True)[: n - r0]] = 1
    return rescale_l1(tau, mask.reshape_as(tau), rescale)


def magnitude_outliers(
    tau: torch.Tensor, density: float, gamma: float = 0.01, rescale: bool = False
) -> torch.Tensor:
    """Drop the top ⌊γ·N⌋ and the smallest magnitudes, keeping ⌊d·N⌋ (breadcrumbs)."""
    n = tau.numel()
    window = rank_window("magnitude_outliers", n, density, gamma)
    if window is None:
        return tau if density >= 1 else torch.zeros_like(tau)
    r0, r1 = window
    w = tau.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    band = _band_mask(w, r0 + 1, r1) if _few_ties(tau) and r0 < r1 else None
    if band is not None:
        mask = band.to(tau.dtype)
    else:
        mask = torch.zeros(n, dtype=tau.dtype, device=tau.device)
        mask[torch.sort(w, descending=False).indices[r0:r1]] = 1
    return rescale_l1(tau, mask.reshape_as(tau), rescale)


def bernoulli(
    tau: torch.Tensor, density: float, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """τ⊙m with m ~ Bernoulli(d) elementwise (DARE); one draw per element from the RNG."""
    if density >= 1:
        return tau
    work = work_dtype(tau)
    mask = torch.bernoulli(torch.full_like(tau, density, dtype=work), generator=generator)
    return rescale_l1(tau.to(work), mask, rescale).to(tau.dtype)


def magnitude_ranks(t: torch.Tensor) -> torch.Tensor:
    """0-based rank of |t| along dim 1 (int64). mergekit takes argsort(argsort(|t|)); scattering
    positions through the first argsort gives the same inverse permutation with one sort."""
    order = torch.argsort(t.abs(), dim=1, descending=False)
    positions = torch.arange(t.shape[1], device=t.device).view([1, -1] + [1] * (t.dim() - 2))
    return torch.empty_like(order).scatter_(1, order, positions.expand_as(order))


def della_ranks(tau: torch.Tensor) -> torch.Tensor:
    """Per-row normalized magnitude rank in [0, 1] (rows along dim 1; 1-D is one row)."""
    work = work_dtype(tau)
    t = tau.unsqueeze(0) if tau.dim() < 2 else tau
    ranks = magnitude_ranks(t).to(work) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    return ((ranks - lo) / (hi - lo)).clamp(0, 1)


def check_della(density: float, epsilon: float) -> None:
    """DELLA keeps an element with a probability from d − ε to d + ε: both must lie in (0, 1)
    wherever it sparsifies (0 < d < 1). The reference, the search's masks and the planner all
    check here."""
    if 0 < density < 1 and not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(
            f"della: density ± epsilon must lie in (0, 1); got density={density}, epsilon={epsilon}"
        )


def della(
    tau: torch.Tensor,
    density: float,
    epsilon: float = 0.15,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """τ⊙m with m ~ Bernoulli(d − ε + 2ε·rank) per element, ranks per row (DELLA)."""
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    check_della(density, epsilon)
    work = work_dtype(tau)
    t = tau.unsqueeze(0) if tau.dim() < 2 else tau
    probs = (density - epsilon) + della_ranks(tau) * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator).to(work)
    return rescale_l1(t.to(work), mask, rescale).to(tau.dtype).reshape(tau.shape)


# Every sparsifier by the name a method gives (`Method.sparsification`), called per task vector as
# fn(tau, density, gamma, epsilon, rescale, generator). A new one registered here (and a method
# using it in registry.py) is searched through this reference until the bank declares it.
SPARSIFIERS = {
    "magnitude": lambda tau, d, g, e, rescale, gen: magnitude(tau, d, rescale),
    "random": lambda tau, d, g, e, rescale, gen: bernoulli(tau, d, rescale, gen),
    "magnitude_outliers": lambda tau, d, g, e, rescale, gen: magnitude_outliers(tau, d, g, rescale),
    "della": lambda tau, d, g, e, rescale, gen: della(tau, d, e, rescale, gen),
}

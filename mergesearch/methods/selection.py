"""Methods of mergekit 0.1.5's second generation, ported as its code computes them (same dtype
rules, same operation order): multislerp, karcher, nearswap, sce, ram, ramplus_tl, arcee_fusion.

mergekit computes these in the working dtype, except karcher (norms in fp32) and ramplus_tl and
arcee_fusion, whose fp32 factors promote the result to fp32: mergekit writes those tensors as
float32 unless `out_dtype` is set, and so do we (`Method.result_fp32`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def multislerp(
    models: Sequence[torch.Tensor],
    weight: Sequence[float],
    base: torch.Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Barycentre on the hypersphere in one step: X_i = x_i (− b), u_i = X_i/(‖X_i‖+eps),
    m̂ = Σw_i u_i / ‖·‖, T = Σ w_i (u_i − ⟨u_i,m̂⟩m̂), out = (m̂ cos‖T‖ + T sin‖T‖/‖T‖)·Σw_i‖X_i‖ (+ b).
    Two models whose weighted unit mean vanishes fall back to Σ w_i X_i."""
    if len(models) == 1:
        return models[0]
    tensors = torch.stack(list(models), dim=0)
    if base is not None:
        tensors -= base
    flat = tensors.view(tensors.shape[0], -1)
    w = torch.tensor(list(weight), dtype=tensors.dtype, device=tensors.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if tensors.shape[0] == 2:
            res = (tensors[0] * w[0] + tensors[1] * w[1]).view(tensors.shape[1:])
            return res + base if base is not None else res
        raise ValueError(
            "multislerp: the weighted sum of the unit inputs is zero (antipodal inputs); change the weights"
        )
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tn = torch.norm(tangent) + eps
    result = (mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)) * (norms.squeeze(-1) * w).sum()
    result = result.view(tensors.shape[1:])
    return result + base if base is not None else result


def karcher(models: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Riemannian (Karcher) mean of the unit inputs with equal weights, scaled by the mean norm:
    u ← exp_u(Σ α̂_i θ_i/sinθ_i (u_i − cosθ_i u)) until the step is below tol (at most max_iter).
    Every input counts, a configured base included; units stay in the input dtype, norms in fp32."""
    tensors = list(models)
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for x in tensors:
        n = torch.linalg.vector_norm(x.to(dtype))
        norms.append(n)
        units.append(torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype))
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)
    a = [alphas[i] for i in valid]
    a = [x / sum(a) for x in a]
    vu = [units[i] for i in valid]
    mean = torch.zeros_like(vu[0])
    for ai, u in zip(a, vu):
        mean += ai * u
    mn = torch.linalg.vector_norm(mean.to(dtype))
    mean = vu[0].clone() if mn.item() < tol else (mean / mn).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, vu):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (u - dot * mean)
        tnorm = torch.linalg.vector_norm(tangent.to(dtype))
        if tnorm.item() < tol:
            break
        mean = (torch.cos(tnorm) * mean + torch.sin(tnorm) * (tangent / tnorm)).to(mean.dtype)
        un = torch.linalg.vector_norm(mean.to(dtype))
        if un.item() > tol:
            mean = (mean / un).to(mean.dtype)
    return sum(ai * n for ai, n in zip(alphas, norms)) * mean


def nearswap(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    """w = clamp(t / max(|b − x|, 1e-6), 0, 1); out = w·x + (1 − w)·b: take the model's value
    where it is within t of the base, keep the base's where they are far apart."""
    w = (t / torch.abs(base - model).clamp(min=1e-6)).clamp(min=0, max=1)
    return w * model + (1 - w) * base


def sce(
    base: torch.Tensor, models: Sequence[torch.Tensor], select_topk: float = 1.0, int8_mask: bool = False
):
    """T = stack(x_i − b); keep the top select_topk of positions by variance across models; elect
    signs by sum (TIES) on the unweighted T; ω_i = mean(τ_i²)/Σ_j mean(τ_j²);
    out = b + Σ ω_i E_i τ_i / max(Σ ω_i E_i, 1e-6). No per-model weight."""
    if not models:
        return base
    mask_dtype = torch.int8 if int8_mask else base.dtype
    tvs = torch.stack([x - base for x in models], dim=0)
    if select_topk < 1:
        tvs = tvs * _variance_mask(tvs, select_topk, mask_dtype).unsqueeze(0)
    sign = tvs.sign().to(mask_dtype)
    majority = (tvs.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    erase = sign == majority
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(w).item()
    w = torch.ones_like(w) / w.shape[0] if abs(total) < 1e-6 else w / total
    while w.dim() < tvs.dim():
        w = w.unsqueeze(-1)
    ew = w * erase
    return base + (tvs * ew).sum(dim=0) / torch.sum(ew, dim=0).clamp(min=1e-6)


def _variance_mask(tvs: torch.Tensor, density: float, mask_dtype: torch.dtype) -> torch.Tensor:
    if density <= 0:
        return torch.zeros_like(tvs[0], dtype=mask_dtype)
    if density >= 1:
        return torch.ones_like(tvs[0], dtype=mask_dtype)
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    if k == 0:
        return torch.zeros_like(var, dtype=mask_dtype)
    _, idx = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask = torch.zeros_like(var, dtype=mask_dtype)
    mask.view(-1)[idx] = 1
    return mask


def _ram_parts(base: torch.Tensor, models: Sequence[torch.Tensor], epsilon: float):
    tv = torch.stack([x - base for x in models], dim=0).view(len(models), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return tv, nonzero, counts, counts > 1, counts == 1


def ram(base: torch.Tensor, models: Sequence[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    """Reinforced agent merging: with c = #{i: |τ_i| > ε} per element, changes only one model made
    are summed, shared ones averaged: out = b + Σ_i τ_i·[|τ_i|>ε]·([c=1] + [c>1]/max(c,1))."""
    if not models:
        return base
    tv, nz, counts, overlap, unique = _ram_parts(base, models, epsilon)
    z = tv * nz
    merged = ((z * unique) + (z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """RAM with each model's unique changes scaled by λ_i = 1 + r·clip(ρ_i, 0, α), where ρ_i is
    its shared over its unique change count in this tensor. λ is fp32, so is the result."""
    if not models:
        return base
    tv, nz, counts, overlap, unique = _ram_parts(base, models, epsilon)
    rho = (nz & overlap).sum(dim=1) / (nz & unique).sum(dim=1).clamp(min=epsilon)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    z = tv * nz
    merged = ((z * unique * lam.unsqueeze(-1)) + (z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


QUANTILE_SAMPLE = 1_000_000  # mergekit samples larger tensors (with replacement, global RNG)


def arcee_fusion(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """Keep the model's change where it matters: importance = |x − b|·KL(softmax x ‖ softmax b) per
    row; out = b + (x − b)·[importance ≥ median + 1.5·IQR]. The mask is fp32, so is the result."""
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    importance = (model - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), device=flat.device)]
    ordered, _ = torch.sort(flat)
    q1, median, q3 = ordered[
        (torch.tensor([0.25, 0.5, 0.75]).to(ordered.device) * (ordered.numel() - 1)).long()
    ]
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (model - base) * mask

"""Methods that interpolate whole weights: linear, slerp, nuslerp, model_stock, passthrough."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def linear(models: Sequence[torch.Tensor], weight: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Σ w_i x_i / Σ w_i (no division when normalize is false), accumulated in fp32."""
    first = models[0]
    dt = _compute_dtype(first)
    w = torch.tensor(list(weight), dtype=dt, device=first.device)
    out = torch.zeros_like(first, dtype=dt)
    for x, wi in zip(models, w):
        out.addcmul_(x, wi)
    if normalize:
        out.div_(w.sum())
    return out.to(first.dtype)


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """sin((1−t)θ)/sinθ · v0 + sin(tθ)/sinθ · v1 over the flattened tensors; lerp when |cosθ| > 0.9995."""
    dt = _compute_dtype(v0)
    a, b = v0.reshape(-1).to(dt), v1.reshape(-1).to(dt)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = torch.where(na > eps, na, 1)
    nb = torch.where(nb > eps, nb, 1)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    tt = torch.tensor(t, dtype=dt, device=a.device)
    if dot.abs() > dot_threshold:
        ca, cb = 1 - tt, tt
    else:
        theta = torch.acos(dot)
        s = torch.sin(theta)
        ca, cb = torch.sin((1 - tt) * theta) / s, torch.sin(tt * theta) / s
    return (ca * a + cb * b).reshape(v0.shape).to(v0.dtype)


def nuslerp_pair(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool = True, row_wise: bool = False
) -> torch.Tensor:
    """Slerp of v0 toward v1 by t along rows (or the whole tensor); lerp only when colinear."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if row_wise and not flatten:
        res = res.transpose(0, -1)
    return res.reshape(shape)


def nuslerp(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    weight: Sequence[float],
    flatten: bool = True,
    row_wise: bool = False,
) -> torch.Tensor:
    """t = w₂/(w₁+w₂); slerp(x₁, x₂, t), or b + slerp(x₁−b, x₂−b, t) with a base."""
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    x1, x2 = models
    if base is None:
        return nuslerp_pair(t, x1, x2, flatten=flatten, row_wise=row_wise)
    return base + nuslerp_pair(t, x1 - base, x2 - base, flatten=flatten, row_wise=row_wise)


def model_stock(
    base: torch.Tensor, models: Sequence[torch.Tensor], filter_wise: bool = False
) -> torch.Tensor:
    """t·mean(x_i) + (1−t)·b with t = N·cosθ̄ / (1 + (N−1)·cosθ̄) over pairwise task-vector angles."""
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [x.unsqueeze(0) if x.dim() == 1 else x for x in models]
    else:
        w0, ws = base.reshape(-1), [x.reshape(-1) for x in models]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            denom = (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(dim=-1) / denom).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6  # no finite estimate: keep the base
    t = torch.where(
        singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom)
    )
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


def passthrough(model: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """x, or scale·x."""
    return model if scale is None else model * scale

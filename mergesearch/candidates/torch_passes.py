"""The candidate's passes in torch, on any device: a chunk at a time through a workspace of
buffers allocated once. `numba_passes.merge` is the same merge as one CPU pass, bit for bit."""

from __future__ import annotations

import torch


class Workspace:
    """Every temporary of a chunk, allocated once: no allocation (and no page faults) per chunk."""

    def __init__(self, k: int, chunk: int, dtype: torch.dtype, device: torch.device) -> None:
        def new(*shape, dt=dtype):
            return torch.empty(*shape, dtype=dt, device=device)

        self.d, self.m, self.e = new(k, chunk), new(k, chunk), new(k, chunk)  # deltas, masks, products
        self.s, self.s2, self.s3 = new(chunk), new(chunk), new(chunk)  # sums over the models
        self.f, self.u = new(chunk), new(chunk)  # a 0/1 mask, a second one
        self.g, self.r, self.acc = (new(chunk, dt=torch.float32) for _ in range(3))  # |τ|, draws, sums


def sum_models(x: torch.Tensor, ws: Workspace, out: torch.Tensor) -> torch.Tensor:
    """torch.sum(x, 0) for a few models, as torch computes it (in order, in fp32 for 16-bit
    types, rounded once), but as plain adds: torch's bf16 reduction is ~10× slower here."""
    if x.dtype in (torch.float32, torch.float64):
        acc = out.copy_(x[0])
        for i in range(1, x.shape[0]):
            acc.add_(x[i])
        return out
    c = x.shape[1]
    acc = ws.acc[:c].copy_(x[0])
    for i in range(1, x.shape[0]):
        acc.add_(ws.g[:c].copy_(x[i]))  # widened first: a mixed-dtype add is ~5× slower
    return out.copy_(acc)


def combine(b, d, w, divisor, ws: Workspace, consensus: bool, normalize: bool, lambda_: float, out) -> None:
    """`task_arithmetic.combine` on one chunk, through the workspace, with masks as 0/1 values of
    the working dtype (comparisons written straight into such buffers run ~4× faster here than
    bool masks and their conversions); the same values bit for bit. `divisor`: Σw as
    `TaskVectorBank._weights` makes it, used without election."""
    c = d.shape[1]
    d.mul_(w)
    if consensus:
        total = sum_models(d, ws, ws.s[:c])
        majority = torch.ge(total, 0, out=ws.s2[:c]).mul_(2).sub_(1)  # a zero sum counts as positive
        m = torch.gt(torch.mul(d, majority, out=ws.e[:, :c]), 0, out=ws.m[:, :c])  # [sign(δ_i) = majority]
        divisor = sum_models(torch.mul(m, w, out=ws.e[:, :c]), ws, ws.s2[:c])
        divisor.add_(torch.eq(divisor, 0, out=ws.s3[:c]))  # a zero divisor becomes 1
        mixed = sum_models(m.mul_(d), ws, ws.s[:c])
    else:
        mixed = sum_models(d, ws, ws.s[:c])
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    torch.add(b, mixed, out=out)


def masked(t: torch.Tensor, m: torch.Tensor, ws: Workspace, out: torch.Tensor) -> None:
    """out = t ⊙ m for an fp32 0/1 mask m (narrowed first: mixed-dtype products are slow)."""
    torch.mul(t, m if t.dtype == m.dtype else ws.f[: m.numel()].copy_(m), out=out)

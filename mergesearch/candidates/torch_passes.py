"""Every pass in torch, on any device: a chunk at a time through a workspace of named buffers
allocated once (temporaries stay in cache; memory above the resident tensors is O(K·chunk)).
`numba_passes.NumbaPasses` runs the same passes as CPU kernels, bit for bit (tests/test_passes.py)."""

from __future__ import annotations

import numpy as np
import torch

from .draws import BLOCK, mul32
from .masks import CutMask, DellaMask, DrawMask
from .passes import Mix, Passes


class Workspace:
    """Every temporary of a chunk, allocated once: no allocation (and no page faults) per chunk.
    Buffers of the work dtype, then fp32 ones (magnitudes and draws are compared in fp32)."""

    def __init__(self, k: int, chunk: int, dtype: torch.dtype, device: torch.device) -> None:
        def new(*shape, dt=dtype):
            return torch.empty(*shape, dtype=dt, device=device)

        self.deltas = new(k, chunk)  # τ_k ⊙ m_k (· s_k · w_k once weighed)
        self.agree = new(k, chunk)  # the election's [sign(δ_k) = majority]
        self.product = new(k, chunk)  # δ_k · majority, then m_k · w_k
        self.total = new(chunk)  # Σ_k over the models
        self.majority = new(chunk)  # ±1
        self.divisor = new(chunk)  # Σ_k m_k w_k
        self.is_zero = new(chunk)  # [divisor = 0]
        self.mask = new(chunk)  # a 0/1 mask narrowed to the work dtype
        self.ranks = new(chunk)  # DELLA's normalized ranks
        self.magnitudes = new(chunk, dt=torch.float32)  # |τ|
        self.compare = new(chunk, dt=torch.float32)  # a second comparison's 0/1
        self.keep = new(chunk, dt=torch.float32)  # the 0/1 keep mask
        self.draws = new(chunk, dt=torch.float32)  # uniforms
        self.probs = new(chunk, dt=torch.float32)  # DELLA's keep probabilities
        self.widened = new(chunk, dt=torch.float32)  # a 16-bit row widened for a sum
        self.accumulator = new(chunk, dt=torch.float32)  # a 16-bit sum's fp32 accumulator


class TorchPasses(Passes):
    name = "torch"

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self._workspaces: dict[tuple[torch.dtype, torch.device], Workspace] = {}

    def workspace(self, k: int, dtype: torch.dtype, device: torch.device) -> Workspace:
        ws = self._workspaces.get((dtype, device))
        if ws is None or ws.deltas.shape[0] < k:
            ws = self._workspaces[(dtype, device)] = Workspace(k, self.chunk, dtype, device)
        return ws

    def takes(self, *tensors: torch.Tensor) -> bool:
        return True

    def takes_mask(self, mask) -> bool:
        return True

    def merge(self, out, base, taus, masks, scales, mix: Mix) -> None:
        k, n = len(taus), base.numel()
        o, b = out.view(-1), base.reshape(-1)
        flat = [t.reshape(-1) for t in taus]
        ws = self.workspace(k, base.dtype, base.device)
        seen: list[dict] = [{} for _ in masks]  # tie occurrences counted so far, per cut
        for start in range(0, n, self.chunk):
            stop = min(n, start + self.chunk)
            d = ws.deltas[:k, : stop - start]  # the workspace may have rows for more models
            for i in range(k):
                if masks[i] is None:
                    d[i].copy_(flat[i][start:stop])
                else:
                    apply_mask(masks[i], flat[i][start:stop], start, ws, d[i], seen[i])
                if scales[i] is not None:
                    d[i].mul_(scales[i])
            combine(b[start:stop], d, mix.w, mix.divisor, ws, mix.consensus, mix.normalize, mix.lambda_,
                    o[start:stop])  # fmt: skip

    def masked_l1(self, tau: torch.Tensor, mask) -> float:
        """fp32 sums per chunk, fp64 across (a whole-tensor `abs()` would copy the largest tensor)."""
        flat, total = tau.reshape(-1), torch.zeros((), dtype=torch.float64, device=tau.device)
        ws, seen = self.workspace(1, tau.dtype, tau.device), {}
        for start in range(0, flat.numel(), self.chunk):
            t = flat[start : start + self.chunk]
            kept = ws.deltas[0, : t.numel()]
            if mask is None:
                kept.copy_(t)
            else:
                apply_mask(mask, t, start, ws, kept, seen)
            total += kept.abs_().sum()
        return total.item()

    def keep_mask(self, tau: torch.Tensor, mask) -> torch.Tensor:
        """The 0/1 mask `merge` applies to τ (τ's shape and dtype)."""
        flat = tau.reshape(-1)
        if mask is None:
            return torch.ones_like(tau)
        ws, seen = self.workspace(1, tau.dtype, tau.device), {}
        kept = torch.empty_like(flat)
        for start in range(0, flat.numel(), self.chunk):
            t = flat[start : start + self.chunk]
            apply_mask(
                mask, torch.ones_like(t), start, ws, kept[start : start + t.numel()], seen, magnitudes=t
            )
        return kept.reshape(tau.shape)

    def magnitude_bins(self, tau: torch.Tensor) -> np.ndarray:
        flat, counts = tau.reshape(-1), torch.zeros(1 << 15, dtype=torch.int64, device=tau.device)
        for start in range(0, flat.numel(), self.chunk):
            a = flat[start : start + self.chunk].abs().float().view(torch.int32)
            counts += torch.bincount(a >> 16, minlength=1 << 15)
        return counts.cpu().numpy()

    def bracket(self, tau, lo, hi):
        flat = tau.reshape(-1)
        below, inside = np.zeros(len(lo), np.int64), [[] for _ in lo]
        ws = self.workspace(1, tau.dtype, tau.device)  # its fp32 buffers only
        for start in range(0, flat.numel(), self.chunk):
            m = min(self.chunk, flat.numel() - start)
            a = ws.magnitudes[:m].copy_(flat[start : start + m]).abs_()
            for i, (blo, bhi) in enumerate(zip(lo.tolist(), hi.tolist())):
                below[i] += int(torch.lt(a, blo, out=ws.compare[:m]).sum())
                band = torch.ge(a, blo, out=ws.compare[:m]).mul_(torch.le(a, bhi, out=ws.keep[:m]))
                inside[i].append(a[band.bool()])
        values = [torch.cat(v) for v in inside]
        starts = np.concatenate([[0], np.cumsum([v.numel() for v in values])])
        return below, torch.cat(values), starts

    def gather(self, tau, lo, hi, total):
        _, values, starts = self.bracket(tau, lo, hi)
        return values, starts, None

    def select(self, values: torch.Tensor, k: int) -> tuple[float, int, int]:
        v = values.kthvalue(k + 1).values
        return v.item(), int((values < v).sum()), int((values == v).sum())

    def level_l1(self, tau: torch.Tensor, keys: np.ndarray, levels: int) -> np.ndarray:
        """fp64 sums per level through torch's index_add_ (the order is torch's)."""
        flat, ws = tau.reshape(-1), self.workspace(1, tau.dtype, tau.device)
        total = torch.zeros(levels, dtype=torch.float64, device=tau.device)
        for start in range(0, flat.numel(), self.chunk):
            t = flat[start : start + self.chunk]
            u = self.uniforms(keys, start, ws.draws[: t.numel()])
            total.index_add_(0, u.mul_(levels).long(), t.abs().double())
        return total.cpu().numpy()

    def uniforms(self, keys: np.ndarray, start: int, out: torch.Tensor) -> torch.Tensor:
        """lowbias32 on int64: 32-bit products in two halves (`draws.mul32`), so none overflows."""
        n = out.numel()
        j = torch.arange(start, start + n, device=out.device)
        x = torch.from_numpy(keys.astype(np.int64)).to(out.device)[j // BLOCK] ^ (j % BLOCK)
        x ^= x >> 16
        x = mul32(x, 0x7FEB352D)
        x ^= x >> 15
        x = mul32(x, 0x846CA68B)
        x ^= x >> 16
        return torch.mul((x >> 8).float(), 1.0 / (1 << 24), out=out)


def apply_mask(mask, t, start, ws: Workspace, out, seen: dict, magnitudes=None) -> None:
    """out = t ⊙ m for the chunk of τ at flat index `start` (m from `magnitudes`, default t);
    `seen` carries a cut's tie occurrences from chunk to chunk (empty at the first chunk)."""
    if isinstance(mask, CutMask):
        _apply_cut(mask, t, start, ws, out, seen, magnitudes)
    elif isinstance(mask, DrawMask):
        u = mask.draws(start, t.numel(), ws.draws)
        masked(t, torch.lt(u, mask.d, out=ws.keep[: t.numel()]), ws, out)
    elif isinstance(mask, DellaMask):
        _apply_della(mask, t, start, ws, out)
    else:
        raise TypeError(f"no torch pass for the mask {mask!r}")


def _apply_cut(mask: CutMask, t, start, ws: Workspace, out, seen: dict, magnitudes) -> None:
    c, n = mask.cut, t.numel()
    if c.lo > c.hi:  # an empty window (density 0)
        out.zero_()
        return
    a = ws.magnitudes[:n].copy_(t if magnitudes is None else magnitudes).abs_()  # fp32, as mergekit ranks
    if not c.partial:
        m = torch.ge(a, c.lo, out=ws.keep[:n])
        if not c.top:
            m.mul_(torch.le(a, c.hi, out=ws.compare[:n]))
    else:
        m = torch.gt(a, c.lo, out=ws.keep[:n]).mul_(torch.lt(a, c.hi, out=ws.compare[:n]))
        for v, first, end in c.tie_groups():  # tie positions count in flat index order
            eq = torch.eq(a, v, out=ws.compare[:n])
            count = int(eq.sum())
            before = seen.get(v, 0)
            seen[v] = before + count
            if max(first, before) >= min(end, before + count):
                continue  # none of this chunk's ties is kept
            if first <= before and before + count <= end:
                m.add_(eq)  # all of them are
            else:
                q = torch.cumsum(eq, 0).add_(before - 1)
                m.add_(eq.mul_((q >= first) & (q < end)))
    masked(t, m, ws, out)


def _apply_della(mask: DellaMask, t, start, ws: Workspace, out) -> None:
    n = t.numel()
    if mask.d <= 0:
        out.zero_()
        return
    if mask.whole is not None:
        ranks = mask.whole[start : start + n].clone()
    else:
        ranks = mask.ranks(start, n, out=ws.ranks if ws.ranks.dtype == t.dtype else None)
    # mergekit's (d − ε) + ranks·2·ε, in place: the same operations and roundings
    p = ranks.mul_(2).mul_(mask.eps).add_(mask.d - mask.eps)
    u = mask.draws(start, n, ws.draws)
    masked(t, torch.lt(u, ws.probs[:n].copy_(p), out=ws.keep[:n]), ws, out)


def sum_models(x: torch.Tensor, ws: Workspace, out: torch.Tensor) -> torch.Tensor:
    """torch.sum(x, 0) for a few models, as torch computes it (in order, in fp32 for 16-bit
    types, rounded once), but as plain adds: torch's bf16 reduction is slower here."""
    if x.dtype in (torch.float32, torch.float64):
        acc = out.copy_(x[0])
        for i in range(1, x.shape[0]):
            acc.add_(x[i])
        return out
    c = x.shape[1]
    acc = ws.accumulator[:c].copy_(x[0])
    for i in range(1, x.shape[0]):
        acc.add_(ws.widened[:c].copy_(x[i]))  # widened first: a mixed-dtype add is slower
    return out.copy_(acc)


def combine(b, d, w, divisor, ws: Workspace, consensus: bool, normalize: bool, lambda_: float, out) -> None:
    """`task_arithmetic.combine` on one chunk, through the workspace, with masks as 0/1 values of
    the working dtype (comparisons written straight into such buffers are faster here than bool
    masks and their conversions); the same values bit for bit. `divisor`: `Mix.divisor`, used
    without election."""
    k, c = d.shape
    d.mul_(w)
    if consensus:
        total = sum_models(d, ws, ws.total[:c])
        majority = torch.ge(total, 0, out=ws.majority[:c]).mul_(2).sub_(1)  # a zero sum counts as positive
        m = torch.gt(
            torch.mul(d, majority, out=ws.product[:k, :c]), 0, out=ws.agree[:k, :c]
        )  # [sign(δ_i) = majority]
        divisor = sum_models(torch.mul(m, w, out=ws.product[:k, :c]), ws, ws.divisor[:c])
        divisor.add_(torch.eq(divisor, 0, out=ws.is_zero[:c]))  # a zero divisor becomes 1
        mixed = sum_models(m.mul_(d), ws, ws.total[:c])
    else:
        mixed = sum_models(d, ws, ws.total[:c])
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    torch.add(b, mixed, out=out)


def masked(t: torch.Tensor, m: torch.Tensor, ws: Workspace, out: torch.Tensor) -> None:
    """out = t ⊙ m for an fp32 0/1 mask m (narrowed first: mixed-dtype products are slow)."""
    torch.mul(t, m if t.dtype == m.dtype else ws.mask[: m.numel()].copy_(m), out=out)

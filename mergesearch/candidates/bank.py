"""Task vectors held for a whole study, and the policy of which pass a candidate takes.

A search builds hundreds of candidates from the same τ_i = x_i − b. What depends only on τ is
done once and cached, by concern: magnitude cuts (`cuts.Cuts`: after the first, a new density is
a comparison, not a sort), draw keys and DARE's level sums (`draws.Draws`), DELLA's ranks
(`ranks.DellaRanks`, with `cache_ranks`), norms and rescales (`norms.Norms`). The bank builds a
candidate tensor's masks from them (`masks.py`) and hands the merge to a backend: numba's one
pass on the CPU where it takes the tensors and masks (`numba_passes`), torch's chunks otherwise
(`torch_passes`: CUDA, DELLA without cached ranks), with the same bits. How the results relate
to mergekit's: the package's docstring.
"""

from __future__ import annotations

import functools

import torch

from ..errors import MergeSearchError
from ..methods import sparsify
from ..methods.registry import Method
from .cuts import Cut, Cuts, bounded
from .draws import Draws
from .masks import CutMask, DellaMask, DrawMask
from .norms import Norms
from .numba_passes import NumbaPasses
from .passes import Backends, Mix, Passes
from .ranks import DellaRanks
from .torch_passes import TorchPasses

CHUNK = 1 << 18  # elements per chunk: few enough to stay in cache, many enough to amortize each op


def chunk_for(n_params: int) -> int:
    """Chunk size for a model: CHUNK (256K elements) from 8M parameters on, where the workspace
    is a few percent of the model; smaller below, where it would dominate. Smaller chunks cost
    speed: each torch op has a fixed dispatch cost per chunk."""
    return max(1 << 12, min(CHUNK, 1 << max(0, (n_params // 32).bit_length() - 1)))


class TaskVectorBank:
    """Cached cuts, draws, ranks and norms per task vector, each named by a key such as
    "1:model.layers.0.mlp.up_proj.weight" (the model's position and the tensor's name).

    `backend="torch"` runs every pass in torch, as on a GPU."""

    # What the bank implements; anything else takes the reference in methods/ (`supports`).
    SPARSIFICATIONS = (None, "magnitude", "magnitude_outliers", "random", "della")
    DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    DEVICES = ("cpu", "cuda")

    def __init__(
        self,
        seed: int = 0,
        chunk: int = CHUNK,
        cache_ranks: bool = False,
        backend: str = "auto",
    ) -> None:
        if backend not in ("auto", "torch"):
            raise ValueError(f"backend {backend!r}: 'auto' or 'torch'")
        self.torch = TorchPasses(chunk)
        self.numba = NumbaPasses() if backend == "auto" else None
        self.passes_for = Backends(self.torch, self.numba)  # numba's kernels where they take the tensors
        self.cuts = Cuts(self.passes_for)
        self.draws = Draws(seed, self.passes_for)
        self.ranks = DellaRanks(chunk, cache_ranks)
        self.norms = Norms(self.torch, self.passes_for, self.draws)
        self._mixes: dict[tuple, Mix] = {}
        self._stage: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def supports(cls, method: Method, dtype: torch.dtype, device: torch.device | str) -> bool:
        """Whether the bank makes this method's candidates in this dtype and on this device;
        every other candidate takes the method's reference (slower, never another method)."""
        return (
            method.task_vectors
            and method.sparsification in cls.SPARSIFICATIONS
            and dtype in cls.DTYPES
            and torch.device(device).type in cls.DEVICES
        )

    # -- one output tensor --------------------------------------------------------------------

    def exact_for(
        self, keys: list[str], taus: list[torch.Tensor], sparsification: str | None, rescale: bool, **params
    ) -> bool:
        """Whether `merge` gives mergekit's result bit for bit for these arguments."""
        if sparsification is None:
            return True
        if sparsification not in ("magnitude", "magnitude_outliers") or rescale:
            return False
        if any(t.dtype not in (torch.float32, torch.float64) for t in taus):
            return False  # 16-bit magnitudes tie at nearly every cut: don't look
        return not any(
            c is not None and c.partial for c in self._cuts_for(keys, taus, sparsification, params)
        )

    def merge(
        self,
        keys: list[str],
        base: torch.Tensor,
        taus: list[torch.Tensor] | None,
        *,
        weight: list[float],
        density: list[float],
        sparsification: str | None,
        consensus: bool,
        normalize: bool,
        rescale: bool,
        lambda_: float = 1.0,
        gamma: list[float] | None = None,
        epsilon: list[float] | None = None,
        out: torch.Tensor | None = None,
        models: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """b + λ·combine(sparsify(τ_i, d_i)·w_i) into `out` (or a new tensor), computed in the
        inputs' dtype; an fp32 `out` for bf16 inputs (an fp32 live model) receives those values.
        `models` instead of `taus` (task arithmetic only: no mask needs τ): the models x_i, with
        τ_i = x_i − b made in numba's pass as it goes, or here where that pass does not take them."""
        out = torch.empty_like(base) if out is None else out
        if models is not None:
            if sparsification is not None:
                raise ValueError("TaskVectorBank.merge: models= is for task arithmetic (no sparsification)")
            mix = self._mix(weight, base.dtype, base.device, consensus, normalize, lambda_)
            nothing = [None] * len(models)
            if self._merge_passes(out, base, models, nothing) is self.numba:
                self.numba.merge(out, base, models, nothing, nothing, mix, from_models=True)
                return out
            taus = [torch.sub(x, base) for x in models]
        masks = self.masks(keys, taus, sparsification, density, gamma, epsilon)
        scales = [
            self.norms.rescale(key, t, m) if rescale and m is not None else None
            for key, t, m in zip(keys, taus, masks)
        ]
        mix = self._mix(weight, base.dtype, base.device, consensus, normalize, lambda_)
        passes = self._merge_passes(out, base, taus, masks)
        if out.dtype != base.dtype and passes is not self.numba:  # only numba's kernel widens as it stores
            into = self._staging(base)
            passes.merge(into, base, taus, masks, scales, mix)
            return out.copy_(into)
        passes.merge(out, base, taus, masks, scales, mix)
        return out

    def _merge_passes(self, out, base, taus, masks) -> Passes:
        numba = self.numba
        widens = out.dtype == torch.float32 and base.dtype == torch.bfloat16
        if (
            numba is not None
            and all(x.dtype == base.dtype for x in taus)
            and (out.dtype == base.dtype or widens)
            and numba.takes(base, *taus)
            and numba.takes(out)
            and all(numba.takes_mask(m) for m in masks)
        ):
            return numba
        return self.torch

    def _staging(self, like: torch.Tensor) -> torch.Tensor:
        """A reused buffer of `like`'s shape, dtype and device (a new tensor per output would cost
        page faults)."""
        buf = self._stage.get(like.dtype)
        if buf is None or buf.numel() < like.numel() or buf.device != like.device:
            buf = self._stage[like.dtype] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        return buf[: like.numel()].view(like.shape)

    def _mix(self, *args) -> Mix:
        """`Mix.of(weight, dtype, device, consensus, normalize, λ)`, cached: a candidate's
        tensors share it."""
        key = (tuple(args[0]), *args[1:])
        if key not in self._mixes:
            bounded(self._mixes, 1024)[key] = Mix.of(*args)
        return self._mixes[key]

    def masks(self, keys, taus, sparsification, density, gamma=None, epsilon=None) -> list:
        """Each task vector's keep mask for these parameters (None: keep every element)."""
        if sparsification in ("magnitude", "magnitude_outliers"):
            params = {"density": density, "gamma": gamma}
            return [
                None if c is None else CutMask(c, functools.partial(self.cuts.tie_positions, key, t, c))
                for key, t, c in zip(keys, taus, self._cuts_for(keys, taus, sparsification, params))
            ]
        if sparsification == "random":
            return [
                None
                if d >= 1
                else DrawMask(self.draws.keys_for(key, t), functools.partial(self.draws.uniforms, key), d)
                for key, t, d in zip(keys, taus, density)
            ]
        if sparsification == "della":
            return [
                None
                if d >= 1
                else DellaMask(
                    self.draws.keys_for(key, t),
                    functools.partial(self.draws.uniforms, key),
                    functools.partial(self.ranks.ranks, key, t),
                    (lambda key=key, t=t: self.ranks.cached(key, t).numpy())
                    if self.ranks.caches(t)
                    else None,
                    t,
                    d,
                    e,
                )
                for key, t, d, e in zip(keys, taus, density, epsilon)
            ]
        if sparsification is None:  # task arithmetic: every element kept
            return [None] * len(taus)
        # Never search a sparsifier the bank does not know as "no mask" (plain task arithmetic).
        raise MergeSearchError(
            f"the search engine has no {sparsification!r} sparsification; score this method with the "
            "exact engine (ResidentEngine(exact=True)) or add it to candidates/bank.py"
        )

    def mask(
        self,
        key: str,
        tau: torch.Tensor,
        sparsification: str,
        density: float,
        gamma: float = 0.01,
        epsilon: float = 0.15,
    ) -> torch.Tensor:
        """The 0/1 keep mask `merge` applies to τ (same shape, τ's work dtype); for tests and
        for anyone who wants to see what a candidate keeps."""
        (m,) = self.masks([key], [tau], sparsification, [density], [gamma], [epsilon])
        return self.torch.keep_mask(tau, m)

    def _cuts_for(self, keys, taus, sparsification: str, params: dict) -> list[Cut | None]:
        gamma = params.get("gamma") or [0.0] * len(taus)
        windows = [
            sparsify.rank_window(sparsification, t.numel(), d, g)
            for t, d, g in zip(taus, params["density"], gamma)
        ]
        return [None if w is None else self.cuts.cut(k, t, *w) for k, t, w in zip(keys, taus, windows)]

"""The in-memory engine a search uses: inputs held in one placement, each candidate written in
place into one live model. Task-vector candidates go through the bank (`bank.py`); every other method, and
any sparsification the bank does not declare, through the reference merge (`engine.merge_tensor`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..engine import merge_tensor, seed_everything
from ..errors import MergeSearchError
from ..plan import Layout, MergePlan, TensorTask, plan_merge
from ..recipe import Recipe
from . import numba_kernels
from .bank import TaskVectorBank, chunk_for
from .placement import Inputs


class ResidentEngine:
    """Each candidate recipe written in place into one live model's parameters (no files, no
    per-candidate model allocation), from inputs held in one `placement` (`placement.py`):
    `device` (loaded once onto `device`: the resident engine), `host` (host memory, pinned on
    CUDA, copied per tensor) or `disk` (the checkpoint files, memory-mapped, read per tensor).
    Every placement gives the same candidate bit for bit.

    With `base=`, the other models are task vectors τ = x − b (held as τ, replacing x: no extra
    memory; or, from the files, computed per tensor), and task-vector methods reuse one scratch
    buffer and write straight into the live parameters. Methods that need the models themselves
    (linear, slerp, ...) then cannot run: build the engine without `base=`.

    Randomized methods draw from the global RNG reseeded per candidate, in the same order as a
    disk merge, so a candidate equals `merge(recipe, seed=...)` bit for bit.

    Task-vector candidates go through a `TaskVectorBank` (chunked, with the work candidates
    share cached) wherever its result is mergekit's bit for bit. With `exact=False` (what a search
    uses) they always do: DARE and DELLA then draw from the bank, reproducible per (seed,
    tensor, model position) and common to all candidates, instead of torch's RNG.
    """

    def __init__(
        self,
        recipe_models: list[str],
        *,
        base: str | None = None,
        resolve_path: Callable[[str], Path] = Path,
        device: str | torch.device = "cpu",
        allow_pickle: bool = False,
        exact: bool = True,
        seed: int = 0,
        cache_ranks: bool = False,
        placement: str = "device",
    ) -> None:
        self.device = torch.device(device)
        self.base = base
        self.exact = exact
        self._position = {ref: i for i, ref in enumerate(recipe_models)}  # names the bank's draws
        return_freed_memory()
        self.models = {ref: Checkpoint(resolve_path(ref), allow_pickle=allow_pickle) for ref in recipe_models}
        self._loaded = set(self.models)  # not a multi-stage recipe's intermediate stages
        self.layouts: dict[tuple, Layout] = {}  # plan layouts by structure (`plan.layout_key`)
        if base is not None and base not in self.models:
            raise MergeSearchError(f"ResidentEngine: base {base} is not among the models")
        self.inputs = Inputs(self.models, base, self.device, placement)
        self._scratch: dict[torch.dtype, torch.Tensor] = {}
        self.bank = TaskVectorBank(
            seed, chunk=chunk_for(self.inputs.base_numel()) if base else 1 << 16, cache_ranks=cache_ranks
        )
        return_freed_memory()

    @property
    def placement(self) -> str:
        return self.inputs.placement

    def plan(self, recipe: Recipe) -> MergePlan:
        """The recipe's plan over the resident models. A search's candidates share their layout
        (`plan.layout_key`), so only their parameters are resolved again; a multi-stage recipe's
        later stages, whose inputs are built per candidate, are planned afresh."""
        fixed = all(m in self._loaded for m in recipe.referenced_models())
        return plan_merge(recipe, models=self.models, layouts=self.layouts if fixed else None)

    def iter_candidate(
        self,
        recipe: Recipe | list[Recipe],
        seed: int | None = None,
        targets: dict[str, torch.Tensor] | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Output tensors of a recipe; a multi-stage recipe keeps its intermediates in memory.
        Where `targets` holds a matching tensor for an output, the output is written into it."""
        recipes = recipe if isinstance(recipe, list) else [recipe]
        added = []
        try:
            for i, r in enumerate(recipes):
                plan = self.plan(r)
                if seed is not None:  # as a disk merge does, once per stage
                    seed_everything(seed, self.device)
                last = i == len(recipes) - 1
                out = {}
                keys = [self._keys(task) for task in plan.tasks]
                raw = self._from_models(plan)
                for task, got in zip(plan.tasks, self.inputs.stream(keys, raw=raw)):
                    target = (targets or {}).get(task.name) if last else None
                    value = self._merge(plan, task, got, target, raw)
                    if self.inputs.owns(value):  # a streamed buffer, reused for a later tensor
                        value = value.clone()
                    if last:
                        yield task.name, value
                    else:
                        out[task.name] = value
                if last:
                    return
                self.models[r.name] = _ResidentCheckpoint(self.models[plan.tokenizer_from], out, plan.config)
                self.inputs.stage(r.name, out)
                added.append(r.name)
        finally:
            for name in added:
                del self.models[name]
                self.inputs.unstage(name)

    def _from_models(self, plan: MergePlan) -> bool:
        """Whether this plan's task vectors come as the models x themselves, for the bank's
        kernel to make τ = x − b as it merges: task arithmetic from the files on the CPU (the
        subtraction is then no pass of its own)."""
        return (
            self.inputs.placement == "disk"
            and self.device.type == "cpu"
            and self.base is not None
            and plan.method.task_vectors
            and plan.method.sparsification is None
            and self.bank.numba is not None
        )

    def _keys(self, task: TensorTask) -> list[tuple[str, str]]:
        return [(ref, self.models[ref].resolve(name)) for ref, name in task.inputs]

    def _merge(
        self, plan: MergePlan, task: TensorTask, got: dict, target: torch.Tensor | None, raw: bool = False
    ) -> torch.Tensor:
        """One output tensor from its inputs `got` (τ for a task-vector key; with `raw`, x)."""
        keys = self._keys(task)
        if not any(self.inputs.is_task_vector(k) for k in keys):
            tensors = [got[k] for k in keys]
            if plan.method.elementwise and task.floating:
                return _chunked(plan, task, tensors, target)
            return merge_tensor(plan, task, tensors)
        base_key = keys[task.base] if task.base is not None else None
        others = [k for i, k in enumerate(keys) if i != task.base]
        if not (
            plan.method.task_vectors
            and base_key
            and base_key[0] == self.base
            and all(self.inputs.is_task_vector(k) for k in others)
        ):
            raise MergeSearchError(
                f"{plan.method.name} with base {base_key[0] if base_key else None}: this engine holds task "
                f"vectors against {self.base}; build ResidentEngine without base= for this recipe"
            )
        base = got[base_key]
        taus = [got[k] for k in others]
        if base.dtype != task.work_dtype:  # a recipe `dtype` that differs from the stored one
            raise MergeSearchError(
                f"tensor {task.name}: recipe dtype {task.work_dtype} differs from the resident "
                f"{base.dtype}; load the engine's models in that dtype"
            )
        # straight into the live parameter, also an fp32 one for bf16 inputs (the CPU's live model)
        out = (
            target
            if target is not None
            and task.out_dtype == base.dtype
            and target.shape == base.shape
            and target.device == base.device
            and target.dtype in (base.dtype, torch.float32)
            else None
        )
        gta = plan.method.gta_arguments({**task.shared, **task.per_model})
        names = [f"{self._position[ref]}:{name}" for ref, name in others]
        # The bank serves only what it declares; any other method is its reference, never another.
        if self.bank.supports(plan.method, base.dtype, base.device) and (
            not self.exact or self.bank.exact_for(names, taus, **gta)
        ):
            if raw:  # the models: the kernel subtracts the base as it merges
                value = self.bank.merge(names, base, None, models=taus, out=out, **gta)
            else:
                value = self.bank.merge(names, base, taus, out=out, **gta)
            return value if value is out else value.to(task.out_dtype)
        out = out if out is not None and out.dtype == base.dtype else None  # the reference does not widen
        n = len(taus) * base.numel()
        scratch = self._scratch.get(base.dtype)
        if scratch is None or scratch.numel() < n:
            scratch = self._scratch[base.dtype] = torch.empty(n, dtype=base.dtype, device=base.device)
        value = plan.method.merge(
            base, [], task_vectors=taus, scratch=scratch, out=out, **task.shared, **task.per_model
        )
        return value.to(task.out_dtype)

    def state_dict(self, recipe: Recipe | list[Recipe], seed: int | None = None) -> dict[str, torch.Tensor]:
        return dict(self.iter_candidate(recipe, seed))

    @torch.no_grad()
    def write_into(
        self, model: torch.nn.Module, recipe: Recipe | list[Recipe], seed: int | None = None
    ) -> None:
        """Materialize the candidate into `model`'s parameters in place."""
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        tied = getattr(model.config, "tie_word_embeddings", False)
        for name, value in self.iter_candidate(recipe, seed, targets=params):
            target = params.get(name)
            if target is None:
                if tied and name == "lm_head.weight":
                    continue
                raise MergeSearchError(f"tensor {name}: the live model has no such parameter")
            if value is not target:
                target.copy_(value)
        return_freed_memory()  # what the candidate freed goes back to the OS


def _chunked(plan: MergePlan, task: TensorTask, tensors: list[torch.Tensor], target: torch.Tensor | None):
    """merge_tensor for an elementwise method, 64K elements at a time, into `target` when it fits:
    the same values, with temporaries that stay in cache instead of whole-tensor copies."""
    out = target
    if (
        out is None
        or out.dtype != task.out_dtype
        or out.shape != tensors[0].shape
        or out.device != tensors[0].device
    ):
        out = torch.empty(tensors[0].shape, dtype=task.out_dtype, device=tensors[0].device)
    if plan.method.name in _KERNELS and _KERNELS[plan.method.name](task, tensors, out):
        return out
    flat, o = [x.reshape(-1) for x in tensors], out.view(-1)
    for start in range(0, o.numel(), 1 << 16):
        stop = min(o.numel(), start + (1 << 16))
        o[start:stop] = merge_tensor(plan, task, [x[start:stop] for x in flat])
    return out


def _fused_linear(task: TensorTask, tensors: list[torch.Tensor], out: torch.Tensor) -> bool:
    """`interpolation.linear` as one `numba_kernels.linear` pass, same bits, where it applies:
    numba present, CPU, one dtype throughout (fp32 or bf16), torch's addcmul_ an FMA."""
    if not (
        task.base is None
        and all(x.dtype == out.dtype == task.work_dtype for x in tensors)
        and numba_kernels.fusable(out, *tensors)
        and numba_kernels.addcmul_is_fma()
    ):
        return False
    w = torch.tensor(list(task.per_model["weight"]), dtype=torch.float32)
    numba_kernels.linear(
        numba_kernels.as_numpy(out),
        tuple(numba_kernels.as_numpy(x) for x in tensors),
        w.numpy(),
        np.float32(w.sum().item()),
        bool(task.shared["normalize"]),
    )
    return True


# Elementwise methods with a kernel of their own: name → fn(task, inputs, out), False where it
# does not apply (then the chunked reference).
_KERNELS = {"linear": _fused_linear}


# Allocations from this size on are mmapped (and so returned to the OS when freed); smaller ones
# come from the heap, which `return_freed_memory` trims. At 1 MiB, evaluation's per-batch
# activations (~1-16 MB) were each mapped and page-faulted afresh: the demo's evaluation ran
# 1.3x slower than at 32 MiB (benchmarks/RESULTS.md, "The demo").
MMAP_THRESHOLD = 32 << 20


@functools.cache
def _glibc():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None
    libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    return libc


def return_freed_memory() -> None:
    """Give memory freed so far back to the OS (glibc keeps small freed blocks in its heap: after
    loading a model that is a large part of the model), and mmap every allocation from
    MMAP_THRESHOLD on from the first call on, so large freed temporaries go back too. The memory bound is about resident bytes.
    Called after every candidate: the library is opened once."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class _ResidentCheckpoint(Checkpoint):
    """An intermediate stage's output, held in memory, standing in for a model folder."""

    def __init__(self, like: Checkpoint, tensors: dict[str, torch.Tensor], config: dict) -> None:
        from ..checkpoint import TensorMeta

        self.path = Path(f"<stage of {like.path.name}>")
        self.config = config
        self.arch = like.arch
        self.num_layers = config.get(like.arch.num_layers_key, like.num_layers)
        self.meta = {k: TensorMeta(tuple(v.shape), v.dtype, self.path) for k, v in tensors.items()}
        self._open, self._pickled, self._allow_pickle = {}, {}, False

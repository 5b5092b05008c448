"""Turns a recipe into weights, streaming tensor by tensor from input folders to an output folder.

`merge` executes a plan (`plan.plan_merge`: inputs and parameters of every output tensor,
resolved before any data is read, so bad recipes fail fast and nothing is written) in
mergekit's order (lexicographic by tensor name, which is also the order of DARE's random
draws) and writes through `StreamingWriter`: peak memory is one tensor per input.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import (
    Checkpoint,
    StreamingWriter,
    check_finite,
    copy_tokenizer,
    parse_size,
)
from .errors import MergeSearchError
from .plan import Layout, MergePlan, TensorTask, plan_merge
from .recipe import Recipe, dump_recipes, load_recipes
from .task_vector_bank import TaskVectorBank, chunk_for, fused_kernels


def seed_everything(seed: int, device: torch.device | None = None) -> None:
    """What mergekit's --random-seed does (transformers.set_seed): python, numpy and torch RNGs.
    With a CPU `device`, of torch's only the CPU generator: torch.manual_seed also seeds every
    accelerator's, lazily where none is initialized, which formats a stack trace (~0.5 ms)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if device is not None and device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeSearchError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise MergeSearchError(f"--device {device!r}: not a device name ({e})") from e


# -- execution -----------------------------------------------------------------------------


def merge_tensor(plan: MergePlan, task: TensorTask, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Apply the plan's method to one output tensor's (already loaded) inputs."""
    method = plan.method
    if not task.floating:
        if any(not torch.equal(tensors[0], x) for x in tensors[1:]):
            raise MergeSearchError(f"tensor {task.name}: non-float buffer differs between inputs")
        return tensors[0]
    tensors = [x.to(task.work_dtype) for x in tensors]
    base = tensors[task.base] if task.base is not None else None
    others = [x for i, x in enumerate(tensors) if i != task.base]
    if method.base == "required" and not others:
        return base
    out = method.merge(base, others, **task.shared, **task.per_model)
    return out.to(task.out_dtype)


def iter_merged(
    plan: MergePlan, device: torch.device, progress: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    for task in tqdm(plan.tasks, desc="merging", unit="tensor", disable=not progress, leave=False):
        tensors = []
        for ref, name in task.inputs:
            ck = plan.models[ref]
            x = ck.get(name, device)
            check_finite(x, name, ck.path)
            tensors.append(x)
        yield task.name, merge_tensor(plan, task, tensors)


@contextmanager
def _stage_dirs(parent: Path) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=".mergesearch-stages-", dir=parent))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def merge(
    recipe: Recipe | list[Recipe] | str | Path,
    out_dir: str | Path,
    *,
    seed: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    allow_pickle: bool = False,
    shard_size: str | int = "5GB",
    progress: bool = False,
    recipe_dir: Path | None = None,
) -> Path:
    """Merge a recipe (or a multi-stage list, or a YAML file) into a Hugging Face model folder."""
    if isinstance(recipe, (str, Path)):
        recipe_dir = Path(recipe).resolve().parent
        recipes = load_recipes(recipe)
    else:
        recipes = recipe if isinstance(recipe, list) else [recipe]
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise MergeSearchError(f"{out_dir}: output folder exists; pass --overwrite to replace it")
    dev = resolve_device(device)
    stages: dict[str, Path] = {}

    def resolve_path(ref: str) -> Path:
        if ref in stages:
            return stages[ref]
        p = Path(ref).expanduser()
        if not p.exists() and recipe_dir is not None and (recipe_dir / ref).exists():
            p = recipe_dir / ref
        if not p.exists():
            raise MergeSearchError(
                f"model {ref}: folder does not exist (paths are relative to the current directory)"
            )
        return p

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _stage_dirs(out_dir.parent) as tmp:
        for i, r in enumerate(recipes):
            last = i == len(recipes) - 1
            target = out_dir if last else tmp / f"stage-{i}-{r.name}"
            plan = plan_merge(r, resolve_path, allow_pickle=allow_pickle)
            _write(
                plan,
                target,
                seed,
                dev,
                overwrite if last else False,
                parse_size(shard_size),
                progress,
                recipes if last else [r],
            )
            if r.name:
                stages[r.name] = target
    return out_dir


def _write(
    plan: MergePlan,
    out_dir: Path,
    seed: int | None,
    device: torch.device,
    overwrite: bool,
    shard_bytes: int,
    progress: bool,
    recipes: list[Recipe],
) -> None:
    writer = StreamingWriter(out_dir, plan.layout, [t.name for t in plan.tasks], shard_bytes, overwrite)
    try:
        if seed is not None:  # mergekit reseeds at the start of every (stage's) merge
            seed_everything(seed)
        for name, tensor in iter_merged(plan, device, progress):
            writer.write(name, tensor)
        writer.add_file("config.json", json.dumps(plan.config, indent=2) + "\n")
        writer.add_file("mergesearch_recipe.yml", dump_recipes(recipes))
        writer.add_file("README.md", model_card(recipes))
        copy_tokenizer(plan.models[plan.tokenizer_from].path, writer)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        for ck in plan.models.values():
            ck.close()


def model_card(recipes: list[Recipe]) -> str:
    """A Hugging Face model card, as mergekit writes one: the method, the models, the recipe."""
    last = recipes[-1]
    staged = {r.name for r in recipes if r.name}
    refs = [
        src.model for r in recipes for src in (r.models or [x for sl in r.slices or [] for x in sl.sources])
    ]
    sources = list(dict.fromkeys(m for m in refs if m not in staged))
    lines = [
        "---",
        "library_name: transformers",
        "tags: [mergekit, merge, mergesearch]",
        "---",
        "# Merged model",
        "",
        f"A merge of pre-trained language models made with mergesearch, mergekit 0.1.5's semantics "
        f"(method `{last.merge_method}`"
        + (f", in {len(recipes)} stages" if len(recipes) > 1 else "")
        + (f", base `{last.base_model}`" if last.base_model else "")
        + ").",
        "",
        "## Models merged",
        "",
        *[f"- `{m}`" for m in sources],
        "",
        "## Configuration",
        "",
        "The recipe, also in `mergesearch_recipe.yml` (`mergekit-yaml` runs it too):",
        "",
        "```yaml",
        dump_recipes(recipes).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


# -- in memory, for the search ---------------------------------------------------------------


class ResidentEngine:
    """Input tensors loaded once and kept resident; each candidate recipe is written in place
    into one live model's parameters (no files, no per-candidate model allocation).

    With `base=`, the other models are kept as task vectors τ = x − b (computed once, exactly
    as a merge computes them, replacing x: no extra memory), and task-vector methods reuse one
    scratch buffer and write straight into the live parameters. Methods that need the models
    themselves (linear, slerp, ...) then cannot run: build the engine without `base=`.

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
    ) -> None:
        self.device = torch.device(device)
        self.base = base
        self.exact = exact
        self._position = {ref: i for i, ref in enumerate(recipe_models)}  # names the bank's draws
        return_freed_memory()
        self.models = {ref: Checkpoint(resolve_path(ref), allow_pickle=allow_pickle) for ref in recipe_models}
        self._loaded = set(self.models)  # not a multi-stage recipe's intermediate stages
        self._layouts: dict[tuple, Layout] = {}
        if base is not None and base not in self.models:
            raise MergeSearchError(f"ResidentEngine: base {base} is not among the models")
        self.tensors: dict[tuple[str, str], torch.Tensor] = {}
        self.task_vectors: dict[tuple[str, str], torch.Tensor] = {}
        order = ([base] if base else []) + [r for r in self.models if r != base]
        for ref in order:
            ck = self.models[ref]
            for name in ck.meta:
                x = ck.get(name, self.device)
                check_finite(x, name, ck.path)
                b = self.tensors.get((base, name)) if base and ref != base else None
                if b is not None and x.is_floating_point() and x.shape == b.shape and x.dtype == b.dtype:
                    # in place: the same rounding as x − b, without a second copy of the model
                    self.task_vectors[(ref, name)] = x.sub_(b) if x.device == b.device else x - b
                else:
                    self.tensors[(ref, name)] = x
            ck.close()
        self._scratch: dict[torch.dtype, torch.Tensor] = {}
        params = sum(t.numel() for (ref, _), t in self.tensors.items() if ref == base) if base else 0
        self.bank = TaskVectorBank(
            seed, chunk=chunk_for(params) if base else 1 << 16, cache_ranks=cache_ranks
        )
        return_freed_memory()

    def plan(self, recipe: Recipe) -> MergePlan:
        """The recipe's plan over the resident models. A search's candidates share their layout
        (`plan.layout_key`), so only their parameters are resolved again; a multi-stage recipe's
        later stages, whose inputs are built per candidate, are planned afresh."""
        fixed = all(m in self._loaded for m in recipe.referenced_models())
        return plan_merge(recipe, models=self.models, layouts=self._layouts if fixed else None)

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
                for task in plan.tasks:
                    value = self._merge(plan, task, (targets or {}).get(task.name) if last else None)
                    if last:
                        yield task.name, value
                    else:
                        out[task.name] = value
                if last:
                    return
                self.models[r.name] = _ResidentCheckpoint(self.models[plan.tokenizer_from], out, plan.config)
                self.tensors.update({(r.name, k): v for k, v in out.items()})
                added.append(r.name)
        finally:
            for name in added:
                del self.models[name]
                for key in [k for k in self.tensors if k[0] == name]:
                    del self.tensors[key]

    def _merge(self, plan: MergePlan, task: TensorTask, target: torch.Tensor | None) -> torch.Tensor:
        keys = [(ref, self.models[ref].resolve(name)) for ref, name in task.inputs]
        if not any(k in self.task_vectors for k in keys):
            tensors = [self.tensors[k] for k in keys]
            if plan.method.elementwise and task.floating:
                return _chunked(plan, task, tensors, target)
            return merge_tensor(plan, task, tensors)
        base_key = keys[task.base] if task.base is not None else None
        others = [k for i, k in enumerate(keys) if i != task.base]
        if not (
            plan.method.task_vectors
            and base_key
            and base_key[0] == self.base
            and all(k in self.task_vectors for k in others)
        ):
            raise MergeSearchError(
                f"{plan.method.name} with base {base_key[0] if base_key else None}: this engine holds task "
                f"vectors against {self.base}; build ResidentEngine without base= for this recipe"
            )
        base = self.tensors[base_key]
        taus = [self.task_vectors[k] for k in others]
        if base.dtype != task.work_dtype:  # a recipe `dtype` that differs from the stored one
            raise MergeSearchError(
                f"tensor {task.name}: recipe dtype {task.work_dtype} differs from the resident "
                f"{base.dtype}; load the engine's models in that dtype"
            )
        out = (
            target
            if (
                target is not None
                and target.dtype == task.out_dtype == base.dtype
                and target.shape == base.shape
                and target.device == base.device
            )
            else None
        )
        m, p, per = plan.method, task.shared, task.per_model
        gta = dict(
            weight=per["weight"],
            density=per["density"],
            sparsification=m.sparsification,
            consensus=m.consensus,
            normalize=p["normalize"],
            rescale=p["rescale"],
            lambda_=p.get("lambda", 1.0),
            gamma=per.get("gamma"),
            epsilon=per.get("epsilon"),
        )
        names = [f"{self._position[ref]}:{name}" for ref, name in others]
        # The bank serves only what it declares; any other method is its reference, never another.
        if self.bank.supports(m.sparsification) and (
            not self.exact or self.bank.exact_for(names, taus, **gta)
        ):
            return self.bank.merge(names, base, taus, out=out, **gta).to(task.out_dtype)
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
        return_freed_memory()  # ~1 ms: what the candidate freed goes back to the OS


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
    if plan.method.name == "linear" and _fused_linear(task, tensors, out):
        return out
    flat, o = [x.reshape(-1) for x in tensors], out.view(-1)
    for start in range(0, o.numel(), 1 << 16):
        stop = min(o.numel(), start + (1 << 16))
        o[start:stop] = merge_tensor(plan, task, [x[start:stop] for x in flat])
    return out


def _fused_linear(task: TensorTask, tensors: list[torch.Tensor], out: torch.Tensor) -> bool:
    """`interpolation.linear` as one `fused_kernels.linear` pass, same bits, where it applies:
    numba present, CPU, one dtype throughout (fp32 or bf16), torch's addcmul_ an FMA."""
    if not (
        fused_kernels is not None
        and task.base is None
        and all(x.dtype == out.dtype == task.work_dtype for x in tensors)
        and fused_kernels.fusable(out, *tensors)
        and fused_kernels.addcmul_is_fma()
    ):
        return False
    w = torch.tensor(list(task.per_model["weight"]), dtype=torch.float32)
    fused_kernels.linear(
        fused_kernels.as_numpy(out),
        tuple(fused_kernels.as_numpy(x) for x in tensors),
        w.numpy(),
        np.float32(w.sum().item()),
        bool(task.shared["normalize"]),
    )
    return True


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
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: mmap every allocation above 1 MiB
    return libc


def return_freed_memory() -> None:
    """Give memory freed so far back to the OS (glibc keeps small freed blocks in its heap: after
    loading a model that is ~0.3× the model), and mmap every allocation above 1 MiB from the first
    call on, so freed candidate temporaries go back too. The memory bound is about resident bytes.
    Called after every candidate: the library is opened once."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class _ResidentCheckpoint(Checkpoint):
    """An intermediate stage's output, held in memory, standing in for a model folder."""

    def __init__(self, like: Checkpoint, tensors: dict[str, torch.Tensor], config: dict) -> None:
        from .checkpoint import TensorMeta

        self.path = Path(f"<stage of {like.path.name}>")
        self.config = config
        self.arch = like.arch
        self.num_layers = config.get(like.arch.num_layers_key, like.num_layers)
        self.meta = {k: TensorMeta(tuple(v.shape), v.dtype, self.path) for k, v in tensors.items()}
        self._open, self._pickled, self._allow_pickle = {}, {}, False

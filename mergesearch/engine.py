"""Turns a recipe into weights, streaming tensor by tensor from input folders to an output folder.

`plan_merge` resolves every output tensor's inputs and parameters before any data is
read, so bad recipes fail fast and nothing is written. `merge` executes the plan in
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import (
    Checkpoint,
    StreamingWriter,
    check_finite,
    copy_tokenizer,
    parse_dtype,
    parse_size,
)
from .errors import MergeSearchError
from .methods.registry import REQUIRED, Method, get_method
from .recipe import Recipe, Slice, Source, dump_recipes, evaluate_setting, load_recipes
from .task_vector_bank import TaskVectorBank, chunk_for, fused_kernels


@dataclass
class TensorTask:
    """One output tensor: which input tensors, in the method's order, and resolved parameters."""

    name: str
    inputs: list[tuple[str, str]]  # (model reference, tensor name in that model)
    base: int | None  # index into inputs of the base model, or None
    shared: dict[str, Any]
    per_model: dict[str, list[Any]]  # aligned with the models the method receives
    shape: tuple[int, ...]
    work_dtype: torch.dtype
    out_dtype: torch.dtype
    floating: bool = True


@dataclass
class MergePlan:
    recipe: Recipe
    method: Method
    tasks: list[TensorTask]  # in execution order
    config: dict  # the output config.json
    tokenizer_from: str  # model reference whose tokenizer files are copied
    models: dict[str, Checkpoint] = field(default_factory=dict)

    @property
    def layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {t.name: (t.shape, t.out_dtype) for t in self.tasks}


def seed_everything(seed: int) -> None:
    """What mergekit's --random-seed does (transformers.set_seed): python, numpy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
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


# -- planning ------------------------------------------------------------------------------


def _open_models(
    recipe: Recipe, resolve_path: Callable[[str], Path], allow_pickle: bool
) -> dict[str, Checkpoint]:
    return {
        ref: Checkpoint(resolve_path(ref), allow_pickle=allow_pickle) for ref in recipe.referenced_models()
    }


def _normalized_slices(recipe: Recipe, models: dict[str, Checkpoint]) -> list[Slice]:
    """mergekit's normalize_config: `models:` becomes one slice over all layers, base appended."""
    if recipe.slices is not None:
        return recipe.slices
    sources = []
    for s in recipe.models:
        n = models[s.model].num_layers
        sources.append(Source(s.model, s.parameters, (0, n or 0)))
    if recipe.base_model and recipe.base_model not in [s.model for s in recipe.models]:
        n = models[recipe.base_model].num_layers
        sources.append(Source(recipe.base_model, {}, (0, n or 0)))
    lengths = {(s.model, s.layer_range[1]) for s in sources}
    if len({n for _, n in lengths}) > 1:
        detail = ", ".join(f"{m}: {n}" for m, n in sorted(lengths))
        raise MergeSearchError(f"models have different layer counts ({detail}); use slices with layer_range")
    return [Slice(sources, {}, None)]


def _resolve(scopes: list[Any], key: str, tensor: str, t: float) -> Any:
    for scope in scopes:
        if scope and key in scope:
            v = evaluate_setting(scope[key], tensor, t)
            if v is not None:
                return v
    return None


def plan_merge(
    recipe: Recipe,
    resolve_path: Callable[[str], Path] = Path,
    *,
    allow_pickle: bool = False,
    models: dict[str, Checkpoint] | None = None,
) -> MergePlan:
    """Every output tensor with its inputs and parameters, checked before any data is read."""
    method = get_method(recipe.merge_method)
    models = models or _open_models(recipe, resolve_path, allow_pickle)
    slices = _normalized_slices(recipe, models)
    dtype = parse_dtype(recipe.dtype, "dtype")
    out_dtype = parse_dtype(recipe.out_dtype, "out_dtype")

    for i, sl in enumerate(slices):
        base = sl.base_model or recipe.base_model
        names = [s.model for s in sl.sources]
        where = f"slices[{i}]" if recipe.slices is not None else "models"
        if method.base == "required" and not base:
            raise MergeSearchError(f"merge_method {method.name} needs a base_model; add base_model: <path>")
        if method.base == "required" and base not in names:
            raise MergeSearchError(f"{where}: base_model {base} is not among the inputs")
        n = len(names) - (1 if method.base in ("required", "optional") and base in names else 0)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            want = (
                f"exactly {method.min_models}"
                if method.min_models == method.max_models
                else f"at least {method.min_models}"
                + (f" and at most {method.max_models}" if method.max_models else "")
            )
            raise MergeSearchError(
                f"{where}: {method.name} takes {want} {'non-base ' if method.base != 'input' else ''}"
                f"model(s), got {n}"
            )

    ref_model = recipe.base_model or slices[0].sources[0].model
    ref = models[ref_model]
    arch = ref.arch
    tasks: list[TensorTask] = []
    total_layers = 0

    def add(out_name: str, sl: Slice, in_names: list[str], t: float) -> None:
        base_ref = sl.base_model or recipe.base_model
        inputs, metas = [], []
        for src, in_name in zip(sl.sources, in_names):
            ck = models[src.model]
            stored = ck.resolve(in_name)
            if stored is None:
                raise MergeSearchError(
                    f"{ck.path}: tensor {in_name} is missing (present in {ref.path}); "
                    "these models do not share an architecture"
                )
            inputs.append((src.model, in_name))
            metas.append(ck.meta[stored])
        shapes = {m.shape for m in metas}
        if len(shapes) > 1:
            detail = ", ".join(f"{models[m].path}: {list(x.shape)}" for (m, _), x in zip(inputs, metas))
            if arch.component_of(out_name) in ("embedding", "head"):
                raise MergeSearchError(
                    f"tensor {out_name}: vocabulary sizes differ ({detail}); mergesearch does not "
                    "merge different vocabularies: resize the embeddings to one tokenizer first"
                )
            raise MergeSearchError(f"tensor {out_name}: shapes differ ({detail})")
        floating = all(m.dtype.is_floating_point for m in metas)
        if dtype is not None and floating:
            work = dtype
        else:
            work = metas[0].dtype
            for m in metas[1:]:
                work = torch.promote_types(work, m.dtype)
        base_idx = None
        if method.base in ("required", "optional") and base_ref is not None:
            base_idx = next(i for i, s in enumerate(sl.sources) if s.model == base_ref)
        receivers = [i for i in range(len(inputs)) if i != base_idx]
        shared = {}
        for key, default in method.shared_params.items():
            v = _resolve([sl.parameters, recipe.parameters], key, out_name, t)
            if v is None:
                if default is REQUIRED:
                    raise MergeSearchError(
                        f"tensor {out_name}: parameter {key!r} is required by {method.name}; "
                        "set it under parameters"
                    )
                v = default
            shared[key] = v
        per_model: dict[str, list[Any]] = {}
        for key, default in method.model_params.items():
            vals = []
            for i in receivers:
                src = sl.sources[i]
                scopes = [s.parameters for s in sl.sources if s.model == src.model]
                v = _resolve(scopes + [sl.parameters, recipe.parameters], key, in_names[i], t)
                if v is None:
                    if default is REQUIRED:
                        raise MergeSearchError(
                            f"tensor {in_names[i]} of {src.model}: parameter {key!r} is required "
                            f"by {method.name}; set it for this model or under top-level parameters"
                        )
                    v = default
                if key == "density" and not 0 <= v <= 1:
                    raise MergeSearchError(f"{src.model}: density {v} for {in_names[i]} is outside [0, 1]")
                vals.append(v)
            per_model[key] = vals
        if shared.get("normalize") and "weight" in per_model and floating:
            if abs(sum(per_model["weight"])) < 1e-8 and method.name in (
                "linear",
                "task_arithmetic",
                "dare_linear",
                "breadcrumbs",
                "della_linear",
            ):
                raise MergeSearchError(
                    f"tensor {out_name}: weights sum to 0 under normalize: true; "
                    "change the weights or set normalize: false"
                )
        if method.name in ("della", "della_linear"):
            for d, e in zip(per_model["density"], per_model["epsilon"]):
                if d < 1 and d > 0 and not (0 < d - e and d + e < 1):
                    raise MergeSearchError(
                        f"tensor {out_name}: della needs density ± epsilon inside (0, 1); "
                        f"got density {d}, epsilon {e}"
                    )
        tasks.append(
            TensorTask(
                out_name,
                inputs,
                base_idx,
                shared,
                per_model,
                metas[0].shape,
                work,
                (out_dtype if out_dtype is not None and floating else work),
                floating,
            )
        )

    # Tied models store no lm_head; mergekit then writes none either.
    for name in ref.by_layer.get(None, []):
        pre = arch.component_of(name) == "embedding"
        sl = slices[0] if pre else slices[-1]
        add(name, sl, [name] * len(sl.sources), 0.0)
    for sl in slices:
        start, end = sl.sources[0].layer_range
        n = end - start
        for idx in range(n):
            t = idx / (n - 1) if n > 1 else 1.0
            first = models[sl.sources[0].model]
            names = first.by_layer.get(start + idx, [])
            if not names:
                raise MergeSearchError(f"{first.path}: has no layer {start + idx}; check layer_range")
            for nm in names:
                out_name = arch.with_layer(nm, total_layers)
                in_names = [models[s.model].arch.with_layer(nm, s.layer_range[0] + idx) for s in sl.sources]
                add(out_name, sl, in_names, t)
            total_layers += 1

    tasks.sort(key=lambda task: task.name)
    config = json.loads(json.dumps(ref.config))
    if total_layers:
        config[arch.num_layers_key if arch.num_layers_key in config else "num_hidden_layers"] = total_layers
    name_dtype = recipe.out_dtype or recipe.dtype
    if name_dtype:
        config["dtype"] = name_dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = name_dtype
    tok = recipe.tokenizer_source
    tokenizer_from = recipe.base_model or slices[0].sources[0].model
    if tok and tok != "base":
        tokenizer_from = tok
        if tok not in models:
            models[tok] = Checkpoint(resolve_path(tok), allow_pickle=allow_pickle)
    return MergePlan(recipe, method, tasks, config, tokenizer_from, models)


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
        copy_tokenizer(plan.models[plan.tokenizer_from].path, writer)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        for ck in plan.models.values():
            ck.close()


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
        return plan_merge(recipe, models=self.models)

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
                plan = plan_merge(r, models=self.models)
                if seed is not None:  # as a disk merge does, once per stage
                    seed_everything(seed)
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
        if not self.exact or self.bank.exact_for(names, taus, **gta):
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

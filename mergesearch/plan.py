"""Recipe → plan: every output tensor with its inputs and resolved parameters, before any data
is read, so a bad recipe fails fast and nothing is written.

Planning has two halves. The *layout* (which tensors, from which inputs, shapes, dtypes, the
output config) depends only on the recipe's structure: its method, models, slices and dtypes.
The *parameters* (weights, densities, ...) are what a search changes from one candidate to the
next. `plan_merge` takes a `layouts` dict to reuse layouts across candidates: a candidate then
resolves only its parameters (4× faster for a 100M-parameter Llama: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, parse_dtype
from .errors import MergeSearchError
from .methods import sparsify
from .methods.registry import REQUIRED, UNIT_INTERVAL, Method, get_method
from .recipe import Recipe, Slice, Source, evaluate_setting


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


@dataclass(frozen=True)
class _Slot:
    """An output tensor before its parameters: what the recipe's structure fixes."""

    name: str
    slice_index: int  # into the recipe's normalized slices
    in_names: list[str]  # per source of that slice
    t: float  # relative depth in the slice, for gradients
    inputs: list[tuple[str, str]]
    base: int | None
    receivers: list[int]  # the inputs the method's per-model parameters belong to
    shape: tuple[int, ...]
    work_dtype: torch.dtype
    out_dtype: torch.dtype
    floating: bool


@dataclass
class Layout:
    """A recipe's plan without parameters; `parameterize` completes it."""

    method: Method
    slots: list[_Slot]  # in execution order (by name)
    config: dict
    tokenizer_from: str


def layout_key(recipe: Recipe) -> tuple:
    """What a layout depends on: the recipe without its parameter values."""

    def sources(srcs: list[Source] | None) -> tuple | None:
        return None if srcs is None else tuple((s.model, s.layer_range) for s in srcs)

    slices = (
        None if recipe.slices is None else tuple((sources(s.sources), s.base_model) for s in recipe.slices)
    )
    return (
        recipe.merge_method,
        recipe.base_model,
        sources(recipe.models),
        slices,
        recipe.dtype,
        recipe.out_dtype,
        recipe.tokenizer_source,
    )


def plan_merge(
    recipe: Recipe,
    resolve_path: Callable[[str], Path] = Path,
    *,
    allow_pickle: bool = False,
    models: dict[str, Checkpoint] | None = None,
    layouts: dict[tuple, Layout] | None = None,
) -> MergePlan:
    """Every output tensor with its inputs and parameters, checked before any data is read.
    With `layouts`, a layout planned for a recipe of the same structure is reused (and a new
    one stored): pass it only with the same `models` each time."""
    models = models or _open_models(recipe, resolve_path, allow_pickle)
    key = layout_key(recipe)
    layout = layouts.get(key) if layouts is not None else None
    if layout is None:
        layout = plan_layout(recipe, models, resolve_path, allow_pickle)
        if layouts is not None:
            layouts[key] = layout
    return parameterize(layout, recipe, models)


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


def plan_layout(
    recipe: Recipe,
    models: dict[str, Checkpoint],
    resolve_path: Callable[[str], Path] = Path,
    allow_pickle: bool = False,
) -> Layout:
    """The output tensors, their inputs, shapes and dtypes, and the output config."""
    method = get_method(recipe.merge_method)
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
    slots: list[_Slot] = []
    total_layers = 0

    def add(out_name: str, si: int, in_names: list[str], t: float) -> None:
        sl = slices[si]
        base_ref = sl.base_model or recipe.base_model
        inputs, metas = [], []
        for src, in_name in zip(sl.sources, in_names):
            ck = models[src.model]
            stored = ck.resolve(in_name)
            if stored is None:
                has = [
                    models[x.model].path for x, n in zip(sl.sources, in_names) if models[x.model].resolve(n)
                ]
                raise MergeSearchError(
                    f"{ck.path}: tensor {in_name} is missing (present in {has[0]}); a merge needs it in "
                    "every input (mergekit refuses too): use a complete checkpoint of this model"
                )
            inputs.append((src.model, in_name))
            metas.append(ck.meta[stored])
        shapes = {m.shape for m in metas}
        if len(shapes) > 1:
            detail = ", ".join(f"{models[m].path}: {list(x.shape)}" for (m, _), x in zip(inputs, metas))
            same_width = len({m.shape[1:] for m in metas}) == 1  # only the row count (vocabulary) differs
            if arch.component_of(out_name) in ("embedding", "head") and same_width:
                raise MergeSearchError(
                    f"tensor {out_name}: vocabulary sizes differ ({detail}); mergesearch does not "
                    "merge different vocabularies: resize the embeddings to one tokenizer first"
                )
            raise MergeSearchError(
                f"tensor {out_name}: shapes differ ({detail}); the models are not fine-tunes of one base "
                "(hidden or intermediate sizes differ)"
            )
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
        out = out_dtype if out_dtype is not None and floating else work
        if method.result_fp32 and out_dtype is None and floating:  # mergekit keeps what it returns
            out = torch.promote_types(work, torch.float32)
        slots.append(
            _Slot(out_name, si, in_names, t, inputs, base_idx, receivers, metas[0].shape, work, out, floating)
        )

    # Every tensor any input holds is planned, so one an input lacks is refused in add(), never
    # dropped. Tied names are the exception: a tied reference stores no lm_head, and mergekit then
    # writes none either (an input that stores one is not asked for it).
    tied = {n for pair in arch.tied for n in pair}
    outside = list(ref.by_layer.get(None, []))
    for sl in (slices[0], slices[-1]):
        for src in sl.sources:
            outside += [n for n in models[src.model].by_layer.get(None, []) if n not in tied]
    for name in dict.fromkeys(outside):
        pre = arch.component_of(name) == "embedding"
        si = 0 if pre else len(slices) - 1
        add(name, si, [name] * len(slices[si].sources), 0.0)
    for si, sl in enumerate(slices):
        start, end = sl.sources[0].layer_range
        n = end - start
        for idx in range(n):
            t = idx / (n - 1) if n > 1 else 1.0
            first = models[sl.sources[0].model]
            if not first.by_layer.get(start + idx):
                raise MergeSearchError(f"{first.path}: has no layer {start + idx}; check layer_range")
            names = []  # the layer's tensors in any input, named as in the first
            for src in sl.sources:
                m = models[src.model]
                names += [
                    m.arch.with_layer(x, start + idx) for x in m.by_layer.get(src.layer_range[0] + idx, [])
                ]
            for nm in dict.fromkeys(names):
                out_name = arch.with_layer(nm, total_layers)
                in_names = [models[s.model].arch.with_layer(nm, s.layer_range[0] + idx) for s in sl.sources]
                add(out_name, si, in_names, t)
            total_layers += 1

    slots.sort(key=lambda slot: slot.name)
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
    return Layout(method, slots, config, tokenizer_from)


def parameterize(layout: Layout, recipe: Recipe, models: dict[str, Checkpoint]) -> MergePlan:
    """The layout's tensors with the recipe's parameters resolved per tensor, and checked."""
    method = layout.method
    slices = _normalized_slices(recipe, models)
    # per slice and source: the parameter scopes of that source's model, most specific first
    scopes = [
        [[s.parameters for s in sl.sources if s.model == src.model] + [sl.parameters, recipe.parameters]
         for src in sl.sources]
        for sl in slices
    ]  # fmt: skip
    tasks = []
    for slot in layout.slots:
        sl, out_name = slices[slot.slice_index], slot.name
        shared = {}
        for key, default in method.shared_params.items():
            v = _resolve([sl.parameters, recipe.parameters], key, out_name, slot.t)
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
            for i in slot.receivers:
                src, in_name = sl.sources[i], slot.in_names[i]
                v = _resolve(scopes[slot.slice_index][i], key, in_name, slot.t)
                if v is None:
                    if default is REQUIRED:
                        raise MergeSearchError(
                            f"tensor {in_name} of {src.model}: parameter {key!r} is required "
                            f"by {method.name}; set it for this model or under top-level parameters"
                        )
                    v = default
                if key in UNIT_INTERVAL and not 0 <= v <= 1:
                    raise MergeSearchError(f"{src.model}: {key} {v} for {in_name} is outside [0, 1]")
                vals.append(v)
            per_model[key] = vals
        if shared.get("normalize") and "weight" in per_model and slot.floating:
            if abs(sum(per_model["weight"])) < 1e-8 and method.divides_by_weight_sum:
                raise MergeSearchError(
                    f"tensor {out_name}: weights sum to 0 under normalize: true; "
                    "change the weights or set normalize: false"
                )
        if method.sparsification == "della":
            for d, e in zip(per_model["density"], per_model["epsilon"]):
                try:
                    sparsify.check_della(d, e)
                except ValueError as err:
                    raise MergeSearchError(f"tensor {out_name}: {err}") from None
        tasks.append(
            TensorTask(
                out_name,
                slot.inputs,
                slot.base,
                shared,
                per_model,
                slot.shape,
                slot.work_dtype,
                slot.out_dtype,
                slot.floating,
            )
        )
    return MergePlan(recipe, method, tasks, layout.config, layout.tokenizer_from, models)

"""One registry: mergekit method name → the function and its parameter contract."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MergeSearchError
from . import interpolation, selection
from .task_arithmetic import generalized_task_arithmetic

REQUIRED = object()  # marks a parameter without a default


@dataclass(frozen=True)
class Method:
    """How the engine calls a method.

    `merge(base, models, **params)`: `models` are the non-base inputs in recipe order
    (for base="input", every input, base included); per-model parameters arrive as
    lists aligned with `models`; `generator` is passed to randomized methods.
    """

    name: str
    merge: Callable[..., torch.Tensor]
    base: str  # "required" | "optional" | "input" (the base is an ordinary input) | "none"
    model_params: dict[str, Any] = field(default_factory=dict)
    shared_params: dict[str, Any] = field(default_factory=dict)
    min_models: int = 1
    max_models: int | None = None
    randomized: bool = False  # draws from torch's RNG (reseeded per merge: `merge --seed`)
    task_vectors: bool = False  # also accepts task_vectors=, scratch=, out= (see task_arithmetic)
    elementwise: bool = False  # each output element depends only on the same element of each input
    sparsification: str | None = None  # task-vector family: which sparsifier ...
    consensus: bool = False  # ... and whether signs are elected
    divides_by_weight_sum: bool = False  # normalize: true divides by Σw (so Σw = 0 is refused)
    between_models: bool = False  # a space runs it between its two models, the first as its base
    result_fp32: bool = False  # returns at least fp32 (mergekit writes that unless out_dtype is set)
    ignored_params: tuple[str, ...] = ()  # accepted and ignored by mergekit: we accept them with a warning

    @property
    def params(self) -> set[str]:
        return set(self.model_params) | set(self.shared_params)

    @property
    def effective_params(self) -> set[str]:
        """The parameters that change the result: what a search searches and an export writes.
        (mergekit's task_arithmetic takes a density and ignores it, as it has no sparsification.)"""
        unused = set(self.ignored_params)
        if self.task_vectors and self.sparsification is None:
            unused.add("density")
        return self.params - unused

    def gta_arguments(self, params: dict[str, Any]) -> dict[str, Any]:
        """A task-arithmetic-family method's recipe parameters (shared and per-model, as planned)
        as `generalized_task_arithmetic`'s keyword arguments, which the search's bank takes too:
        mergekit's `lambda` is `lambda_`; `int8_mask` changes no value."""
        return dict(
            weight=params["weight"],
            density=params["density"],
            sparsification=self.sparsification,
            consensus=self.consensus,
            normalize=params["normalize"],
            rescale=params["rescale"],
            lambda_=params.get("lambda", 1.0),
            gamma=params.get("gamma"),
            epsilon=params.get("epsilon"),
        )


def gta_method(name, sparsification, consensus, normalize, rescale, extra=None) -> Method:
    """A method of the task-arithmetic family: its sparsifier (a key of `sparsify.SPARSIFIERS`, or
    None), whether signs are elected, mergekit's defaults for normalize and rescale, and any
    per-model parameters beyond weight and density (`extra`, with defaults). A new sparsifier is
    searched as soon as it and a method built here are registered (through the reference until
    the search's bank implements it)."""
    model_params = {"weight": REQUIRED, "density": 1.0, **(extra or {})}
    shared = {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False}

    def merge(base, models, *, generator=None, task_vectors=None, scratch=None, out=None, **params):
        return generalized_task_arithmetic(
            base,
            models,
            **method.gta_arguments(params),
            generator=generator,
            task_vectors=task_vectors,
            scratch=scratch,
            out=out,
        )

    method = Method(
        name,
        merge,
        base="required",
        model_params=model_params,
        shared_params=shared,
        min_models=0,
        randomized=sparsification in ("random", "della"),
        task_vectors=True,
        sparsification=sparsification,
        consensus=consensus,
        divides_by_weight_sum=not consensus,
    )
    return method


def _linear(base, models, *, weight, normalize):
    return interpolation.linear(models, weight, normalize)


def _slerp(base, models, *, t):
    return interpolation.slerp(t, base, models[0])


def _nuslerp(base, models, *, weight, nuslerp_flatten, nuslerp_row_wise):
    return interpolation.nuslerp(base, models, weight, nuslerp_flatten, nuslerp_row_wise)


def _model_stock(base, models, *, filter_wise):
    return interpolation.model_stock(base, models, filter_wise)


def _passthrough(base, models, *, scale):
    return interpolation.passthrough(models[0], scale[0])


def _multislerp(base, models, *, weight, normalize_weights, eps):
    return selection.multislerp(models, weight, base, normalize_weights, eps)


def _karcher(base, models, *, max_iter, tol):
    return selection.karcher(models, int(max_iter), tol)


def _nearswap(base, models, *, t):
    return selection.nearswap(base, models[0], t)


def _sce(base, models, *, select_topk, int8_mask):
    return selection.sce(base, models, select_topk, int8_mask)


def _ram(base, models, *, epsilon):
    return selection.ram(base, models, epsilon)


def _ramplus_tl(base, models, *, r, alpha, epsilon):
    return selection.ramplus_tl(base, models, r, alpha, epsilon)


def _arcee_fusion(base, models):
    return selection.arcee_fusion(base, models[0])


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "linear",
            _linear,
            "input",
            {"weight": REQUIRED},
            {"normalize": True},
            elementwise=True,
            divides_by_weight_sum=True,
        ),
        Method("slerp", _slerp, "required", {}, {"t": REQUIRED}, 1, 1, between_models=True),
        Method(
            "nuslerp",
            _nuslerp,
            "optional",
            {"weight": REQUIRED},
            {"nuslerp_flatten": True, "nuslerp_row_wise": False},
            2,
            2,
        ),
        Method("model_stock", _model_stock, "required", {}, {"filter_wise": False}, 2),
        Method("passthrough", _passthrough, "input", {"scale": None}, {}, 1, 1),
        gta_method("task_arithmetic", None, False, False, False),
        gta_method("ties", "magnitude", True, True, False),
        gta_method("dare_ties", "random", True, False, True),
        gta_method("dare_linear", "random", False, False, True),
        gta_method("breadcrumbs", "magnitude_outliers", False, False, False, {"gamma": 0.01}),
        gta_method("breadcrumbs_ties", "magnitude_outliers", True, False, False, {"gamma": 0.01}),
        gta_method("della", "della", True, True, True, {"epsilon": 0.15}),
        gta_method("della_linear", "della", False, False, True, {"epsilon": 0.15}),
        Method(
            "multislerp",
            _multislerp,
            "optional",
            {"weight": REQUIRED},
            {"normalize_weights": True, "eps": 1e-8},
        ),
        Method("karcher", _karcher, "input", {}, {"max_iter": 10, "tol": 1e-5}),
        Method("nearswap", _nearswap, "required", {}, {"t": REQUIRED}, 1, 1),
        Method(
            "sce",
            _sce,
            "required",
            {},
            {"select_topk": 1.0, "int8_mask": False},
            0,
            ignored_params=("weight", "density", "normalize"),
        ),
        Method("ram", _ram, "required", {}, {"epsilon": 1e-5}, 0),
        Method(
            "ramplus_tl",
            _ramplus_tl,
            "required",
            {},
            {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
            0,
            result_fp32=True,
        ),
        Method("arcee_fusion", _arcee_fusion, "required", {}, {}, 1, 1, result_fp32=True),
    )
}

# Parameters whose value must lie in [0, 1] wherever it is given (a recipe, the planner, a search
# space): mergekit takes no other density. A search space narrows more (search/space_file.py).
UNIT_INTERVAL = ("density",)


def get_method(name: str, key: str = "merge_method") -> Method:
    if name not in METHODS:
        raise MergeSearchError(
            f"{key}: unknown merge method {name!r}; supported: {', '.join(sorted(METHODS))}"
        )
    return METHODS[name]


__all__ = ["METHODS", "Method", "REQUIRED", "get_method"]

"""The known recipes every study starts from, wherever its space can express them: enqueued as
the first trials (so a study shows what learning gains over them) and re-scored by the report as
plain mergekit recipes."""

from __future__ import annotations

from typing import Any

from ..methods.registry import METHODS
from ..recipe import Recipe, Source
from .space import SearchSpace

BASELINES: dict[str, dict[str, Any]] = {
    "linear 50/50": {"method": "linear", "weight": [0.5, 0.5]},
    "linear 70/30": {"method": "linear", "weight": [0.7, 0.3]},
    "slerp t=0.5": {"method": "slerp", "t": 0.5},
    "ties d=0.5 w=0.5": {"method": "ties", "weight": [0.5, 0.5], "density": [0.5, 0.5]},
    "dare_ties d=0.5 w=0.5": {"method": "dare_ties", "weight": [0.5, 0.5], "density": [0.5, 0.5]},
    "task_arithmetic λ=1": {"method": "task_arithmetic", "weight": [1.0, 1.0], "lambda": 1.0},
}


def _for_two_models_only(name: str) -> bool:
    """Slerp (between two models) and unequal weights are defined for two models; uniform recipes
    (ties 0.5/0.5, task arithmetic 1/1) extend to any number."""
    spec = BASELINES[name]
    uneven = any(len(set(v)) > 1 for v in spec.values() if isinstance(v, list))
    return METHODS[spec["method"]].between_models or uneven


def baseline_values(space: SearchSpace, name: str, num_layers: int) -> dict[str, Any] | None:
    """Trial parameters that reproduce a known recipe in `space`, or None when it cannot."""
    spec = BASELINES[name]
    method = spec["method"]
    if method not in space.methods or space.order == "sequential":
        return None
    if len(space.models) != 2 and _for_two_models_only(name):
        return None
    m = METHODS[method]
    values: dict[str, Any] = {}
    if len(space.methods) > 1:
        values["method"] = method
    for c in space.coefficients(method, num_layers):
        if c.model is not None:
            default = m.model_params[c.param]
            v = spec.get(c.param, default if isinstance(default, float) else None)
            if v is None:
                return None
            v = v[c.model % len(v)] if isinstance(v, list) else v
        else:
            v = spec.get(c.param, m.shared_params[c.param])
            if not isinstance(v, float):
                return None
        if not space.parameters[c.param].contains(v):
            return None
        values[c.key] = v
    # Parameters the known recipe sets but the space does not search cannot be expressed.
    for key in spec:
        if key != "method" and key not in space.parameters and key in m.params:
            default = m.model_params.get(key, m.shared_params.get(key))
            val = spec[key][0] if isinstance(spec[key], list) else spec[key]
            if val != default:
                return None
    return values


def baseline_recipe(name: str, base: str, models: list[str], dtype: str | None = None) -> Recipe | None:
    """A known recipe as a plain mergekit recipe over the given models (None if it needs two)."""
    spec = BASELINES[name]
    method = spec["method"]
    if len(models) != 2 and _for_two_models_only(name):
        return None
    if METHODS[method].between_models:
        return Recipe(
            method,
            base_model=models[0],
            models=[Source(m) for m in models],
            parameters={"t": spec["t"]},
            dtype=dtype,
        )
    params = []
    for i, m in enumerate(models):
        p = {k: spec[k][i % len(spec[k])] for k in ("weight", "density") if k in spec}
        params.append(Source(m, p))
    r = Recipe(method, models=params, dtype=dtype)
    if METHODS[method].base == "required":
        r.base_model = base
    if "lambda" in spec:
        r.parameters["lambda"] = spec["lambda"]
    return r

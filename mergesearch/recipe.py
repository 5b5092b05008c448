"""Recipes: what to merge and how, read and written as mergekit YAML.

A recipe is one mergekit-yaml document; a multi-stage recipe is several documents in
mergekit-multi's form (each with a `name:`, later stages naming earlier ones as models).
Parameter settings mean what they mean in mergekit: a scalar, a gradient (list of
anchors interpolated over the layers of a slice) or a list of `{filter, value}` entries
whose first substring match wins.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import MergeSearchError
from .methods.registry import UNIT_INTERVAL, get_method
from .yaml_files import read_text, safe_load_all, yaml_error

TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "name",
}
UNSUPPORTED = {
    "modules": "multi-module (vision-language) layouts are not supported; merge the text model",
    "tokenizer": "the `tokenizer:` block (vocabulary union, token overrides) is not supported; "
    "use tokenizer_source: base or a model path",
    "chat_template": "chat_template is not supported; copy the template into the output's "
    "tokenizer_config.json after merging",
}


def _model_ref(value: Any, where: str) -> str:
    if isinstance(value, str) and value:
        if "+" in value:
            raise MergeSearchError(f"{where}: {value!r}: LoRA references (model+lora) are not supported")
        return value
    if isinstance(value, dict) and isinstance(value.get("model"), dict):
        return _model_ref(value["model"].get("path"), where)
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        return value["path"]
    raise MergeSearchError(f"{where}: expected a model path, got {value!r}")


def _check_setting(value: Any, where: str) -> None:
    scalar = (int, float, bool, str)
    if isinstance(value, scalar):
        return
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if all(isinstance(v, scalar) for v in value):
            if not value:
                raise MergeSearchError(f"{where}: empty list; give a scalar or a list of anchors")
            return
        for i, cond in enumerate(value):
            if not isinstance(cond, dict) or "value" not in cond:
                raise MergeSearchError(f"{where}[{i}]: expected {{filter: ..., value: ...}}, got {cond!r}")
            extra = set(cond) - {"filter", "value"}
            if extra:
                raise MergeSearchError(f"{where}[{i}]: unknown key {sorted(extra)[0]!r}")
            _check_setting(cond["value"], f"{where}[{i}].value")
        return
    raise MergeSearchError(f"{where}: unexpected parameter value {value!r}")


def _scalars(value: Any):
    """Every scalar a setting can take (for range checks)."""
    if isinstance(value, dict):
        yield from _scalars(value.get("value"))
    elif isinstance(value, list):
        for v in value:
            yield from _scalars(v)
    elif value is not None:
        yield value


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """A setting's value for one tensor at relative depth t ∈ [0, 1] (mergekit's evaluate_setting)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (int, float, bool, str)):
        return setting
    if not setting:
        return None
    if all(isinstance(e, (int, float, bool, str)) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t)
    return None


# `scheme:name`: a model of a zoo (zoo:add, smollm2:largest), which only a zoo-aware resolver
# (`mergesearch.sources.resolve_model`) turns into a folder.
ZOO_REFERENCE = re.compile(r"^([a-z][a-z0-9_]*):([^/\\]+)$")


@dataclass
class Source:
    model: str
    parameters: dict[str, Any] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None


@dataclass
class Slice:
    sources: list[Source]
    parameters: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None


@dataclass
class Recipe:
    merge_method: str
    base_model: str | None = None
    models: list[Source] | None = None
    slices: list[Slice] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    name: str | None = None

    # -- reading ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Any, where: str = "recipe") -> Recipe:
        if not isinstance(d, dict):
            raise MergeSearchError(f"{where}: expected a mapping of mergekit keys, got {type(d).__name__}")
        for key in d:
            if key in UNSUPPORTED:
                raise MergeSearchError(f"{where}: key {key!r}: {UNSUPPORTED[key]}")
            if key not in TOP_KEYS:
                raise MergeSearchError(
                    f"{where}: unknown key {key!r}; mergesearch reads {', '.join(sorted(TOP_KEYS))}"
                )
        if "merge_method" not in d:
            raise MergeSearchError(f"{where}: missing key 'merge_method'")
        method = get_method(d["merge_method"], f"{where}: merge_method")
        if ("models" in d) == ("slices" in d):
            raise MergeSearchError(f"{where}: give exactly one of 'models' or 'slices'")
        r = cls(
            merge_method=d["merge_method"],
            base_model=_model_ref(d["base_model"], f"{where}: base_model") if d.get("base_model") else None,
            parameters=dict(d.get("parameters") or {}),
            dtype=d.get("dtype"),
            out_dtype=d.get("out_dtype"),
            tokenizer_source=d.get("tokenizer_source"),
            name=d.get("name"),
        )
        if "models" in d:
            r.models = [
                cls._source(m, f"{where}: models[{i}]", False) for i, m in enumerate(d["models"] or [])
            ]
            if not r.models:
                raise MergeSearchError(f"{where}: models is empty")
        else:
            r.slices = []
            for i, s in enumerate(d["slices"] or []):
                w = f"{where}: slices[{i}]"
                if not isinstance(s, dict) or "sources" not in s:
                    raise MergeSearchError(f"{w}: expected a mapping with 'sources'")
                extra = set(s) - {"sources", "parameters", "base_model"}
                if extra:
                    raise MergeSearchError(f"{w}: unknown key {sorted(extra)[0]!r}")
                srcs = [cls._source(x, f"{w}.sources[{j}]", True) for j, x in enumerate(s["sources"])]
                lengths = {b - a for a, b in (x.layer_range for x in srcs)}
                if len(lengths) != 1:
                    raise MergeSearchError(f"{w}: all sources must span the same number of layers")
                r.slices.append(
                    Slice(
                        srcs,
                        dict(s.get("parameters") or {}),
                        _model_ref(s["base_model"], f"{w}.base_model") if s.get("base_model") else None,
                    )
                )
            if not r.slices:
                raise MergeSearchError(f"{where}: slices is empty")
        if r.tokenizer_source == "union":
            raise MergeSearchError(
                f"{where}: tokenizer_source: union is not supported; use 'base' or a model path"
            )
        r._check_parameters(method, where)
        return r

    @staticmethod
    def _source(m: Any, where: str, sliced: bool) -> Source:
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise MergeSearchError(f"{where}: expected a mapping with 'model'")
        allowed = {"model", "parameters"} | ({"layer_range"} if sliced else set())
        extra = set(m) - allowed
        if extra:
            raise MergeSearchError(f"{where}: unknown key {sorted(extra)[0]!r}")
        lr = None
        if sliced:
            lr = m.get("layer_range")
            if not (
                isinstance(lr, list)
                and len(lr) == 2
                and all(isinstance(x, int) for x in lr)
                and lr[0] < lr[1]
            ):
                raise MergeSearchError(f"{where}.layer_range: expected [start, end) with start < end")
            lr = (lr[0], lr[1])
        return Source(_model_ref(m["model"], f"{where}.model"), dict(m.get("parameters") or {}), lr)

    def _check_parameters(self, method, where: str) -> None:
        scopes: list[tuple[str, dict]] = [(f"{where}: parameters", self.parameters)]
        for i, s in enumerate(self.models or []):
            scopes.append((f"{where}: models[{i}].parameters", s.parameters))
        for i, sl in enumerate(self.slices or []):
            scopes.append((f"{where}: slices[{i}].parameters", sl.parameters))
            for j, s in enumerate(sl.sources):
                scopes.append((f"{where}: slices[{i}].sources[{j}].parameters", s.parameters))
        for loc, params in scopes:
            if not isinstance(params, dict):
                raise MergeSearchError(f"{loc}: expected a mapping")
            for key, value in params.items():
                if key in method.ignored_params:
                    warnings.warn(
                        f"{loc}.{key}: {method.name} ignores {key} (mergekit does too, without a word); "
                        "remove it from the recipe",
                        stacklevel=2,
                    )
                    continue
                if key not in method.params:
                    raise MergeSearchError(
                        f"{loc}.{key}: unknown parameter for {method.name}; "
                        f"it takes {', '.join(sorted(method.params)) or 'none'}"
                    )
                _check_setting(value, f"{loc}.{key}")
                if key in UNIT_INTERVAL:
                    for v in _scalars(value):
                        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
                            raise MergeSearchError(f"{loc}.{key}: {v!r} is outside [0, 1]")

    # -- writing ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.name:
            d["name"] = self.name
        d["merge_method"] = self.merge_method
        if self.base_model:
            d["base_model"] = self.base_model
        if self.models is not None:
            d["models"] = [
                {"model": s.model, **({"parameters": copy.deepcopy(s.parameters)} if s.parameters else {})}
                for s in self.models
            ]
        if self.slices is not None:
            d["slices"] = []
            for sl in self.slices:
                e: dict[str, Any] = {
                    "sources": [
                        {
                            "model": s.model,
                            "layer_range": list(s.layer_range),
                            **({"parameters": copy.deepcopy(s.parameters)} if s.parameters else {}),
                        }
                        for s in sl.sources
                    ]
                }
                if sl.parameters:
                    e["parameters"] = copy.deepcopy(sl.parameters)
                if sl.base_model:
                    e["base_model"] = sl.base_model
                d["slices"].append(e)
        if self.parameters:
            d["parameters"] = copy.deepcopy(self.parameters)
        for key in ("dtype", "out_dtype", "tokenizer_source"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        return d

    def to_yaml(self) -> str:
        return dump_recipes([self])

    def referenced_models(self) -> list[str]:
        out: list[str] = []
        srcs = self.models or [s for sl in self.slices or [] for s in sl.sources]
        for s in srcs:
            if s.model not in out:
                out.append(s.model)
        if self.base_model and self.base_model not in out:
            out.append(self.base_model)
        return out


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # a list used twice is written twice, never as &id001
        return True


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def dump_recipes(recipes: list[Recipe]) -> str:
    docs = [yaml.dump(r.to_dict(), Dumper=_Dumper, sort_keys=False) for r in recipes]
    return "---\n".join(docs)


def renamed(recipes: list[Recipe], names: dict[str, str]) -> list[Recipe]:
    """The recipes with every model reference in `names` replaced by its value (base models,
    models and slice sources; stage names and references not in `names` stay)."""
    out = copy.deepcopy(recipes)
    for r in out:
        r.base_model = names.get(r.base_model, r.base_model) if r.base_model else r.base_model
        for src in r.models or []:
            src.model = names.get(src.model, src.model)
        for sl in r.slices or []:
            sl.base_model = names.get(sl.base_model, sl.base_model) if sl.base_model else sl.base_model
            for src in sl.sources:
                src.model = names.get(src.model, src.model)
    return out


def rounded(recipes: list[Recipe], digits: int = 4) -> list[Recipe]:
    """The recipes with every coefficient to `digits` significant digits (0.7342, not
    0.7341926508470133): what a person reads and a search can tell apart. The report scores
    these, and export writes these, so an exported file's reported score is its own."""

    def r(v: Any) -> Any:
        if isinstance(v, float):
            return float(f"{v:.{digits}g}")
        if isinstance(v, list):
            return [r(x) for x in v]
        if isinstance(v, dict):
            return {k: r(x) for k, x in v.items()}
        return v

    return [Recipe.from_dict(r(x.to_dict())) for x in recipes]


def parse_recipes(text: str, where: str = "recipe") -> list[Recipe]:
    try:
        docs = [d for d in safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise yaml_error(where, e) from e
    if not docs:
        raise MergeSearchError(f"{where}: empty recipe")
    recipes = [
        Recipe.from_dict(d, where if len(docs) == 1 else f"{where} (document {i + 1})")
        for i, d in enumerate(docs)
    ]
    if len(recipes) > 1:
        names = set()
        for i, r in enumerate(recipes[:-1]):
            if not r.name:
                raise MergeSearchError(
                    f"{where} (document {i + 1}): in a multi-stage recipe every stage but the "
                    "last needs a 'name:' that later stages use as a model"
                )
            if r.name in names:
                raise MergeSearchError(f"{where}: stage name {r.name!r} used twice")
            names.add(r.name)
    return recipes


def load_recipes(path: str | Path) -> list[Recipe]:
    return parse_recipes(read_text(path, "recipe file"), str(path))

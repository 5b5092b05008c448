"""Search spaces as YAML: which coefficients the study learns, and how a trial becomes a recipe.

Every point of a space is a recipe mergekit can run: per-layer values are gradients with
one anchor per layer (blocks repeat an anchor), components are `{filter, value}` entries.
The schema, with defaults, is documented in search_spaces/README.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .architecture import Architecture
from .errors import MergeSearchError
from .methods.registry import METHODS, get_method
from .recipe import Recipe, Source
from .yaml_files import names, number, read_mapping

KEYS = {
    "name",
    "description",
    "base",
    "models",
    "method",
    "granularity",
    "components",
    "parameters",
    "order",
    "tasks",
    "objective",
    "task_weights",
    "constraints",
    "sampler",
    "trials",
    "timeout",
    "fidelity",
    "anchors",
    "baselines",
    "seed",
    "dtype",
    "search_order",
    "gradient_steps",
}
MODEL_PARAMS = ("weight", "density", "gamma", "epsilon")
SHARED_PARAMS = ("t", "lambda", "select_topk")
COMPONENTS = ("attention", "mlp", "other")
SAMPLERS = ("auto", "cmaes", "nsga2", "tpe", "gp", "random")
# Known recipes every study starts from, wherever the space can express them.
BASELINES: dict[str, dict[str, Any]] = {
    "linear 50/50": {"method": "linear", "weight": [0.5, 0.5]},
    "linear 70/30": {"method": "linear", "weight": [0.7, 0.3]},
    "slerp t=0.5": {"method": "slerp", "t": 0.5},
    "ties d=0.5 w=0.5": {"method": "ties", "weight": [0.5, 0.5], "density": [0.5, 0.5]},
    "dare_ties d=0.5 w=0.5": {"method": "dare_ties", "weight": [0.5, 0.5], "density": [0.5, 0.5]},
    "task_arithmetic λ=1": {"method": "task_arithmetic", "weight": [1.0, 1.0], "lambda": 1.0},
}


@dataclass
class Range:
    low: float
    high: float
    log: bool = False
    step: float | None = None  # a grid: repeated values let the engine reuse cuts and norms

    def contains(self, v: float) -> bool:
        return self.low - 1e-12 <= v <= self.high + 1e-12


@dataclass(frozen=True)
class Coefficient:
    """One number a trial searches: an Optuna parameter, and where it goes in the recipe."""

    key: str  # the Optuna parameter's name (SearchSpace.coefficients says how it is built)
    param: str  # weight, density, lambda, ...
    stage: int  # 0, or the stage of a sequential space
    model: int | None  # the input's index within the stage; None for a shared parameter
    component: str  # attention, mlp, other or all
    group: int  # index into SearchSpace.groups()


_ZOO_REF = re.compile(r"^(zoo|smollm2):")


@dataclass
class SearchSpace:
    name: str
    base: str
    models: list[str]
    methods: list[str]
    tasks: list[str]
    granularity: str = "layer"  # model | layer | block:N
    components: list[str] = field(default_factory=lambda: ["all"])
    parameters: dict[str, Range] = field(default_factory=dict)
    order: str = "all_at_once"  # all_at_once | sequential
    objective: str = "pareto"  # pareto (one objective per task) | mean
    task_weights: dict[str, float] = field(default_factory=dict)
    constraints: dict[str, float] = field(default_factory=dict)
    sampler: str = "auto"
    trials: int = 100
    timeout: float | None = None
    fidelity: list[int] = field(default_factory=lambda: [50, 200])  # examples per task at each rung
    # Few-example fitness (evaluation/anchors.py): {per_task: A, reference: R}. The first R trials
    # are scored on the whole search split; later ones on A anchors per task chosen from them.
    anchors: dict[str, int] | None = None
    baselines: bool = True
    seed: int = 0
    dtype: str | None = None
    # sequential spaces of 3+ models: the merge order is a searched categorical (see `orders`)
    search_order: bool = True
    # a new study first learns task-arithmetic coefficients by this many gradient steps (gradient.py)
    # and enqueues them as a warm start; steps, not seconds, so that the study is reproducible
    gradient_steps: int = 0
    description: str = ""
    path: Path | None = None
    raw: dict = field(default_factory=dict)  # the YAML as written, stored with the study

    # -- shape of the parameter vector ------------------------------------------------------
    def groups(self, num_layers: int) -> list[list[int]]:
        """Layer indices of each coefficient group."""
        if self.granularity == "model":
            return [list(range(num_layers))]
        if self.granularity == "layer":
            return [[i] for i in range(num_layers)]
        n = int(self.granularity.split(":")[1])
        return [list(range(i, min(i + n, num_layers))) for i in range(0, num_layers, n)]

    def fingerprint(self) -> str:
        d = asdict(self)
        for k in ("trials", "timeout", "path", "description", "sampler", "raw", "gradient_steps"):
            d.pop(k)
        if d["search_order"]:  # the default: studies made before the key existed keep their print
            d.pop("search_order")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def stages(self) -> int:
        return len(self.models) - 1 if self.order == "sequential" else 1

    @property
    def orders(self) -> list[tuple[int, ...]] | None:
        """The merge orders a sequential space of 3+ models searches (model indices, first merged
        first): every permutation up to 4 models (24); beyond, the listed order and its reverse
        with their rotations (2n), as n! grows too fast to search. None: the listed order only."""
        n = len(self.models)
        if self.order != "sequential" or n < 3 or not self.search_order:
            return None
        if n <= 4:
            return list(itertools.permutations(range(n)))
        listed = list(range(n))
        rotations = [tuple(seq[i:] + seq[:i]) for seq in (listed, listed[::-1]) for i in range(n)]
        return list(dict.fromkeys(rotations))

    @property
    def categorical(self) -> bool:
        """Whether a point has a categorical choice (method, merge order): CMA-ES cannot search it."""
        return len(self.methods) > 1 or self.orders is not None

    @property
    def models_per_stage(self) -> int:
        return 2 if self.order == "sequential" else len(self.models)

    def input_labels(self) -> list[str]:
        """How parameter names call a stage's inputs: the models' short names (`zoo:add` and
        `/ckpt/add` are both `add`) when they are distinct words; the input's index otherwise, and
        in sequential spaces, whose inputs are 0 (the first model, or the previous stage's merge)
        and 1 (the next model)."""
        if self.order == "sequential":
            return ["0", "1"]
        labels = [Path(m.split(":", 1)[1] if _ZOO_REF.match(m) else m).name for m in self.models]
        if len(set(labels)) == len(labels) and all(re.fullmatch(r"[\w\-]+", x) for x in labels):
            return labels
        return [str(i) for i in range(len(self.models))]

    def coefficients(self, method: str, num_layers: int) -> list[Coefficient]:
        """Every number a trial searches for `method`, in the order it is asked, with its Optuna
        name: `weight[add].attention.L3` (model `add`, attention, layer 3); `L0-4` for a block of
        layers, no layer part when one value covers the model, no component part for `all`;
        shared parameters have no model (`lambda.mlp.L3`); stages of sequential spaces are
        prefixed (`stage2.weight[1].mlp.L0`). A parameter the method ignores is not searched."""
        m = METHODS[method]
        groups = self.groups(num_layers)
        labels = self.input_labels()
        out = []
        for s in range(self.stages):
            prefix = f"stage{s + 1}." if self.stages > 1 else ""
            for name in self.parameters:
                if name not in m.effective_params:
                    continue
                inputs = range(self.models_per_stage) if name in m.model_params else [None]
                for i in inputs:
                    for c in self.components:
                        for g, layers in enumerate(groups):
                            key = prefix + name + (f"[{labels[i]}]" if i is not None else "")
                            if c != "all":
                                key += f".{c}"
                            if self.granularity != "model":
                                key += f".L{layers[0]}" + (f"-{layers[-1]}" if len(layers) > 1 else "")
                            out.append(Coefficient(key, name, s, i, c, g))
        return out

    def suggest(self, trial, num_layers: int) -> dict[str, Any]:
        """Ask an Optuna trial for one point of the space (names are stable across trials)."""
        p: dict[str, Any] = {}
        method = (
            self.methods[0] if len(self.methods) == 1 else trial.suggest_categorical("method", self.methods)
        )
        if self.orders is not None:
            p["merge_order"] = trial.suggest_categorical("merge_order", [order_name(o) for o in self.orders])
        for c in self.coefficients(method, num_layers):
            rng = self.parameters[c.param]
            p[c.key] = trial.suggest_float(c.key, rng.low, rng.high, log=rng.log, step=rng.step)
        p["method"] = method
        return p

    # -- trial values → recipe ----------------------------------------------------------------
    def recipes(
        self,
        values: dict[str, Any],
        arch: Architecture,
        num_layers: int,
        base_path: str,
        model_paths: list[str],
    ) -> list[Recipe]:
        """The recipe (one, or one per stage when sequential) for a point of the space."""
        method = values.get("method", self.methods[0])
        m = get_method(method)
        groups = self.groups(num_layers)
        if "merge_order" in values:  # the same coefficients, applied to the inputs in this order
            model_paths = [model_paths[int(i)] for i in values["merge_order"].split(">")]

        at = {
            (c.stage, c.param, c.model, c.component, c.group): c.key
            for c in self.coefficients(method, num_layers)
        }

        def setting(stage: int, name: str, i: int | None) -> Any:
            per_comp = {}
            for c in self.components:
                vals = [float(values[at[stage, name, i, c, g]]) for g in range(len(groups))]
                if len(groups) == 1:
                    per_comp[c] = vals[0]
                else:
                    per_comp[c] = [vals[g] for g, layers in enumerate(groups) for _ in layers]
            if self.components == ["all"]:
                return per_comp["all"]
            out = []
            for c in ("attention", "mlp"):
                if c in per_comp:
                    out.append({"filter": filter_for(arch, c), "value": per_comp[c]})
            out.append({"value": per_comp.get("other", per_comp[self.components[-1]])})
            return out

        recipes = []
        prev = None
        for s in range(self.stages):
            inputs = (
                model_paths if self.order != "sequential" else [prev or model_paths[0], model_paths[s + 1]]
            )
            sources = []
            for i, mp in enumerate(inputs):
                params = {}
                for name in self.parameters:
                    if name in m.model_params and name in m.effective_params:
                        params[name] = setting(s, name, i)
                sources.append(Source(mp, params))
            shared: dict[str, Any] = {}
            for name in self.parameters:
                if name in m.shared_params and name in m.effective_params:
                    shared[name] = setting(s, name, None)
            r = Recipe(method, models=sources, parameters=shared, dtype=self.dtype)
            if m.between_models:
                r.base_model = inputs[0]
            elif m.base == "required":
                r.base_model = base_path
            if self.stages > 1 and s < self.stages - 1:
                r.name = f"stage{s + 1}"
                prev = r.name
            recipes.append(r)
        return recipes

    def baseline_values(self, name: str, num_layers: int) -> dict[str, Any] | None:
        """Trial parameters that reproduce a known recipe, or None when the space cannot."""
        spec = BASELINES[name]
        method = spec["method"]
        if method not in self.methods or self.order == "sequential":
            return None
        # As in baseline_recipe: uniform recipes (ties 0.5/0.5, task arithmetic 1/1) extend to
        # any number of models; slerp (between two models) and unequal weights are defined for two.
        uneven = any(len(set(v)) > 1 for v in spec.values() if isinstance(v, list))
        m = METHODS[method]
        if len(self.models) != 2 and (m.between_models or uneven):
            return None
        values: dict[str, Any] = {}
        if len(self.methods) > 1:
            values["method"] = method
        for c in self.coefficients(method, num_layers):
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
            if not self.parameters[c.param].contains(v):
                return None
            values[c.key] = v
        # Parameters the known recipe sets but the space does not search cannot be expressed.
        for key in spec:
            if key != "method" and key not in self.parameters and key in m.params:
                default = m.model_params.get(key, m.shared_params.get(key))
                val = spec[key][0] if isinstance(spec[key], list) else spec[key]
                if val != default:
                    return None
        return values


def baseline_recipe(name: str, base: str, models: list[str], dtype: str | None = None) -> Recipe | None:
    """A known recipe as a plain mergekit recipe over the given models (None if it needs two)."""
    spec = BASELINES[name]
    method = spec["method"]
    lists = [v for v in spec.values() if isinstance(v, list)]
    # Uniform recipes (ties 0.5/0.5, task arithmetic 1/1) extend to any number of models.
    if (METHODS[method].between_models or any(len(set(v)) > 1 for v in lists)) and len(models) != 2:
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


def order_name(order: tuple[int, ...]) -> str:
    """A merge order as a trial parameter: model indices in merge order, "0>2>1"."""
    return ">".join(str(i) for i in order)


def filter_for(arch: Architecture, component: str) -> str:
    for needle, comp in arch.components:
        if comp == component:
            return needle
    raise MergeSearchError(f"architecture {arch.name} has no {component} component")


def _range(v: Any, where: str) -> Range:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        x = number(v, where)
        return Range(x, x)
    if isinstance(v, list) and len(v) == 2:
        v = {"low": v[0], "high": v[1]}
    if not isinstance(v, dict) or "low" not in v or "high" not in v:
        raise MergeSearchError(f"{where}: expected [low, high] or {{low, high}}, not {v!r}")
    extra = set(v) - {"low", "high", "log", "step"}
    if extra:
        raise MergeSearchError(f"{where}: unknown key {sorted(extra)[0]!r}")
    low, high = number(v["low"], f"{where}: low"), number(v["high"], f"{where}: high")
    step = number(v["step"], f"{where}: step") if v.get("step") is not None else None
    if not isinstance(v.get("log", False), bool):
        raise MergeSearchError(f"{where}: log is true or false, not {v['log']!r}")
    r = Range(low, high, v.get("log", False), step)
    if r.low > r.high:
        raise MergeSearchError(f"{where}: inverted range (low {r.low} > high {r.high})")
    if step is not None and (step <= 0 or r.log):
        raise MergeSearchError(f"{where}: step must be positive and cannot be combined with log")
    if r.log and r.low <= 0:
        raise MergeSearchError(f"{where}: a log range needs low > 0, not {r.low}")
    return r


def load_space(path: str | Path) -> SearchSpace:
    return space_from_dict(read_mapping(path, "search space file"), Path(path))


def space_from_dict(d: dict, p: Path | None = None) -> SearchSpace:
    """Check every key of a space (types, ranges, finite numbers) and build it."""
    where = str(p) if p else "search space"
    for k in d:
        if k not in KEYS:
            raise MergeSearchError(
                f"{where}: unknown key {k!r}; a search space takes {', '.join(sorted(KEYS))}"
            )
    for k in ("base", "models", "method", "tasks"):
        if k not in d:
            raise MergeSearchError(f"{where}: missing key {k!r}")
    if not isinstance(d["base"], str) or not d["base"]:
        raise MergeSearchError(f"{where}: base: a model folder or zoo reference, not {d['base']!r}")
    methods = d["method"] if isinstance(d["method"], list) else [d["method"]]
    for mname in methods:
        if not isinstance(mname, str):
            raise MergeSearchError(f"{where}: method: a method name or a list of them, not {mname!r}")
        get_method(mname, f"{where}: method")
    models = names(d["models"], f"{where}: models", "[zoo:add, zoo:reverse]")
    if len(models) < 2:
        raise MergeSearchError(f"{where}: models needs at least two entries")
    tasks = names(d["tasks"], f"{where}: tasks", "[add, reverse]")
    gran = str(d.get("granularity", "layer"))
    if gran not in ("model", "layer") and not (
        gran.startswith("block:") and gran[6:].isdigit() and int(gran[6:]) > 0
    ):
        raise MergeSearchError(f"{where}: granularity {gran!r}: use model, layer or block:N")
    comps = d.get("components", ["all"])
    comps = [comps] if isinstance(comps, str) else comps
    if comps != ["all"] and (
        not isinstance(comps, list) or not comps or any(c not in COMPONENTS for c in comps)
    ):
        raise MergeSearchError(
            f"{where}: components {comps}: use 'all' or a list from {', '.join(COMPONENTS)}"
        )
    params = {}
    raw_params = d.get("parameters") or {}
    if not isinstance(raw_params, dict):
        raise MergeSearchError(
            f"{where}: parameters: a mapping of names to ranges, e.g. {{weight: [0, 1.5]}}"
        )
    for name, v in raw_params.items():
        if name not in MODEL_PARAMS + SHARED_PARAMS:
            raise MergeSearchError(
                f"{where}: parameters.{name}: not searchable; use {', '.join(MODEL_PARAMS + SHARED_PARAMS)}"
            )
        params[name] = _range(v, f"{where}: parameters.{name}")
        if name in ("density", "t", "select_topk") and not (0 <= params[name].low and params[name].high <= 1):
            raise MergeSearchError(f"{where}: parameters.{name}: range must lie in [0, 1]")
    for mname in methods:
        m = METHODS[mname]
        missing = [
            k
            for k, v in m.model_params.items()
            if v is not None and not isinstance(v, float) and k not in params
        ]
        missing += [k for k, v in m.shared_params.items() if k == "t" and k not in params]
        if missing:
            raise MergeSearchError(f"{where}: method {mname} needs parameters.{missing[0]} to be searched")
    for name in params:  # a searched number that changes no merge would only slow the search
        if not any(name in METHODS[mname].effective_params for mname in methods):
            raise MergeSearchError(
                f"{where}: parameters.{name}: {' and '.join(methods)} "
                f"{'ignores' if len(methods) == 1 else 'ignore'} {name}; remove it from the space"
            )
    order = d.get("order", "all_at_once")
    if order not in ("all_at_once", "sequential"):
        raise MergeSearchError(f"{where}: order {order!r}: use all_at_once or sequential")
    objective = d.get("objective", "pareto")
    if objective not in ("pareto", "mean"):
        raise MergeSearchError(f"{where}: objective {objective!r}: use pareto or mean")
    sampler = d.get("sampler", "auto")
    if sampler not in SAMPLERS:
        raise MergeSearchError(f"{where}: sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    search_order = d.get("search_order", True)
    if not isinstance(search_order, bool):
        raise MergeSearchError(f"{where}: search_order: true or false, not {search_order!r}")
    ordered = order == "sequential" and len(models) >= 3 and search_order
    if sampler == "cmaes" and (len(methods) > 1 or ordered):
        raise MergeSearchError(
            f"{where}: sampler cmaes cannot choose among {'methods' if len(methods) > 1 else 'merge orders'} "
            "(a categorical); use tpe or auto" + ("" if len(methods) > 1 else ", or search_order: false")
        )
    trials = number(d.get("trials", 100), f"{where}: trials", whole=True, minimum=1)
    fid = d.get("fidelity", [50, 200])
    fid = fid if isinstance(fid, list) else [fid]
    fid = [number(x, f"{where}: fidelity", whole=True, minimum=1) for x in fid]
    if not fid or fid != sorted(fid) or len(set(fid)) != len(fid):
        raise MergeSearchError(
            f"{where}: fidelity: an increasing list of example counts per task, e.g. [50, 200]"
        )
    timeout = d.get("timeout")
    if timeout is not None:
        timeout = number(timeout, f"{where}: timeout (seconds)", minimum=1)
    seed = number(d.get("seed", 0), f"{where}: seed", whole=True, minimum=0)
    gradient_steps = number(d.get("gradient_steps", 0), f"{where}: gradient_steps", whole=True, minimum=0)
    if gradient_steps and ("task_arithmetic" not in methods or order == "sequential"):
        raise MergeSearchError(
            f"{where}: gradient_steps: gradients learn task-arithmetic coefficients merged all at once; "
            "add task_arithmetic to method, or remove gradient_steps"
        )
    weights = d.get("task_weights") or {}
    if not isinstance(weights, dict):
        raise MergeSearchError(
            f"{where}: task_weights: a mapping of task to weight, e.g. {{add: 2, reverse: 1}}"
        )
    for k, v in weights.items():  # keys are task names, checked against the loaded tasks (Searcher)
        number(v, f"{where}: task_weights.{k}", minimum=0)
    if not isinstance(d.get("baselines", True), bool):
        raise MergeSearchError(f"{where}: baselines: true or false, not {d['baselines']!r}")
    dtype = d.get("dtype")
    if dtype is not None:
        from .checkpoint import parse_dtype

        parse_dtype(dtype, f"{where}: dtype")
    anchors = d.get("anchors")
    if anchors is not None:
        if not isinstance(anchors, dict) or set(anchors) != {"per_task", "reference"}:
            raise MergeSearchError(
                f"{where}: anchors: a mapping {{per_task: A, reference: R}} (A examples per task score "
                "a candidate once R reference trials have been scored on the whole search split)"
            )
        for k, v in anchors.items():
            number(v, f"{where}: anchors.{k}", whole=True, minimum=1)
        if len(fid) > 1:
            raise MergeSearchError(
                f"{where}: anchors and several fidelity rungs are two ways to spend fewer examples; "
                "use one (with anchors, give fidelity: [N], the search examples per task of the reference trials)"
            )
    constraints = d.get("constraints") or {}
    if not isinstance(constraints, dict):
        raise MergeSearchError(f"{where}: constraints: a mapping, e.g. {{weight_sum_max: 1.5}}")
    for k, v in constraints.items():
        if k != "weight_sum_max":
            raise MergeSearchError(f"{where}: constraints.{k}: unknown; supported: weight_sum_max")
        number(v, f"{where}: constraints.{k}")
    return SearchSpace(
        name=str(d.get("name", p.stem if p else "space")),
        base=str(d["base"]),
        models=models,
        methods=methods,
        tasks=tasks,
        granularity=gran,
        components=comps,
        parameters=params,
        order=order,
        objective=objective,
        task_weights=dict(weights),  # as written: the study's fingerprint hashes them
        constraints=dict(constraints),
        sampler=sampler,
        trials=trials,
        timeout=timeout,
        fidelity=fid,
        anchors=dict(anchors) if anchors else None,
        baselines=bool(d.get("baselines", True)),
        seed=seed,
        dtype=dtype,
        search_order=search_order,
        gradient_steps=gradient_steps,
        description=str(d.get("description", "")),
        path=p,
        raw=dict(d),
    )

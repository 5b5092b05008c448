"""Search spaces as YAML: which coefficients the study learns, and how a trial becomes a recipe.

Every point of a space is a recipe mergekit can run: per-layer values are gradients with
one anchor per layer (blocks repeat an anchor), components are `{filter, value}` entries.
The YAML is read and checked in `space_file.py`; its schema, with defaults, is documented in
search_spaces/README.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..architecture import Architecture
from ..errors import MergeSearchError
from ..methods.registry import METHODS, get_method
from ..recipe import ZOO_REFERENCE, Recipe, Source
from .convergence import Patience

MODEL_PARAMS = ("weight", "density", "gamma", "epsilon")
SHARED_PARAMS = ("t", "lambda", "select_topk")
COMPONENTS = ("attention", "mlp", "other")


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
    # Screen, then confirm (screening.py): {examples: m} per task; a space file gets it by default
    # unless it names anchors or several fidelity rungs. Then `fidelity` is [N], the whole split it
    # confirms on, or empty: every search example.
    screening: dict[str, int] | None = None
    # stop once converged: no gain beyond the noise in this many finished trials, or sampler
    # generations (convergence.py); 0: run to the trial budget. Not part of the fingerprint
    patience: Patience = field(default_factory=Patience)
    # CMA-ES's popsize or NSGA-II's population_size; None: theirs (CMA-ES 4 + 3 ln d) or trials/8
    population: int | None = None
    # CMA-ES's start (samplers.centred_cmaes): its mean at the middle of the ranges, or at the
    # best trial scored before it (the known recipes and the gradient's warm start); its initial
    # step σ0 as a fraction of each range (None: Optuna's 1/6). Sampler settings, like `sampler`:
    # not part of the fingerprint
    centre: str = "middle"
    trust: float | None = None
    screening_asked: bool = False  # written in the space (an error where it cannot work), not defaulted
    baselines: bool = True
    seed: int = 0
    dtype: str | None = None
    # sequential spaces of 3+ models: the merge order is a searched categorical (see `orders`)
    search_order: bool = True
    # a new study first learns task-arithmetic coefficients by this many gradient steps (gradient.py)
    # and enqueues them as a warm start; steps, not seconds, so that the study is reproducible
    gradient_steps: int = 0
    # where the search holds the inputs (candidates/placement.py); auto: from free memory. Not part
    # of the fingerprint: each worker may hold them differently, and every placement gives the same candidates
    placement: str = "auto"
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
        for k in (
            "trials",
            "timeout",
            "path",
            "description",
            "sampler",
            "raw",
            "gradient_steps",
            "placement",
            "screening_asked",
            "patience",
            "centre",
            "trust",
        ):
            d.pop(k)
        for k in ("screening", "population"):  # studies made before the keys existed keep their print
            if d[k] is None:
                d.pop(k)
        if d["search_order"]:  # the default: studies made before the key existed keep their print
            d.pop("search_order")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def whole(self) -> int | None:
        """Examples per task of a whole-split score: the last fidelity rung (None: all of them)."""
        return self.fidelity[-1] if self.fidelity else None

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
        labels = [Path(_reference_name(m)).name for m in self.models]
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


def order_name(order: tuple[int, ...]) -> str:
    """A merge order as a trial parameter: model indices in merge order, "0>2>1"."""
    return ">".join(str(i) for i in order)


def filter_for(arch: Architecture, component: str) -> str:
    for needle, comp in arch.components:
        if comp == component:
            return needle
    raise MergeSearchError(f"architecture {arch.name} has no {component} component")


def _reference_name(ref: str) -> str:
    """`zoo:add` → `add`: a zoo reference (`scheme:name`) names its model after the colon."""
    m = ZOO_REFERENCE.match(ref)
    return m.group(2) if m else ref

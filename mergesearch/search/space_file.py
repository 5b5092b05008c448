"""A search space's YAML file: every key checked (types, ranges, finite numbers) before a
`SearchSpace` is built from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..candidates.placement import CHOICES as PLACEMENT_CHOICES
from ..errors import MergeSearchError
from ..methods.registry import METHODS, UNIT_INTERVAL, get_method
from ..yaml_files import names, number, read_mapping
from .convergence import Patience
from .samplers import CENTRES, SAMPLERS, cmaes_cannot_search
from .space import COMPONENTS, MODEL_PARAMS, SHARED_PARAMS, Range, SearchSpace

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
    "screening",
    "population",
    "patience",
    "centre",
    "trust",
    "baselines",
    "seed",
    "dtype",
    "search_order",
    "gradient_steps",
    "placement",
}
# A search also keeps t between the two models and select_topk a fraction (mergekit would
# extrapolate t, and treats select_topk ≥ 1 as 1): ranges outside [0, 1] only waste trials.
SEARCH_UNIT_INTERVAL = (*UNIT_INTERVAL, "t", "select_topk")


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


def _screening(d: dict, fid: list[int], where: str) -> dict[str, int] | None:
    """screening: off, on, or {examples: m}; absent, it is on unless the space spends examples
    another way (anchors, or several fidelity rungs)."""
    from .screening import CONFIRM_SIGMAS, SCREEN_EXAMPLES

    v = d.get("screening", "default")
    if v == "default":
        return (
            None
            if d.get("anchors") is not None or len(fid) > 1
            else {"examples": SCREEN_EXAMPLES, "confirm_sigmas": CONFIRM_SIGMAS}
        )
    if v is False or v == "off":  # YAML reads a bare `off` as false
        return None
    if v is True or v == "on":
        v = {}
    if not isinstance(v, dict) or set(v) - {"examples", "confirm_sigmas"}:
        raise MergeSearchError(
            f"{where}: screening: off, on, or {{examples: M, confirm_sigmas: Z}} (M examples per task "
            "screen each candidate; it is confirmed when its estimate beats the incumbent by Z standard errors)"
        )
    m = number(v.get("examples", SCREEN_EXAMPLES), f"{where}: screening.examples", whole=True, minimum=1)
    z = number(v.get("confirm_sigmas", CONFIRM_SIGMAS), f"{where}: screening.confirm_sigmas", minimum=0)
    if d.get("anchors") is not None or len(fid) > 1:
        raise MergeSearchError(
            f"{where}: screening, anchors and several fidelity rungs are ways to spend fewer examples; "
            "use one (with screening, fidelity: [N] is the whole split a candidate is confirmed on)"
        )
    return {"examples": int(m), "confirm_sigmas": float(z)}


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
        if name in SEARCH_UNIT_INTERVAL and not (0 <= params[name].low and params[name].high <= 1):
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
    if order == "sequential" and len(models) < 3:
        raise MergeSearchError(
            f"{where}: order: sequential with two models is one merge, as all_at_once, but without the "
            "known recipes or a gradient warm start; use all_at_once (sequential is for 3+ models)"
        )
    objective = d.get("objective", "pareto")
    if objective not in ("pareto", "mean"):
        raise MergeSearchError(f"{where}: objective {objective!r}: use pareto or mean")
    sampler = d.get("sampler", "auto")
    if sampler not in SAMPLERS:
        raise MergeSearchError(f"{where}: sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    search_order = d.get("search_order", True)
    if not isinstance(search_order, bool):
        raise MergeSearchError(f"{where}: search_order: true or false, not {search_order!r}")
    trials = number(d.get("trials", 100), f"{where}: trials", whole=True, minimum=1)
    fid = d.get("fidelity", [])
    fid = fid if isinstance(fid, list) else [fid]
    fid = [number(x, f"{where}: fidelity", whole=True, minimum=1) for x in fid]
    if ("fidelity" in d and not fid) or fid != sorted(fid) or len(set(fid)) != len(fid):
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
    for k, v in weights.items():  # keys are task names, checked against the loaded tasks (bench.Bench)
        number(v, f"{where}: task_weights.{k}", minimum=0)
    if not isinstance(d.get("baselines", True), bool):
        raise MergeSearchError(f"{where}: baselines: true or false, not {d['baselines']!r}")
    dtype = d.get("dtype")
    if dtype is not None:
        from ..checkpoint import parse_dtype

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
    patience = Patience.parse(d.get("patience", 0), where)
    population = d.get("population")
    if population is not None:
        population = int(number(population, f"{where}: population", whole=True, minimum=2))
    centre = d.get("centre", "middle")
    if centre not in CENTRES:
        raise MergeSearchError(
            f"{where}: centre {centre!r}: where CMA-ES starts; use middle (the ranges' middle) or best "
            "(the best trial scored before it: the known recipes and the gradient's warm start)"
        )
    trust = d.get("trust")
    if trust is not None:
        trust = number(trust, f"{where}: trust", minimum=1e-6)
        if trust > 1:
            raise MergeSearchError(
                f"{where}: trust {trust}: CMA-ES's initial step as a fraction of each range, in (0, 1]"
            )
    screening = _screening(d, fid, where)
    if screening is None and not fid:
        fid = [50, 200]  # rungs, as before screening was the default
    constraints = d.get("constraints") or {}
    if not isinstance(constraints, dict):
        raise MergeSearchError(f"{where}: constraints: a mapping, e.g. {{weight_sum_max: 1.5}}")
    for k, v in constraints.items():
        if k != "weight_sum_max":
            raise MergeSearchError(f"{where}: constraints.{k}: unknown; supported: weight_sum_max")
        number(v, f"{where}: constraints.{k}")
    placement = d.get("placement", "auto")
    if placement not in PLACEMENT_CHOICES:
        raise MergeSearchError(
            f"{where}: placement {placement!r}: where the inputs live; use one of {', '.join(PLACEMENT_CHOICES)}"
        )
    space = SearchSpace(
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
        screening=screening,
        screening_asked="screening" in d,
        population=population,
        patience=patience,
        centre=centre,
        trust=trust,
        baselines=bool(d.get("baselines", True)),
        seed=seed,
        dtype=dtype,
        search_order=search_order,
        gradient_steps=gradient_steps,
        placement=placement,
        description=str(d.get("description", "")),
        path=p,
        raw=dict(d),
    )
    if ("centre" in d or "trust" in d) and (
        sampler not in ("cmaes", "auto") or objective != "mean" or cmaes_cannot_search(space)
    ):
        raise MergeSearchError(
            f"{where}: centre and trust set where CMA-ES starts; this space's sampler is not CMA-ES "
            "(it is for one objective, objective: mean, over numbers only, sampler: cmaes or auto)"
        )
    if sampler == "cmaes" and (why := cmaes_cannot_search(space)):
        raise MergeSearchError(
            f"{where}: {why}; use tpe or auto" + ("" if len(methods) > 1 else ", or search_order: false")
        )
    return space

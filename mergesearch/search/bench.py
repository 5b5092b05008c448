"""The bench a study's trials run on, loaded once: the inputs in the search engine, one live
model that every candidate is written into, the tokenizer, the tasks and their evaluator.

Model references are resolved by the caller's `resolve` (a folder by default): the CLI and the
demo hand in `mergesearch.sources.resolve_model`, which also knows the zoos; the search imports
none."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..candidates import ResidentEngine, return_freed_memory
from ..candidates.placement import Choice, choose
from ..checkpoint import Checkpoint
from ..errors import MergeSearchError
from ..evaluation import Scorer, TaskResult, configure_threads, find_task, weighted_mean
from ..methods import METHODS
from ..modeling import compute_dtype, live_model, load_tokenizer
from ..recipe import ZOO_REFERENCE, Recipe
from .space import SearchSpace

MERGE_SEED = 0  # DARE/DELLA draws of every candidate; exported recipes carry it

Resolver = Callable[[str, "Path | None"], Path]


def resolve_folder(ref: str, space_path: Path | None) -> Path:
    """A model reference as a folder that exists: absolute, or relative to the working directory
    or to the space file."""
    p = Path(ref).expanduser()
    if not p.exists() and space_path is not None and (space_path.parent / ref).exists():
        p = space_path.parent / ref
    if not p.is_dir():
        if ZOO_REFERENCE.match(ref) and not p.exists():
            raise MergeSearchError(
                f"model {ref}: a zoo reference, which needs a resolver that knows the zoos "
                "(mergesearch.sources.resolve_model; the CLI uses it)"
            )
        raise MergeSearchError(f"model {ref}: folder does not exist")
    return p.resolve()


def placement_choice(refs: list[str], device: str, asked: str) -> Choice:
    """Where a search on these models holds its inputs (`placement.choose`), from their headers."""
    models = {ref: Checkpoint(ref) for ref in refs}
    metas = models[refs[0]].meta.values()
    stored = next((m.dtype for m in metas if m.dtype.is_floating_point), torch.float32)
    live = sum(math.prod(m.shape) for m in metas) * compute_dtype(device, stored).itemsize
    return choose(models, device, live, asked)


class Bench:
    """Everything a trial needs, loaded once: resident inputs, one live model, the tasks."""

    def __init__(
        self,
        space: SearchSpace,
        *,
        device: str = "cpu",
        cache_ranks: bool = False,
        resolve: Resolver = resolve_folder,
        placement: str | None = None,
        log=lambda msg: None,
    ) -> None:
        self.space = space
        self.device = device
        self.base_path = str(resolve(space.base, space.path))
        self.model_paths = [str(resolve(m, space.path)) for m in space.models]
        self.folders = dict(zip([space.base, *space.models], [self.base_path, *self.model_paths]))
        # Task-vector methods only (and no sequential stages): keep τ = x − b resident instead of x.
        gta_only = all(METHODS[m].task_vectors for m in space.methods) and space.order != "sequential"
        # The search engine (exact=False): task-vector candidates in chunks with shared work,
        # DARE/DELLA from the bank's fixed draws (common to all candidates and workers). Reports
        # score the chosen recipes again with the exact engine (mergekit's model).
        refs = list(dict.fromkeys([self.base_path, *self.model_paths]))
        # Where the inputs live: the flag, else the space's key, else what fits (placement.choose).
        self.placement = placement_choice(refs, device, placement or space.placement)
        log(str(self.placement))
        self.engine = ResidentEngine(
            refs,
            device=device,
            base=self.base_path if gta_only else None,
            exact=False,
            seed=MERGE_SEED,
            cache_ranks=cache_ranks,
            placement=self.placement.placement,
        )
        base_ck = self.engine.models[self.base_path]
        self.arch, self.num_layers = base_ck.arch, base_ck.num_layers or 1
        base_weights = self.engine.inputs.weights(self.base_path)
        configure_threads(sum(t.numel() for t in base_weights.values()))
        self.model = live_model(self.base_path, base_weights, device=device)
        del base_weights
        return_freed_memory()
        self.tok = load_tokenizer(self.base_path)
        # A search verifies each generative example's previous output in one pass (generate.py).
        self.evaluator = Scorer(self.model, self.tok, reuse_outputs=True)
        self.tasks = [find_task(t) for t in space.tasks]
        for t in self.tasks:
            t.check(self.tok)
        # lm-eval tasks: load them and split their documents now, so a bad task fails before any
        # trial and the split can be recorded in the study.
        self.task_splits = {
            t.name: self.evaluator.lm_eval().load(t).record(t) for t in self.tasks if t.lm_eval is not None
        }
        self.directions = ["maximize" if t.higher_is_better else "minimize" for t in self.tasks]
        self._check_inputs()
        self._check_task_settings()

    def _check_inputs(self) -> None:
        """The base given again among the models: under a task-vector method its τ is zero, so its
        coefficients change nothing (a warning, not an error: the search still runs as asked).
        Interpolating methods (linear, slerp, ...) merge the base as any input: nothing to say."""
        vectors = [m for m in self.space.methods if METHODS[m].task_vectors]
        if self.base_path not in self.model_paths or not vectors:
            return
        ref = self.space.models[self.model_paths.index(self.base_path)]
        warnings.warn(
            f"{self.space.path or self.space.name}: model {ref} is the base; under {', '.join(vectors)} "
            "its task vector is zero, so its coefficients change nothing: remove it from models",
            stacklevel=3,
        )

    def _check_task_settings(self) -> None:
        space, names = self.space, [t.name for t in self.tasks]
        where = space.path or space.name
        for k in space.task_weights:
            if k not in names:
                raise MergeSearchError(
                    f"{where}: task_weights.{k}: not the name of one of the space's tasks ({', '.join(names)})"
                )
        if space.task_weights and not sum(space.task_weights.get(n, 1.0) for n in names) > 0:
            raise MergeSearchError(f"{where}: task_weights: at least one task needs a weight above 0")
        no_verdicts = [t.name for t in self.tasks if t.metric == "perplexity"]
        self.screening = space.screening
        if space.screening and no_verdicts:
            if space.screening_asked:
                raise MergeSearchError(
                    f"{where}: screening pairs per-example verdicts; task(s) {', '.join(no_verdicts)} "
                    "(perplexity) have none: remove screening (or give screening: off)"
                )
            self.screening = None  # the default gives way: such a study scores fidelity rungs
            if not self.space.whole:
                self.space.fidelity = [50, 200]
        if space.anchors:
            bad = [t.name for t in self.tasks if t.lm_eval is not None or t.metric == "perplexity"]
            if bad:
                raise MergeSearchError(
                    f"{where}: anchors need per-example verdicts from the native "
                    f"harness; task(s) {', '.join(bad)} (lm-eval or perplexity) have none: remove anchors"
                )

    def validate(self) -> None:
        """What can be known before the first trial: every rung fits every task's search split,
        and the space's recipes can be built from these models (one candidate per method is
        merged in memory: architecture, shapes, layer counts, method arity, dtype)."""
        where = self.space.path or self.space.name
        for t in self.tasks:
            if t.lm_eval is not None or not self.space.fidelity:
                continue
            n = len(t.examples("search"))
            if self.space.fidelity[-1] > n:
                raise MergeSearchError(
                    f"{where}: fidelity rung {self.space.fidelity[-1]} is more than the {n} search examples "
                    f"of task {t.name}; use rungs up to {n}"
                )
        for method in self.space.methods:
            recipes = self.recipes(self.space.suggest(Midpoint(method), self.num_layers))
            try:
                self.engine.write_into(self.model, recipes, seed=MERGE_SEED)
            except MergeSearchError as e:
                raise MergeSearchError(f"{where}: the models cannot be merged by {method}: {e}") from e
            except (RuntimeError, ValueError) as e:  # torch's shape errors
                raise MergeSearchError(
                    f"{where}: the models cannot be merged by {method} ({type(e).__name__}: {e})"
                ) from e

    def use_exact_engine(self) -> None:
        """Switch to the exact engine with the models themselves resident (instead of task
        vectors), so any recipe can be scored (the report scores linear and slerp baselines too)
        and scores are those of the model mergekit builds. Frees the task vectors first."""
        self.evaluator.reuse_outputs = False  # reported numbers come from plain decoding
        if self.engine.base is not None:
            refs, placement = list(self.engine.models), self.engine.placement
            self.engine = None
            self.engine = ResidentEngine(refs, device=self.device, placement=placement)

    def split_fingerprints(self) -> dict[str, str]:
        """Per task, a hash of its search examples (`verdicts.split_fingerprint`)."""
        from .verdicts import split_fingerprint

        return {t.name: split_fingerprint(t, self.task_splits.get(t.name)) for t in self.tasks}

    def search_sizes(self) -> dict[str, int]:
        """Per task, the whole search split a screen-then-confirm study confirms on: the space's
        last fidelity rung where it gives one, else every search example."""
        out = {}
        for t in self.tasks:
            n = (
                len(self.task_splits[t.name]["search"])
                if t.lm_eval is not None
                else len(t.examples("search"))
            )
            out[t.name] = min(n, self.space.whole) if self.space.whole else n
        return out

    def recipes(self, values: dict[str, Any]) -> list[Recipe]:
        return self.space.recipes(values, self.arch, self.num_layers, self.base_path, self.model_paths)

    def merge(self, recipes: list[Recipe]) -> float:
        """Write a candidate into the live model; returns the seconds it took."""
        t0 = time.perf_counter()
        self.engine.write_into(self.model, recipes, seed=MERGE_SEED)
        return time.perf_counter() - t0

    def evaluate(
        self, split: str = "search", limit: int | None = None, indices: dict[str, list[int]] | None = None
    ) -> tuple[dict[str, TaskResult], float]:
        """Score the live model on every task (the first `limit` examples), or on each task's
        `indices` (a task given none is left out); returns per-task results and the seconds it took."""
        t0 = time.perf_counter()
        results = {
            t.name: self.evaluator.evaluate(t, split, limit, indices[t.name] if indices is not None else None)
            for t in self.tasks
            if indices is None or indices.get(t.name)
        }
        return results, time.perf_counter() - t0

    def score(self, recipes: list[Recipe], split: str = "search", limit: int | None = None):
        """Materialize a candidate in place and score it; returns per-task results and merge seconds."""
        merge_s = self.merge(recipes)
        return self.evaluate(split, limit)[0], merge_s

    def objective_value(self, scores: dict[str, float]) -> list[float] | float:
        if self.space.objective == "pareto":
            return [scores[t.name] for t in self.tasks]
        return weighted_mean(scores, self.space.task_weights)


class Midpoint:
    """A stand-in trial that answers every suggestion with a point inside its range."""

    def __init__(self, method: str) -> None:
        self.method = method

    def suggest_categorical(self, name: str, choices: list) -> Any:
        return self.method if name == "method" else choices[0]

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False, step=None) -> float:
        if step is not None:
            return low
        return math.sqrt(low * high) if log else (low + high) / 2

"""Re-scoring: chosen recipes measured again with the exact engine (the model mergekit builds from
the exported YAML) on the search and test splits, and the references a learned recipe is judged
against: the known recipes, a hand-tuned scalar (a λ sweep), the specialists' ceiling, and
each merge order's best."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluation import TaskResult, bootstrap_ci, task_weight, weighted_mean
from ..recipe import Recipe, Source, dump_recipes, renamed
from ..search import Bench
from ..search.trials import TrialRecord
from .export import trial_recipes, zoo_names


@dataclass
class Scored:
    """A recipe scored on both splits. `trial` is its study trial (None for a reference that is not
    one: a known recipe, the tuned scalar); rows are found by it, never by `label`."""

    label: str
    recipe_yaml: str
    search: dict[str, float]
    test: dict[str, TaskResult]
    during_study: dict[str, float] | None = None  # search scores the study recorded (its engine)
    task_weights: dict[str, float] | None = None  # the space's: means are the search's objective
    method: str = ""  # the last stage's merge method
    trial: int | None = None
    known_recipe: str | None = None  # the known recipe's name, for a baseline row

    @property
    def test_mean(self) -> float:
        return weighted_mean({t: r.value for t, r in self.test.items()}, self.task_weights)

    @property
    def search_mean(self) -> float:
        return weighted_mean(self.search, self.task_weights) if self.search else float("nan")

    def row(self) -> dict[str, Any]:
        """The candidate as test_scores.json stores it."""
        return {
            "label": self.label,
            "trial": self.trial,
            "known_recipe": self.known_recipe,
            "search": self.search,
            "search_mean": self.search_mean,
            "search_during_study": self.during_study,
            "test": {
                k: {"value": v.value, "ci95": bootstrap_ci(v), "n": v.n}
                | (
                    {"verdicts": "".join("1" if y else "0" for y in v.scores)}
                    if v.metric != "perplexity"
                    else {}
                )
                for k, v in self.test.items()
            },
            "test_mean": self.test_mean,
            "gap_search_minus_test": self.search_mean - self.test_mean,
            "method": self.method,
            "recipe": self.recipe_yaml,
        }


def paired_gain(a: Scored, b: Scored, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Test score of a minus b, as the weighted mean over tasks the search optimized, and its
    paired 95 % bootstrap interval (the same resampled examples for both)."""
    rng = np.random.default_rng(seed)
    diffs = np.zeros(n_boot)
    for task, ra in a.test.items():
        rb = b.test[task]
        idx = rng.integers(0, ra.n, size=(n_boot, ra.n))
        diffs += task_weight(a.task_weights, task) * (ra.scores[idx].mean(1) - rb.scores[idx].mean(1))
    diffs /= sum(task_weight(a.task_weights, t) for t in a.test)
    gain = a.test_mean - b.test_mean
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return gain, float(lo), float(hi)


class Rescorer:
    """Scores recipes on the bench's exact engine, each trial once."""

    def __init__(self, bench: Bench, weights: dict[str, float] | None, log) -> None:
        self.bench, self.weights, self.log = bench, weights, log
        self.names = zoo_names(bench.folders)  # rows show zoo models by reference, not this machine's folder
        self.by_trial: dict[int, Scored] = {}

    def score(
        self,
        label: str,
        recipes: list[Recipe],
        recorded: dict[str, float] | None = None,
        *,
        trial: int | None = None,
        known_recipe: str | None = None,
    ) -> Scored:
        # Both splits again with the exact engine: the model mergekit builds from the exported
        # YAML, not the search engine's (other DARE/DELLA draws; ties broken by index).
        t0 = time.perf_counter()
        test, _ = self.bench.score(recipes, "test")
        res, _ = self.bench.score(recipes, "search")
        search = {k: v.value for k, v in res.items()}
        self.log(
            f"scored {label}: test mean {np.mean([r.value for r in test.values()]):.3f} ({time.perf_counter() - t0:.0f}s)"
        )
        x = Scored(
            label,
            dump_recipes(renamed(recipes, self.names)),
            search,
            test,
            recorded,
            self.weights,
            recipes[-1].merge_method,
            trial,
            known_recipe,
        )
        if trial is not None:
            self.by_trial.setdefault(trial, x)
        return x

    def trial(self, t: TrialRecord, label: str) -> Scored:
        """A trial's rounded recipe (what export writes), scored once however often it is asked."""
        if t.number in self.by_trial:
            return self.by_trial[t.number]
        return self.score(label, trial_recipes(t), t.scores or None, trial=t.number)

    def tuned_scalar(self, dtype: str | None) -> Scored | None:
        """Task arithmetic with unit weights and the λ that a 1-D sweep on the search split picks:
        what a careful person would do by hand, so the report says what learning adds beyond it."""
        b = self.bench
        if not all(t.higher_is_better for t in b.tasks):
            return None
        best: tuple[float, float, Recipe] | None = None
        for lam in [round(0.2 + 0.1 * i, 1) for i in range(14)]:
            r = Recipe(
                "task_arithmetic",
                base_model=b.base_path,
                parameters={"lambda": lam},
                dtype=dtype,
                models=[Source(m, {"weight": 1.0}) for m in b.model_paths],
            )
            res, _ = b.score([r], "search")
            mean = float(np.mean([v.value for v in res.values()]))
            if best is None or mean > best[0]:
                best = (mean, lam, r)
        return self.score(f"tuned: task_arithmetic λ={best[1]} (sweep on search split)", [best[2]])

    def ceiling(self) -> dict[str, float]:
        """Each specialist on its own skill, when a model is named after the task (the zoo)."""
        b, out = self.bench, {}
        for task in b.tasks:
            for path in b.model_paths:
                if Path(path).name == task.name:
                    # its own task only: the others are not the ceiling (3× fewer examples to score)
                    b.merge([Recipe("passthrough", models=[Source(path)])])
                    out[task.name] = b.evaluator.evaluate(task, "test").value
        return out

    def merge_orders(self, trials: list[TrialRecord], models: list[str]) -> list[dict[str, Any]] | None:
        """Sequential spaces that search the merge order: per order, its trials and its best trial
        (by search mean) scored on the test split, so the orders compare on data the search never saw."""
        done = [t for t in trials if t.complete and "merge_order" in t.params]
        if not done:
            return None
        rows = []
        for order in sorted({t.params["merge_order"] for t in done}):
            ts = [t for t in done if t.params["merge_order"] == order]
            top = max(ts, key=lambda t: t.mean)
            names = " > ".join(models[int(i)] for i in order.split(">"))
            x = self.trial(top, f"order {names}: trial {top.number}")
            row = {"order": order, "models": names, "trials": len(ts), "best_trial": top.number}
            rows.append(row | {"search_mean": top.mean, "test": x.row()["test"], "test_mean": x.test_mean})
        return rows

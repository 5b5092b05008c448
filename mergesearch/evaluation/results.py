"""What scoring returns, shared by every backend (native, lm-eval) so that none imports another:
a task's per-example result, its bootstrap interval, and the weighted mean over tasks that a
study optimizes and a report compares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class TaskResult:
    task: str
    metric: str
    split: str
    scores: np.ndarray  # per example: 1/0 verdicts, or per-example NLL sums for perplexity
    weights: np.ndarray | None = None  # token counts, for perplexity
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def value(self) -> float:
        if self.metric == "perplexity":
            return float(np.exp(self.scores.sum() / self.weights.sum()))
        return float(self.scores.mean()) if len(self.scores) else float("nan")


def bootstrap_ci(
    result: TaskResult, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the task's metric over examples."""
    rng = np.random.default_rng(seed)
    n = result.n
    if n == 0:
        return float("nan"), float("nan")
    idx = rng.integers(0, n, size=(n_boot, n))
    if result.metric == "perplexity":
        stats = np.exp(result.scores[idx].sum(1) / result.weights[idx].sum(1))
    else:
        stats = result.scores[idx].mean(1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def task_weight(weights: dict[str, float] | None, task: str) -> float:
    """A task's weight in the objective: the space's task_weights, 1 where it names none."""
    return float((weights or {}).get(task, 1.0))


def weighted_mean(values: dict[str, Any], weights: dict[str, float] | None = None) -> Any:
    """Σₜ wₜ·vₜ / Σₜ wₜ over the tasks in `values` (wₜ = 1 where `weights` names none): the
    objective of a `mean` study. Values may be floats or tensors (the gradient's losses)."""
    if not values:
        return float("nan")
    total = sum(task_weight(weights, t) for t in values)
    return sum(task_weight(weights, t) * v for t, v in values.items()) / total

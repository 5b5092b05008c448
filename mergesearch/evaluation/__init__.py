"""Scoring a candidate: tasks as data (`tasks`), token sequences (`sequences`), the native batched
harness (`native`), lm-evaluation-harness as a second backend (`lmeval`), the result types both
return (`results`), and `Scorer`, which routes each task to its backend."""

from __future__ import annotations

from .native import NativeEvaluator, configure_threads
from .results import TaskResult, bootstrap_ci, task_weight, weighted_mean
from .scorer import Scorer
from .tasks import Task, find_task, load_task

__all__ = [
    "NativeEvaluator",
    "Scorer",
    "Task",
    "TaskResult",
    "bootstrap_ci",
    "configure_threads",
    "evaluate_model",
    "find_task",
    "load_task",
    "task_weight",
    "weighted_mean",
]


def evaluate_model(
    model_dir,
    tasks: list[str],
    *,
    split: str = "test",
    limit: int | None = None,
    backend: str = "native",
    device: str = "cpu",
    evals_dir=None,
) -> list[dict]:
    """Score a model folder on tasks; one row per task with value and 95 % bootstrap interval."""
    from ..errors import MergeSearchError
    from ..modeling import load_model

    task_objs = [find_task(t, evals_dir) for t in tasks]
    model, tok = load_model(model_dir, device=device)
    configure_threads(model.num_parameters())
    for t in task_objs:
        t.check(tok)
    if backend == "native":
        scorer = Scorer(model, tok)  # a task naming an lm-eval task goes to lm-eval
    elif backend == "lm-eval":
        from .lmeval import LMEvalBackend

        scorer = LMEvalBackend(model, tok)
    else:
        raise MergeSearchError(f"--backend {backend!r}: use native or lm-eval")
    rows = []
    for t in task_objs:
        r = scorer.evaluate(t, split, limit)
        lo, hi = bootstrap_ci(r)
        rows.append(
            {
                "task": t.name,
                "metric": r.metric,
                "split": split,
                "n": r.n,
                "value": r.value,
                "ci_low": lo,
                "ci_high": hi,
                "seconds": round(r.seconds, 3),
                "backend": backend,
                "unextracted": r.extra.get("unextracted"),
            }
        )
    return rows

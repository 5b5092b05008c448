"""One entry point for scoring a task on an in-memory model: the native harness, or
lm-evaluation-harness for a task that names an lm-eval task. Neither backend knows the other."""

from __future__ import annotations

from .native import NativeEvaluator
from .results import TaskResult
from .tasks import Task


class Scorer:
    """Routes each task to its backend; both score the same model, whose weights may change
    between calls. `reuse_outputs` is the native harness's (see NativeEvaluator)."""

    def __init__(self, model, tokenizer, **native_options) -> None:
        self.model, self.tok = model, tokenizer
        self.native = NativeEvaluator(model, tokenizer, **native_options)
        self._lm_eval = None

    @property
    def reuse_outputs(self) -> bool:
        return self.native.reuse_outputs

    @reuse_outputs.setter
    def reuse_outputs(self, on: bool) -> None:
        self.native.reuse_outputs = on

    def lm_eval(self):
        """lm-evaluation-harness on the same model, loaded on first use (it imports for seconds)."""
        if self._lm_eval is None:
            from .lmeval import LMEvalBackend

            self._lm_eval = LMEvalBackend(self.model, self.tok)
        return self._lm_eval

    def evaluate(
        self, task: Task, split: str = "search", limit: int | None = None, indices: list[int] | None = None
    ) -> TaskResult:
        """Score the split's first `limit` examples, or the examples at `indices` (a screen)."""
        if task.lm_eval is None:
            return self.native.evaluate(task, split, limit, indices)
        return self.lm_eval().evaluate(task, split, limit, indices)

"""lm-evaluation-harness as the second backend, on the same in-memory model, fully offline.

One HFLM wraps the live model for every candidate (new weights are loaded into the model
in place), one TaskManager is built per set of tasks (`include_defaults=False` when only
local tasks are asked: milliseconds instead of ~20 s), and lm-eval's request cache is
never used: its key ignores the weights, so it would return another candidate's answers.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from ..errors import MergeSearchError
from .native import TaskResult
from .tasks import Task


class LMEvalBackend:
    def __init__(self, model, tokenizer, *, batch_size: int = 64, max_gen_toks: int = 16):
        from lm_eval.models.huggingface import HFLM

        self.lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            device=str(next(model.parameters()).device),
        )
        self.max_gen_toks = max_gen_toks
        self._dir = Path(tempfile.mkdtemp(prefix="mergesearch-lmeval-"))
        self._managers: dict[tuple[str, ...], object] = {}

    def _export(self, task: Task, split: str, limit: int | None) -> str:
        """Write the rendered examples and an lm-eval task YAML (absolute paths: lm-eval
        resolves data_files against the working directory, not the YAML)."""
        if task.metric == "perplexity":
            raise MergeSearchError(
                f"task {task.name}: perplexity tasks are scored by the native backend only"
            )
        name = f"ms_{task.name}_{split}_{limit or 'all'}"
        data = self._dir / f"{name}.jsonl"
        with open(data, "w") as fh:
            for ex in task.examples(split, limit):
                fh.write(
                    json.dumps(
                        {"prompt": ex.prompt, "target": ex.target, "choices": ex.choices, "label": ex.label}
                    )
                    + "\n"
                )
        spec = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "doc_to_text": "{{prompt}}",
            "metadata": {"version": 1.0},
        }
        if task.metric == "exact_match":
            spec |= {
                "output_type": "generate_until",
                "doc_to_target": "{{target}}",
                "target_delimiter": "",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": self.max_gen_toks, "do_sample": False},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            }
        else:
            spec |= {
                "output_type": "multiple_choice",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{label}}",
                "target_delimiter": task.choice_prefix,
                "metric_list": [
                    {"metric": m, "aggregation": "mean", "higher_is_better": True}
                    for m in ("acc", "acc_norm")
                ],
            }
        (self._dir / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        return name

    def evaluate(self, task: Task, split: str = "search", limit: int | None = None) -> TaskResult:
        from lm_eval import evaluator
        from lm_eval.tasks import TaskManager

        name = self._export(task, split, limit)
        key = (name,)
        if key not in self._managers:
            self._managers[key] = TaskManager(include_path=str(self._dir), include_defaults=False)
        t0 = time.perf_counter()
        out = evaluator.simple_evaluate(
            model=self.lm,
            tasks=[name],
            task_manager=self._managers[key],
            bootstrap_iters=0,
            log_samples=True,
            use_cache=None,
            cache_requests=False,
            verbosity="ERROR",
        )
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        if task.metric == "exact_match":
            res = TaskResult(
                task.name, "exact_match", split, np.array([float(s["exact_match"]) for s in samples])
            )
            res.extra["responses"] = [s["filtered_resps"][0] for s in samples]
        else:
            res = TaskResult(
                task.name,
                "acc",
                split,
                np.array([float(s["acc"]) for s in samples]),
                extra={"acc_norm": np.array([float(s["acc_norm"]) for s in samples])},
            )
        res.seconds = time.perf_counter() - t0
        return res

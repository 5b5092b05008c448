"""lm-evaluation-harness as the second backend, on the same in-memory model, fully offline.

Two uses:
- any task of ours, exported as an lm-eval task YAML (`task_spec`): `mergesearch eval
  --backend lm-eval`, and the check that native verdicts equal lm-eval's;
- a task file that names an lm-eval task (`lm_eval:`: a registered name or a local task YAML) as
  a search fitness. Its documents are split into disjoint search and test subsets by a fixed
  seed (`LMEvalTask.split`), recorded in the study; fidelity rungs are sample limits (the first
  n documents of the search subset's fixed order, passed as lm-eval's `samples`).

One HFLM wraps the live model for every candidate (new weights are written into the model in
place), one TaskManager is built per set of tasks (`include_defaults=False` for local tasks:
milliseconds instead of ~20 s), and lm-eval's request cache is never used: its key ignores the
weights, so it would return another candidate's answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..errors import MergeSearchError
from .results import TaskResult
from .sequences import prompt_text
from .tasks import Task

MIN_SPLIT_DOCS = 2


class _TaggedLoader(yaml.SafeLoader):
    """safe_load that keeps lm-eval's `!function module.name` tags as they are (never runs them)."""


class _Tagged(str):
    pass


class _TaggedDumper(yaml.SafeDumper):
    pass


_TaggedLoader.add_constructor("!function", lambda loader, node: _Tagged(loader.construct_scalar(node)))
_TaggedDumper.add_representer(_Tagged, lambda dumper, v: dumper.represent_scalar("!function", str(v)))


@dataclass
class LMEvalTask:
    """A loaded lm-eval task: its name, manager, document count and our split of its documents."""

    name: str
    manager: object
    documents: int
    search: list[int] = field(default_factory=list)
    test: list[int] = field(default_factory=list)
    aggregation: dict = field(default_factory=dict)

    def record(self, task: Task) -> dict:
        """What the study records: enough to rebuild the split and to check nobody changed it."""
        spec = task.lm_eval
        return {
            "lm_eval_task": spec.task,
            "documents": self.documents,
            "split_seed": spec.split_seed,
            "search_fraction": spec.search_fraction,
            "search": self.search,
            "test": self.test,
        }


def _quiet_lm_eval() -> None:
    # simple_evaluate runs `git describe` for its results record, once per call (per candidate):
    # outside a checkout git prints "fatal: not a git repository". We never read that record.
    import lm_eval.evaluator

    lm_eval.evaluator.get_git_commit_hash = lambda: None
    # Its progress bars (building requests, running them) would print twice per candidate;
    # they are created with an explicit disable=False, so TQDM_DISABLE cannot turn them off.
    import lm_eval.api.task
    import lm_eval.models.huggingface
    from tqdm import tqdm

    def quiet_tqdm(*args, **kwargs):
        kwargs["disable"] = True
        return tqdm(*args, **kwargs)

    lm_eval.api.task.tqdm = quiet_tqdm
    lm_eval.models.huggingface.tqdm = quiet_tqdm
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


class LMEvalBackend:
    def __init__(self, model, tokenizer, *, batch_size: int = 64, max_gen_toks: int = 16):
        _quiet_lm_eval()
        from lm_eval.models.huggingface import HFLM

        self.tok = tokenizer
        self.lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            device=str(next(model.parameters()).device),
        )
        self.max_gen_toks = max_gen_toks
        # Exported tasks and staged YAMLs; removed when the backend goes (or the process exits).
        self._tmp = tempfile.TemporaryDirectory(prefix="mergesearch-lmeval-")
        self._dir = Path(self._tmp.name)
        self._managers: dict[tuple[str, ...], object] = {}
        self._loaded: dict[str, LMEvalTask] = {}

    # -- our tasks, exported -------------------------------------------------------------
    def task_spec(self, task: Task, name: str, data: Path) -> dict:
        """Our task as an lm-eval task over rendered examples (prompt already final)."""
        spec = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "doc_to_text": "{{prompt}}",
            "metadata": {"version": 1.0},
        }
        if task.metric == "exact_match":
            if task.generative:
                until, max_toks = list(task.generation.until), task.generation.max_new_tokens
                em = {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
                em |= task.normalize.lm_eval_args()
            else:  # the zoo's "target then EOS": a stop at the newline, the answer as generated
                until, max_toks = ["\n"], self.max_gen_toks
                em = {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
            spec |= {
                "output_type": "generate_until",
                "doc_to_target": "{{target}}",
                "target_delimiter": "",
                "generation_kwargs": {"until": until, "max_gen_toks": max_toks, "do_sample": False},
                "metric_list": [em],
            }
            if task.extract is not None:
                spec["filter_list"] = [
                    {
                        "name": "extract",
                        "filter": [
                            {
                                "function": "regex",
                                "regex_pattern": task.extract.pattern,
                                "group_select": task.extract.group,
                            },
                            {"function": "take_first"},
                        ],
                    }
                ]
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
        return spec

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
                row = {
                    "prompt": prompt_text(self.tok, ex),
                    "target": ex.target,
                    "choices": ex.choices,
                    "label": ex.label,
                }
                fh.write(json.dumps(row) + "\n")
        (self._dir / f"{name}.yaml").write_text(yaml.safe_dump(self.task_spec(task, name, data)))
        return name

    def _run(self, name: str, manager, **kw) -> list[dict]:
        from lm_eval import evaluator

        try:
            out = evaluator.simple_evaluate(
                model=self.lm,
                tasks=[name],
                task_manager=manager,
                bootstrap_iters=0,
                log_samples=True,
                use_cache=None,
                cache_requests=False,
                verbosity="ERROR",
                **kw,
            )
        except MergeSearchError:
            raise
        except Exception as e:  # lm-eval raises many types for a task it cannot load or run
            raise MergeSearchError(f"lm-eval task {name}: {type(e).__name__}: {e}") from e
        return out["samples"][name]

    def evaluate(
        self, task: Task, split: str = "search", limit: int | None = None, indices: list[int] | None = None
    ) -> TaskResult:
        """Score a task; `indices` (positions in the search or test subset) only for a task that
        names an lm-eval task (a screen): one of ours is exported whole or by `limit`."""
        if task.lm_eval is not None:
            return self._evaluate_lm_eval(task, split, limit, indices)
        if indices is not None:
            raise MergeSearchError(
                f"task {task.name}: exported to lm-eval by its first examples; score chosen examples natively"
            )
        from lm_eval.tasks import TaskManager

        name = self._export(task, split, limit)
        key = (name,)
        if key not in self._managers:
            self._managers[key] = TaskManager(include_path=str(self._dir), include_defaults=False)
        t0 = time.perf_counter()
        samples = sorted(self._run(name, self._managers[key]), key=lambda s: s["doc_id"])
        if task.metric == "exact_match":
            res = TaskResult(
                task.name, "exact_match", split, np.array([float(s["exact_match"]) for s in samples])
            )
            res.extra["responses"] = [s["resps"][0][0] for s in samples]
            res.extra["answers"] = [s["filtered_resps"][0] for s in samples]
            if task.extract is not None:
                res.extra["unextracted"] = sum(a == "[invalid]" for a in res.extra["answers"])
        else:
            res = TaskResult(
                task.name,
                "acc",
                split,
                np.array([float(s["acc"]) for s in samples]),
                extra={
                    "acc_norm": np.array([float(s["acc_norm"]) for s in samples]),
                    "loglikelihood": [_gold_loglikelihood(s) for s in samples],
                },
            )
        res.seconds = time.perf_counter() - t0
        return res

    # -- lm-eval tasks as a fitness -------------------------------------------------------
    def load(self, task: Task) -> LMEvalTask:
        """Resolve the lm-eval task, count its documents and split them (cached per task)."""
        if task.name in self._loaded:
            return self._loaded[task.name]
        from lm_eval.tasks import TaskManager

        spec = task.lm_eval
        if spec.is_path:
            name, include = self._stage_yaml(Path(spec.task), task)
            manager = TaskManager(include_path=str(include), include_defaults=False)
        else:
            name = spec.task
            if ("__defaults__",) not in self._managers:  # indexing lm-eval's own tasks takes ~20 s
                self._managers[("__defaults__",)] = TaskManager()
            manager = self._managers[("__defaults__",)]
        if name not in manager.all_tasks:
            raise MergeSearchError(
                f"{task.path}: lm_eval.task {spec.task!r} is not an lm-eval task "
                "(not registered, and no such local task YAML); `lm_eval ls tasks` lists registered ones"
            )
        try:
            obj = manager.load([name])["tasks"][name]
            docs = obj.eval_docs
            n = len(docs)
        except Exception as e:
            raise MergeSearchError(
                f"{task.path}: lm-eval task {name} cannot be loaded ({type(e).__name__}: {e})"
            ) from e
        agg = {m["metric"]: m.get("aggregation", "mean") for m in (obj.config.metric_list or [])}
        if spec.metric in agg and agg[spec.metric] != "mean":
            raise MergeSearchError(
                f"{task.path}: lm-eval metric {spec.metric!r} aggregates by {agg[spec.metric]!r}; a fitness "
                "needs a per-document metric averaged over documents (e.g. exact_match, acc)"
            )
        order = np.random.default_rng(spec.split_seed).permutation(n).tolist()
        k = int(round(n * spec.search_fraction))
        if min(k, n - k) < MIN_SPLIT_DOCS:
            raise MergeSearchError(
                f"{task.path}: lm-eval task {name} has {n} document(s); disjoint search and test splits "
                f"need at least {MIN_SPLIT_DOCS} each (search_fraction {spec.search_fraction} gives {k} and {n - k})"
            )
        loaded = LMEvalTask(name, manager, n, order[:k], order[k:], agg)
        self._loaded[task.name] = loaded
        return loaded

    def _stage_yaml(self, src: Path, task: Task) -> tuple[str, Path]:
        """Copy a local task YAML into its own include folder with `data_files` made absolute
        against the YAML's folder (lm-eval resolves them against the working directory)."""
        try:
            d = yaml.load(src.read_text(), Loader=_TaggedLoader)  # noqa: S506 — a SafeLoader subclass
        except yaml.YAMLError as e:
            raise MergeSearchError(f"{src}: not valid YAML ({e})") from e
        if not isinstance(d, dict) or "task" not in d:
            raise MergeSearchError(f"{src}: not an lm-eval task YAML (no `task:` key)")
        files = (d.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            for k, v in files.items():
                if isinstance(v, str) and "://" not in v and not Path(v).is_absolute():
                    files[k] = str((src.parent / v).resolve())
        elif isinstance(files, str) and "://" not in files and not Path(files).is_absolute():
            d["dataset_kwargs"]["data_files"] = str((src.parent / files).resolve())
        folder = self._dir / ("t" + hashlib.sha1(str(src).encode()).hexdigest()[:10])
        folder.mkdir(exist_ok=True)
        for py in src.parent.glob("*.py"):  # `!function utils.x` helpers next to the YAML
            shutil.copy(py, folder / py.name)
        (folder / src.name).write_text(yaml.dump(d, Dumper=_TaggedDumper, sort_keys=False))
        return str(d["task"]), folder

    def _evaluate_lm_eval(
        self, task: Task, split: str, limit: int | None, indices: list[int] | None = None
    ) -> TaskResult:
        """The documents of our split (its first `limit`, or those at `indices`), scored by
        lm-eval; per document, the metric from lm-eval's own samples (and the gold choice's
        log-likelihood for a multiple-choice task)."""
        t = self.load(task)
        if split not in ("search", "test"):
            raise MergeSearchError(
                f"{task.path}: lm-eval tasks have the splits search and test, not {split!r}"
            )
        ids = (t.search if split == "search" else t.test)[: limit if limit is not None else None]
        if indices is not None:
            if not all(0 <= i < len(ids) for i in indices):
                raise MergeSearchError(
                    f"task {task.name}: example indices out of range for its {split} split of {len(ids)} documents"
                )
            ids = [ids[i] for i in indices]
        t0 = time.perf_counter()
        # Sorted: lm-eval iterates the chosen documents in dataset order but labels the k-th with
        # the k-th id as given (evaluator.py, `indices[doc_id]`; lm-evaluation-harness issue #4084,
        # open PRs #4085/#4089), so an unsorted list attaches each document's result to another's id.
        samples = self._run(t.name, t.manager, samples={t.name: sorted(ids)})
        filters = list(dict.fromkeys(s.get("filter", "none") for s in samples))
        want = task.lm_eval.filter or filters[0]
        if want not in filters:
            raise MergeSearchError(f"{task.path}: lm-eval task {t.name} has filters {filters}, not {want!r}")
        by_doc = {s["doc_id"]: s for s in samples if s.get("filter", "none") == want}
        metric = task.lm_eval.metric
        first = next(iter(by_doc.values()))
        if metric not in first:
            known = [
                k
                for k in first
                if k
                not in {
                    "doc_id",
                    "doc",
                    "target",
                    "arguments",
                    "resps",
                    "filtered_resps",
                    "filter",
                    "metrics",
                    "doc_hash",
                    "prompt_hash",
                    "target_hash",
                }
            ]
            raise MergeSearchError(
                f"{task.path}: lm-eval task {t.name} reports {known}, not metric {metric!r}"
            )
        rows = [by_doc[i] for i in ids]
        res = TaskResult(task.name, metric, split, np.array([float(s[metric]) for s in rows]))
        res.extra["responses"] = [s["resps"][0][0] if s["resps"] and s["resps"][0] else "" for s in rows]
        res.extra["answers"] = [s["filtered_resps"][0] if s["filtered_resps"] else "" for s in rows]
        res.extra["unextracted"] = sum(a == "[invalid]" for a in res.extra["answers"])
        if metric == "acc":
            lls = [_gold_loglikelihood(s) for s in rows]
            if all(x is not None for x in lls):
                res.extra["loglikelihood"] = lls
        res.seconds = time.perf_counter() - t0
        return res


def _gold_loglikelihood(sample: dict) -> float | None:
    """A multiple-choice sample's gold choice log-likelihood: lm-eval keeps (ll, is_greedy) per
    choice in `filtered_resps` and the gold index as `target`."""
    try:
        return float(sample["filtered_resps"][int(sample["target"])][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None

"""Tasks as data: one YAML per task in `evals/`, its records loaded through `datasets`.

    name: add
    metric: exact_match            # exact_match | multiple_choice | perplexity
    data_files:                    # paths relative to this YAML (or a hub id in `dataset:`)
      search: data/add.search.jsonl
      test: data/add.test.jsonl
    prompt: "{a}+{b}="             # str.format over a record's fields
    target: "{answer}"             # exact_match; for multiple_choice: `choices` + `label` fields
    fewshot: 0                     # k solved search examples prepended to every prompt
    shuffle_seed: 0

Subsets are prefixes of one fixed shuffle per split, so a score on 50 examples is the
first 50 of the score on all of them.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MergeSearchError
from ..yaml_files import read_mapping

METRICS = ("exact_match", "multiple_choice", "perplexity")
KEYS = {
    "name",
    "description",
    "metric",
    "data_files",
    "dataset",
    "format",
    "prompt",
    "target",
    "choices",
    "label",
    "choice_prefix",
    "fewshot",
    "fewshot_separator",
    "shuffle_seed",
    "splits",
}
DEFAULT_EVALS = Path(__file__).resolve().parents[2] / "evals"


@dataclass
class Example:
    id: int  # position in the split's fixed shuffle
    prompt: str
    target: str | None = None
    choices: list[str] | None = None
    label: int | None = None


@dataclass
class Task:
    name: str
    path: Path
    metric: str
    prompt: str
    target: str | None
    data_files: dict[str, str]
    dataset: str | None = None
    format: str | None = None
    choices: str | None = None
    label: str | None = None
    choice_prefix: str = " "
    fewshot: int = 0
    fewshot_separator: str = "\n"
    shuffle_seed: int = 0
    description: str = ""
    _cache: dict[str, list[dict]] = field(default_factory=dict, repr=False)

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "perplexity"

    @property
    def splits(self) -> list[str]:
        return list(self.data_files)

    # -- records -------------------------------------------------------------------------
    def records(self, split: str) -> list[dict]:
        if split in self._cache:
            return self._cache[split]
        if split not in self.data_files:
            raise MergeSearchError(
                f"{self.path}: task {self.name} has no split {split!r}; it has {', '.join(self.data_files)}"
            )
        recs = _load_records(self, split)
        if not recs:
            raise MergeSearchError(f"{self.path}: split {split!r} of task {self.name} is empty")
        order = np.random.default_rng(self.shuffle_seed).permutation(len(recs))
        self._cache[split] = [recs[i] for i in order]
        return self._cache[split]

    @cached_property
    def _fewshot_prefix(self) -> str:
        if not self.fewshot:
            return ""
        shots = self.records("search")[: self.fewshot]
        return "".join(
            self._render(r, "prompt") + (self._render(r, "target") or "") + self.fewshot_separator
            for r in shots
        )

    def examples(self, split: str, limit: int | None = None) -> list[Example]:
        recs = self.records(split)
        start = self.fewshot if split == "search" else 0  # shots are never scored
        recs = recs[start:]
        if limit is not None:
            recs = recs[:limit]
        out = []
        for i, r in enumerate(recs):
            ex = Example(i, self._fewshot_prefix + self._render(r, "prompt"))
            if self.metric == "exact_match":
                ex.target = self._render(r, "target")
            elif self.metric == "multiple_choice":
                ex.choices = [str(c) for c in self._field(r, self.choices)]
                ex.label = int(self._field(r, self.label))
            out.append(ex)
        return out

    def _field(self, r: dict, name: str) -> Any:
        if name not in r:
            raise MergeSearchError(
                f"{self.path}: field {name!r} is missing from a record of {self.name}; fields: {sorted(r)}"
            )
        return r[name]

    def _render(self, r: dict, which: str) -> str | None:
        template = getattr(self, which)
        if template is None:
            return None
        try:
            return template.format(**r)
        except KeyError as e:
            raise MergeSearchError(
                f"{self.path}: {which} template names field {e.args[0]!r}, which the data lacks; "
                f"fields: {', '.join(sorted(r))}"
            ) from e

    def check(self) -> None:
        """Load every split, render every record, and refuse overlapping search/test splits."""
        rendered = {}
        for split in self.data_files:
            rendered[split] = {ex.prompt for ex in self.examples(split)}
        if "search" in rendered and "test" in rendered:
            both = rendered["search"] & rendered["test"]
            if both:
                raise MergeSearchError(
                    f"{self.path}: {len(both)} prompt(s) appear in both the search and test splits "
                    f"(e.g. {sorted(both)[0]!r}); test scores must come from unseen examples"
                )


def _load_records(task: Task, split: str) -> list[dict]:
    spec = task.data_files[split]
    if task.dataset:  # a hub or local dataset id, loaded by datasets as given
        import datasets

        return list(datasets.load_dataset(task.dataset, split=spec))
    path = (task.path.parent / spec).resolve()
    if not path.is_file():
        raise MergeSearchError(f"{task.path}: data file {spec} (split {split}) does not exist at {path}")
    fmt = task.format or {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(
        path.suffix
    )
    if fmt is None:
        raise MergeSearchError(f"{task.path}: cannot tell the format of {spec}; set format: json|csv|parquet")
    if fmt == "json":
        # Check line by line first: datasets' own error does not say which line is bad.
        with open(path) as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        if not isinstance(json.loads(line), dict):
                            raise ValueError("not an object")
                    except ValueError as e:
                        raise MergeSearchError(f"{path}:{n}: malformed JSON line ({e})") from e
    if path.stat().st_size == 0:
        raise MergeSearchError(f"{path}: data file is empty")
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    return list(ds)


def load_task(path: str | Path) -> Task:
    p = Path(path)
    d = read_mapping(p, "task file")
    for k in d:
        if k not in KEYS:
            raise MergeSearchError(f"{p}: unknown key {k!r}; task files take {', '.join(sorted(KEYS))}")
    for k in ("name", "metric", "prompt", "data_files"):
        if k not in d:
            raise MergeSearchError(f"{p}: missing key {k!r}")
    if d["metric"] not in METRICS:
        raise MergeSearchError(f"{p}: metric {d['metric']!r} is not one of {', '.join(METRICS)}")
    if d["metric"] == "exact_match" and "target" not in d:
        raise MergeSearchError(f"{p}: exact_match needs a 'target' template")
    if d["metric"] == "multiple_choice" and not ("choices" in d and "label" in d):
        raise MergeSearchError(f"{p}: multiple_choice needs 'choices' and 'label' field names")
    files = d["data_files"]
    if not isinstance(files, dict) or not files:
        raise MergeSearchError(f"{p}: data_files must map split names (search, test) to files")
    for t in (d.get("prompt"), d.get("target")):
        if t is not None:
            try:
                list(string.Formatter().parse(t))
            except ValueError as e:
                raise MergeSearchError(f"{p}: bad template {t!r} ({e})") from e
    return Task(
        name=d["name"],
        path=p,
        metric=d["metric"],
        prompt=d["prompt"],
        target=d.get("target"),
        data_files={str(k): str(v) for k, v in files.items()},
        dataset=d.get("dataset"),
        format=d.get("format"),
        choices=d.get("choices"),
        label=d.get("label"),
        choice_prefix=d.get("choice_prefix", " "),
        fewshot=int(d.get("fewshot", 0)),
        fewshot_separator=d.get("fewshot_separator", "\n"),
        shuffle_seed=int(d.get("shuffle_seed", 0)),
        description=d.get("description", ""),
    )


def find_task(name: str, evals_dir: str | Path | None = None) -> Task:
    """A task by name (evals/<name>.yaml) or by path to its YAML."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        return load_task(name)
    d = Path(evals_dir) if evals_dir else DEFAULT_EVALS
    for ext in (".yaml", ".yml"):
        if (d / f"{name}{ext}").is_file():
            return load_task(d / f"{name}{ext}")
    known = sorted(p.stem for p in d.glob("*.yaml"))
    raise MergeSearchError(f"unknown task {name!r}; tasks in {d}: {', '.join(known) or 'none'}")

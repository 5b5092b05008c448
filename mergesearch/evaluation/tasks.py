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

Generative tasks (greedy decoding, scored as lm-eval's `generate_until` is; `exact_match`
without `generation:` is the demo zoo's teacher-forced "target then EOS"):

    generation:
      until: ["\n\n", "Question:"] # stop strings (the end-of-sequence token always stops)
      max_new_tokens: 64
    extract: last_number           # first_number | last_number | first_line |
                                   # {regex: "#### (-?[0-9.,]+)", group: first|last}
    normalize: [strip, numbers]    # any of strip, case, punctuation, numbers (see answers.py)
    shot_target: " {solution}"     # what few-shot examples show after the prompt (default: target)
    chat_template: true            # render through the tokenizer's chat template; few-shot
    system_prompt: "Be brief."     #   examples become earlier user/assistant turns

A task scored by lm-evaluation-harness on the live model (no data_files/prompt/target):

    lm_eval:
      task: word_problems_lmeval.yaml  # a registered lm-eval task name, or a local task YAML
      metric: exact_match              # a per-document metric with mean aggregation
      filter: strict-match             # which of the task's filters (default: its first)
      search_fraction: 0.5             # the documents' split into search and test,
      split_seed: 0                    #   disjoint, fixed by this seed and recorded in the study

Subsets are prefixes of one fixed shuffle per split, so a score on 50 examples is the
first 50 of the score on all of them.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MergeSearchError
from ..resources import data_dir
from ..yaml_files import number, read_mapping
from .answers import Extractor, Normalizer

METRICS = ("exact_match", "multiple_choice", "perplexity")
GENERATIVE_KEYS = {"generation", "extract", "normalize", "shot_target", "chat_template", "system_prompt"}
KEYS = GENERATIVE_KEYS | {
    "lm_eval",
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
DEFAULT_EVALS = data_dir("evals")


@dataclass
class Example:
    id: int  # position in the split's fixed shuffle
    prompt: str
    target: str | None = None
    choices: list[str] | None = None
    label: int | None = None
    messages: list[dict] | None = None  # chat tasks: rendered by the model's chat template


@dataclass(frozen=True)
class Generation:
    until: tuple[str, ...] = ("\n\n",)
    max_new_tokens: int = 256


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
    generation: Generation | None = None
    extract: Extractor | None = None
    normalize: Normalizer = field(default_factory=Normalizer)
    shot_target: str | None = None
    chat_template: bool = False
    system_prompt: str | None = None
    lm_eval: LMEvalSpec | None = None
    _cache: dict[str, list[dict]] = field(default_factory=dict, repr=False)

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "perplexity"

    @property
    def generative(self) -> bool:
        return self.generation is not None

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

    def _shot(self, r: dict) -> str:
        return self._render(r, "shot_target" if self.shot_target is not None else "target") or ""

    @cached_property
    def _fewshot_prefix(self) -> str:
        if not self.fewshot:
            return ""
        shots = self.records("search")[: self.fewshot]
        return "".join(self._render(r, "prompt") + self._shot(r) + self.fewshot_separator for r in shots)

    @cached_property
    def _chat_turns(self) -> list[dict]:
        turns = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for r in self.records("search")[: self.fewshot]:
            turns += [
                {"role": "user", "content": self._render(r, "prompt")},
                {"role": "assistant", "content": self._shot(r).strip()},
            ]
        return turns

    def examples(self, split: str, limit: int | None = None) -> list[Example]:
        if limit is not None and limit < 1:
            raise MergeSearchError(f"task {self.name}: limit {limit}: score at least 1 example (or no limit)")
        recs = self.records(split)
        start = self.fewshot if split == "search" else 0  # shots are never scored
        recs = recs[start:]
        if limit is not None:
            recs = recs[:limit]
        return [self.example(r, i) for i, r in enumerate(recs)]

    def example(self, r: dict, i: int = 0) -> Example:
        """One record as the model sees it (also how the SmolLM2 zoo renders its training data)."""
        if self.chat_template:
            turns = [*self._chat_turns, {"role": "user", "content": self._render(r, "prompt")}]
            ex = Example(i, "", messages=turns)
        else:
            ex = Example(i, self._fewshot_prefix + self._render(r, "prompt"))
        if self.metric == "exact_match":
            ex.target = self._render(r, "target")
        elif self.metric == "multiple_choice":
            choices, label = self._field(r, self.choices), self._field(r, self.label)
            if not isinstance(choices, list) or not choices:
                raise MergeSearchError(
                    f"{self.path}: field {self.choices!r} of a record is {choices!r}, not a list of choices "
                    f"({json.dumps(r, default=str)[:200]})"
                )
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
                raise MergeSearchError(
                    f"{self.path}: label field {self.label!r} is {label!r}, not an index into its "
                    f"{len(choices)} choices (0 to {len(choices) - 1}) ({json.dumps(r, default=str)[:200]}); "
                    "fix or remove that record"
                )
            ex.choices, ex.label = [str(c) for c in choices], label
        return ex

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
            text = template.format(**r)
        except KeyError as e:
            raise MergeSearchError(
                f"{self.path}: {which} template names field {e.args[0]!r}, which the data lacks; "
                f"fields: {', '.join(sorted(r))}"
            ) from e
        # A field present but empty (null in JSON, a missing CSV cell) would render as "None".
        empty = [f for f in _fields(template) if r.get(f) is None]
        if empty:
            raise MergeSearchError(
                f"{self.path}: a record has no value for field {empty[0]!r} of the {which} template "
                f"({json.dumps(r, default=str)[:200]}); fill or remove that record"
            )
        return text

    def check(self, tokenizer=None) -> None:
        """Load every split, render every record, and refuse overlapping search/test splits;
        with a tokenizer, also what the task asks of it (a chat template)."""
        if self.lm_eval is not None:
            return  # lm-eval tasks are checked when the backend loads them (lmeval.py)
        if self.chat_template and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise MergeSearchError(
                f"{self.path}: chat_template: true, but the model's tokenizer has no chat template "
                "(tokenizer_config.json or chat_template.jinja); remove the option or use an instruct model"
            )
        if "search" in self.data_files and self.fewshot >= len(self.records("search")):
            raise MergeSearchError(
                f"{self.path}: fewshot {self.fewshot} leaves no example to score: the search split has "
                f"{len(self.records('search'))} records and the shots come from it; lower fewshot or add records"
            )
        rendered = {}
        for split in self.data_files:
            rendered[split] = {
                ex.prompt if ex.messages is None else json.dumps(ex.messages[-1])
                for ex in self.examples(split)
            }
        if "search" in rendered and "test" in rendered:
            both = rendered["search"] & rendered["test"]
            if both:
                raise MergeSearchError(
                    f"{self.path}: {len(both)} prompt(s) appear in both the search and test splits "
                    f"(e.g. {sorted(both)[0]!r}); test scores must come from unseen examples"
                )


@lru_cache(maxsize=256)
def _fields(template: str) -> tuple[str, ...]:
    """The plain field names a template reads (parsed once, not per record and candidate)."""
    return tuple(f for _, f, _, _ in string.Formatter().parse(template) if f and f.isidentifier())


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
        try:
            lines = path.read_bytes().decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise MergeSearchError(f"{path}: not UTF-8 text (byte {e.start}); save the data as UTF-8") from e
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    if not isinstance(json.loads(line), dict):
                        raise ValueError("not an object")
                except ValueError as e:
                    raise MergeSearchError(f"{path}:{n}: malformed JSON line ({e})") from e
        if not any(line.strip() for line in lines):
            raise MergeSearchError(
                f"{path}: data file is empty: no records (split {split} of task {task.name})"
            )
    if path.stat().st_size == 0:
        raise MergeSearchError(f"{path}: data file is empty")
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for unreadable files; name the file
        msg = " ".join(str(e).split())[:300]
        raise MergeSearchError(f"{path}: cannot be read as {fmt} ({type(e).__name__}: {msg})") from e
    return list(ds)


def load_task(path: str | Path) -> Task:
    p = Path(path)
    d = read_mapping(p, "task file")
    for k in d:
        if k not in KEYS:
            raise MergeSearchError(f"{p}: unknown key {k!r}; task files take {', '.join(sorted(KEYS))}")
    if "lm_eval" in d:
        return _load_lm_eval_task(p, d)
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
    generative = {k for k in GENERATIVE_KEYS if k in d} - {"chat_template", "system_prompt"}
    if generative and "generation" not in d:
        raise MergeSearchError(
            f"{p}: {', '.join(sorted(generative))} need a 'generation:' block (until, max_new_tokens)"
        )
    if generative and d["metric"] != "exact_match":
        raise MergeSearchError(f"{p}: generation is scored by exact_match; metric is {d['metric']!r}")
    if "system_prompt" in d and not d.get("chat_template"):
        raise MergeSearchError(f"{p}: system_prompt needs chat_template: true")
    for t in (d.get("prompt"), d.get("target"), d.get("shot_target")):
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
        fewshot=number(d.get("fewshot", 0), f"{p}: fewshot", whole=True, minimum=0),
        fewshot_separator=d.get("fewshot_separator", "\n"),
        shuffle_seed=number(d.get("shuffle_seed", 0), f"{p}: shuffle_seed", whole=True, minimum=0),
        description=d.get("description", ""),
        generation=_generation(p, d.get("generation")) if "generation" in d else None,
        extract=Extractor.parse(d.get("extract"), str(p)),
        normalize=Normalizer.parse(d.get("normalize"), str(p)),
        shot_target=d.get("shot_target"),
        chat_template=bool(d.get("chat_template", False)),
        system_prompt=d.get("system_prompt"),
    )


def _generation(p: Path, g) -> Generation:
    if not isinstance(g, dict) or set(g) - {"until", "max_new_tokens"}:
        raise MergeSearchError(f"{p}: generation takes until (a list of stop strings) and max_new_tokens")
    until = g.get("until", ["\n\n"])
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list) or not all(isinstance(u, str) and u for u in until):
        raise MergeSearchError(f"{p}: generation.until must be a list of non-empty stop strings")
    n = g.get("max_new_tokens", 256)
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise MergeSearchError(f"{p}: generation.max_new_tokens is {n!r}; it must be a whole number > 0")
    return Generation(tuple(until), n)


@dataclass(frozen=True)
class LMEvalSpec:
    """`lm_eval:` of a task file: an lm-eval task scored on the live model."""

    task: str  # a registered name, or the absolute path of a local task YAML
    metric: str = "exact_match"
    filter: str | None = None
    search_fraction: float = 0.5
    split_seed: int = 0

    @property
    def is_path(self) -> bool:
        return self.task.endswith((".yaml", ".yml"))


LM_EVAL_KEYS = {"task", "metric", "filter", "search_fraction", "split_seed"}


def _load_lm_eval_task(p: Path, d: dict) -> Task:
    extra = set(d) - {"name", "description", "lm_eval"}
    if extra:
        raise MergeSearchError(
            f"{p}: an lm_eval task takes name, description and lm_eval only (not {', '.join(sorted(extra))}); "
            "prompts, data and metrics come from the lm-eval task"
        )
    spec = d["lm_eval"]
    if isinstance(spec, str):
        spec = {"task": spec}
    if not isinstance(spec, dict) or "task" not in spec or set(spec) - LM_EVAL_KEYS:
        raise MergeSearchError(f"{p}: lm_eval takes {', '.join(sorted(LM_EVAL_KEYS))} (task is required)")
    task = str(spec["task"])
    if task.endswith((".yaml", ".yml")):
        path = (p.parent / task).resolve()
        if not path.is_file():
            raise MergeSearchError(f"{p}: lm_eval.task {task} does not exist at {path}")
        task = str(path)
    frac = spec.get("search_fraction", 0.5)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
        raise MergeSearchError(f"{p}: lm_eval.search_fraction is {frac!r}; it must be between 0 and 1")
    seed = spec.get("split_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MergeSearchError(f"{p}: lm_eval.split_seed is {seed!r}; it must be a whole number ≥ 0")
    lm = LMEvalSpec(task, str(spec.get("metric", "exact_match")), spec.get("filter"), float(frac), seed)
    return Task(
        name=str(d.get("name") or Path(task).stem),
        path=p,
        metric=lm.metric,
        prompt="",
        target=None,
        data_files={"search": "", "test": ""},
        description=d.get("description", ""),
        lm_eval=lm,
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

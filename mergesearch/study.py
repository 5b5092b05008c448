"""The search: an Optuna study in real storage whose trials are recipes scored in memory.

Storage: SQLite under results/<study>/ by default; a journal file (`*.log`/`*.journal`) for
several processes on one machine; PostgreSQL (or any SQLAlchemy URL) across machines.
Trial records: per-task scores, examples used, merge and eval seconds, the recipe YAML (as a
user attribute and as an Optuna artifact under results/<study>/artifacts).
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from . import interrupts
from .candidates import ResidentEngine, return_freed_memory
from .errors import MergeSearchError
from .evaluation import NativeEvaluator, configure_threads, find_task
from .methods import METHODS
from .modeling import live_model, load_tokenizer
from .recipe import Recipe, dump_recipes
from .sources import resolve_model
from .space import BASELINES, SearchSpace

RESULTS = Path(os.environ.get("MERGESEARCH_RESULTS", "results"))
MERGE_SEED = 0  # DARE/DELLA draws of every candidate; exported recipes carry it


def study_dir(study: str) -> Path:
    """results/<study>; a name that would leave results/ (a path, `..`) is refused."""
    if not study or study in (".", "..") or "/" in study or "\\" in study or "\0" in study:
        raise MergeSearchError(
            f"study name {study!r} is not a plain name (no '/', '\\' or '..'): it names the folder "
            f"results/<study>; pick a name like my_study"
        )
    return RESULTS / study


def open_storage(url: str | None, study: str, *, create: bool = True) -> optuna.storages.BaseStorage:
    """SQLite file by default, a journal file for *.log/*.journal paths, else an RDB URL.

    `create=False` (report, export, worker, dashboard) opens only what exists: a missing SQLite file
    or journal is an error, not a new empty one left behind."""
    if url is None:
        db = study_dir(study) / "study.db"
        if not create and not db.is_file():
            raise MergeSearchError(
                f"no study {study!r}: {db} does not exist; run `mergesearch search` first, or pass "
                "--storage where the study lives"
            )
        db.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{db}"
    if url.endswith((".log", ".journal")) and "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        path = Path(url)
        if not create and not path.is_file():
            raise MergeSearchError(
                f"{path}: journal file does not exist; check --storage (a study's journal path)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_journal(path)
        return interrupts.guard(optuna.storages.JournalStorage(JournalFileBackend(url)))
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        if not create and not path.is_file():
            raise MergeSearchError(f"{path}: SQLite file does not exist; check --storage")
        if not path.parent.is_dir():
            raise MergeSearchError(
                f"{path.parent}: folder of the SQLite file in --storage {url} does not exist; create it or fix the URL"
            )
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" but long-standing
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90)
        return interrupts.guard(storage)
    except Exception as e:  # SQLAlchemy raises many types for a bad URL or an unreachable server
        msg = " ".join(str(e).split("(Background on this error")[0].split())
        raise MergeSearchError(f"storage {url!r} cannot be opened ({type(e).__name__}: {msg})") from e


def repair_journal(path: Path) -> int:
    """Drop the records an interrupted write left unreadable (a full disk, a kill mid-write).

    Optuna's journal reader stops at a record without its newline, so a torn *last* record hides
    nothing; but the next append lands after it, and from then on the file fails to load and every
    completed trial is out of reach. Under the journal's own lock, records that do not parse are
    removed (the file is rewritten atomically) before anyone appends. Returns how many."""
    import json

    from optuna.storages.journal import JournalFileSymlinkLock
    from optuna.storages.journal._file import get_lock_file

    if not path.is_file() or path.stat().st_size == 0:
        return 0
    with get_lock_file(JournalFileSymlinkLock(str(path))):
        data = path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline, else a torn record
        good, bad = [], 0 if not tail else 1
        for line in lines:
            try:
                json.loads(line)
                good.append(line)
            except ValueError:
                bad += 1
        if not bad:
            return 0
        tmp = path.with_name(path.name + ".repair")
        tmp.write_bytes(b"".join(x + b"\n" for x in good))
        os.replace(tmp, path)
    warnings.warn(
        f"{path}: removed {bad} unreadable journal record(s) left by an interrupted write "
        "(a full disk or a killed process); every completed record is kept",
        stacklevel=2,
    )
    return bad


class Searcher:
    """Everything a trial needs, loaded once: resident inputs, one live model, the tasks."""

    def __init__(self, space: SearchSpace, *, device: str = "cpu", cache_ranks: bool = False) -> None:
        self.space = space
        self.device = device
        self.base_path = str(resolve_model(space.base, space.path))
        self.model_paths = [str(resolve_model(m, space.path)) for m in space.models]
        # Task-vector methods only (and no sequential stages): keep τ = x − b resident instead of x.
        gta_only = all(METHODS[m].task_vectors for m in space.methods) and space.order != "sequential"
        # The search engine (exact=False): task-vector candidates in chunks with shared work,
        # DARE/DELLA from the bank's fixed draws (common to all candidates and workers). Reports
        # score the chosen recipes again with the exact engine (mergekit's model).
        self.engine = ResidentEngine(
            list(dict.fromkeys([self.base_path, *self.model_paths])),
            device=device,
            base=self.base_path if gta_only else None,
            exact=False,
            seed=MERGE_SEED,
            cache_ranks=cache_ranks,
        )
        base_ck = self.engine.models[self.base_path]
        self.arch, self.num_layers = base_ck.arch, base_ck.num_layers or 1
        base_weights = {name: t for (ref, name), t in self.engine.tensors.items() if ref == self.base_path}
        configure_threads(sum(t.numel() for t in base_weights.values()))
        self.model = live_model(self.base_path, base_weights, device=device)
        return_freed_memory()
        self.tok = load_tokenizer(self.base_path)
        # A search verifies each generative example's previous output in one pass (generate.py).
        self.evaluator = NativeEvaluator(self.model, self.tok, reuse_outputs=True)
        self.tasks = [find_task(t) for t in space.tasks]
        for t in self.tasks:
            t.check(self.tok)
        # lm-eval tasks: load them and split their documents now, so a bad task fails before any
        # trial and the split can be recorded in the study.
        self.task_splits = {
            t.name: self.evaluator.lm_eval().load(t).record(t) for t in self.tasks if t.lm_eval is not None
        }
        self.directions = ["maximize" if t.higher_is_better else "minimize" for t in self.tasks]
        names = [t.name for t in self.tasks]
        where = space.path or space.name
        for k in space.task_weights:
            if k not in names:
                raise MergeSearchError(
                    f"{where}: task_weights.{k}: not the name of one of the space's tasks ({', '.join(names)})"
                )
        if space.task_weights and not sum(space.task_weights.get(n, 1.0) for n in names) > 0:
            raise MergeSearchError(f"{where}: task_weights: at least one task needs a weight above 0")
        if space.anchors:
            bad = [t.name for t in self.tasks if t.lm_eval is not None or t.metric == "perplexity"]
            if bad:
                raise MergeSearchError(
                    f"{space.path or space.name}: anchors need per-example verdicts from the native "
                    f"harness; task(s) {', '.join(bad)} (lm-eval or perplexity) have none: remove anchors"
                )

    def validate(self) -> None:
        """What can be known before the first trial: every rung fits every task's search split,
        and the space's recipes can be built from these models (one candidate per method is
        merged in memory: architecture, shapes, layer counts, method arity, dtype)."""
        where = self.space.path or self.space.name
        for t in self.tasks:
            if t.lm_eval is not None:
                continue
            n = len(t.examples("search"))
            if self.space.fidelity[-1] > n:
                raise MergeSearchError(
                    f"{where}: fidelity rung {self.space.fidelity[-1]} is more than the {n} search examples "
                    f"of task {t.name}; use rungs up to {n}"
                )
        for method in self.space.methods:
            recipes = self.recipes(self.space.suggest(_Midpoint(method), self.num_layers))
            try:
                self.engine.write_into(self.model, recipes, seed=MERGE_SEED)
            except MergeSearchError as e:
                raise MergeSearchError(f"{where}: the models cannot be merged by {method}: {e}") from e
            except (RuntimeError, ValueError) as e:  # torch's shape errors
                raise MergeSearchError(
                    f"{where}: the models cannot be merged by {method} ({type(e).__name__}: {e})"
                ) from e

    def hold_models(self) -> None:
        """Keep the models themselves resident (instead of task vectors) in the exact engine, so any
        recipe can be scored (the report scores linear and slerp baselines too) and scores are those
        of the model mergekit builds. Frees the task vectors first."""
        self.evaluator.reuse_outputs = False  # reported numbers come from plain decoding
        if self.engine.base is not None:
            refs = list(self.engine.models)
            self.engine = None
            self.engine = ResidentEngine(refs, device=self.device)

    def recipes(self, values: dict[str, Any]) -> list[Recipe]:
        return self.space.recipes(values, self.arch, self.num_layers, self.base_path, self.model_paths)

    def score(self, recipes: list[Recipe], split: str = "search", limit: int | None = None):
        """Materialize a candidate in place and score it; returns per-task results."""
        t0 = time.perf_counter()
        self.engine.write_into(self.model, recipes, seed=MERGE_SEED)
        merge_s = time.perf_counter() - t0
        results = {t.name: self.evaluator.evaluate(t, split, limit) for t in self.tasks}
        return results, merge_s

    def objective_value(self, scores: dict[str, float]) -> list[float] | float:
        if self.space.objective == "pareto":
            return [scores[t.name] for t in self.tasks]
        w = self.space.task_weights
        return sum(w.get(t, 1.0) * s for t, s in scores.items()) / sum(w.get(t, 1.0) for t in scores)


def _sampler(
    space: SearchSpace, name: str, seed: int, multi: bool, trials: int
) -> optuna.samplers.BaseSampler:
    categorical = space.categorical
    if name == "auto":
        name = "nsga2" if multi else ("tpe" if categorical else "cmaes")
    if name == "cmaes":
        if multi:
            raise MergeSearchError(
                "sampler cmaes optimizes one objective; use objective: mean, or --sampler nsga2"
            )
        if categorical:
            raise MergeSearchError(
                "sampler cmaes cannot choose among methods or merge orders (categorical); use --sampler tpe"
            )
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=len(BASELINES) + 1)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, min(50, trials // 8)))
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=10)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise MergeSearchError(f"--sampler {name!r}: use cmaes, nsga2, tpe, gp or random")


class _NoRepeats(optuna.samplers.BaseSampler):
    """The space's sampler, except that it never proposes a candidate another process already ran.

    Population samplers (NSGA-II) can return a parent unchanged, and processes on one study share
    the population, so one process may run another's candidate again: the same score for one
    trial's cost. When a whole proposal equals a trial run by another process, the sampler is asked
    again (its generator has moved on), and after 10 tries the trial is sampled at random. A single
    process's own repeats are left as they are, so a study run by one process stays the study the
    space's seed gives."""

    def __init__(self, inner: optuna.samplers.BaseSampler, me: str) -> None:
        self.inner, self.me = inner, me

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        params = self.inner.sample_relative(study, trial, search_space)
        if not params or set(params) != set(search_space):
            return params  # some parameters are drawn independently: no exact repeat to fear
        others = {
            _params_key(t.params)
            for t in study.get_trials(deepcopy=False)
            if t.params and t.user_attrs.get("worker", self.me) != self.me
        }
        for _ in range(10):
            if _params_key(params) not in others:
                return params
            params = self.inner.sample_relative(study, trial, search_space)
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def _params_key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, v) for k, v in params.items()))


def _fail_dead_trials(study: optuna.Study) -> int:
    """Trials left RUNNING by a killed worker on this host are marked FAIL, so resuming is clean."""
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        h, _, pid = worker.rpartition(":")
        if h == host and pid.isdigit() and not _alive(int(pid)):
            # Another live process may release it at the same moment: finished is fine.
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_study_space(study: str, storage: str | None) -> SearchSpace:
    """The search space a study was created with (for workers)."""
    try:
        s = optuna.load_study(study_name=study, storage=open_storage(storage, study, create=False))
    except KeyError as e:
        raise MergeSearchError(
            f"study {study!r} does not exist in that storage; start it with mergesearch search"
        ) from e
    return space_of(s)


def space_of(s: optuna.Study) -> SearchSpace:
    """The space recorded in a study: its YAML as written, and where it was read from."""
    from .space import space_from_dict

    recorded = s.user_attrs.get("space") or {}
    if not recorded.get("raw"):
        raise MergeSearchError(
            f"study {s.study_name!r} was not created by mergesearch search (no space recorded)"
        )
    path = recorded.get("path")
    return space_from_dict(recorded["raw"], Path(path) if path else None)


def create_or_load(
    space: SearchSpace,
    study: str,
    storage_url: str | None,
    *,
    directions: list[str],
    objective_names: list[str],
) -> tuple[optuna.Study, bool]:
    """The study, and whether this call created it."""
    storage = open_storage(storage_url, study)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress bar says what happens
    fingerprint = space.fingerprint()
    try:
        s = optuna.create_study(study_name=study, storage=storage, directions=directions)
    except optuna.exceptions.DuplicatedStudyError:  # atomic: of racing processes, one creates
        existing = optuna.load_study(study_name=study, storage=storage)
        for _ in range(50):  # its creator may not have recorded the space yet
            if "space_fingerprint" in existing.user_attrs:
                break
            time.sleep(0.1)
        if existing.user_attrs.get("space_fingerprint") != fingerprint:
            raise MergeSearchError(
                f"study {study!r} already exists with a different search space; start a new one with "
                f"--study NEW_NAME (or delete {study_dir(study)} to start over)"
            ) from None
        return existing, False
    s.set_user_attr("space_fingerprint", fingerprint)
    s.set_user_attr("space", {"raw": space.raw, "path": str(space.path) if space.path else None})
    s.set_user_attr("objective_names", objective_names)
    s.set_user_attr("merge_seed", MERGE_SEED)
    with warnings.catch_warnings():  # metric names are "experimental"; the dashboard shows them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        s.set_metric_names(objective_names)
    from optuna_dashboard import save_note

    save_note(s, _study_note(space))
    return s, True


def _study_note(space: SearchSpace) -> str:
    """The study's page in optuna-dashboard: what is searched and how the parameters are named."""
    labels = space.input_labels()
    models = ", ".join(
        f"`{m}`" + (f" ({label})" if space.order != "sequential" else "")
        for m, label in zip(space.models, labels)
    )
    return "\n".join(
        [
            f"**{space.description or space.name}**",
            "",
            f"- base: `{space.base}`; models: {models}",
            f"- method: {', '.join(space.methods)}; order: {space.order}; granularity: {space.granularity}; "
            f"components: {', '.join(space.components)}",
            f"- tasks: {', '.join(space.tasks)} (objective: {space.objective})",
            "",
            "Parameter names read `weight[add].attention.L3`: the weight of model *add* for the attention "
            "tensors of layer 3 (`L0-4`: a block of layers; `other`: embeddings, norms and the head). "
            "Shared parameters have no model (`lambda.mlp.L3`); a sequential space's stages are prefixed "
            "(`stage2.weight[1]`: input 1 of stage 2, the next model). Trials whose user attribute `kind` "
            "is `known recipe: …` are baselines, not searched; each trial's recipe is its artifact "
            "`trial_N_recipe.yaml`.",
        ]
    )


def _record_task_splits(s: optuna.Study, splits: dict[str, dict]) -> None:
    """lm-eval tasks' document splits: recorded once, and every later run must see the same."""
    if not splits:
        return
    known = s.user_attrs.get("task_splits")
    if known is None:
        s.set_user_attr("task_splits", splits)
    elif known != splits:
        changed = sorted(k for k in splits if known.get(k) != splits[k])
        raise MergeSearchError(
            f"the documents of lm-eval task(s) {', '.join(changed)} are not split as when this study "
            "started (the task's data, split_seed or search_fraction changed); start a new study"
        )


def _dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    better = [(x >= y) if d == "maximize" else (x <= y) for x, y, d in zip(a, b, directions)]
    strictly = [(x > y) if d == "maximize" else (x < y) for x, y, d in zip(a, b, directions)]
    return all(better) and any(strictly)


def run_search(
    space: SearchSpace,
    *,
    study: str | None = None,
    storage: str | None = None,
    trials: int | None = None,
    timeout: float | None = None,
    sampler: str | None = None,
    seed: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    searcher: Searcher | None = None,
    cache_ranks: bool = False,
    worker: bool = False,
    set_budget: bool = False,
    gradient_seconds: float | None = None,
    log=lambda msg: None,
) -> optuna.Study:
    """Create or resume a study and run trials until its budget is used. `log` receives a line
    per phase before the first trial (loading, checking, the study's state).

    The budget (`trials`) is set when the study is created; a later `trials` that differs is
    refused unless `set_budget`, and a `worker`'s only says when that process stops. Everything
    that can be checked before the first trial is checked before the study is created.
    `gradient_seconds` (and the space's `gradient_steps`, whichever ends first): a new study first
    learns task-arithmetic coefficients by gradient on the search split (`gradient.py`) and
    enqueues them after the known recipes, as the search's warm start and the report's gradient
    reference.
    """
    study_name = study or space.name
    study_dir(study_name)  # a bad name fails before anything is loaded
    if trials is not None and trials < 1:
        raise MergeSearchError("--trials must be at least 1 (the study's total budget of trials)")
    if timeout is not None and not timeout > 0:
        raise MergeSearchError(f"--timeout {timeout}: seconds, more than 0")
    if seed is not None and not 0 <= seed < 2**32:
        raise MergeSearchError(f"--seed {seed}: a whole number from 0 to 2**32-1")
    if searcher is None:
        log(f"loading the base and {len(space.models)} models, tasks {', '.join(space.tasks)}")
        searcher = Searcher(space, device=device, cache_ranks=cache_ranks)
    multi = space.objective == "pareto" and len(searcher.tasks) > 1
    sampler_name = sampler or space.sampler
    _sampler(space, sampler_name, 0, multi, 1)  # refuse a sampler that cannot search this space
    log(f"checking the space: one merge per method ({', '.join(space.methods)}) and every task's records")
    searcher.validate()
    if gradient_seconds or space.gradient_steps:  # refused before the study exists, like the rest
        from .gradient import check

        check(searcher)
    names = [t.name for t in searcher.tasks] if multi else ["mean score"]
    directions = searcher.directions if multi else ["maximize"]
    s, created = create_or_load(space, study_name, storage, directions=directions, objective_names=names)
    _record_task_splits(s, searcher.task_splits)
    budget = s.user_attrs.get("trials")
    if created or budget is None:
        budget = trials or space.trials
        s.set_user_attr("trials", budget)
    elif trials is not None and trials != budget and not worker:
        if not set_budget:
            raise MergeSearchError(
                f"study {study_name!r} has a budget of {budget} trials, set when it was created; "
                f"--trials {trials} would change it for every worker. Omit --trials to resume, or add "
                f"--set-budget to make the budget {trials}"
            )
        budget = trials
        s.set_user_attr("trials", budget)
    target = trials if worker and trials is not None else budget
    # The first process of a new study uses the space's seed (a study is reproducible); any other
    # process (a resume, a second search, a worker) derives its own, so that it never proposes
    # the candidates another process already ran.
    base_seed = space.seed if seed is None else seed
    seed = base_seed if created else _process_seed(base_seed, s)
    s.sampler = _NoRepeats(_sampler(space, sampler_name, seed, multi, target), _worker_id())
    if not multi:
        s.pruner = optuna.pruners.PercentilePruner(50.0, n_startup_trials=8, n_warmup_steps=0)
    _fail_dead_trials(s)
    if created and space.baselines:
        _enqueue_baselines(s, searcher)
    if created and (gradient_seconds or space.gradient_steps):
        _enqueue_gradient(s, searcher, gradient_seconds, space.gradient_steps or None, log)
    artifacts = _artifact_store(study_name)
    objective = _Objective(searcher, s, multi, artifacts, seed)
    finished = _finished(s)
    todo = target - finished
    log(
        f"study {study_name}: {'created' if created else 'resumed'}, {finished} of {target} trials finished"
        + (f", {todo} to run" if todo > 0 else "")
    )
    if todo <= 0:
        return s
    done = s.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    bar = _Progress(
        todo,
        timeout or space.timeout,
        progress,
        best=max((float(np.mean(t.values)) for t in done), default=-math.inf),
    )
    failures = _Failures()

    def stop_at_budget(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        _fail_dead_trials(study)  # a killed worker's trial is released within one trial's time
        if _finished(study) >= target:
            study.stop()

    # Failed trials are reported by _Failures, not by Optuna's warning with a traceback per trial.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with interrupts.deferred():  # Ctrl-C stops the trial, never a storage write
            s.optimize(
                objective,
                n_trials=todo,
                timeout=timeout or space.timeout,
                callbacks=[bar, failures, stop_at_budget, interrupts.check],
                catch=(MergeSearchError,),
                gc_after_trial=False,
            )
    except Exception as e:
        # A full or read-only disk under the storage: Optuna's failure handling then fails too
        # and raises its own AssertionError; the OSError under it is what the user must see.
        cause = _os_error_within(e)
        if cause is None:
            raise
        if cause.filename is None:
            cause.filename = storage or str(study_dir(study_name) / "study.db")
        raise cause from None
    finally:
        bar.close()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    if failures.stopped:
        raise MergeSearchError(
            f"stopped after {failures.limit} trials in a row failed (trials {failures.numbers}); "
            f"the first error: {failures.first_error}"
        )
    return s


def _os_error_within(e: BaseException | None) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_seed(seed: int, s: optuna.Study) -> int:
    """A sampler seed for a process joining an existing study: derived from the study (its name
    and size), the host and the process, so that no two processes draw the same proposals."""
    import hashlib

    key = f"{seed}:{s.study_name}:{len(s.get_trials(deepcopy=False))}:{socket.gethostname()}:{os.getpid()}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


class _Failures:
    """Stops the study after `limit` failed trials in a row: a space that cannot produce a valid
    candidate should end the command with its error, not spend the budget."""

    def __init__(self, limit: int = 3) -> None:
        self.limit, self.numbers, self.stopped, self.first_error = limit, [], False, None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state != optuna.trial.TrialState.FAIL:
            self.numbers = []
            return
        if not self.numbers:
            self.first_error = trial.user_attrs.get("error", "(no message recorded)")
        self.numbers.append(trial.number)
        if len(self.numbers) >= self.limit:
            self.stopped = True
            study.stop()


def _finished(study: optuna.Study) -> int:
    return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))


def _artifact_store(study: str):
    from optuna.artifacts import FileSystemArtifactStore

    d = study_dir(study) / "artifacts"
    d.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(d))


def _enqueue_baselines(s: optuna.Study, searcher: Searcher) -> None:
    """Enqueue the known recipes the space can express, tagged, so they run first."""
    enq = {}
    for name in BASELINES:
        values = searcher.space.baseline_values(name, searcher.num_layers)
        if values is not None:
            s.enqueue_trial({k: v for k, v in values.items()}, user_attrs={"baseline": name})
            enq[name] = values
    s.set_user_attr("baselines_enqueued", list(enq))


def _enqueue_gradient(
    s: optuna.Study, searcher: Searcher, seconds: float | None, steps: int | None, log
) -> None:
    from .gradient import learn_coefficients

    budget = " and ".join(x for x in (seconds and f"{seconds:g}s", steps and f"{steps} steps") if x)
    log(f"learning task-arithmetic coefficients by gradient on the search split ({budget})")
    g = learn_coefficients(searcher, seconds=seconds, steps=steps, seed=searcher.space.seed, log=log)
    log(
        f"gradient: {g.steps} steps in {g.seconds:.0f}s, loss {g.losses[0]:.4f} → {g.losses[-1]:.4f}; enqueued"
    )
    s.enqueue_trial(
        g.values,
        user_attrs={"warm_start": "gradient", "gradient_steps": g.steps, "gradient_seconds": g.seconds},
    )


class _Midpoint:
    """A stand-in trial that answers every suggestion with a point inside its range."""

    def __init__(self, method: str) -> None:
        self.method = method

    def suggest_categorical(self, name: str, choices: list) -> Any:
        return self.method if name == "method" else choices[0]

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False, step=None) -> float:
        if step is not None:
            return low
        return math.sqrt(low * high) if log else (low + high) / 2


class _Objective:
    def __init__(self, searcher: Searcher, study: optuna.Study, multi: bool, artifacts, seed: int) -> None:
        self.s, self.study, self.multi, self.artifacts = searcher, study, multi, artifacts
        self.seed = seed
        self._anchor_cache: dict | None = None

    def __call__(self, trial: optuna.Trial):
        try:
            with interrupts.objective():
                return self._run(trial)
        except MergeSearchError as e:
            trial.set_user_attr("error", str(e))  # what _Failures reports
            raise

    def _run(self, trial: optuna.Trial):
        s = self.s
        trial.set_user_attr("worker", _worker_id())
        trial.set_user_attr("sampler_seed", self.seed)
        values = s.space.suggest(trial, s.num_layers)
        recipes = s.recipes(values)
        yaml_text = dump_recipes(recipes)
        trial.set_user_attr("recipe", yaml_text)
        if "weight_sum_max" in s.space.constraints:
            ws = [
                values[c.key]
                for c in s.space.coefficients(values["method"], s.num_layers)
                if c.param == "weight" and c.stage == 0
            ]
            n_models = len(s.model_paths)
            total = float(np.mean(ws)) * n_models if ws else 0.0
            trial.set_user_attr("weight_sum", total)
            trial.set_user_attr("feasible", total <= s.space.constraints["weight_sum_max"])
            if hasattr(trial, "set_constraint"):
                trial.set_constraint("weight_sum", total - s.space.constraints["weight_sum_max"])
        # The dashboard names an artifact by its file's name: the trial's, not a temporary one.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"trial_{trial.number}_recipe.yaml"
            path.write_text(yaml_text)
            optuna.artifacts.upload_artifact(
                artifact_store=self.artifacts,
                file_path=str(path),
                study_or_trial=trial,
                mimetype="application/yaml",
            )
        baseline = trial.user_attrs.get("baseline")
        kind = f"known recipe: {baseline}" if baseline else "searched"
        if trial.user_attrs.get("warm_start") == "gradient":
            kind = "gradient-learned (warm start)"
        trial.set_user_attr("kind", kind)
        if baseline:  # shown on the trial's page in optuna-dashboard
            from optuna_dashboard import save_note

            save_note(
                trial,
                f"**Known recipe: {baseline}**\n\nNot searched: enqueued before the search as a "
                "reference.\nThe report re-scores it on the test split beside the learned recipes.",
            )

        t0 = time.perf_counter()
        s.engine.write_into(s.model, recipes, seed=MERGE_SEED)
        merge_s = time.perf_counter() - t0
        trial.set_user_attr("merge_seconds", merge_s)
        if s.space.anchors:
            return self._anchor_fitness(trial)
        eval_s, scores, n = 0.0, {}, {}
        rungs = s.space.fidelity
        for r, limit in enumerate(rungs):
            t1 = time.perf_counter()
            results = {t.name: s.evaluator.evaluate(t, "search", limit) for t in s.tasks}
            eval_s += time.perf_counter() - t1
            scores = {k: v.value for k, v in results.items()}
            n = {k: v.n for k, v in results.items()}
            trial.set_user_attr("eval_seconds", eval_s)
            trial.set_user_attr("scores", scores)
            trial.set_user_attr("examples", n)
            trial.set_user_attr("fidelity", limit)
            unextracted = {
                k: v.extra["unextracted"] for k, v in results.items() if v.extra.get("unextracted")
            }
            if unextracted:  # outputs where the answer extraction found nothing (scored wrong)
                trial.set_user_attr("unextracted", unextracted)
            if r == len(rungs) - 1:
                break
            if self._stop_early(trial, scores, min(n.values())):
                trial.set_user_attr("stopped_at", limit)
                raise optuna.TrialPruned(f"cannot matter after {limit} examples per task")
        return self._result(scores)

    def _result(self, scores: dict[str, float]):
        return [scores[t.name] for t in self.s.tasks] if self.multi else self.s.objective_value(scores)

    def _anchor_fitness(self, trial: optuna.Trial):
        """Reference trials (the first `reference` of the study) on the whole search split, with
        their verdicts recorded; every later one on the anchors chosen from those verdicts."""
        s = self.s
        anchors = self._anchors()
        t1 = time.perf_counter()
        if anchors is None:
            limit = s.space.fidelity[-1]
            results = {t.name: s.evaluator.evaluate(t, "search", limit) for t in s.tasks}
            scores = {k: v.value for k, v in results.items()}
            trial.set_user_attr(
                "verdicts", {k: "".join("1" if x else "0" for x in v.scores) for k, v in results.items()}
            )
            trial.set_user_attr("fitness", "reference")
        else:
            from .evaluation.anchors import estimate

            results = {
                t.name: s.evaluator.evaluate(t, "search", indices=anchors[t.name]["indices"]) for t in s.tasks
            }
            scores = {k: estimate(v.scores, anchors[k]["weights"]) for k, v in results.items()}
            trial.set_user_attr("fitness", "anchors")
        trial.set_user_attr("eval_seconds", time.perf_counter() - t1)
        trial.set_user_attr("scores", scores)
        trial.set_user_attr("examples", {k: v.n for k, v in results.items()})
        trial.set_user_attr("fidelity", max(v.n for v in results.values()))
        return self._result(scores)

    def _anchors(self) -> dict | None:
        """The study's anchors, chosen and recorded once `reference` trials scored on the whole
        search split have completed (the first ones by number, so racing workers agree); None
        until then."""
        from .evaluation.anchors import choose_anchors

        if self._anchor_cache is not None:  # fixed once chosen: no storage read per trial
            return self._anchor_cache
        attrs = self.study.user_attrs
        if "anchors" in attrs:
            self._anchor_cache = attrs["anchors"]
            return self._anchor_cache
        want = self.s.space.anchors["reference"]
        ref = [
            t
            for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs.get("fitness") == "reference"
        ]
        if len(ref) < want:
            return None
        ref = sorted(ref, key=lambda t: t.number)[:want]
        out = {}
        for task in self.s.tasks:
            correct = np.array([[c == "1" for c in t.user_attrs["verdicts"][task.name]] for t in ref])
            idx, w = choose_anchors(correct, self.s.space.anchors["per_task"], seed=self.s.space.seed)
            out[task.name] = {"indices": idx, "weights": w}
        self.study.set_user_attr("anchors", out)
        self.study.set_user_attr("anchor_reference_trials", [t.number for t in ref])
        self._anchor_cache = out
        return out

    def _stop_early(self, trial: optuna.Trial, scores: dict[str, float], n: int) -> bool:
        if not self.multi:  # Optuna's pruner on the mean score at this fidelity
            value = self.s.objective_value(scores)
            trial.report(value, step=n)
            return trial.should_prune()
        # Several objectives (Optuna cannot prune these): stop when a finished trial beats this
        # candidate's optimistic bound (score + 2·sqrt(1/4n), Hoeffding-style) on every task.
        margin = 2 * math.sqrt(0.25 / n)
        dirs = self.study.directions
        bound = [
            scores[t.name] + (margin if d == optuna.study.StudyDirection.MAXIMIZE else -margin)
            for t, d in zip(self.s.tasks, dirs)
        ]
        dnames = ["maximize" if d == optuna.study.StudyDirection.MAXIMIZE else "minimize" for d in dirs]
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if _dominates(list(t.values), bound, dnames):
                return True
        return False


class _Progress:
    """A progress bar over trials with the best mean score so far and the time left."""

    def __init__(self, total: int, timeout: float | None, enabled: bool, best: float = -math.inf) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="trials", unit="trial", disable=not enabled)
        self.best = best  # over the whole study: a resume starts from the trials already run
        self.t0 = time.perf_counter()
        self.timeout = timeout

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            self.best = max(self.best, float(np.mean(trial.values)))
        post = {"best mean": f"{self.best:.3f}" if self.best > -math.inf else "-"}
        a = trial.user_attrs
        if "merge_seconds" in a:  # the last trial's cost: what a user tunes fidelity against
            n = sum((a.get("examples") or {}).values())
            post["last"] = f"merge {a['merge_seconds']:.1f}s eval {a.get('eval_seconds', 0):.1f}s {n} ex"
        if self.timeout:
            post["time left"] = f"{max(0, self.timeout - (time.perf_counter() - self.t0)):.0f}s"
        self.bar.set_postfix(post)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

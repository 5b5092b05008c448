"""The search loop: create or resume the study, seed it, and run trials until its budget is used,
with a progress bar, a stop after repeated failures, and Ctrl-C that never lands in a storage write."""

from __future__ import annotations

import math
import time
import warnings

import optuna

from ..errors import MergeSearchError
from . import interrupts
from .bench import Bench, Resolver, resolve_folder
from .convergence import GENERATIONS, Convergence, Patience, convergence
from .objective import Objective
from .samplers import NoRepeats, generation_size, make_sampler, process_seed, resolved, worker_id
from .space import SearchSpace
from .storage import artifact_store, os_error_within, study_dir
from .studies import (
    create_or_load,
    enqueue_gradient,
    enqueue_known_recipes,
    fail_dead_trials,
    finished,
    record_task_splits,
)
from .trials import ELITE, SCREENED_FITNESS, StudyAttr, TrialRecord, enqueued, records

State = optuna.trial.TrialState


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
    bench: Bench | None = None,
    resolve: Resolver = resolve_folder,
    cache_ranks: bool = False,
    placement: str | None = None,
    worker: bool = False,
    set_budget: bool = False,
    gradient_seconds: float | None = None,
    patience: Patience | int | None = None,
    warm_starts: list[dict] | None = None,
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
    reference. `resolve` turns the space's model references into folders when no `bench` is given
    (folders only by default; the CLI and the demo pass `sources.resolve_model`, which knows the zoos).
    `placement`: where the inputs live (`candidates/placement.py`), over the space's key; `auto`
    chooses from free memory, and the choice is logged and recorded on every trial.
    `patience` (over the space's; 0 = off; trials, or `Patience(n, "generations")`): stop once the
    study has converged (`convergence.py`): no gain beyond the noise in that many finished trials
    or sampler generations, whichever comes first of it, the budget and the timeout; the rule in
    trials is stored on the study (`StudyAttr.PATIENCE`) for the CLI and the report.
    `warm_starts`: points a new study runs first, after the known recipes (the previous round's
    best elite, `rounds.py`).
    """
    study_name = study or space.name
    study_dir(study_name)  # a bad name fails before anything is loaded
    if trials is not None and trials < 1:
        raise MergeSearchError("--trials must be at least 1 (the study's total budget of trials)")
    if timeout is not None and not timeout > 0:
        raise MergeSearchError(f"--timeout {timeout}: seconds, more than 0")
    if seed is not None and not 0 <= seed < 2**32:
        raise MergeSearchError(f"--seed {seed}: a whole number from 0 to 2**32-1")
    if bench is None:
        log(f"loading the base and {len(space.models)} models, tasks {', '.join(space.tasks)}")
        bench = Bench(
            space, device=device, cache_ranks=cache_ranks, resolve=resolve, placement=placement, log=log
        )
    multi = space.objective == "pareto" and len(bench.tasks) > 1
    sampler_name = sampler or space.sampler
    make_sampler(space, sampler_name, 0, multi, 1)  # refuse a sampler that cannot search this space
    log(f"checking the space: one merge per method ({', '.join(space.methods)}) and every task's records")
    bench.validate()
    if gradient_seconds or space.gradient_steps:  # refused before the study exists, like the rest
        from .gradient import check

        check(bench)
    patience_rule(
        space, bench, sampler_name, multi, trials or space.trials, patience
    )  # refused now, not later
    names = [t.name for t in bench.tasks] if multi else ["mean score"]
    directions = bench.directions if multi else ["maximize"]
    s, created = create_or_load(space, study_name, storage, directions=directions, objective_names=names)
    record_task_splits(s, bench.task_splits)
    if created:  # what each reference meant here: reports write zoo models by their reference
        s.set_user_attr(StudyAttr.MODEL_FOLDERS, bench.folders)
        # which search examples the verdicts are on: a later study compares only with the same
        s.set_user_attr(StudyAttr.SEARCH_SPLITS, bench.split_fingerprints())
    target = _target(s, created, space.trials, trials, worker, set_budget)
    # The first process of a new study uses the space's seed (a study is reproducible); any other
    # process (a resume, a second search, a worker) derives its own, so that it never proposes
    # the candidates another process already ran.
    base_seed = space.seed if seed is None else seed
    seed = base_seed if created else process_seed(base_seed, s)
    s.sampler = NoRepeats(make_sampler(space, sampler_name, seed, multi, target), worker_id())
    if not multi:
        s.pruner = optuna.pruners.PercentilePruner(50.0, n_startup_trials=8, n_warmup_steps=0)
    fail_dead_trials(s)
    if created and space.baselines:
        enqueue_known_recipes(s, bench)
    for values in (warm_starts or []) if created else []:  # a resumed study has them already
        s.enqueue_trial(values, user_attrs=enqueued(warm_start=ELITE))
    if created and (gradient_seconds or space.gradient_steps):
        enqueue_gradient(s, bench, gradient_seconds, space.gradient_steps or None, log)
    objective = Objective(bench, s, multi, artifact_store(study_name), seed)
    done = finished(s)
    todo = target - done
    log(
        f"study {study_name}: {'created' if created else 'resumed'}, {done} of {target} trials finished"
        + (f", {todo} to run" if todo > 0 else "")
    )
    if todo <= 0:
        return s
    rule = patience_rule(space, bench, sampler_name, multi, target, patience)
    s.set_user_attr(StudyAttr.PATIENCE, rule)
    watch = Watch(rule["trials"], space, rule["rule"])
    watch(s)
    if watch.converged:
        log(
            f"study {study_name}: {watch.state.line()}; nothing to run (--patience 0 runs it on to its budget)"
        )
        return s
    bar = Progress(
        todo,
        timeout or space.timeout,
        progress,
        watch=watch,
        best=max(
            (t.mean for t in records(s, (State.COMPLETE,)) if t.fitness != SCREENED_FITNESS),
            default=-math.inf,
        ),
    )
    _optimize(
        s,
        objective,
        todo,
        target,
        timeout or space.timeout,
        bar,
        watch,
        storage or str(study_dir(study_name) / "study.db"),
    )
    return s


def _target(
    s: optuna.Study, created: bool, default: int, trials: int | None, worker: bool, set_budget: bool
) -> int:
    """How many finished trials this process runs the study to: the study's budget (set when it is
    created; changed only with `set_budget`), or a worker's own `trials`."""
    budget = s.user_attrs.get(StudyAttr.BUDGET)
    if created or budget is None:
        budget = trials or default
        s.set_user_attr(StudyAttr.BUDGET, budget)
    elif trials is not None and trials != budget and not worker:
        if not set_budget:
            raise MergeSearchError(
                f"study {s.study_name!r} has a budget of {budget} trials, set when it was created; "
                f"--trials {trials} would change it for every worker. Omit --trials to resume, or add "
                f"--set-budget to make the budget {trials}"
            )
        budget = trials
        s.set_user_attr(StudyAttr.BUDGET, budget)
    return trials if worker and trials is not None else budget


def _optimize(
    s: optuna.Study,
    objective: Objective,
    todo: int,
    target: int,
    timeout,
    bar: Progress,
    watch: Watch,
    where: str,
) -> None:
    """Optuna's loop with our callbacks: progress, a stop after repeated failures, a stop at the
    budget (shared by every worker), Ctrl-C between storage writes. `where` names the storage in
    a disk error."""
    failures = Failures()

    def stop_at_budget(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        fail_dead_trials(study)  # a killed worker's trial is released within one trial's time
        if finished(study) >= target or watch.converged:
            study.stop()

    # Failed trials are reported by Failures, not by Optuna's warning with a traceback per trial.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with interrupts.deferred():  # Ctrl-C stops the trial, never a storage write
            s.optimize(
                objective,
                n_trials=todo,
                timeout=timeout,
                callbacks=[watch, bar, GradientVerdict(_warn), failures, stop_at_budget, interrupts.check],
                catch=(MergeSearchError,),
                gc_after_trial=False,
            )
    except Exception as e:
        # A full or read-only disk under the storage: Optuna's failure handling then fails too
        # and raises its own AssertionError; the OSError under it is what the user must see.
        cause = os_error_within(e)
        if cause is None:
            raise
        if cause.filename is None:
            cause.filename = where
        raise cause from None
    finally:
        bar.close()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    if failures.stopped:
        raise MergeSearchError(
            f"stopped after {failures.limit} trials in a row failed (trials {failures.numbers}); "
            f"the first error: {failures.first_error}"
        )


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=2)  # one line on stderr from the CLI, even with -q


class GradientVerdict:
    """Once the gradient's warm start is scored: a warning when it did not beat the best known
    recipe on the search split (a teacher-forced loss can fall while generated answers get worse:
    docs/design.md, "When the search earns its place"), so nobody builds on it unawares."""

    def __init__(self, warn) -> None:
        self.warn, self.done = warn, False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        t = TrialRecord.of(trial)
        if self.done or not t.is_gradient or not t.state.is_finished():
            return
        self.done = True
        known = [r for r in records(study, (State.COMPLETE,)) if r.baseline and r.fitness != SCREENED_FITNESS]
        best = max(known, key=lambda r: r.mean, default=None)
        whole = t.complete and t.fitness != SCREENED_FITNESS
        if best is None or (whole and t.mean > best.mean):
            return
        got = (
            f"{t.mean:.3f}" + ("" if whole else " (a screen's estimate: not confirmed)")
            if t.values
            else "no score"
        )
        self.warn(
            f"gradient: its point (trial {t.number}, search mean {got}) did not beat the known recipe "
            f"{best.baseline} ({best.mean:.3f}) on the search split; the gradient did not help on these "
            "tasks: use the search's best, not the gradient's point (centre: best starts CMA-ES there)"
        )


class Failures:
    """Stops the study after `limit` failed trials in a row: a space that cannot produce a valid
    candidate should end the command with its error, not spend the budget."""

    def __init__(self, limit: int = 3) -> None:
        self.limit, self.numbers, self.stopped, self.first_error = limit, [], False, None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state != State.FAIL:
            self.numbers = []
            return
        if not self.numbers:
            self.first_error = TrialRecord.of(trial).error or "(no message recorded)"
        self.numbers.append(trial.number)
        if len(self.numbers) >= self.limit:
            self.stopped = True
            study.stop()


def patience_rule(
    space: SearchSpace, bench: Bench, sampler: str, multi: bool, target: int, patience: Patience | int | None
) -> dict:
    """The patience in finished trials (`Patience.trials`) and as stated: {"trials", "rule"}."""
    p = space.patience if patience is None else patience
    p = Patience(p) if isinstance(p, int) else p
    dims = sum(len(space.coefficients(m, bench.num_layers)) for m in space.methods)
    generation = generation_size(space, sampler, multi, dims, target)
    n = p.trials(generation, resolved(space, sampler, multi))
    rule = f"{p} of {generation} trials" if p.unit == GENERATIONS and p.count else ""
    return {"trials": n, "rule": rule}


class Watch:
    """After each trial, whether the study has converged (`convergence.py`; nothing with patience 0)."""

    def __init__(self, patience: int, space: SearchSpace, rule: str = "") -> None:
        self.patience, self.rule = patience, rule
        self.weights = dict(space.task_weights) if space.objective == "mean" else None
        self.state: Convergence | None = None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial | None = None) -> None:
        if self.patience:
            self.state = convergence(records(study), self.patience, self.weights, self.rule)

    @property
    def converged(self) -> bool:
        return self.state is not None and self.state.converged


class Progress:
    """A progress bar over trials with the best mean score so far, the trials since the last gain
    beyond the noise (with a patience, from `watch`) and the time left."""

    def __init__(
        self,
        total: int,
        timeout: float | None,
        enabled: bool,
        best: float = -math.inf,
        watch: Watch | None = None,
    ) -> None:
        from tqdm.auto import tqdm

        self.watch = watch
        self.bar = tqdm(total=total, desc="trials", unit="trial", disable=not enabled)
        self.best = best  # over the whole study: a resume starts from the trials already run
        self.t0 = time.perf_counter()
        self.timeout = timeout

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        t = TrialRecord.of(trial)
        if t.complete and t.fitness != SCREENED_FITNESS:  # an estimate is never the best
            self.best = max(self.best, t.mean)
        post = {"best mean": f"{self.best:.3f}" if self.best > -math.inf else "-"}
        if t.merge_seconds is not None:  # the last trial's cost: what a user tunes fidelity against
            n = sum(t.examples.values())
            post["last"] = f"merge {t.merge_seconds:.1f}s eval {t.eval_seconds or 0:.1f}s {n} ex" + (
                f" {t.fitness}" if t.fitness else ""
            )
        if self.watch is not None and self.watch.state is not None:  # how close to converging
            post["no gain"] = f"{min(self.watch.state.since, self.watch.patience)}/{self.watch.patience}"
        if self.timeout:
            post["time left"] = f"{max(0, self.timeout - (time.perf_counter() - self.t0)):.0f}s"
        self.bar.set_postfix(post)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

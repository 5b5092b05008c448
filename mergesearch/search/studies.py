"""The Optuna study of a search: created once with its space recorded (so workers and reports
read the space from the storage), resumed, joined by other processes, and seeded with the known
recipes and the gradient's warm start before the search proper."""

from __future__ import annotations

import os
import socket
import time
import warnings
from pathlib import Path

import optuna

from ..errors import MergeSearchError
from .bench import MERGE_SEED, Bench
from .known_recipes import BASELINES, baseline_values
from .space import SearchSpace
from .space_file import space_from_dict
from .storage import open_storage, study_dir
from .trials import GRADIENT, StudyAttr, enqueued, stored

State = optuna.trial.TrialState


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
    recorded = s.user_attrs.get(StudyAttr.SPACE) or {}
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
            if StudyAttr.FINGERPRINT in existing.user_attrs:
                break
            time.sleep(0.1)
        if existing.user_attrs.get(StudyAttr.FINGERPRINT) != fingerprint:
            raise MergeSearchError(
                f"study {study!r} already exists with a different search space; start a new one with "
                f"--study NEW_NAME (or delete {study_dir(study)} to start over)"
            ) from None
        return existing, False
    s.set_user_attr(StudyAttr.FINGERPRINT, fingerprint)
    s.set_user_attr(StudyAttr.SPACE, {"raw": space.raw, "path": str(space.path) if space.path else None})
    s.set_user_attr(StudyAttr.OBJECTIVE_NAMES, objective_names)
    s.set_user_attr(StudyAttr.MERGE_SEED, MERGE_SEED)
    with warnings.catch_warnings():  # metric names are "experimental"; the dashboard shows them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        s.set_metric_names(objective_names)
    from optuna_dashboard import save_note

    save_note(s, study_note(space))
    return s, True


def study_note(space: SearchSpace) -> str:
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


def record_task_splits(s: optuna.Study, splits: dict[str, dict]) -> None:
    """lm-eval tasks' document splits: recorded once, and every later run must see the same."""
    if not splits:
        return
    known = s.user_attrs.get(StudyAttr.TASK_SPLITS)
    if known is None:
        s.set_user_attr(StudyAttr.TASK_SPLITS, splits)
    elif known != splits:
        changed = sorted(k for k in splits if known.get(k) != splits[k])
        raise MergeSearchError(
            f"the documents of lm-eval task(s) {', '.join(changed)} are not split as when this study "
            "started (the task's data, split_seed or search_fraction changed); start a new study"
        )


def fail_dead_trials(study: optuna.Study) -> int:
    """Trials left RUNNING by a killed worker on this host are marked FAIL, so resuming is clean."""
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(State.RUNNING,)):
        worker = stored(t, "worker", "")
        h, _, pid = worker.rpartition(":")
        if h == host and pid.isdigit() and not _alive(int(pid)):
            # Another live process may release it at the same moment: finished is fine.
            study.tell(t.number, state=State.FAIL, skip_if_finished=True)
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


def finished(study: optuna.Study) -> int:
    return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))


def enqueue_known_recipes(s: optuna.Study, bench: Bench) -> None:
    """Enqueue the known recipes the space can express, tagged, so they run first."""
    enq = {}
    for name in BASELINES:
        values = baseline_values(bench.space, name, bench.num_layers)
        if values is not None:
            s.enqueue_trial({k: v for k, v in values.items()}, user_attrs=enqueued(baseline=name))
            enq[name] = values
    s.set_user_attr(StudyAttr.BASELINES_ENQUEUED, list(enq))


def enqueue_gradient(s: optuna.Study, bench: Bench, seconds: float | None, steps: int | None, log) -> None:
    from .gradient import learn_coefficients

    budget = " and ".join(x for x in (seconds and f"{seconds:g}s", steps and f"{steps} steps") if x)
    log(f"learning task-arithmetic coefficients by gradient on the search split ({budget})")
    g = learn_coefficients(bench, seconds=seconds, steps=steps, seed=bench.space.seed, log=log)
    log(
        f"gradient: {g.steps} steps in {g.seconds:.0f}s, loss {g.losses[0]:.4f} → {g.losses[-1]:.4f}; enqueued"
    )
    s.enqueue_trial(
        g.values,
        user_attrs=enqueued(warm_start=GRADIENT, gradient_steps=g.steps, gradient_seconds=g.seconds),
    )

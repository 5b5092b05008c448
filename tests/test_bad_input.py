"""A battery of bad inputs: each exits 2 with one line naming what is wrong, and leaves nothing behind.

Each case prepares files under tmp_path and returns the command line; the CLI runs in this process
(a subprocess per case would cost minutes). After the call, no file under tmp_path may have been
created or changed: no study, journal, results folder, temporary file or partial output.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from mergesearch.cli import main
from mergesearch.search import storage as study_mod
from tests.tiny_models import make_base, make_finetune

ROOT = Path(__file__).resolve().parents[1]
SPACE = {
    "name": "bad",
    "base": "zoo:base",
    "models": ["zoo:add", "zoo:reverse"],
    "method": "task_arithmetic",
    "granularity": "model",
    "parameters": {"weight": [0.0, 1.5]},
    "tasks": ["add"],
    "objective": "mean",
    "fidelity": [20],
    "trials": 3,
}
TASK = {
    "name": "mytask",
    "metric": "exact_match",
    "data_files": {"search": "s.jsonl", "test": "t.jsonl"},
    "prompt": "{q}",
    "target": "{a}",
}
RECORDS = [{"q": f"{i}+1=", "a": str(i + 1)} for i in range(30)]


def space(tmp: Path, **over) -> str:
    d = {k: v for k, v in {**SPACE, **over}.items() if v is not None}
    p = tmp / "space.yaml"
    p.write_text(yaml.safe_dump(d, allow_unicode=True))
    return str(p)


def task(tmp: Path, records=RECORDS, test=None, **over) -> str:
    """A task file with its own data; returns the task file's path (usable in a space's tasks)."""
    d = {k: v for k, v in {**TASK, **over}.items() if v is not None}
    (tmp / "mytask.yaml").write_text(yaml.safe_dump(d))
    for name, recs in (
        ("s.jsonl", records),
        ("t.jsonl", test or [{"q": f"{i}+2=", "a": "x"} for i in range(9)]),
    ):
        data = recs if isinstance(recs, (str, bytes)) else "".join(json.dumps(r) + "\n" for r in recs)
        (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(tmp / "mytask.yaml")


def search(tmp: Path, *extra, **over) -> list[str]:
    return ["search", space(tmp, **over), "-q", "--device", "cpu", *extra]


def choice_search(tmp: Path, records: list[dict]) -> list[str]:
    """A multiple-choice task (choices in field c, label in field l) with these search records."""
    test = [{"q": "2+2=", "c": ["4", "5"], "l": 0}]
    mc = {"metric": "multiple_choice", "target": None, "choices": "c", "label": "l"}
    return search(tmp, tasks=[task(tmp, records=records, test=test, **mc)])


def task_search(tmp: Path, **task_over) -> list[str]:
    return search(tmp, tasks=[task(tmp, **task_over)])


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory) -> dict[str, str]:
    """Models that cannot be merged with each other in a given way (tiny, random weights)."""
    root = tmp_path_factory.mktemp("odd")
    base = make_base(root / "base", "llama", layers=3)
    out = {
        "base": base,
        "ft": make_finetune(base, root / "ft", 1),
        "ft2": make_finetune(base, root / "ft2", 2),
        "layers2": make_base(root / "layers2", "llama", layers=2, seed=3),
        "hidden32": make_base(root / "hidden32", "llama", hidden=32, seed=4),
        "gpt2": make_base(root / "gpt2", "gpt2", seed=5),
    }
    return {k: str(v) for k, v in out.items()}


# (id, how to build the command under tmp_path, what the one line must say)
CASES: list[tuple[str, Callable, str]] = [
    # -- the space file ------------------------------------------------------------------------
    ("space missing", lambda t: ["search", str(t / "nope.yaml")], "does not exist"),
    ("space is a folder", lambda t: ["search", str(t)], "is a folder"),
    (
        "space binary",
        lambda t: ["search", _write(t / "s.yaml", b"\x89PNG\r\n\x1a\n\xff\xfe\x00")],
        "not a UTF-8",
    ),
    (
        "space latin-1",
        lambda t: ["search", _write(t / "s.yaml", "name: caf\xe9\n".encode("latin-1"))],
        "not a UTF-8",
    ),
    ("space not yaml", lambda t: ["search", _write(t / "s.yaml", b"a: [1, 2\n")], "not valid YAML"),
    ("space a list", lambda t: ["search", _write(t / "s.yaml", b"- a\n- b\n")], "expected a mapping"),
    ("unknown key", lambda t: search(t, wieght=1), "unknown key 'wieght'"),
    ("missing base", lambda t: search(t, base=None), "missing key 'base'"),
    ("models a string", lambda t: search(t, models="zoo:add"), "models: a list"),
    ("models one", lambda t: search(t, models=["zoo:add"]), "at least two"),
    ("models numbers", lambda t: search(t, models=[1, 2]), "models: a list"),
    ("tasks a string", lambda t: search(t, tasks="add"), "tasks: a list"),
    ("tasks empty", lambda t: search(t, tasks=[]), "tasks: a list"),
    ("unknown task", lambda t: search(t, tasks=["addd"]), "unknown task 'addd'"),
    ("unknown method", lambda t: search(t, method="tiez"), "tiez"),
    ("unknown placement", lambda t: search(t, placement="gpu"), "placement 'gpu': where the inputs live"),
    ("placement flag", lambda t: search(t) + ["--placement", "ram"], "invalid choice: 'ram'"),
    ("method a number", lambda t: search(t, method=3), "method"),
    ("parameters a list", lambda t: search(t, parameters=["weight"]), "parameters: a mapping"),
    ("range of strings", lambda t: search(t, parameters={"weight": ["a", 1]}), "parameters.weight"),
    ("range nan", lambda t: search(t, parameters={"weight": [float("nan"), 1.0]}), "finite"),
    ("range inf", lambda t: search(t, parameters={"weight": [0.0, float("inf")]}), "finite"),
    ("range inverted", lambda t: search(t, parameters={"weight": [1.0, 0.0]}), "inverted range"),
    ("range three", lambda t: search(t, parameters={"weight": [0, 1, 2]}), "parameters.weight"),
    ("step zero", lambda t: search(t, parameters={"weight": {"low": 0, "high": 1, "step": 0}}), "step"),
    (
        "density above 1",
        lambda t: search(t, method="ties", parameters={"weight": [0, 1], "density": [0.5, 2]}),
        "[0, 1]",
    ),
    ("log from 0", lambda t: search(t, parameters={"weight": {"low": 0, "high": 1, "log": True}}), "log"),
    ("trials a string", lambda t: search(t, trials="many"), "trials"),
    ("trials fractional", lambda t: search(t, trials=2.5), "trials"),
    ("trials zero", lambda t: search(t, trials=0), "trials"),
    ("fidelity string", lambda t: search(t, fidelity=["x"]), "fidelity"),
    ("fidelity decreasing", lambda t: search(t, fidelity=[50, 20]), "fidelity"),
    ("fidelity above split", lambda t: search(t, fidelity=[20, 5000]), "5000"),
    ("granularity", lambda t: search(t, granularity="block:0"), "granularity"),
    ("components", lambda t: search(t, components=["attn"]), "components"),
    ("order", lambda t: search(t, order="random"), "order"),
    ("objective", lambda t: search(t, objective="max"), "objective"),
    ("sampler", lambda t: search(t, sampler="bayes"), "sampler"),
    (
        "cmaes with methods",
        lambda t: search(
            t,
            sampler="cmaes",
            method=["ties", "task_arithmetic"],
            parameters={"weight": [0, 1], "density": [0.2, 1]},
        ),
        "cmaes",
    ),
    ("seed negative", lambda t: search(t, seed=-1), "seed"),
    ("seed string", lambda t: search(t, seed="x"), "seed"),
    ("timeout negative", lambda t: search(t, timeout=-5), "timeout"),
    ("timeout string", lambda t: search(t, timeout="soon"), "timeout"),
    ("task_weights a list", lambda t: search(t, task_weights=[1, 2]), "task_weights"),
    ("task_weights unknown task", lambda t: search(t, task_weights={"reverse": 2}), "task_weights"),
    ("task_weights negative", lambda t: search(t, task_weights={"add": -1}), "task_weights"),
    ("constraints unknown", lambda t: search(t, constraints={"max_norm": 1}), "constraints"),
    ("anchors bad", lambda t: search(t, anchors={"per_task": 0, "reference": 2}), "anchors"),
    ("dtype float8", lambda t: search(t, dtype="float8"), "dtype"),
    ("baselines a string", lambda t: search(t, baselines="maybe"), "baselines"),
    ("name with slash", lambda t: search(t, name="a/b"), "plain name"),
    ("model missing", lambda t: search(t, models=["zoo:add", "nowhere"]), "nowhere"),
    ("zoo model unknown", lambda t: search(t, models=["zoo:add", "zoo:nothing"]), "zoo:nothing"),
    # -- models that cannot be merged in this recipe --------------------------------------------
    ("architectures differ", lambda t: ODD(t, "ft", "gpt2"), "gpt2"),
    ("layer counts differ", lambda t: ODD(t, "ft", "layers2"), "layers2"),
    ("hidden sizes differ", lambda t: ODD(t, "ft", "hidden32"), "shapes differ"),
    (
        "slerp of three",
        lambda t: ODD(t, "ft", "ft2", "base", method="slerp", parameters={"t": [0, 1]}),
        "slerp",
    ),
    # -- flags ------------------------------------------------------------------------------------
    ("--trials zero", lambda t: search(t, "--trials", "0"), "--trials"),
    ("--seed negative", lambda t: search(t, "--seed", "-3"), "--seed"),
    ("--timeout negative", lambda t: search(t, "--timeout", "-1"), "--timeout"),
    (
        "eval --limit negative",
        lambda t: ["eval", str(ZOO["add"]), "--tasks", "add", "--limit", "-5", "--device", "cpu"],
        "--limit",
    ),
    (
        "eval split",
        lambda t: ["eval", str(ZOO["add"]), "--tasks", "add", "--split", "train", "--device", "cpu"],
        "split",
    ),
    (
        "eval model missing",
        lambda t: ["eval", str(t / "m"), "--tasks", "add", "--device", "cpu"],
        "does not exist",
    ),
    (
        "merge --seed negative",
        lambda t: ["merge", _recipe(t), str(t / "out"), "--seed", "-1", "-q"],
        "--seed",
    ),
    # -- storages -------------------------------------------------------------------------------
    (
        "sqlite folder missing",
        lambda t: search(t, "--storage", f"sqlite:///{t}/no/such/dir/x.db"),
        "no/such/dir",
    ),
    ("storage scheme", lambda t: search(t, "--storage", "notadb://x/y"), "cannot be opened"),
    ("report of no study", lambda t: ["report", "ghost", "-q", "--device", "cpu"], "ghost"),
    ("export of no study", lambda t: ["export", "ghost"], "ghost"),
    ("export from a missing journal", lambda t: ["export", "ghost", "--storage", str(t / "j.log")], "j.log"),
    (
        "worker on a missing journal",
        lambda t: ["worker", "--study", "ghost", "--storage", str(t / "j.log"), "-q", "--device", "cpu"],
        "j.log",
    ),
    ("dashboard of no study", lambda t: ["dashboard", "ghost"], "ghost"),
    (
        "report of a study with no completed trial",
        lambda t: ["report", _empty_study(t), "-q", "--device", "cpu"],
        "no completed trial",
    ),
    ("sqlite study missing", lambda t: ["export", "ghost", "--storage", f"sqlite:///{t}/x.db"], "x.db"),
    # -- tasks ------------------------------------------------------------------------------------
    ("record lacks the prompt field", lambda t: task_search(t, records=[*RECORDS, {"a": "1"}]), "'q'"),
    ("record with a null field", lambda t: task_search(t, records=[*RECORDS, {"q": None, "a": "1"}]), "'q'"),
    ("whitespace-only split", lambda t: task_search(t, records="   \n\n  \n"), "s.jsonl"),
    (
        "non-UTF-8 data",
        lambda t: task_search(t, records='{"q": "caf\xe9", "a": "1"}\n'.encode("latin-1")),
        "s.jsonl",
    ),
    ("fewshot above split", lambda t: task_search(t, fewshot=40), "fewshot"),
    ("fewshot a string", lambda t: task_search(t, fewshot="two"), "fewshot"),
    ("shuffle_seed a string", lambda t: task_search(t, shuffle_seed="x"), "shuffle_seed"),
    (
        "label out of range",
        lambda t: choice_search(
            t,
            [{"q": f"{i}=", "c": ["2", "3"], "l": i % 2} for i in range(29)]
            + [{"q": "x", "c": ["2", "3"], "l": 2}],
        ),
        "label",
    ),
    (
        "label not a number",
        lambda t: choice_search(t, [{"q": f"{i}=", "c": ["2", "3"], "l": "first"} for i in range(20)]),
        "label",
    ),
    ("task file a list", lambda t: search(t, tasks=[_write(t / "tl.yaml", b"- 1\n")]), "expected a mapping"),
    # -- silent paths closed (issue 25, item 8) ------------------------------------------------------
    (
        "space key given twice",
        lambda t: ["search", _write(t / "s.yaml", Path(space(t)).read_bytes() + b"method: ties\n")],
        "key 'method' is given twice",
    ),
    (
        "recipe key given twice",
        lambda t: [
            "merge",
            _write(t / "r.yaml", Path(_recipe(t)).read_bytes() + b"merge_method: ties\n"),
            str(t / "out"),
        ],
        "key 'merge_method' is given twice",
    ),
    ("eval tasks a comma", lambda t: ["eval", str(ZOO["add"]), "--tasks", ","], "names no task"),
    ("sequential of two", lambda t: search(t, order="sequential"), "sequential with two models"),
    ("export a failed trial", lambda t: ["export", _failed_study(t), "--trial", "0"], "failed"),
]

ZOO: dict[str, Path] = {}
ODD_MODELS: dict[str, str] = {}


def ODD(t: Path, *names, method="task_arithmetic", **over):
    return search(t, base=ODD_MODELS["base"], models=[ODD_MODELS[n] for n in names], method=method, **over)


def _empty_study(t: Path) -> str:
    """A study created by search whose only trial failed: nothing to report yet."""
    import optuna

    d = t / "results" / "empty"
    d.mkdir(parents=True)
    s = optuna.create_study(study_name="empty", storage=f"sqlite:///{d / 'study.db'}")
    s.set_user_attr("space", {"raw": dict(SPACE, name="empty"), "path": None})
    s.tell(s.ask(), state=optuna.trial.TrialState.FAIL)
    return "empty"


def _failed_study(t: Path) -> str:
    """A study whose trial 0 has a recipe and failed (its merge raised)."""
    import optuna

    d = t / "results" / "failed"
    d.mkdir(parents=True)
    s = optuna.create_study(study_name="failed", storage=f"sqlite:///{d / 'study.db'}")
    s.set_user_attr("space", {"raw": dict(SPACE, name="failed"), "path": None})
    trial = s.ask()
    trial.set_user_attr("recipe", Path(_recipe(t)).read_text())
    trial.set_user_attr("error", "the models cannot be merged")
    s.tell(trial, state=optuna.trial.TrialState.FAIL)
    return "failed"


def _write(p: Path, data: bytes) -> str:
    p.write_bytes(data)
    return str(p)


def _recipe(t: Path) -> str:
    r = {
        "merge_method": "linear",
        "models": [
            {"model": str(ZOO["add"]), "parameters": {"weight": 0.5}},
            {"model": str(ZOO["reverse"]), "parameters": {"weight": 0.5}},
        ],
    }
    (t / "r.yaml").write_text(yaml.safe_dump(r))
    return str(t / "r.yaml")


def snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("build,says", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(build, says, zoo, odd_models, tmp_path, monkeypatch, capfd):
    ZOO.update(zoo.models)
    ODD_MODELS.update(odd_models)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study_mod, "RESULTS", tmp_path / "results")
    argv = build(tmp_path)
    capfd.readouterr()
    before = snapshot(tmp_path)
    rc = main(argv)
    out, err = capfd.readouterr()
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert says in lines[0], lines[0]
    assert snapshot(tmp_path) == before, sorted(set(snapshot(tmp_path)) ^ set(before))


def test_the_battery_covers_what_it_says():
    assert len(CASES) >= 81 and len({c[0] for c in CASES}) == len(CASES)


def test_task_weights_name_tasks_given_by_path(zoo, tmp_path, monkeypatch, capfd):
    """task_weights keys are task names, also for a task given by its file (the walkthrough's case)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study_mod, "RESULTS", tmp_path / "results")
    argv = search(tmp_path, tasks=[task(tmp_path), "add"], task_weights={"mytask": 2, "add": 1}, trials=2)
    assert main(argv) == 0, capfd.readouterr().err


def _stopped_study(root: Path) -> str:
    """A study whose trial 0 completed and trial 1 was stopped early at 20 examples per task."""
    import optuna

    d = root / "results" / "stopped"
    d.mkdir(parents=True)
    s = optuna.create_study(study_name="stopped", storage=f"sqlite:///{d / 'study.db'}")
    s.set_user_attr("space", {"raw": dict(SPACE, name="stopped"), "path": None})
    for state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
        trial = s.ask()
        trial.set_user_attr("recipe", Path(_recipe(root)).read_text())
        trial.set_user_attr("scores", {"add": 0.5})
        if state == optuna.trial.TrialState.PRUNED:
            trial.set_user_attr("stopped_at", 20)
        s.tell(trial, 0.5 if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    return "stopped"


def test_export_of_a_stopped_trial_warns_and_says_so(zoo, tmp_path, monkeypatch, capfd):
    """A stopped-early trial is exported as asked, with a warning and its state in the header."""
    ZOO.update(zoo.models)
    monkeypatch.setattr(study_mod, "RESULTS", tmp_path / "results")
    name = _stopped_study(tmp_path)
    with pytest.warns(UserWarning, match="stopped early after 20 examples per task"):
        assert main(["export", name, "--trial", "1", "-o", str(tmp_path / "t1.yaml")]) == 0
    header = (tmp_path / "t1.yaml").read_text().splitlines()
    assert header[1] == (
        "# state: PRUNED (trial 1 was stopped early after 20 examples per task: its search scores are "
        "of those examples only)"
    )
    assert main(["export", name, "--trial", "0", "-o", str(tmp_path / "t0.yaml")]) == 0
    assert (tmp_path / "t0.yaml").read_text().splitlines()[1] == "# state: COMPLETE"


def test_a_full_disk_during_export_names_the_output(zoo, tmp_path, tmpfs, monkeypatch, capfd):
    """ENOSPC while writing the export: one line naming the file asked for, nothing left behind."""
    ZOO.update(zoo.models)
    monkeypatch.setattr(study_mod, "RESULTS", tmp_path / "results")
    name = _stopped_study(tmp_path)
    disk = tmpfs("disk", size="64k")
    (disk / "filler").write_bytes(b"x" * 60_000)
    try:
        (disk / "more").write_bytes(b"x" * 8192)  # fill what rounding left
    except OSError:
        pass
    before = sorted(p.name for p in disk.iterdir())
    capfd.readouterr()
    out = disk / "best.yaml"
    assert main(["export", name, "--trial", "0", "-o", str(out)]) == 2
    err = [x for x in capfd.readouterr().err.splitlines() if x.strip()]
    assert err == [
        f"error: {out}: No space left on device; the disk is full; free space (completed "
        "trials are kept) and run the command again"
    ], err
    assert sorted(p.name for p in disk.iterdir()) == before  # no partial file, no temporary one


def test_the_base_among_the_models_is_a_warning(zoo, tmp_path, monkeypatch):
    """Legal, but under task arithmetic its task vector is zero: the search says so and runs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study_mod, "RESULTS", tmp_path / "results")
    argv = search(tmp_path, models=["zoo:base", "zoo:add"], trials=1)
    with pytest.warns(
        UserWarning, match="model zoo:base is the base; under task_arithmetic its task vector is zero"
    ):
        assert main(argv) == 0

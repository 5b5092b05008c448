"""Faults the storage and the user can cause: a full disk, a read-only folder, Ctrl-C, a killed
worker, several processes on one study. Full and read-only disks are real tmpfs mounts (root only:
CI runs as root; elsewhere these tests are skipped with that reason)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from mergesearch.cli import main
from mergesearch.errors import MergeSearchError
from mergesearch.search import storage as study_mod
from tests.conftest import bench, cli, env, write_space
from tests.conftest import search as run_search

COMPLETE, RUNNING, FAIL = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.RUNNING,
    optuna.trial.TrialState.FAIL,
)


def journal_trials(path: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name, storage=storage).trials


def search_cli(tmp_path: Path, space, *extra, **kw):
    """`mergesearch search SPACE -q --device cpu ...` as a subprocess."""
    return cli(tmp_path, "search", str(space), "-q", "--device", "cpu", *extra, **kw)


def one_error_line(stderr: str, *says: str) -> None:
    lines = [x for x in stderr.splitlines() if x.strip() and not x.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    for s in says:
        assert s in lines[0], lines[0]


@pytest.mark.e2e
def test_a_full_disk_mid_search_loses_no_completed_trial(zoo, tmp_path, tmpfs):
    disk = tmpfs("disk", "48k")  # holds the journal of about six trials
    space = write_space(tmp_path, name="full", fidelity=[20], trials=30)
    journal = disk / "full.log"
    r = search_cli(tmp_path, space, "--storage", str(journal), check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    one_error_line(r.stderr, "No space left on device", "full.log", "free space")
    done = {t.number: t.values for t in journal_trials(journal, "full") if t.state == COMPLETE}
    assert len(done) >= 3
    subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)  # space freed
    search_cli(tmp_path, space, "--storage", str(journal))
    after = {t.number: t for t in journal_trials(journal, "full")}
    assert all(after[n].state == COMPLETE and after[n].values == v for n, v in done.items())
    assert sum(t.state.is_finished() for t in after.values()) == 30  # the study went on to its budget
    # report reads it too
    cli(tmp_path, "export", "full", "--storage", str(journal), "-o", "best.yaml")


def _run(argv, capfd) -> tuple[int, str]:
    capfd.readouterr()
    rc = main(argv)
    return rc, capfd.readouterr().err


def test_read_only_and_full_folders_fail_cleanly(zoo, tmp_path, tmpfs, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study_mod, "RESULTS", tmp_path / "results")
    space = str(write_space(tmp_path, name="ro", fidelity=[20], trials=2))
    assert _run(["search", space, "-q", "--device", "cpu"], capfd)[0] == 0
    ro = tmpfs("ro", ro=True)
    full = tmpfs("full", "64k")
    with open(full / "filler", "wb", buffering=0) as fh:  # fill it to the last byte
        try:
            while True:
                fh.write(b"\0" * 1024)
        except OSError:
            pass
    cases = {
        "results folder": (["search", space, "-q", "--device", "cpu", "--study", "ro2"], "read-only"),
        "journal folder": (
            ["search", space, "-q", "--device", "cpu", "--storage", str(ro / "j.log")],
            "read-only",
        ),
        "export to read-only": (["export", "ro", "-o", str(ro / "best.yaml")], "read-only"),
        "export to a full disk": (["export", "ro", "-o", str(full / "best.yaml")], "disk is full"),
        "merge to read-only": (["merge", "recipe.yaml", str(ro / "m"), "-q"], "read-only"),
        "merge to a full disk": (["merge", "recipe.yaml", str(full / "m"), "-q"], "disk is full"),
    }
    (tmp_path / "recipe.yaml").write_text(
        f"merge_method: linear\nmodels:\n  - model: {zoo.models['add']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {zoo.models['reverse']}\n    parameters: {{weight: 0.5}}\n"
    )
    for name, (argv, says) in cases.items():
        if name == "results folder":
            monkeypatch.setattr(study_mod, "RESULTS", ro / "results")
        before = sorted(os.listdir(full))
        rc, err = _run(argv, capfd)
        monkeypatch.setattr(study_mod, "RESULTS", tmp_path / "results")
        assert rc == 2, (name, err)
        one_error_line(err, says)
        assert sorted(os.listdir(full)) == before, (name, os.listdir(full))  # no temporary left
        assert os.listdir(ro) == []


@pytest.mark.e2e
def test_ctrl_c_exits_130_with_one_word_and_the_study_resumes(zoo, tmp_path):
    # a budget it cannot finish before the signal: a short one could end between two polls
    space = write_space(tmp_path, name="intr", fidelity=[200], trials=100_000)
    db = f"sqlite:///{tmp_path / 'results' / 'intr' / 'study.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergesearch", "search", str(space), "-q", "--device", "cpu"],
        env=env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal, whatever this test runs under (a background job ignores SIGINT,
        # and its children inherit that)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline, storage, sent = time.time() + 120, None, False
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            ts = optuna.load_study(study_name="intr", storage=storage or db).trials
            storage = storage or optuna.storages.RDBStorage(db)  # once it exists: cheaper polls
        except Exception:
            continue
        if sum(t.state == COMPLETE for t in ts) >= 3 and any(t.state == RUNNING for t in ts):
            proc.send_signal(signal.SIGINT)  # mid-trial: inside the merge or the model
            sent = True
            break
    if not sent:
        proc.kill()
    _, err = proc.communicate(timeout=60)
    assert sent, f"no running trial after the third within 120 s: {err[-3000:]}"
    assert proc.returncode == 130, err[-3000:]
    assert err.strip() == "interrupted", err[-3000:]
    done = {
        t.number: t.values
        for t in optuna.load_study(study_name="intr", storage=db).trials
        if t.state == COMPLETE
    }
    search_cli(tmp_path, space, "--trials", str(len(done) + 3), "--set-budget")
    after = {t.number: t for t in optuna.load_study(study_name="intr", storage=db).trials}
    assert all(after[n].values == v for n, v in done.items())
    assert not any(t.state == RUNNING for t in after.values())


def test_an_interrupt_waits_for_the_storage_call_and_is_never_lost():
    """SIGINT during a storage call lets the call finish; inside the objective it is raised when
    the call returns, elsewhere at `check` (after the trial is recorded); one that something
    swallowed (Python does, inside garbage-collection callbacks) is raised again at `check`."""
    from mergesearch.search import interrupts

    class Storage:  # one public method of Optuna's storage interface
        def get_all_studies(self):
            signal.raise_signal(signal.SIGINT)
            self.finished = True
            return []

    storage = interrupts.guard(Storage())
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        _interrupt_paths(interrupts, storage)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under `nohup … &`: still ignored
        with interrupts.deferred():
            assert storage.get_all_studies() == []
            interrupts.check()
    finally:
        signal.signal(signal.SIGINT, outer)


def _interrupt_paths(interrupts, storage) -> None:
    with interrupts.deferred():  # between trials: the call finishes, the interrupt waits
        assert storage.get_all_studies() == [] and storage.finished
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    with interrupts.deferred(), pytest.raises(KeyboardInterrupt), interrupts.objective():
        storage.finished = False
        storage.get_all_studies()  # raises on return, not inside
    assert storage.finished
    with interrupts.deferred():
        with interrupts.objective():
            try:
                signal.raise_signal(signal.SIGINT)  # at once, inside the objective
            except KeyboardInterrupt:
                pass  # swallowed
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    interrupts.check()  # and nothing pending outside a search


def _params(t: optuna.trial.FrozenTrial) -> str:
    return json.dumps(t.params, sort_keys=True)


@pytest.mark.e2e
def test_concurrent_and_resumed_searches_never_repeat_a_candidate(zoo, tmp_path):
    """Two `search` processes on one journal study, one killed mid-trial; then the same command to
    resume. No candidate is proposed twice, and the killed one's trial is released by the other
    while it runs."""
    space = write_space(tmp_path, name="conc", fidelity=[20, 60], trials=24)
    journal = tmp_path / "conc.log"
    cmd = [
        sys.executable,
        "-m",
        "mergesearch",
        "search",
        str(space),
        "-q",
        "--device",
        "cpu",
        "--storage",
        str(journal),
    ]
    procs = [
        subprocess.Popen(
            cmd, env=env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    killed = None
    deadline = time.time() + 180
    while time.time() < deadline and killed is None:
        time.sleep(0.05)
        try:
            ts = journal_trials(journal, "conc")
        except Exception:
            continue
        for p in procs:
            mine = [t for t in ts if t.user_attrs.get("worker", "").endswith(f":{p.pid}")]
            running = [t for t in mine if t.state == RUNNING and "merge_seconds" in t.user_attrs]
            searched = sum(t.state == COMPLETE and "baseline" not in t.user_attrs for t in mine)
            if searched >= 2 and running and procs[1 - procs.index(p)].poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
                killed = (p, running[0].number)
                break
    assert killed is not None, "no trial was running to kill"
    other = procs[1 - procs.index(killed[0])]
    out, err = other.communicate(timeout=300)
    assert other.returncode == 0, err[-3000:]
    ts = {t.number: t for t in journal_trials(journal, "conc")}
    assert ts[killed[1]].state == FAIL  # released by the process still running, not at the next start
    search_cli(tmp_path, space, "--storage", str(journal), "--trials", "32", "--set-budget")
    ts = journal_trials(journal, "conc")
    assert sum(t.state.is_finished() for t in ts) == 32
    searched = [t for t in ts if "baseline" not in t.user_attrs and t.params]
    seeds = {t.user_attrs["sampler_seed"] for t in searched}
    assert len(seeds) == 3, seeds  # the creator (the space's seed), the other, the resume
    assert 0 in seeds
    by_candidate: dict[str, set] = {}
    for t in searched:
        by_candidate.setdefault(_params(t), set()).add(t.user_attrs["worker"])
    # NSGA-II returns a parent unchanged now and then (no crossover, no mutation); processes share
    # the parents, so without study._NoRepeats one process runs another's candidate (seen here
    # once in 30 trials). Its own repeats stay (a one-process study stays what its seed gives).
    assert all(len(w) == 1 for w in by_candidate.values()), "a process ran another's candidate"
    assert len(by_candidate) >= len(searched) - 2


def test_budget_is_the_studys_and_failing_trials_stop_the_search(zoo, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study_mod, "RESULTS", tmp_path / "results")
    space = str(write_space(tmp_path, name="budget", fidelity=[20], trials=3))
    capfd.readouterr()
    assert main(["search", space, "-q", "--device", "cpu", "--timeout", "0.01"]) == 0
    out = capfd.readouterr().out  # the end-of-command summary: what happened, what next
    assert "stopped before the budget (1 of 3 trials finished)" in out
    assert main(["search", space, "-q", "--device", "cpu"]) == 0
    out = capfd.readouterr().out
    assert (
        "best trial " in out
        and "next: mergesearch report budget" in out
        and "mergesearch export budget" in out
    )
    rc, err = _run(["search", space, "-q", "--device", "cpu", "--trials", "2"], capfd)
    assert rc == 2
    one_error_line(err, "budget of 3 trials", "--set-budget")
    db = f"sqlite:///{tmp_path / 'results' / 'budget' / 'study.db'}"
    assert optuna.load_study(study_name="budget", storage=db).user_attrs["trials"] == 3
    # A worker's --trials says when it stops; the study's budget stays.
    assert _run(["worker", "--study", "budget", "--trials", "5", "-q", "--device", "cpu"], capfd)[0] == 0
    s = optuna.load_study(study_name="budget", storage=db)
    assert len(s.trials) == 5 and s.user_attrs["trials"] == 3

    # A space whose trials all fail (after validation passed) stops after three, with the first error.
    from mergesearch.search import load_space

    sp = load_space(write_space(tmp_path, name="failing", fidelity=[20], trials=20))
    searcher = bench(sp)
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise MergeSearchError(f"broken merge {len(calls)}")

    searcher.validate()
    searcher.validate = lambda: None
    searcher.engine.write_into = broken
    with pytest.raises(MergeSearchError, match=r"3 trials in a row failed.*the first error: broken merge 1$"):
        run_search(sp, bench=searcher, progress=False)
    _, err = capfd.readouterr()
    assert "Traceback" not in err and "Trial 0 failed" not in err
    s = optuna.load_study(
        study_name="failing", storage=f"sqlite:///{tmp_path / 'results' / 'failing' / 'study.db'}"
    )
    assert [t.state for t in s.trials] == [FAIL] * 3
    assert s.trials[0].user_attrs["error"] == "broken merge 1"


def test_the_sampler_never_proposes_another_process_candidate():
    from optuna.distributions import FloatDistribution

    from mergesearch.search.samplers import NoRepeats as _NoRepeats

    dist = {"x": FloatDistribution(0, 1)}

    class Scripted(optuna.samplers.RandomSampler):
        """Proposes 0.5, 0.5, 0.25, ... as a population sampler copying a parent would."""

        def __init__(self, script):
            super().__init__(seed=0)
            self.script = list(script)

        def infer_relative_search_space(self, study, trial):
            return dist

        def sample_relative(self, study, trial, search_space):
            return {"x": self.script.pop(0)} if self.script else {}

    study = optuna.create_study()
    for x, who in ((0.5, "host:1"), (0.75, "host:2")):
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": x}, distributions=dist, value=x, user_attrs={"worker": who}
            )
        )
    study.sampler = _NoRepeats(Scripted([0.5, 0.5, 0.25]), "host:1")  # its own 0.5: allowed
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert study.trials[-1].params["x"] == 0.5
    study.sampler = _NoRepeats(Scripted([0.5, 0.5, 0.25]), "host:2")  # host:1's 0.5: asked again
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert study.trials[-1].params["x"] == 0.25
    study.sampler = _NoRepeats(Scripted([0.5] * 11), "host:2")  # never anything new: random
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert study.trials[-1].params["x"] not in (0.5, 0.75)

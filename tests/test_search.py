"""The search end to end: real SQLite/journal storage, real CLI subprocesses, mergekit as the oracle."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from mergesearch.errors import MergeSearchError
from mergesearch.search import load_space
from tests.conftest import cli, env, mergekit_yaml, report, write_space
from tests.conftest import search as run_search
from tests.tiny_models import load_weights

pytestmark = pytest.mark.e2e  # real CLI subprocesses, searches and reports


def trials(db: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=db).trials


@pytest.mark.parametrize("placement", [None, "disk"], ids=["auto", "disk"])
def test_export_runs_in_mergekit_and_scores_as_reported(zoo, tmp_path, placement):
    """The whole round trip, with the inputs where `auto` puts them (on the device here) and
    streamed from their files (the space's `placement` key: the search and the report)."""
    space = write_space(tmp_path, name="exp", **({"placement": placement} if placement else {}))
    search = cli(tmp_path, "search", str(space)).stdout
    # Every command ends by saying what happened and what to run next; nothing stray on stderr.
    assert (
        "loading the base and 2 models" in search and "study exp: created, 0 of 12 trials finished" in search
    )
    assert f"inputs: {placement or 'device'} (" in search
    db = f"sqlite:///{tmp_path / 'results' / 'exp' / 'study.db'}"
    assert {t.user_attrs["placement"] for t in trials(db, "exp")} == {placement or "device"}
    assert re.search(r"best trial \d+.*: search mean \d\.\d{3} \(add \d\.\d{3}, reverse \d\.\d{3}\)", search)
    assert "next: mergesearch report exp" in search and "mergesearch export exp" in search
    report = cli(tmp_path, "report", "exp")
    assert re.search(r"best trial \d+: test mean .* gain [+-]\d\.\d{3} \(paired 95% CI", report.stdout)
    assert "next: mergesearch export exp -o best.yaml" in report.stdout
    assert "warning" not in report.stderr.lower() and "fatal" not in report.stderr.lower(), report.stderr
    out = cli(tmp_path, "export", "exp", "--best", "-o", "best.yaml").stdout
    assert "best.yaml" in out and "next: mergesearch merge" in out
    text = (tmp_path / "best.yaml").read_text()
    assert text.startswith("# mergesearch export: study exp, trial ") and "# test scores: {" in text
    # Readable: no YAML anchors, every coefficient to 4 significant digits, only parameters DARE-TIES uses.
    body = yaml.safe_load(text)
    assert "&id" not in text and "*id" not in text
    floats = re.findall(r"(?<![\w.])\d+\.\d+(?:e-?\d+)?", text.split("\n", 4)[4])
    assert floats and all(len(f.lstrip("0.").replace(".", "")) <= 4 for f in floats), floats
    assert {k for m in body["models"] for k in m["parameters"]} == {"weight", "density"}
    # mergekit-yaml builds the model from the exported YAML ...
    mergekit_yaml(tmp_path, "best.yaml", "mk_out")
    # ... equal to mergesearch merge's output, bit for bit (DARE with the same seed) ...
    cli(tmp_path, "merge", "best.yaml", "ms_out", "--seed", "0", "-q")
    a, b = load_weights(tmp_path / "ms_out"), load_weights(tmp_path / "mk_out")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # ... and that model scores on the test split exactly what the report says.
    summary = json.loads((tmp_path / "results" / "exp" / "test_scores.json").read_text())
    best = next(c for c in summary["candidates"] if c["label"].endswith("(best)"))
    got = json.loads(
        cli(tmp_path, "eval", "mk_out", "--tasks", "add,reverse", "--split", "test", "--json").stdout
    )
    for row in got:
        assert row["value"] == pytest.approx(best["test"][row["task"]]["value"], abs=0), row
    # The search itself ran on the search engine's DARE draws (recorded apart); the report's
    # search-split scores are also those of mergekit's model.
    assert set(best["search_during_study"]) == {"add", "reverse"}
    got = json.loads(
        cli(tmp_path, "eval", "mk_out", "--tasks", "add,reverse", "--split", "search", "--json").stdout
    )
    for row in got:
        assert row["value"] == pytest.approx(best["search"][row["task"]], abs=0), row
    # the report's files are there
    for f in (
        "trials.csv",
        "pareto.csv",
        "report.md",
        "pareto.png",
        "history.png",
        "coefficients.png",
        "pareto.html",
        "history.html",
    ):
        assert (tmp_path / "results" / "exp" / f).is_file(), f
    # The HTML plots work offline: plotly.js lies beside them; nothing is fetched.
    for f in ("pareto.html", "history.html"):
        html = (tmp_path / "results" / "exp" / f).read_text()
        assert 'src="plotly.min.js"' in html and not re.search(r"(src|href)=[\"']?(https?:)?//", html), f
    assert (tmp_path / "results" / "exp" / "plotly.min.js").stat().st_size > 1_000_000


def test_sigkill_during_a_trial_then_resume(zoo, tmp_path):
    space = write_space(tmp_path, name="kill", fidelity=[200], trials=40)
    db = f"sqlite:///{tmp_path / 'results' / 'kill' / 'study.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergesearch", "search", str(space), "-q"],
        env=env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    killed_running = None
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.05)
        try:
            ts = trials(db, "kill")
        except Exception:
            continue
        running = [t for t in ts if t.state == optuna.trial.TrialState.RUNNING]
        if sum(t.state == optuna.trial.TrialState.COMPLETE for t in ts) >= 3 and running:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            break
    assert proc.returncode == -signal.SIGKILL, "search finished before it could be killed"
    before = trials(db, "kill")
    completed = {t.number: t.values for t in before if t.state == optuna.trial.TrialState.COMPLETE}
    killed_running = [t.number for t in before if t.state == optuna.trial.TrialState.RUNNING]
    assert killed_running, "no trial was running at the kill"
    cli(tmp_path, "search", str(space), "-q")  # the same command again
    after = {t.number: t for t in trials(db, "kill")}
    for n, values in completed.items():
        assert after[n].state == optuna.trial.TrialState.COMPLETE and after[n].values == values
    for n in killed_running:
        assert after[n].state == optuna.trial.TrialState.FAIL
    assert sum(t.state.is_finished() for t in after.values()) >= 40
    assert max(after) > max(killed_running)  # the study went on


def test_two_workers_on_a_journal_study(zoo, tmp_path):
    space = write_space(tmp_path, name="jw", trials=24)
    journal = str(tmp_path / "jw.log")
    cli(tmp_path, "search", str(space), "--storage", journal, "--trials", "2", "-q")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mergesearch",
                "worker",
                "--storage",
                journal,
                "--study",
                "jw",
                "--trials",
                "24",
                "-q",
            ],
            env=env(tmp_path),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    from optuna.storages.journal import JournalFileBackend

    ts = optuna.load_study(
        study_name="jw", storage=optuna.storages.JournalStorage(JournalFileBackend(journal))
    ).trials
    numbers = [t.number for t in ts]
    assert len(numbers) == len(set(numbers)) and sorted(numbers) == list(range(len(numbers)))
    assert len(ts) >= 24 and all(t.state.is_finished() for t in ts)
    workers = {t.user_attrs.get("worker") for t in ts[2:]}
    assert len(workers) == 2  # both processes ran trials


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=5) as r:
        body = r.read()
        if r.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return r.status, body


def test_dashboard_serves_the_study_with_objective_names(zoo, tmp_path):
    """One dashboard over a storage two studies share: both listed; parameters named by model,
    component and layer; recipe artifacts named by trial and served from each study's folder;
    known recipes tagged (user attribute and note); the study's note says what is searched."""
    shared = "sqlite:///studies.db"
    cli(tmp_path, "search", str(write_space(tmp_path, name="dash", trials=4)), "-q", "--storage", shared)
    cli(
        tmp_path,
        "search",
        str(
            write_space(
                tmp_path, name="dash_ta", method="task_arithmetic", parameters={"weight": [0, 1.5]}, trials=3
            )
        ),
        *("-q", "--storage", shared),
    )
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergesearch", "dashboard", "--storage", shared, "--port", str(port)],
        env=env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline, studies = time.time() + 60, None
        while time.time() < deadline:
            try:
                status, body = _get(f"http://127.0.0.1:{port}/api/studies")
                studies = json.loads(body)["study_summaries"]
                break
            except OSError:
                time.sleep(0.3)
        assert studies, "dashboard did not answer"
        assert sorted(s["study_name"] for s in studies) == ["dash", "dash_ta"]
        for summary in studies:
            sid = summary["study_id"]
            status, body = _get(f"http://127.0.0.1:{port}/api/studies/{sid}?after=0")
            detail = json.loads(body)
            assert status == 200 and detail["objective_names"] == ["add", "reverse"]
            assert "weight[add].attention.L3" in detail["note"]["body"]
            trials = detail["trials"]
            assert len(trials) == (4 if summary["study_name"] == "dash" else 3)
            names = {p["name"] for t in trials for p in t["params"]}
            assert "weight[add].attention.L0" in names and "weight[reverse].other.L1" in names, names
            for t in trials:
                attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
                if "baseline" in attrs:
                    assert attrs["kind"] == f"known recipe: {attrs['baseline']}"
                    assert t["note"]["body"].startswith(f"**Known recipe: {attrs['baseline']}**")
                else:
                    assert attrs["kind"] == "searched"
                (art,) = t["artifacts"]
                assert art["filename"] == f"trial_{t['number']}_recipe.yaml"
                status, body = _get(
                    f"http://127.0.0.1:{port}/artifacts/{sid}/{t['trial_id']}/{art['artifact_id']}"
                )
                assert status == 200 and yaml.safe_load(body)["merge_method"] in (
                    "dare_ties",
                    "task_arithmetic",
                )
        assert any(
            a["key"] == "kind" and a["value"].startswith("known recipe")
            for t in trials
            for a in t["user_attrs"]
        )
        status, _ = _get(f"http://127.0.0.1:{port}/static/bundle.js")
        assert status == 200
    finally:
        served = proc.poll() is None  # still up after every request: nothing crashed it
        proc.terminate()
        proc.wait(timeout=10)
    assert served and proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stderr.read()[-2000:])


def test_bad_search_input(zoo, tmp_path, results):
    """The library's own checks (the CLI's are in test_bad_input.py), and a changed space."""

    with pytest.raises(MergeSearchError, match="at least 1"):
        run_search(load_space(write_space(tmp_path)), trials=0, progress=False)
    with pytest.raises(MergeSearchError, match="--seed"):
        run_search(load_space(write_space(tmp_path)), seed=-1, progress=False)
    run_search(load_space(write_space(tmp_path, name="same")), trials=2, progress=False)
    changed = write_space(tmp_path, name="same", parameters={"weight": [0.1, 1.0], "density": [0.3, 1.0]})
    with pytest.raises(MergeSearchError, match="different search space.*--study NEW_NAME"):
        run_search(load_space(changed), trials=3, progress=False)
    p = cli(tmp_path, "search", str(changed), check=False)
    assert p.returncode == 2 and "different search space" in p.stderr and "Traceback" not in p.stderr


def _initdb() -> str | None:
    import glob
    import shutil

    return shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 (initdb/pg_ctl of the machine's PostgreSQL)."""
    initdb = _initdb()
    if initdb is None:
        pytest.skip("PostgreSQL server binaries (initdb) are not installed on this machine")
    import shutil
    import tempfile

    bindir = Path(initdb).parent
    # pytest's tmp_path is private to root (0700); the server runs as the postgres user
    root = Path(tempfile.mkdtemp(prefix="mergesearch-pg-"))
    os.chmod(root, 0o755)
    data = root / "data"
    data.mkdir()
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        uid = int(subprocess.check_output(["id", "-u", "postgres"]))
        gid = int(subprocess.check_output(["id", "-g", "postgres"]))
        os.chown(data, uid, gid)
    port = _free_port()
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_user,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-l",
            str(data / "log"),
            "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", "CREATE DATABASE optuna"],
            check=True,
            capture_output=True,
        )
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


def test_postgres_study_with_a_worker(zoo, tmp_path, postgres):
    """The storage for several machines: a search and a worker process on one PostgreSQL study."""
    space = write_space(tmp_path, name="pg", trials=8)
    cli(tmp_path, "search", str(space), "--storage", postgres, "--trials", "3", "-q")
    cli(tmp_path, "worker", "--storage", postgres, "--study", "pg", "--trials", "8", "-q")
    ts = trials(postgres, "pg")
    assert len(ts) >= 8 and all(t.state.is_finished() for t in ts)
    assert sorted(t.number for t in ts) == list(range(len(ts)))
    assert len({t.user_attrs.get("worker") for t in ts}) == 2


DEMO_SPACES = [
    p
    for p in sorted((Path(__file__).parents[1] / "search_spaces").glob("*.yaml"))
    if not p.name.startswith("smollm2_")  # the SmolLM2 zoo's spaces: tests/test_realmodel_search.py (slow)
]


@pytest.mark.parametrize("path", DEMO_SPACES, ids=lambda p: p.stem)
def test_every_shipped_space_runs(zoo, results, path):
    """Each demo-zoo space in search_spaces/ searches the zoo for real (baselines, then sampled
    trials), through the search engine; stepped ranges give values on their grid."""

    space = load_space(path)
    if space.gradient_steps:  # the demo's warm start: a few steps show it runs (600 take ~30 s)
        space.gradient_steps = 20
    s = run_search(space, trials=8, progress=False)
    if space.gradient_steps:
        assert any(t.user_attrs.get("warm_start") == "gradient" for t in s.trials)
    done = [
        t for t in s.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    assert len(done) == 8, [t.state for t in s.trials]
    for name, rng in space.parameters.items():
        if rng.step:
            # parameter names: weight[add].mlp.L1, stage2.weight[1].L0 (SearchSpace.coefficients)
            values = [
                v
                for t in done
                for k, v in t.params.items()
                if re.match(r"(stage\d+\.)?([a-z_]+)", k)[2] == name
            ]
            assert values and all(
                abs((v - rng.low) / rng.step - round((v - rng.low) / rng.step)) < 1e-6 for v in values
            ), name


def _journal_trials(path: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name, storage=storage).trials


def test_a_torn_journal_record_is_repaired_and_the_study_goes_on(zoo, tmp_path):
    """An interrupted write (a full disk, a kill mid-write) leaves a record without its newline;
    the next append would make the whole journal unreadable. The same command repairs it first."""
    space = write_space(tmp_path, name="torn", fidelity=[20], trials=4)
    journal = tmp_path / "j" / "torn.log"
    cli(tmp_path, "search", str(space), "-q", "--storage", str(journal))
    done = {t.number: t.values for t in _journal_trials(journal, "torn") if t.state.is_finished()}
    assert len(done) == 4
    with open(journal, "ab") as fh:  # what a write cut short by a full disk leaves
        fh.write(b'{"op_code":4,"worker_id":"x","trial_id":9,"da')
    r = cli(tmp_path, "search", str(space), "-q", "--storage", str(journal), "--trials", "6", "--set-budget")
    assert "removed 1 unreadable journal record" in r.stderr
    after = {t.number: t for t in _journal_trials(journal, "torn")}
    assert all(after[n].values == v for n, v in done.items())
    assert sum(t.state.is_finished() for t in after.values()) == 6  # and the study went on
    # A journal already damaged by an append after the torn record loads again too.
    text = journal.read_bytes()
    cut = text.rindex(b"\n", 0, len(text) - 1)
    journal.write_bytes(text[: cut + 1] + b'{"op_code":4,"wor\n' + text[cut + 1 :])
    with pytest.raises((ValueError, json.JSONDecodeError)):
        _journal_trials(journal, "torn")  # Optuna alone cannot read it
    cli(tmp_path, "export", "torn", "--storage", str(journal), "-o", "best.yaml")  # reads it all
    assert len(_journal_trials(journal, "torn")) == len(after)


def test_study_names_stay_inside_results_and_version(zoo, tmp_path):
    space = write_space(tmp_path, name="ok")
    for bad in ("../outside", "a/b", ".."):
        r = cli(tmp_path, "search", str(space), "--study", bad, "-q", check=False)
        assert r.returncode == 2 and "is not a plain name" in r.stderr and "Traceback" not in r.stderr, (
            r.stderr
        )
    assert not (tmp_path / "outside").exists() and not (tmp_path / "results" / "a").exists()
    assert cli(tmp_path, "--version").stdout.startswith("mergesearch ")


def test_a_sequential_space_searches_the_merge_order(zoo, tmp_path, results):
    """Three models merged pairwise: the order is a categorical over the 6 permutations, each
    trial's recipe follows its order, and the report compares the orders on the test split."""

    space = load_space(
        write_space(
            tmp_path,
            name="order",
            models=["zoo:add", "zoo:reverse", "zoo:count"],
            tasks=["add", "reverse", "count"],
            method="task_arithmetic",
            order="sequential",
            granularity="model",
            components=["all"],
            parameters={"weight": [0.3, 1.2]},
            objective="mean",
            fidelity=[20],
            trials=14,
        )
    )
    assert len(space.orders) == 6 and space.categorical
    s = run_search(space, progress=False)
    done = [t for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len({t.params["merge_order"] for t in done}) >= 3
    for t in done:
        first = [str(zoo.models[n]) for n in ("add", "reverse", "count")]
        order = [first[int(i)] for i in t.params["merge_order"].split(">")]
        stage1 = yaml.safe_load(t.user_attrs["recipe"].split("---")[0])
        assert [m["model"] for m in stage1["models"]] == order[:2]
    summary = report("order")
    rows = summary["merge_orders"]
    assert sorted(r["order"] for r in rows) == sorted({t.params["merge_order"] for t in done})
    assert all(0 <= r["test_mean"] <= 1 for r in rows)
    text = (results / "order" / "report.md").read_text()
    assert "## Merge order" in text and "**(best)**" in text
    # the coefficient plot names each stage's inputs in the trial's order
    from types import SimpleNamespace

    from mergesearch.report import coefficient_profile

    fake = SimpleNamespace(space=space, num_layers=2, model_paths=["/z/add", "/z/reverse", "/z/count"])
    for t in done[:4]:
        a, b, c = (["add", "reverse", "count"][int(i)] for i in t.params["merge_order"].split(">"))
        want = {f"{a} (stage 1)", f"{b} (stage 1)", "stage 1 merge (stage 2)", f"{c} (stage 2)"}
        assert set(coefficient_profile(t, fake)["model"]) == want
    pinned = load_space(
        write_space(
            tmp_path,
            name="pinned",
            order="sequential",
            search_order=False,
            models=["zoo:add", "zoo:reverse", "zoo:count"],
        )
    )
    assert pinned.orders is None


@pytest.mark.parametrize(
    "models,methods,parameters",
    [
        # all three fine-tunes at once; sce's select_topk and multislerp's weights searched per layer
        (
            ["zoo:add", "zoo:reverse"],
            ["ties", "karcher", "multislerp", "sce"],
            {"weight": [0.2, 1.0], "density": [0.3, 1.0], "select_topk": [0.2, 1.0]},
        ),
        # base + one fine-tune: nearswap's t searched, arcee_fusion a fixed choice
        (["zoo:base", "zoo:add"], ["nearswap", "arcee_fusion"], {"t": [0.0001, 0.05]}),
    ],
    ids=["four_methods", "base_and_one"],
)
def test_the_newer_methods_are_searched_as_themselves(zoo, tmp_path, results, models, methods, parameters):
    """A method-choice study over mergekit's newer methods: every method is chosen and scored, and a
    trial's search score is the score of its recipe merged by `mergesearch merge` (the exact path)."""
    from mergesearch.engine import merge
    from mergesearch.evaluation import evaluate_model

    space = load_space(
        write_space(
            tmp_path,
            name="newer",
            models=models,
            method=methods,
            parameters=parameters,
            tasks=["add"],
            objective="mean",
            granularity="layer",
            components=["all"],
            fidelity=[40],
            trials=10 * len(methods),
            sampler="random",
        )
    )
    s = run_search(space, progress=False)
    done = [t for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert {t.params["method"] for t in done} == set(methods) and not [
        t for t in s.trials if t.state.name == "FAIL"
    ]
    assert max(t.value for t in done) > 0.3  # merges that work, not an all-zero study
    t = max(done, key=lambda t: t.value)
    (tmp_path / "r.yaml").write_text(t.user_attrs["recipe"])
    merge(tmp_path / "r.yaml", tmp_path / "m", seed=0)
    (row,) = evaluate_model(tmp_path / "m", ["add"], split="search", limit=40, device="cpu")
    assert row["value"] == pytest.approx(t.user_attrs["scores"]["add"], abs=1e-9)


def test_a_method_choice_study_searches_and_reports_only_what_each_method_uses(zoo, tmp_path, results):
    """Task arithmetic ignores density: its trials search none and their recipes carry none, while
    TIES trials search it; the report has a method column saying which method each recipe used."""

    space = load_space(
        write_space(
            tmp_path,
            name="choice",
            method=["task_arithmetic", "ties"],
            granularity="model",
            components=["all"],
            fidelity=[40],
            trials=10,
            sampler="random",
        )
    )
    s = run_search(space, progress=False)
    done = [t for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE]
    by = {m: [t for t in done if t.params["method"] == m] for m in ("task_arithmetic", "ties")}
    assert by["task_arithmetic"] and by["ties"]
    for t in by["task_arithmetic"]:
        assert set(t.params) == {"method", "weight[add]", "weight[reverse]"}, t.params
        assert "density" not in t.user_attrs["recipe"]
    for t in by["ties"]:
        assert {"density[add]", "density[reverse]"} <= set(t.params)
    summary = report("choice", device="cpu")
    md = (results / "choice" / "report.md").read_text()
    assert "| candidate | method | search mean |" in md
    for c in summary["candidates"]:
        assert c["method"] in ("task_arithmetic", "ties", "linear", "slerp", "dare_ties"), c
        assert f"| {c['label']} | {c['method']} |" in md
    # a space that searches a parameter no method of it uses is refused
    with pytest.raises(MergeSearchError, match="parameters.density: task_arithmetic ignores density"):
        load_space(write_space(tmp_path, name="x", method="task_arithmetic"))


def test_the_report_weighs_tasks_as_the_search_did(zoo, tmp_path, results):
    """With objective: mean and task_weights, the report's means and gains are that weighted mean,
    not the plain one (the headline is about what the search optimized)."""

    space = load_space(
        write_space(
            tmp_path,
            name="weighted",
            method="task_arithmetic",
            parameters={"weight": [0.0, 1.5]},
            granularity="model",
            components=["all"],
            objective="mean",
            task_weights={"add": 3},
            fidelity=[40],
            trials=6,
        )
    )
    run_search(space, progress=False)
    summary = report("weighted")
    assert summary["task_weights"] == {"add": 3}
    for c in summary["candidates"]:
        t = {k: v["value"] for k, v in c["test"].items()}
        assert c["test_mean"] == pytest.approx((3 * t["add"] + t["reverse"]) / 4)
    g = summary["gain"]
    assert g["gain"] == pytest.approx(g["best_test_mean"] - g["baseline_test_mean"])
    assert g["ci95"][0] <= g["gain"] <= g["ci95"][1]
    assert "objective was: add 3" in (results / "weighted" / "report.md").read_text()

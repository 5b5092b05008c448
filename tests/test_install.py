"""A wheel, installed into a fresh virtualenv, runs the demo from an empty folder: evals/,
search_spaces/ and the demo zoo ship inside it. Slow (a virtualenv from the lock file, then the
demo): `.venv/bin/python -m pytest -m slow tests/test_install.py`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-3000:])
    return p


@pytest.mark.slow
def test_a_wheel_install_runs_the_demo_from_an_empty_folder(tmp_path):
    # python -m build when it is installed; pip wheel runs the same PEP 517 backend otherwise
    has_build = subprocess.run(
        [sys.executable, "-m", "build", "--version"], capture_output=True, cwd=tmp_path
    )
    if has_build.returncode == 0:
        _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", tmp_path / "dist", ROOT])
    else:
        pip_wheel = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", ROOT]
        _run([sys.executable, "-m", *pip_wheel])
    (wheel,) = (tmp_path / "dist").glob("mergesearch-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, "torch==2.13.0"])  # first, as scripts/bootstrap.sh does: the local CPU wheel
    _run([*pip, "-r", ROOT / "reqs" / "requirements-lock.txt"])
    _run([*pip, "--no-deps", wheel])
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERGESEARCH_")}
    env["MERGESEARCH_HOME"] = str(tmp_path / "home")
    exe = venv / "bin" / "mergesearch"
    demo = _run([exe, "demo", "--trials", "20", "-q"], cwd=empty, env=env)
    assert "learned recipe" in demo.stdout and (empty / "results" / "demo" / "report.md").is_file()
    # the installed package reads its own data, not this checkout's
    where = _run(
        [
            venv / "bin" / "python",
            "-c",
            "from mergesearch.resources import data_dir; print(data_dir('evals'))",
        ],
        cwd=empty,
    ).stdout.strip()
    assert str(venv) in where and "_data" in where, where
    add = _run(
        [
            venv / "bin" / "python",
            "-c",
            "from mergesearch.zoo import build_zoo; print(build_zoo().models['add'])",
        ],
        cwd=empty,
        env=env,
    ).stdout.strip()
    scored = _run(
        [exe, "eval", add, "--tasks", "add", "--limit", "20", "--device", "cpu"], cwd=empty, env=env
    )
    assert "add" in scored.stdout and "exact_match" in scored.stdout

"""The demo zoo has the properties that make it a fair test of merging."""

from __future__ import annotations

import subprocess
import sys
import time

from mergesearch.zoo import build_zoo


def test_zoo_properties(zoo):
    s = zoo.scores
    for skill in ("add", "reverse", "count"):
        assert s[skill][skill] >= 0.9, (skill, s[skill])
        assert s["base"][skill] <= 0.1
        for other in ("add", "reverse", "count"):
            if other != skill:
                assert s[skill][other] <= 0.1, (skill, other, s[skill][other])
    lin = zoo.checks["linear 50/50 keeps less than half"]
    ta = zoo.checks["task arithmetic keeps both skills"]
    assert lin["ok"], lin
    assert ta["ok"], ta
    assert all(c["ok"] for c in zoo.checks.values()), zoo.checks
    for path in zoo.models.values():
        assert (path / "README.md").read_text().startswith("# mergesearch demo zoo")


def test_shipped_zoo_scores_here_as_recorded(zoo):
    """The shipped weights were scored on the machine that built them; this machine agrees."""
    from mergesearch.zoo import SHIPPED, score_models

    assert zoo.root.parent == SHIPPED
    here = score_models(zoo.models, ("add", "reverse", "count"))
    for name, scores in zoo.scores.items():
        for skill, value in scores.items():
            assert abs(here[name][skill] - value) <= 0.01, (name, skill, here[name][skill], value)


def test_zoo_is_cached_and_cli_prints_scores(zoo):
    t0 = time.perf_counter()
    again = build_zoo(progress=False, log=lambda s: None)
    assert time.perf_counter() - t0 < 2 and again.root == zoo.root
    p = subprocess.run(
        [sys.executable, "-m", "mergesearch", "zoo", "build", "-q"], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    assert "exact match on test splits" in p.stdout and str(zoo.root) in p.stdout and "FAIL" not in p.stdout

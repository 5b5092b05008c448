"""benchmarks/bench_scale.py runs as its README line says, on models of its own (the tiny shape):
every placement measured in its own process, one row each, the same candidates' trials."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_bench_scale_measures_every_placement(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_scale.py"),
        "--shape",
        "tiny",
        "--root",
        str(tmp_path / "m"),
    ]
    cmd += ["--placements", "disk,device", "--trials", "2", "--examples", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["placement"] for r in rows] == ["disk", "device"]
    for r in rows:
        assert r["trials"] == 2 and r["merge_s"] > 0 and r["floor_s"] > 0 and r["eval_s"] > 0
        assert r["peak_anon_gib"] <= r["peak_rss_gib"]
    assert rows[0]["inputs_gib"] == rows[1]["inputs_gib"]
    assert "| disk |" in proc.stdout and "| device |" in proc.stdout

"""Fixtures and helpers that several test files share: tiny models, the demo zoo, results under
tmp_path, a space file, a real subprocess of the CLI, mergekit's own merge, and the search's bench
with the zoo-aware model resolver the CLI hands it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.tiny_models import make_base, make_finetune

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Llama (base sharded into several files) and GPT-2 bases, each with three fine-tunes."""
    root = tmp_path_factory.mktemp("tiny")
    paths: dict[str, Path] = {}
    for arch in ("llama", "gpt2"):
        base = make_base(root / arch / "base", arch, shard="100KB" if arch == "llama" else None)
        paths[f"{arch}/base"] = base
        for i in range(3):
            paths[f"{arch}/ft{i}"] = make_finetune(base, root / arch / f"ft{i}", 100 + i)
    return paths


@pytest.fixture(scope="session")
def zoo():
    """The demo zoo, built once and cached under $MERGESEARCH_HOME (about 1.5 minutes cold)."""
    from mergesearch.zoo import build_zoo

    return build_zoo(progress=False, log=lambda s: None)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, size, ro=False): a tmpfs folder under tmp_path; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "1m", ro: bool = False) -> Path:
        d = tmp_path / name
        d.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True)
        if r.returncode:
            pytest.skip(f"mounting a tmpfs needs root (CI runs as root): {r.stderr.decode().strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture
def results(tmp_path, monkeypatch):
    """results/<study> of in-process searches and reports under tmp_path."""
    from mergesearch.search import storage

    monkeypatch.setattr(storage, "RESULTS", tmp_path / "results")
    return tmp_path / "results"


SPACE = {
    "name": "t",
    "base": "zoo:base",
    "models": ["zoo:add", "zoo:reverse"],
    "method": "dare_ties",
    "granularity": "layer",
    "components": ["attention", "other"],
    "parameters": {"weight": [0.2, 1.2], "density": [0.3, 1.0]},
    "tasks": ["add", "reverse"],
    "fidelity": [20, 60],
    "trials": 12,
}


def write_space(tmp_path: Path, **over) -> Path:
    d = dict(SPACE, **over)
    p = tmp_path / f"{d['name']}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def env(tmp_path: Path) -> dict:
    return dict(os.environ, MERGESEARCH_RESULTS=str(tmp_path / "results"))


def cli(tmp_path: Path, *args, check=True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "-m", "mergesearch", *args],
        capture_output=True,
        text=True,
        env=env(tmp_path),
        cwd=tmp_path,
        **kw,
    )
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def mergekit_yaml(cwd: Path, recipe: str, out: str) -> None:
    """mergekit itself builds the model of an exported recipe (the draws of `--random-seed 0`)."""
    mk = subprocess.run(
        [str(Path(sys.executable).parent / "mergekit-yaml"), recipe, out, "--random-seed", "0"]
        + ["--no-write-model-card", "--quiet"],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    assert mk.returncode == 0, mk.stderr[-3000:]


def bench(space, **kw):
    """The search's bench over a space that names zoo models (as the CLI and the demo build it)."""
    from mergesearch.search import Bench
    from mergesearch.sources import resolve_model

    return Bench(space, resolve=resolve_model, **kw)


def search(space, **kw):
    """run_search with the zoo-aware resolver (as the CLI calls it)."""
    from mergesearch.search import run_search
    from mergesearch.sources import resolve_model

    return run_search(space, resolve=resolve_model, **kw)


def report(study, **kw):
    """report() with the zoo-aware resolver (as the CLI calls it)."""
    from mergesearch.report import report as build
    from mergesearch.sources import resolve_model

    return build(study, resolve=resolve_model, **kw)


def index_order_mask(tau: torch.Tensor, sparsification: str, density: float, gamma: float) -> torch.Tensor:
    """The rank window of |τ| that mergekit keeps, ranking ties by flat index (stable sort)."""
    a = tau.reshape(-1).abs().float()
    n = a.numel()
    if sparsification == "magnitude":
        k = max(1, int(density * n))
        r0, r1 = n - k, n
    else:
        target, n_top = int(density * n), int(gamma * n)
        r0 = max(0, n - target - n_top)
        r1 = min(n, r0 + target)
    mask = torch.zeros_like(a)
    mask[torch.sort(a, stable=True).indices[r0:r1]] = 1
    return mask.reshape(tau.shape).to(tau.dtype)


@pytest.fixture(scope="session")
def bf16_models(tiny, tmp_path_factory):
    """The tiny Llama base and fine-tunes stored in bf16 (a base of its own: bf16 rounding)."""
    from tests.tiny_models import make_finetune

    root = tmp_path_factory.mktemp("bf16")
    out = {
        "llama/base": make_finetune(tiny["llama/base"], root / "base", 399, scale=0.0, dtype=torch.bfloat16)
    }
    for i in range(3):
        out[f"llama/ft{i}"] = make_finetune(
            tiny["llama/base"], root / f"ft{i}", 300 + i, dtype=torch.bfloat16
        )
    return out

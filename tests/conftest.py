from __future__ import annotations

import os
from pathlib import Path

import pytest

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
def results(tmp_path, monkeypatch):
    """results/<study> of in-process searches and reports under tmp_path."""
    from mergesearch import study

    monkeypatch.setattr(study, "RESULTS", tmp_path / "results")
    return tmp_path / "results"

"""Where the project's data lives: `evals/` and `search_spaces/` at the top of a checkout, or the
copies a wheel installs as `mergesearch/_data/` (pyproject.toml maps one onto the other)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def data_dir(name: str) -> Path:
    """`evals` or `search_spaces`: the checkout's folder when there is one, else the installed copy."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / name).is_dir():  # a checkout, not site-packages
        return root / name
    return Path(str(resources.files("mergesearch") / "_data" / name))

"""Reading the project's YAML files (recipes, tasks, search spaces): safe_load, clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import MergeSearchError


def read_mapping(path: str | Path, kind: str) -> dict[str, Any]:
    """The top-level mapping of a YAML file; `kind` names the file in errors ("task file")."""
    p = Path(path)
    if not p.is_file():
        raise MergeSearchError(f"{p}: {kind} does not exist")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise MergeSearchError(f"{p}: not valid YAML ({e})") from e
    if not isinstance(d, dict):
        raise MergeSearchError(f"{p}: expected a mapping")
    return d

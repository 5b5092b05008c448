"""Reading the project's YAML files (recipes, tasks, search spaces): safe_load, clear errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from .errors import MergeSearchError


def read_text(path: str | Path, kind: str) -> str:
    """A UTF-8 text file's contents; `kind` names the file in errors ("task file")."""
    p = Path(path)
    if p.is_dir():
        raise MergeSearchError(f"{p}: is a folder; give the {kind} (a .yaml file) itself")
    if not p.is_file():
        raise MergeSearchError(f"{p}: {kind} does not exist")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergeSearchError(
            f"{p}: not a UTF-8 text file (byte {e.start}); is it the {kind}? Save it as UTF-8 YAML"
        ) from e


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no tags that build objects) that refuses a key given twice in one mapping:
    PyYAML would keep the last value without a word (`method:` twice merges by the second)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None,
                            None,
                            f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one",
                            key_node.start_mark,
                        )
                    seen[key] = line
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    continue
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str) -> Any:
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


def safe_load_all(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=StrictLoader))  # noqa: S506


def yaml_error(where: str, e: yaml.YAMLError) -> MergeSearchError:
    return MergeSearchError(f"{where}: not valid YAML ({' '.join(str(e).split())})")


def read_mapping(path: str | Path, kind: str) -> dict[str, Any]:
    """The top-level mapping of a YAML file."""
    text = read_text(path, kind)
    try:
        d = safe_load(text)
    except yaml.YAMLError as e:
        raise yaml_error(str(path), e) from e
    if not isinstance(d, dict):
        raise MergeSearchError(f"{path}: expected a mapping of keys to values, found {type(d).__name__}")
    return d


def number(v: Any, where: str, *, whole: bool = False, minimum: float | None = None) -> Any:
    """A finite number read from YAML (a whole one when `whole`), else an error naming `where`."""
    kind = "a whole number" if whole else "a finite number"
    if minimum is not None:
        kind += f" ≥ {minimum:g}"
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and whole:
        ok = float(v).is_integer()
    if not ok or (minimum is not None and v < minimum):
        raise MergeSearchError(f"{where}: {kind}, not {v!r}")
    return int(v) if whole else float(v)


def names(v: Any, where: str, example: str) -> list[str]:
    """A non-empty list of non-empty strings (a YAML string alone is refused, not iterated)."""
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise MergeSearchError(f"{where}: a list of names, e.g. {example}; not {v!r}")
    return list(v)

"""Where a model reference points, zoos included: a folder (absolute, or relative to the working
directory or to the space file), or a model of a built-in zoo, built on first use: `zoo:<name>`
(the demo zoo, `zoo.py`), `smollm2:<name>` (`zoo build --base smollm2`) and
`smollm2_lists:<name>` (`zoo build --base smollm2_lists`).

The search resolves folders only (`search.bench.resolve_folder`); the CLI and the demo hand it
`resolve_model`, so the demo's zoos sit above the search, not under it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .errors import MergeSearchError
from .search.bench import resolve_folder


def _demo_zoo() -> dict[str, Path]:
    from .zoo import build_zoo

    return build_zoo(log=lambda s: None).models


def _smollm2_zoo() -> dict[str, Path]:
    from .smollm2_zoo import build_smollm2_zoo

    return build_smollm2_zoo().models


def _smollm2_lists_zoo() -> dict[str, Path]:
    from .smollm2_zoo import LIST_SKILLS, SmolZooConfig, build_smollm2_zoo

    return build_smollm2_zoo(cfg=SmolZooConfig(skills=LIST_SKILLS)).models


ZOOS: dict[str, Callable[[], dict[str, Path]]] = {
    "zoo": _demo_zoo,
    "smollm2": _smollm2_zoo,
    "smollm2_lists": _smollm2_lists_zoo,
}


def resolve_model(ref: str, space_path: Path | None) -> Path:
    """A model reference as a folder that exists."""
    prefix, _, name = ref.partition(":")
    if name and prefix in ZOOS:
        models = ZOOS[prefix]()
        if name not in models:
            raise MergeSearchError(f"model {ref}: the {prefix} zoo has {', '.join(models)}")
        return models[name]
    return resolve_folder(ref, space_path)

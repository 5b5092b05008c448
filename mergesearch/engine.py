"""Turns a recipe into weights, streaming tensor by tensor from input folders to an output folder.

`merge` executes a plan (`plan.plan_merge`: inputs and parameters of every output tensor,
resolved before any data is read, so bad recipes fail fast and nothing is written) in
mergekit's order (lexicographic by tensor name, which is also the order of DARE's random
draws) and writes through `StreamingWriter`: peak memory is one tensor per input.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import (
    StreamingWriter,
    check_finite,
    copy_tokenizer,
    parse_size,
)
from .errors import MergeSearchError
from .plan import MergePlan, TensorTask, plan_merge
from .recipe import ZOO_REFERENCE, Recipe, dump_recipes, load_recipes


def seed_everything(seed: int, device: torch.device | None = None) -> None:
    """What mergekit's --random-seed does (transformers.set_seed): python, numpy and torch RNGs.
    With a CPU `device`, of torch's only the CPU generator: torch.manual_seed also seeds every
    accelerator's, lazily where none is initialized, which formats a stack trace (a cost per candidate)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if device is not None and device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeSearchError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise MergeSearchError(f"--device {device!r}: not a device name ({e})") from e


# -- execution -----------------------------------------------------------------------------


def merge_tensor(plan: MergePlan, task: TensorTask, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Apply the plan's method to one output tensor's (already loaded) inputs."""
    method = plan.method
    if not task.floating:
        if any(not torch.equal(tensors[0], x) for x in tensors[1:]):
            raise MergeSearchError(f"tensor {task.name}: non-float buffer differs between inputs")
        return tensors[0]
    tensors = [x.to(task.work_dtype) for x in tensors]
    base = tensors[task.base] if task.base is not None else None
    others = [x for i, x in enumerate(tensors) if i != task.base]
    if method.base == "required" and not others:
        return base
    out = method.merge(base, others, **task.shared, **task.per_model)
    return out.to(task.out_dtype)


def iter_merged(
    plan: MergePlan, device: torch.device, progress: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    for task in tqdm(plan.tasks, desc="merging", unit="tensor", disable=not progress, leave=False):
        tensors = []
        for ref, name in task.inputs:
            ck = plan.models[ref]
            x = ck.get(name, device)
            check_finite(x, name, ck.path)
            tensors.append(x)
        yield task.name, merge_tensor(plan, task, tensors)


@contextmanager
def _stage_dirs(parent: Path) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=".mergesearch-stages-", dir=parent))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def merge(
    recipe: Recipe | list[Recipe] | str | Path,
    out_dir: str | Path,
    *,
    seed: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    allow_pickle: bool = False,
    shard_size: str | int = "5GB",
    progress: bool = False,
    recipe_dir: Path | None = None,
    resolve: Callable[[str, Path | None], Path] | None = None,
) -> Path:
    """Merge a recipe (or a multi-stage list, or a YAML file) into a Hugging Face model folder.
    `resolve` turns a zoo reference (`smollm2:largest`, as `export --references space` writes)
    into its folder; the CLI passes `sources.resolve_model`."""
    if isinstance(recipe, (str, Path)):
        recipe_dir = Path(recipe).resolve().parent
        recipes = load_recipes(recipe)
    else:
        recipes = recipe if isinstance(recipe, list) else [recipe]
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise MergeSearchError(f"{out_dir}: output folder exists; pass --overwrite to replace it")
    dev = resolve_device(device)
    stages: dict[str, Path] = {}

    def resolve_path(ref: str) -> Path:
        if ref in stages:
            return stages[ref]
        p = Path(ref).expanduser()
        if not p.exists() and recipe_dir is not None and (recipe_dir / ref).exists():
            p = recipe_dir / ref
        if not p.exists() and resolve is not None and ZOO_REFERENCE.match(ref):
            return resolve(ref, None)
        if not p.exists():
            raise MergeSearchError(
                f"model {ref}: folder does not exist (paths are relative to the current directory)"
            )
        return p

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _stage_dirs(out_dir.parent) as tmp:
        for i, r in enumerate(recipes):
            last = i == len(recipes) - 1
            target = out_dir if last else tmp / f"stage-{i}-{r.name}"
            plan = plan_merge(r, resolve_path, allow_pickle=allow_pickle)
            _write(
                plan,
                target,
                seed,
                dev,
                overwrite if last else False,
                parse_size(shard_size),
                progress,
                recipes if last else [r],
            )
            if r.name:
                stages[r.name] = target
    return out_dir


def _write(
    plan: MergePlan,
    out_dir: Path,
    seed: int | None,
    device: torch.device,
    overwrite: bool,
    shard_bytes: int,
    progress: bool,
    recipes: list[Recipe],
) -> None:
    writer = StreamingWriter(out_dir, plan.layout, [t.name for t in plan.tasks], shard_bytes, overwrite)
    try:
        if seed is not None:  # mergekit reseeds at the start of every (stage's) merge
            seed_everything(seed)
        for name, tensor in iter_merged(plan, device, progress):
            writer.write(name, tensor)
        writer.add_file("config.json", json.dumps(plan.config, indent=2) + "\n")
        writer.add_file("mergesearch_recipe.yml", dump_recipes(recipes))
        writer.add_file("README.md", model_card(recipes))
        copy_tokenizer(plan.models[plan.tokenizer_from].path, writer)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        for ck in plan.models.values():
            ck.close()


def model_card(recipes: list[Recipe]) -> str:
    """A Hugging Face model card, as mergekit writes one: the method, the models, the recipe."""
    last = recipes[-1]
    staged = {r.name for r in recipes if r.name}
    refs = [
        src.model for r in recipes for src in (r.models or [x for sl in r.slices or [] for x in sl.sources])
    ]
    sources = list(dict.fromkeys(m for m in refs if m not in staged))
    lines = [
        "---",
        "library_name: transformers",
        "tags: [mergekit, merge, mergesearch]",
        "---",
        "# Merged model",
        "",
        f"A merge of pre-trained language models made with mergesearch, mergekit 0.1.5's semantics "
        f"(method `{last.merge_method}`"
        + (f", in {len(recipes)} stages" if len(recipes) > 1 else "")
        + (f", base `{last.base_model}`" if last.base_model else "")
        + ").",
        "",
        "## Models merged",
        "",
        *[f"- `{m}`" for m in sources],
        "",
        "## Configuration",
        "",
        "The recipe, also in `mergesearch_recipe.yml` (`mergekit-yaml` runs it too):",
        "",
        "```yaml",
        dump_recipes(recipes).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)

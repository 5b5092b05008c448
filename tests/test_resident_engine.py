"""In-memory candidates equal `mergesearch merge` disk output for the same recipe and seed."""

from __future__ import annotations

import random

import pytest
import torch
import yaml

from mergesearch.candidates import ResidentEngine
from mergesearch.engine import merge
from mergesearch.methods.registry import METHODS
from mergesearch.recipe import parse_recipes
from tests.test_merge_vs_mergekit import CASE_NAMES, GTA_CASES, cases
from tests.tiny_models import load_weights

CASES = [c for c in CASE_NAMES if c not in ("linear_unnormalized", "nuslerp_rowwise_nobase")]


def _randomize(config: dict, rng: random.Random) -> dict:
    """Random weights/densities (per model, some per layer gradient) in a known recipe shape."""
    for m in config.get("models", []):
        p = m.setdefault("parameters", {})
        if "weight" in p:
            p["weight"] = [round(rng.uniform(0.1, 1.2), 3), round(rng.uniform(0.1, 1.2), 3)]
        if "density" in p:
            p["density"] = round(rng.uniform(0.3, 0.8), 3)
    return config


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_resident_candidates_equal_disk_merges(tiny, tmp_path, arch):
    rng = random.Random(0)
    all_cases = cases(tiny, arch)
    refs = sorted({str(p) for k, p in tiny.items() if k.startswith(arch)})
    engine = ResidentEngine(refs)
    for name in CASES:
        config = _randomize(all_cases[name], rng)
        (recipe,) = parse_recipes(yaml.safe_dump(config))
        merge(recipe, tmp_path / name, seed=5)
        disk = load_weights(tmp_path / name)
        mem = engine.state_dict(recipe, seed=5)
        assert sorted(mem) == sorted(disk), name
        for k in disk:
            assert torch.equal(mem[k], disk[k]), f"{name}: {k}"


GTA = GTA_CASES


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_task_vector_engine_writes_live_model_bit_for_bit(tiny, tmp_path, arch):
    """Resident task vectors + scratch + writes into the live parameters == the disk merge."""
    import transformers

    rng = random.Random(1)
    all_cases = cases(tiny, arch)
    base = str(tiny[f"{arch}/base"])
    refs = sorted({str(p) for k, p in tiny.items() if k.startswith(arch)})
    engine = ResidentEngine(refs, base=base)
    assert len(engine.inputs.taus) == 3 * len(engine.inputs.weights(base))
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    for name in GTA:
        (recipe,) = parse_recipes(yaml.safe_dump(_randomize(all_cases[name], rng)))
        merge(recipe, tmp_path / name, seed=9)
        engine.write_into(model, recipe, seed=9)
        live = model.state_dict()
        for k, v in load_weights(tmp_path / name).items():
            assert torch.equal(live[k], v), f"{name}: {k}"
    from mergesearch.errors import MergeSearchError

    (linear,) = parse_recipes(yaml.safe_dump(all_cases["linear"]))
    with pytest.raises(MergeSearchError, match="without base="):
        engine.write_into(model, linear)


def two_stages(tiny) -> tuple[str, list[str], list]:
    """(base, fine-tunes, recipes): DARE-TIES of two fine-tunes, then TIES of that with the third."""
    base, ft = str(tiny["llama/base"]), [str(tiny[f"llama/ft{i}"]) for i in range(3)]
    text = (
        f"name: ab\nmerge_method: dare_ties\nbase_model: {base}\nmodels:\n"
        f"  - {{model: {ft[0]}, parameters: {{weight: 0.6, density: 0.5}}}}\n"
        f"  - {{model: {ft[1]}, parameters: {{weight: 0.4, density: 0.7}}}}\n---\n"
        f"merge_method: ties\nbase_model: {base}\nmodels:\n"
        f"  - {{model: ab, parameters: {{weight: 0.5, density: 0.6}}}}\n"
        f"  - {{model: {ft[2]}, parameters: {{weight: 0.5, density: 0.6}}}}\n"
    )
    return base, ft, parse_recipes(text)


def test_write_into_live_model_and_multistage(tiny, tmp_path):
    import transformers

    base, ft, recipes = two_stages(tiny)
    merge(recipes, tmp_path / "disk", seed=3)
    engine = ResidentEngine([base, *ft])
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    engine.write_into(model, recipes, seed=3)
    disk = load_weights(tmp_path / "disk")
    live = model.state_dict()
    for k, v in disk.items():
        assert torch.equal(live[k], v), k
    assert "ab" not in engine.models  # intermediates are dropped after the candidate


def test_dare_candidates_share_their_draws(tiny):
    """Reseeded per candidate, DARE's Bernoulli draws are common random numbers: a lower density
    keeps a subset of what a higher one keeps, in every tensor, so two candidates differ by their
    coefficients, not by noise — under mergekit's own RNG contract (what the exported recipe gets)."""
    base, ft = str(tiny["llama/base"]), str(tiny["llama/ft0"])
    engine = ResidentEngine([base, ft], base=base)

    def kept(density: float) -> dict[str, torch.Tensor]:
        (r,) = parse_recipes(
            yaml.safe_dump(
                {
                    "merge_method": "dare_linear",
                    "base_model": base,
                    "models": [{"model": ft, "parameters": {"weight": 1.0, "density": density}}],
                }
            )
        )
        out = engine.state_dict(r, seed=0)
        return {k: (v - engine.inputs.weights(base)[k]) != 0 for k, v in out.items()}

    low, high = kept(0.3), kept(0.6)
    for k in low:
        assert not bool((low[k] & ~high[k]).any()), k
        assert low[k].sum() < high[k].sum(), k


def test_linear_is_merged_in_chunks_with_the_same_values(tiny):
    """The resident engine runs elementwise methods 64K elements at a time (into the live
    parameter): the values equal the whole-tensor merge, across chunk boundaries."""
    from mergesearch.candidates.resident import _chunked, merge_tensor, plan_merge

    refs = [str(tiny[f"llama/ft{i}"]) for i in range(3)]
    (recipe,) = parse_recipes(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [{"model": r, "parameters": {"weight": w}} for r, w in zip(refs, [0.3, 0.5, 0.9])],
            }
        )
    )
    plan = plan_merge(recipe)
    task = plan.tasks[0]
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        task.work_dtype = task.out_dtype = dtype
        xs = [torch.randn(300, 701, generator=g).to(dtype) for _ in refs]  # 3.2 chunks
        target = torch.empty(300, 701, dtype=dtype)
        assert _chunked(plan, task, xs, target) is target
        assert torch.equal(target, merge_tensor(plan, task, xs))


def test_layouts_are_reused_only_by_recipes_of_the_same_structure(tiny, tmp_path):
    """A candidate reuses the plan layout of an earlier recipe with the same structure and resolves
    its own parameters (scalars, gradients, filters); another structure (slices, dtype) gets its
    own layout. Each candidate equals the disk merge of its recipe."""
    all_cases = cases(tiny, "llama")
    refs = sorted({str(p) for k, p in tiny.items() if k.startswith("llama")})
    engine = ResidentEngine(refs)
    rng = random.Random(7)
    names = ["linear", "slerp_slices", "linear", "linear_unnormalized", "slerp_slices", "linear"]
    for i, name in enumerate(names):
        config = _randomize(all_cases[name], rng)
        if i == 5:  # the same models and method in another dtype: another layout
            config["dtype"] = "bfloat16"
        (recipe,) = parse_recipes(yaml.safe_dump(config))
        merge(recipe, tmp_path / str(i), seed=1)
        mem = engine.state_dict(recipe, seed=1)
        for k, v in load_weights(tmp_path / str(i)).items():
            assert torch.equal(mem[k], v), f"{i} {name}: {k}"
    # linear (whose layout linear_unnormalized shares: the same models and dtype, its parameters
    # set at the top level instead), slerp_slices, and linear in bf16
    assert len(engine.layouts) == 3


def test_a_new_sparsifier_is_searched_through_its_reference(tiny, tmp_path, monkeypatch):
    """A sparsifier registered in methods/ only (and a method using it) is searched as itself: the
    search engine, which does not know it, takes the reference instead of merging it unmasked."""
    from mergesearch.methods import registry, sparsify

    def smallest(tau, density, gamma, epsilon, rescale, generator):  # keep the smallest |τ|
        k = max(1, int(density * tau.numel()))
        cut = tau.abs().flatten().kthvalue(k).values
        return tau * (tau.abs() <= cut)

    monkeypatch.setitem(sparsify.SPARSIFIERS, "smallest", smallest)
    monkeypatch.setitem(
        registry.METHODS, "smallest_ta", registry.gta_method("smallest_ta", "smallest", False, False, False)
    )
    base = str(tiny["llama/base"])
    config = {
        "merge_method": "smallest_ta",
        "base_model": base,
        "models": [
            {"model": str(tiny[f"llama/ft{i}"]), "parameters": {"weight": 0.7, "density": 0.3}}
            for i in (0, 1)
        ],
    }
    (recipe,) = parse_recipes(yaml.safe_dump(config))
    merge(recipe, tmp_path / "disk", seed=0)
    ta = dict(config, merge_method="task_arithmetic")
    (plain,) = parse_recipes(yaml.safe_dump(ta))
    merge(plain, tmp_path / "ta", seed=0)
    disk, unmasked = load_weights(tmp_path / "disk"), load_weights(tmp_path / "ta")
    searched = ResidentEngine([base, *config_models(config)], base=base, exact=False).state_dict(
        recipe, seed=0
    )
    for k, v in disk.items():
        assert torch.equal(searched[k], v), k
    assert any(not torch.equal(disk[k], unmasked[k]) for k in disk)  # it is not task arithmetic


def config_models(config: dict) -> list[str]:
    return [m["model"] for m in config["models"]]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_search_candidate_is_its_own_methods_merge(tiny, method, monkeypatch):
    """The bank ↔ methods/ contract, over every registered method. Where the bank declares the
    method (`TaskVectorBank.supports`), it makes the search's candidate: deterministic methods
    equal the exact engine bit for bit, DARE and DELLA equal the method's formula with the bank's
    draws (fp32 rounding: the L1 norms' order). Every other method takes its reference, equal to
    the exact engine, and the bank is never called."""
    from mergesearch.candidates import TaskVectorBank
    from mergesearch.methods import sparsify
    from mergesearch.methods.task_arithmetic import combine

    calls = []
    real = TaskVectorBank.merge
    monkeypatch.setattr(TaskVectorBank, "merge", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    all_cases = cases(tiny, "llama")
    config = next(c for c in all_cases.values() if c["merge_method"] == method)
    (recipe,) = parse_recipes(yaml.safe_dump(config))
    refs = sorted({str(p) for k, p in tiny.items() if k.startswith("llama")})
    m = METHODS[method]
    exact = ResidentEngine(refs).state_dict(recipe, seed=0)
    calls.clear()
    base = config.get("base_model") if m.task_vectors else None
    search = ResidentEngine(refs, base=base, exact=False)
    got = search.state_dict(recipe, seed=0)
    assert sorted(got) == sorted(exact)
    if not TaskVectorBank.supports(m, torch.float32, "cpu"):
        assert not calls, method
        assert all(torch.equal(got[k], exact[k]) for k in exact), method
        return
    assert calls, method
    if not m.randomized:
        assert all(torch.equal(got[k], exact[k]) for k in exact), method
        return
    checked = 0
    for task in search.plan(recipe).tasks:
        keys = [(ref, search.models[ref].resolve(name)) for ref, name in task.inputs]
        others = [k for i, k in enumerate(keys) if i != task.base]
        if not all(search.inputs.is_task_vector(k) for k in others):
            continue
        checked += 1
        args = m.gta_arguments({**task.shared, **task.per_model})
        deltas = []
        for i, (ref, name) in enumerate(others):
            tau = search.inputs.tensor(ref, name)
            extra = {"epsilon": args["epsilon"][i]} if args["epsilon"] else {}
            mask = search.bank.mask(
                f"{refs.index(ref)}:{name}", tau, m.sparsification, args["density"][i], **extra
            )
            deltas.append(sparsify.rescale_l1(tau, mask, args["rescale"]))
        b = search.inputs.tensor(*keys[task.base])
        w = torch.tensor(args["weight"], dtype=b.dtype).reshape(-1, *[1] * b.dim())
        expected = combine(b, torch.stack(deltas), w, consensus=m.consensus, normalize=args["normalize"],
                           lambda_=args["lambda_"])  # fmt: skip
        torch.testing.assert_close(got[task.name], expected, rtol=1e-6, atol=1e-7)
    assert checked > 0.5 * len(got), (method, checked)


def test_a_dropped_engine_frees_its_tensors_at_once(tiny):
    """No reference cycle through the bank and its caches: the task vectors of an engine a
    report or a benchmark drops are freed when it is dropped, not at the next garbage collection
    (a search's process then never holds two engines' inputs)."""
    import gc
    import weakref

    base, ft = str(tiny["llama/base"]), [str(tiny[f"llama/ft{i}"]) for i in range(2)]
    config = {
        "merge_method": "della",
        "base_model": base,
        "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}} for m in ft],
    }
    (recipe,) = parse_recipes(yaml.safe_dump(config))
    gc.disable()
    try:
        engine = ResidentEngine([base, *ft], base=base, exact=False, cache_ranks=True)
        engine.state_dict(recipe, seed=0)
        bank = weakref.ref(engine.bank)  # its caches hold views of the task vectors' memory
        del engine
        assert bank() is None
    finally:
        gc.enable()

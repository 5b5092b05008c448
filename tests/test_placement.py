"""Placement × method: every placement of the inputs gives the resident engine's candidate bit for
bit, for every registered method, in the search engine and the exact one (DARE and DELLA with the
same draws), and the streamed placements hold no input in memory they allocate."""

from __future__ import annotations

import random

import pytest
import torch
import yaml

from mergesearch.candidates import ResidentEngine
from mergesearch.candidates.placement import Choice, Inputs, choose, input_bytes
from mergesearch.checkpoint import Checkpoint
from mergesearch.errors import MergeSearchError
from mergesearch.methods.registry import METHODS
from mergesearch.recipe import parse_recipes
from tests.test_merge_vs_mergekit import cases
from tests.test_resident_engine import _randomize, two_stages

STREAMED = ["host", "disk"]  # on the CPU, host is device's memory: it must still give the same bits


def _engines(models, method: str, exact: bool, placements, bf16: bool):
    refs = sorted({str(p) for k, p in models.items() if k.startswith("llama")})
    config = next(c for c in cases(models, "llama").values() if c["merge_method"] == method)
    if bf16:
        config.pop("dtype", None)  # merged in the inputs' bf16, as a search of bf16 models is
    base = config.get("base_model") if METHODS[method].task_vectors and not exact else None
    return config, {p: ResidentEngine(refs, base=base, exact=exact, placement=p) for p in placements}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("exact", [False, True], ids=["search", "exact"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_placement_gives_the_resident_candidate(tiny, bf16_models, method, exact, dtype):
    """Several candidates per engine (the caches and the reused buffers carry over); with bf16
    inputs also written into an fp32 live model, as a search on the CPU does: the bf16 values."""
    import transformers

    models = bf16_models if dtype == "bf16" else tiny
    config, engines = _engines(models, method, exact, ["device", *STREAMED], dtype == "bf16")
    live = transformers.AutoModelForCausalLM.from_pretrained(str(models["llama/base"]), dtype=torch.float32)
    rng = random.Random(7)
    for n in range(3):
        (recipe,) = parse_recipes(yaml.safe_dump(_randomize(config, rng)))
        want = engines["device"].state_dict(recipe, seed=n)
        for placement in STREAMED:
            got = engines[placement].state_dict(recipe, seed=n)
            assert sorted(got) == sorted(want)
            for k in want:
                assert torch.equal(got[k], want[k]), f"{method} in {placement}, candidate {n}: {k}"
        if dtype == "bf16" and set(want) <= {n for n, _ in live.named_parameters()} | {"lm_head.weight"}:
            for placement, engine in engines.items():
                engine.write_into(live, recipe, seed=n)
                params = dict(live.named_parameters())
                for k, v in want.items():
                    if k in params:
                        assert torch.equal(params[k], v.float()), f"{method} into fp32 ({placement}): {k}"


def test_a_multi_stage_recipe_streams_alike(tiny):
    base, ft, recipes = two_stages(tiny)
    want = ResidentEngine([base, *ft]).state_dict(recipes, seed=3)
    disk = ResidentEngine([base, *ft], placement="disk")
    got = disk.state_dict(recipes, seed=3)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not disk.inputs.staged  # the intermediate stage is dropped after the candidate


def test_the_disk_placement_allocates_no_input(tiny):
    """From the files, the engine's own memory is the τ buffers of the two tensors in flight,
    not the models: the mapped pages belong to the page cache."""
    base, ft = str(tiny["llama/base"]), [str(tiny[f"llama/ft{i}"]) for i in range(3)]
    resident = ResidentEngine([base, *ft], base=base, exact=False)
    disk = ResidentEngine([base, *ft], base=base, exact=False, placement="disk")
    (recipe,) = parse_recipes(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": base,
                "models": [{"model": m, "parameters": {"weight": 0.4, "density": 0.5}} for m in ft],
            }
        )
    )
    disk.state_dict(recipe, seed=0)
    largest = max(m.nbytes for m in disk.models[base].meta.values())
    assert resident.inputs.nbytes_held() == input_bytes(resident.models)
    assert disk.inputs.nbytes_held() <= 2 * 3 * largest  # two slots of K = 3 task vectors


def test_auto_places_what_fits(tiny, monkeypatch):
    import mergesearch.candidates.placement as placement

    refs = [str(tiny["llama/base"]), str(tiny["llama/ft0"])]
    models = {r: Checkpoint(r) for r in refs}
    need = input_bytes(models)
    monkeypatch.setattr(placement, "available_memory", lambda device: need + 10 * placement.HEADROOM_MIN)
    assert choose(models, "cpu", 1000).placement == "device"
    monkeypatch.setattr(placement, "available_memory", lambda device: need)
    c = choose(models, "cpu", 1000)
    assert c == Choice("disk", c.reason) and "do not fit" in c.reason
    assert choose(models, "cpu", 1000, "host").placement == "host"  # asked: no question
    with pytest.raises(MergeSearchError, match="placement device: .* need .* use placement host or disk"):
        choose(models, "cpu", 1000, "device")  # unless it cannot fit
    with pytest.raises(MergeSearchError, match="placement 'gpu'"):
        choose(models, "cpu", 1000, "gpu")
    with pytest.raises(MergeSearchError, match="placement 'ram'"):
        Inputs(models, None, torch.device("cpu"), "ram")

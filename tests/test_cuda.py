"""The CUDA paths against the CPU ones, on the shipped demo zoo. Skipped where PyTorch sees no
GPU (CI); run where one is: `python -m pytest tests/test_cuda.py`."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

RECIPES = {
    "task_arithmetic": {"weight": [[0.9, 0.4, 1.1], [0.6, 1.0, 0.2]]},
    "ties": {"weight": [0.8, 0.7], "density": [0.5, 0.3]},
    "dare_ties": {"weight": [0.9, 0.6], "density": [0.6, 0.4]},
}


def _recipe(zoo, method: str):
    from mergesearch.recipe import parse_recipes

    p = RECIPES[method]
    models = []
    for i, m in enumerate(("add", "reverse")):
        params = {"weight": p["weight"][i]}
        if "density" in p:
            params["density"] = p["density"][i]
        models.append({"model": str(zoo.models[m]), "parameters": params})
    text = yaml.safe_dump({"merge_method": method, "base_model": str(zoo.models["base"]), "models": models})
    return parse_recipes(text)


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_search_engine_candidates_on_cuda_equal_the_cpu_ones(zoo, method):
    """The search engine (task vectors resident, the bank's fixed DARE draws) on the GPU writes the
    same candidate as on the CPU, to fp32 rounding."""
    import transformers

    from mergesearch.candidates import ResidentEngine

    refs = [str(zoo.models[m]) for m in ("base", "add", "reverse")]
    out = {}
    for dev in ("cpu", "cuda"):
        engine = ResidentEngine(refs, base=refs[0], exact=False, seed=0, device=dev)
        model = transformers.AutoModelForCausalLM.from_pretrained(refs[0]).to(dev)
        engine.write_into(model, _recipe(zoo, method), seed=0)
        out[dev] = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    for k, a in out["cpu"].items():
        b = out["cuda"][k]
        tol = 1e-6 * max(1.0, float(a.abs().max()))
        assert torch.allclose(a, b, rtol=1e-5, atol=tol), (method, k, float((a - b).abs().max()))


@pytest.mark.parametrize("exact", [False, True], ids=["search", "exact"])
def test_every_placement_on_cuda_gives_the_resident_candidate(bf16_models, exact):
    """On a GPU, host (pinned, copied on a side stream) and disk (mapped, copied, τ on the GPU)
    give the resident engine's candidate bit for bit, several candidates in a row, also written
    into a bf16 live model on the GPU."""
    import random

    import transformers

    from mergesearch.candidates import ResidentEngine
    from mergesearch.methods.registry import METHODS
    from mergesearch.recipe import parse_recipes
    from tests.test_merge_vs_mergekit import cases
    from tests.test_resident_engine import _randomize

    refs = sorted({str(p) for k, p in bf16_models.items() if k.startswith("llama")})
    live = transformers.AutoModelForCausalLM.from_pretrained(
        str(bf16_models["llama/base"]), dtype=torch.bfloat16
    ).to("cuda")
    rng = random.Random(3)
    for method in ("task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs_ties", "linear"):
        config = next(c for c in cases(bf16_models, "llama").values() if c["merge_method"] == method)
        config.pop("dtype", None)
        base = config.get("base_model") if METHODS[method].task_vectors and not exact else None
        engines = {
            p: ResidentEngine(refs, base=base, exact=exact, device="cuda", placement=p)
            for p in ("device", "host", "disk")
        }
        for n in range(2):
            (recipe,) = parse_recipes(yaml.safe_dump(_randomize(config, rng)))
            want = engines["device"].state_dict(recipe, seed=n)
            for placement, engine in engines.items():
                got = engine.state_dict(recipe, seed=n)
                assert all(torch.equal(got[k], want[k]) for k in want), (method, placement)
                engine.write_into(live, recipe, seed=n)
                params = dict(live.named_parameters())
                assert all(torch.equal(params[k], want[k]) for k in want if k in params), (method, placement)


def test_generation_on_cuda_equals_hf_generate_and_the_cpu_verdicts(zoo):
    """Batched greedy decoding on the GPU gives transformers' own continuations, and the native
    harness's verdicts on the GPU equal the CPU's (fp32 checkpoint: scored in fp32 on both)."""
    from mergesearch.evaluation import NativeEvaluator, find_task
    from mergesearch.evaluation.generate import Generator
    from mergesearch.modeling import load_model

    model, tok = load_model(zoo.models["add"], device="cuda")
    texts = [ex.prompt for ex in find_task("add").examples("test", 12)]
    g = Generator(model, tok, batch_size=5)
    prompts = [tok(t)["input_ids"] for t in texts]
    ours = g.generate(prompts, max_new_tokens=4, stops=[])
    for p, mine in zip(prompts, ours):
        ids = torch.tensor([p], device="cuda")
        ref = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        want = ref[0, len(p) :].tolist()
        if tok.eos_token_id in want:
            want = want[: want.index(tok.eos_token_id) + 1]
        assert mine[: len(want)] == want, (p, mine, want)
    cpu_model, _ = load_model(zoo.models["add"], device="cpu")
    for task in ("add", "reverse"):
        gpu = NativeEvaluator(model, tok).evaluate(find_task(task), "test", 100)
        cpu = NativeEvaluator(cpu_model, tok).evaluate(find_task(task), "test", 100)
        assert (gpu.scores == cpu.scores).mean() >= 0.99, task


def test_search_and_report_on_cuda_by_default(zoo, tmp_path):
    """`search` and `report` pick the GPU by themselves (--device auto) and finish; the report's
    numbers for the best recipe agree with `eval` of the exported recipe's merge on the CPU."""
    from tests.conftest import cli  # a real subprocess of the CLI, results under tmp_path

    space = {
        "name": "gpu",
        "base": "zoo:base",
        "models": ["zoo:add", "zoo:reverse"],
        "method": "task_arithmetic",
        "granularity": "layer",
        "parameters": {"weight": [0.2, 1.2]},
        "tasks": ["add", "reverse"],
        "objective": "mean",
        "fidelity": [60],
        "trials": 6,
    }
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(space))

    cli(tmp_path, "search", "gpu.yaml", "-q")
    cli(tmp_path, "report", "gpu")
    summary = json.loads((tmp_path / "results" / "gpu" / "test_scores.json").read_text())
    best = next(c for c in summary["candidates"] if c["label"].endswith("(best)"))
    cli(tmp_path, "export", "gpu", "--best", "-o", "best.yaml")
    cli(tmp_path, "merge", "best.yaml", "merged", "-q")
    got = json.loads(
        cli(
            tmp_path,
            "eval",
            "merged",
            "--tasks",
            "add,reverse",
            "--split",
            "test",
            "--device",
            "cpu",
            "--json",
        ).stdout
    )
    for row in got:
        assert abs(row["value"] - best["test"][row["task"]]["value"]) <= 0.02, (row, best["test"])

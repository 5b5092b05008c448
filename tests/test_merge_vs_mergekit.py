"""`mergesearch merge` against mergekit 0.1.5 on the same models and YAML.

fp32: max |ours − mergekit| ≤ 1e-6 · max |mergekit|; DARE and DELLA bit-identical with a seed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mergesearch.cli import main as cli
from mergesearch.methods import METHODS
from tests.tiny_models import load_weights

SEED = 1234


def _models(tiny, arch, params, n=2):
    return [{"model": str(tiny[f"{arch}/ft{i}"]), "parameters": p} for i, p in zip(range(n), params)]


def gta(method, arch, tiny, params=None, **top):
    d = {
        "merge_method": method,
        "base_model": str(tiny[f"{arch}/base"]),
        "models": _models(
            tiny,
            arch,
            [
                {"weight": 0.7, "density": [0.8, 0.4]},  # density gradient over layers
                {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}], "density": 0.5},
            ],
        ),
        "dtype": "float32",
    }
    if params:
        d["parameters"] = params
    d.update(top)
    return d


def cases(tiny, arch):
    base = str(tiny[f"{arch}/base"])
    ft = [str(tiny[f"{arch}/ft{i}"]) for i in range(3)]
    n_layers = 3
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": ft[0], "parameters": {"weight": [0.2, 1.0]}},
                {
                    "model": ft[1],
                    "parameters": {"weight": [{"filter": "attn", "value": 0.9}, {"value": 0.4}]},
                },
            ],
            "dtype": "float32",
        },
        "linear_unnormalized": {
            "merge_method": "linear",
            "models": [{"model": ft[0]}, {"model": ft[1]}],
            "parameters": {"weight": 0.5, "normalize": False},
            "dtype": "float32",
        },
        "slerp_slices": {
            "merge_method": "slerp",
            "base_model": base,
            "slices": [
                {
                    "sources": [
                        {"model": base, "layer_range": [0, n_layers]},
                        {"model": ft[0], "layer_range": [0, n_layers]},
                    ]
                }
            ],
            "parameters": {
                "t": [
                    {"filter": "attn", "value": [0, 0.5, 1]},
                    {"filter": "mlp", "value": [1, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "float32",
        },
        "nuslerp": {
            "merge_method": "nuslerp",
            "base_model": base,
            "models": _models(tiny, arch, [{"weight": 0.3}, {"weight": 0.8}]),
            "dtype": "float32",
        },
        "nuslerp_rowwise_nobase": {
            "merge_method": "nuslerp",
            "models": _models(tiny, arch, [{"weight": 0.6}, {"weight": 0.4}]),
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
            "dtype": "float32",
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": f} for f in ft],
            "dtype": "float32",
        },
        "passthrough_frankenmerge": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": ft[0], "layer_range": [0, 2]}]},
                {
                    "sources": [{"model": ft[1], "layer_range": [1, 3]}],
                    "parameters": {
                        "scale": [
                            {"filter": "o_proj" if arch == "llama" else "c_proj", "value": 0.5},
                            {"value": 1.0},
                        ]
                    },
                },
            ],
            "dtype": "float32",
        },
        "task_arithmetic": gta("task_arithmetic", arch, tiny, {"lambda": 0.8}),
        "ties": gta("ties", arch, tiny),
        "ties_unnormalized": gta("ties", arch, tiny, {"normalize": False, "lambda": 1.3}),
        "dare_ties": gta("dare_ties", arch, tiny),
        "dare_linear": gta("dare_linear", arch, tiny),
        "breadcrumbs": gta("breadcrumbs", arch, tiny, {"gamma": 0.05}),
        "breadcrumbs_ties": gta("breadcrumbs_ties", arch, tiny),
        "della": gta("della", arch, tiny, {"epsilon": 0.1}),
        "della_linear": gta("della_linear", arch, tiny, {"epsilon": 0.15}),
        "multislerp": {
            "merge_method": "multislerp",
            "base_model": base,
            "models": [
                {"model": ft[0], "parameters": {"weight": [0.2, 0.9]}},  # a gradient over layers
                {"model": ft[1], "parameters": {"weight": 0.5}},
                {"model": ft[2], "parameters": {"weight": 0.3}},
            ],
            "dtype": "float32",
        },
        "multislerp_nobase": {
            "merge_method": "multislerp",
            "models": _models(tiny, arch, [{"weight": 0.6}, {"weight": 0.4}]),
            "parameters": {"normalize_weights": False},
            "dtype": "float32",
        },
        "karcher": {  # the base is an ordinary input
            "merge_method": "karcher",
            "base_model": base,
            "models": [{"model": base}, {"model": ft[0]}, {"model": ft[1]}],
            "parameters": {"max_iter": 5},
            "dtype": "float32",
        },
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": base,
            "models": [{"model": base}, {"model": ft[0]}],
            "parameters": {"t": [{"filter": "mlp", "value": [0.001, 0.01]}, {"value": 0.004}]},
            "dtype": "float32",
        },
        "sce": {
            "merge_method": "sce",
            "base_model": base,
            "models": [{"model": f} for f in ft],
            "parameters": {"select_topk": [0.3, 0.8]},
            "dtype": "float32",
        },
        "ram": {
            "merge_method": "ram",
            "base_model": base,
            "models": [{"model": f} for f in ft],
            "parameters": {"epsilon": 0.004},
            "dtype": "float32",
        },
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            "base_model": base,
            "models": [{"model": f} for f in ft],
            "parameters": {"epsilon": 0.004, "r": 0.2, "alpha": 0.5},
            "dtype": "float32",
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": base,
            "models": [{"model": base}, {"model": ft[0]}],
            "dtype": "float32",
        },
    }


def run_mergekit(config: dict | str, out: Path, multi: bool = False) -> None:
    if multi:
        from mergekit.scripts.multimerge import main as mk_multi

        cfg = out.parent / f"{out.name}.mk.yml"
        cfg.write_text(config)
        mk_multi.main(
            [
                str(cfg),
                "--out-path",
                str(out),
                "-I",
                str(out.parent / f"{out.name}-inter"),
                "--random-seed",
                str(SEED),
                "--no-copy-tokenizer",
                "--no-write-model-card",
                "--quiet",
            ],
            standalone_mode=False,
        )
        return
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(
        MergeConfiguration.model_validate(config),
        str(out),
        options=MergeOptions(random_seed=SEED, copy_tokenizer=False, write_model_card=False, quiet=True),
    )


def run_ours(config: dict | str, out: Path) -> None:
    cfg = out.parent / f"{out.name}.yml"
    cfg.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    assert cli(["merge", str(cfg), str(out), "--seed", str(SEED), "-q"]) == 0


def assert_same(ours: Path, theirs: Path, exact: bool) -> None:
    a, b = load_weights(ours), load_weights(theirs)
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if exact:
            assert torch.equal(a[k], b[k]), f"{k}: not bit-identical"
        else:
            tol = 1e-6 * float(b[k].abs().max())
            diff = float((a[k].double() - b[k].double()).abs().max())
            assert diff <= tol, f"{k}: max diff {diff} > {tol}"


class _AnyPath(dict):
    def __missing__(self, key):
        return Path(key)


# Derived from cases() and METHODS, never kept by hand: a case added above is checked everywhere.
CASE_NAMES = list(cases(_AnyPath(), "llama"))
# the task-vector family (what a ResidentEngine with base= can run)
GTA_CASES = [n for n in CASE_NAMES if METHODS[cases(_AnyPath(), "llama")[n]["merge_method"]].task_vectors]
RANDOMIZED = {n for n in CASE_NAMES if METHODS[cases(_AnyPath(), "llama")[n]["merge_method"]].randomized}


def test_every_mergekit_method_is_registered_and_has_cases(tiny):
    """The contract: METHODS is mergekit 0.1.5's registry, and each method has parity cases below
    (a method added to METHODS without a case fails here)."""
    from mergekit.merge_methods.registry import registered_methods

    assert set(METHODS) == {m.spec.name for m in registered_methods()}
    covered = {c["merge_method"] for c in cases(tiny, "llama").values()}
    assert covered == set(METHODS)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_matches_mergekit(tiny, tmp_path, arch, method):
    all_cases = cases(tiny, arch)
    names = [n for n, c in all_cases.items() if c["merge_method"] == method]
    assert names, f"{method}: no parity case"
    for case in names:
        _check_case(tiny, tmp_path / case, arch, case)


def _check_case(tiny, tmp_path, arch, case):
    tmp_path.mkdir()
    config = cases(tiny, arch)[case]
    run_mergekit(config, tmp_path / "mk")
    run_ours(config, tmp_path / "ours")
    assert_same(tmp_path / "ours", tmp_path / "mk", exact=case in RANDOMIZED)
    # the output loads as a model
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert model.config.num_hidden_layers == (4 if case == "passthrough_frankenmerge" else 3)


def test_dare_seed_changes_draws(tiny, tmp_path):
    config = cases(tiny, "llama")["dare_ties"]
    cfg = tmp_path / "r.yml"
    cfg.write_text(yaml.safe_dump(config))
    assert cli(["merge", str(cfg), str(tmp_path / "a"), "--seed", "1", "-q"]) == 0
    assert cli(["merge", str(cfg), str(tmp_path / "b"), "--seed", "2", "-q"]) == 0
    a, b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_bf16_inputs_match_mergekit(tiny, tmp_path):
    """Without `dtype`, bf16 inputs are merged in bf16 (weights quantized), as mergekit does."""
    from tests.tiny_models import make_finetune

    base = tiny["llama/base"]
    fts = [make_finetune(base, tmp_path / f"bf{i}", 300 + i, dtype=torch.bfloat16) for i in range(2)]
    bf_base = make_finetune(base, tmp_path / "bfbase", 399, scale=0.0, dtype=torch.bfloat16)
    for method in ("linear", "ties", "dare_ties"):
        config = {
            "merge_method": method,
            "models": [{"model": str(f), "parameters": {"weight": 0.3, "density": 0.6}} for f in fts],
            "out_dtype": "bfloat16",
        }
        if method != "linear":
            config["base_model"] = str(bf_base)
        else:
            for m in config["models"]:
                m["parameters"].pop("density")
        run_mergekit(config, tmp_path / f"mk-{method}")
        run_ours(config, tmp_path / f"ours-{method}")
        assert_same(tmp_path / f"ours-{method}", tmp_path / f"mk-{method}", exact=True)


def test_three_model_sequential_matches_mergekit_multi(tiny, tmp_path):
    base, ft = str(tiny["llama/base"]), [str(tiny[f"llama/ft{i}"]) for i in range(3)]
    text = f"""name: ab
merge_method: dare_ties
base_model: {base}
models:
  - model: {ft[0]}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {ft[1]}
    parameters: {{weight: 0.4, density: 0.7}}
dtype: float32
---
merge_method: slerp
base_model: ab
models:
  - model: ab
  - model: {ft[2]}
parameters:
  t: [0.2, 0.7]
dtype: float32
"""
    run_mergekit(text, tmp_path / "mk", multi=True)
    run_ours(text, tmp_path / "ours")
    assert_same(tmp_path / "ours", tmp_path / "mk", exact=False)
    # the intermediate stage is not left behind
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".mergesearch")] == []


def test_sharded_output_and_tokenizer(tiny, tmp_path):
    config = cases(tiny, "llama")["ties"]
    cfg = tmp_path / "r.yml"
    cfg.write_text(yaml.safe_dump(config))
    assert cli(["merge", str(cfg), str(tmp_path / "out"), "--shard-size", "60KB", "-q"]) == 0
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "tokenizer.json").is_file()
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("hello")["input_ids"], skip_special_tokens=True) == "hello"
    mk = tmp_path / "mk"
    run_mergekit(config, mk)
    assert_same(out, mk, exact=False)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_matches_mergekit_on_bf16_inputs(bf16_models, tmp_path, method):
    """No `dtype`: each method computes in what mergekit computes it in (bf16 for most, fp32 norms
    for karcher), and writes what it returns — float32 for ramplus_tl and arcee_fusion."""
    name = next(n for n, c in cases(bf16_models, "llama").items() if c["merge_method"] == method)
    config = cases(bf16_models, "llama")[name]
    config.pop("dtype")
    run_mergekit(config, tmp_path / "mk")
    run_ours(config, tmp_path / "ours")
    assert_same(tmp_path / "ours", tmp_path / "mk", exact=True)
    dtypes = {t.dtype for t in load_weights(tmp_path / "ours").values()}
    assert dtypes == ({torch.float32} if method in ("ramplus_tl", "arcee_fusion") else {torch.bfloat16})


def test_sce_warns_about_the_parameters_mergekit_ignores(tiny, tmp_path):
    config = cases(tiny, "llama")["sce"]
    for m in config["models"]:
        m["parameters"] = {"weight": 0.3, "density": 0.5}
    config["parameters"]["normalize"] = True
    run_mergekit(config, tmp_path / "mk")
    with pytest.warns(UserWarning) as caught:
        run_ours(config, tmp_path / "ours")
    said = " ".join(str(w.message) for w in caught)
    for key in ("weight", "density", "normalize"):
        assert f"sce ignores {key}" in said, said
    assert_same(tmp_path / "ours", tmp_path / "mk", exact=False)  # ignored, as mergekit does

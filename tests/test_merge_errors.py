"""Bad input: a MergeSearchError naming the file, tensor or key; exit 2; no output folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergesearch.cli import main as cli
from tests.tiny_models import load_weights, make_base, make_finetune


def recipe(tiny, method="ties", models=None, base="llama/base", **params):
    d = {
        "merge_method": method,
        "models": [
            {"model": str(m), "parameters": {"weight": 0.5}}
            for m in models or [tiny["llama/ft0"], tiny["llama/ft1"]]
        ],
    }
    if base:
        d["base_model"] = str(tiny[base]) if base in tiny else str(base)
    if params:
        d["parameters"] = params
    return d


def run(tmp_path, config, capsys, *extra) -> str:
    cfg = tmp_path / "recipe.yml"
    cfg.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    out = tmp_path / "out"
    capsys.readouterr()  # drop what building the test models printed
    code = cli(["merge", str(cfg), str(out), "-q", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers
    return err


def _edit(src: Path, dst: Path, fn) -> Path:
    make_finetune(src, dst, 7, scale=0.0)
    sd = load_file(str(dst / "model.safetensors"))
    fn(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_shapes_differ(tiny, tmp_path, capsys):
    other = make_base(tmp_path / "m" / "wide", "llama", intermediate=96, tokenizer=False)
    err = run(tmp_path, recipe(tiny, models=[tiny["llama/ft0"], other]), capsys)
    assert "shapes differ" in err and "mlp" in err and str(other) in err


def test_tensor_missing(tiny, tmp_path, capsys):
    bad = _edit(
        tiny["llama/base"], tmp_path / "m" / "missing", lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight")
    )
    err = run(tmp_path, recipe(tiny, models=[tiny["llama/ft0"], bad]), capsys)
    assert "model.layers.1.mlp.up_proj.weight" in err and "missing" in err and str(bad) in err


@pytest.mark.parametrize(
    "where,name",
    [
        ("first fine-tune", "model.layers.1.self_attn.q_proj.weight"),  # was dropped silently
        ("base", "model.layers.0.mlp.down_proj.weight"),
        ("base", "model.norm.weight"),  # outside the layers
    ],
)
def test_a_tensor_missing_from_any_input_is_refused_never_dropped(tiny, tmp_path, capsys, where, name):
    src = tiny["llama/base"] if where == "base" else tiny["llama/ft0"]
    bad = _edit(src, tmp_path / "m" / "missing", lambda sd: sd.pop(name))
    if where == "base":
        r = recipe(tiny, base=str(bad))
    else:
        r = recipe(tiny, models=[bad, tiny["llama/ft1"]])
    err = run(tmp_path, r, capsys)
    assert name in err and "missing" in err and str(bad) in err


def test_an_optional_tied_head_missing_from_a_fine_tune_merges_as_mergekit(tiny, tmp_path):
    """mergekit's Llama declares lm_head optional, tied to the embeddings: a fine-tune that stores
    none contributes its embedding matrix there. Ours is the same model."""
    from tests.test_merge_vs_mergekit import assert_same, run_mergekit, run_ours

    headless = _edit(tiny["llama/ft0"], tmp_path / "m" / "headless", lambda sd: sd.pop("lm_head.weight"))
    config = recipe(tiny, models=[headless, tiny["llama/ft1"]])
    for m in config["models"]:
        m["parameters"]["density"] = 0.5
    run_mergekit(config, tmp_path / "mk")
    run_ours(config, tmp_path / "ours")
    assert "lm_head.weight" in load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert_same(tmp_path / "ours", tmp_path / "mk", exact=False)


def test_vocabulary_sizes_differ(tiny, tmp_path, capsys):
    other = make_base(tmp_path / "m" / "vocab", "llama", vocab=300, tokenizer=False)
    err = run(tmp_path, recipe(tiny, models=[tiny["llama/ft0"], other]), capsys)
    assert "vocabulary sizes differ" in err


def test_truncated_safetensors(tiny, tmp_path, capsys):
    bad = make_finetune(tiny["llama/base"], tmp_path / "m" / "trunc", 7)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    err = run(tmp_path, recipe(tiny, models=[tiny["llama/ft0"], bad]), capsys)
    assert "truncated" in err and str(f) in err


def test_corrupt_safetensors(tiny, tmp_path, capsys):
    bad = make_finetune(tiny["llama/base"], tmp_path / "m" / "corrupt", 7)
    f = bad / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 64)
    err = run(tmp_path, recipe(tiny, models=[tiny["llama/ft0"], bad]), capsys)
    assert "not a readable safetensors file" in err and str(f) in err


def test_nan_in_input(tiny, tmp_path, capsys):
    def poison(sd):
        sd["model.layers.2.self_attn.q_proj.weight"][0, 0] = float("nan")

    bad = _edit(tiny["llama/base"], tmp_path / "m" / "nan", poison)
    err = run(tmp_path, recipe(tiny, models=[tiny["llama/ft0"], bad]), capsys)
    assert "NaN or Inf" in err and "model.layers.2.self_attn.q_proj.weight" in err


def test_unknown_method(tiny, tmp_path, capsys):
    err = run(tmp_path, recipe(tiny, method="dare-ties"), capsys)
    assert "unknown merge method 'dare-ties'" in err and "dare_ties" in err


def test_unknown_parameter(tiny, tmp_path, capsys):
    err = run(tmp_path, recipe(tiny, densty=0.5), capsys)
    assert "parameters.densty" in err and "unknown parameter" in err


def test_unknown_top_level_key(tiny, tmp_path, capsys):
    d = recipe(tiny)
    d["tokenizer"] = {"source": "union"}
    assert "'tokenizer'" in run(tmp_path, d, capsys)


def test_density_outside_unit_interval(tiny, tmp_path, capsys):
    err = run(tmp_path, recipe(tiny, density=[0.5, 1.4]), capsys)
    assert "density" in err and "1.4" in err and "[0, 1]" in err


def test_weights_sum_to_zero_under_normalize(tiny, tmp_path, capsys):
    d = {
        "merge_method": "linear",
        "models": [
            {"model": str(tiny["llama/ft0"]), "parameters": {"weight": 1.0}},
            {"model": str(tiny["llama/ft1"]), "parameters": {"weight": -1.0}},
        ],
    }
    err = run(tmp_path, d, capsys)
    assert "sum to 0" in err and "normalize" in err


def test_method_needs_base(tiny, tmp_path, capsys):
    err = run(tmp_path, recipe(tiny, base=None), capsys)
    assert "ties needs a base_model" in err


def test_model_folder_missing(tiny, tmp_path, capsys):
    err = run(tmp_path, recipe(tiny, models=[tiny["llama/ft0"], tmp_path / "nope"]), capsys)
    assert "nope" in err and "does not exist" in err


def test_pickle_refused_then_loaded_with_flag(tiny, tmp_path, capsys):
    pkl = tmp_path / "m" / "pickled"
    pkl.mkdir(parents=True)
    sd = load_weights(tiny["llama/ft1"])
    torch.save(sd, pkl / "pytorch_model.bin")
    (pkl / "config.json").write_text((tiny["llama/ft1"] / "config.json").read_text())
    d = recipe(tiny, models=[tiny["llama/ft0"], pkl])
    err = run(tmp_path, d, capsys)
    assert "pickle" in err and "--allow-pickle" in err and str(pkl) in err
    # with the flag, the result equals the safetensors twin
    cfg = tmp_path / "recipe.yml"
    assert cli(["merge", str(cfg), str(tmp_path / "a"), "-q", "--allow-pickle"]) == 0
    cfg2 = tmp_path / "recipe2.yml"
    cfg2.write_text(yaml.safe_dump(recipe(tiny)))
    assert cli(["merge", str(cfg2), str(tmp_path / "b"), "-q"]) == 0
    a, b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_output_needs_overwrite(tiny, tmp_path, capsys):
    cfg = tmp_path / "recipe.yml"
    cfg.write_text(yaml.safe_dump(recipe(tiny)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli(["merge", str(cfg), str(out), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert cli(["merge", str(cfg), str(out), "-q", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3


def test_cli_subprocess_exit_code_and_no_traceback(tiny, tmp_path):
    cfg = tmp_path / "recipe.yml"
    cfg.write_text(yaml.safe_dump(recipe(tiny, method="nonsense")))
    p = subprocess.run(
        [sys.executable, "-m", "mergesearch", "merge", str(cfg), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2
    assert "unknown merge method 'nonsense'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text,needle",
    [
        ("merge_method: ties\nbase_model: x\n", "give exactly one of 'models' or 'slices'"),
        ("[not, a, mapping]\n", "expected a mapping"),
        ("merge_method: ties\nmodels: [{model: a, parameters: {weight: {filtr: mlp}}}]\n", "value"),
    ],
)
def test_malformed_recipes(tmp_path, capsys, text, needle):
    assert needle in run(tmp_path, text, capsys)


def test_a_merged_folder_is_readable_and_carries_a_model_card(tiny, tmp_path):
    """Hub-ready: the umask's permissions (not mkdtemp's owner-only 0700) and a README.md model card
    naming the method, the models and the recipe, as mergekit writes one."""
    import os
    import stat

    cfg = tmp_path / "r.yml"
    cfg.write_text(yaml.safe_dump(recipe(tiny)))
    old = os.umask(0o022)
    try:
        assert cli(["merge", str(cfg), str(tmp_path / "out"), "-q"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    card = (tmp_path / "out" / "README.md").read_text()
    assert "method `ties`" in card and str(tiny["llama/ft0"]) in card and "merge_method: ties" in card
    assert "&id" not in card  # no YAML anchors


def test_recipes_are_written_without_yaml_anchors():
    """A space that gives `other` the MLP values shares one list between two entries; the YAML
    writes it twice (a reader sees values, not &id001 / *id001), and reads back the same recipe."""
    from mergesearch.recipe import Recipe, Source, dump_recipes, parse_recipes

    shared = [0.25, 0.5]
    r = Recipe(
        "task_arithmetic",
        base_model="b",
        models=[Source("m", {"weight": [{"filter": "mlp", "value": shared}, {"value": shared}]})],
    )
    text = dump_recipes([r])
    assert "&" not in text and "*" not in text
    assert [x.to_dict() for x in parse_recipes(text)] == [r.to_dict()]

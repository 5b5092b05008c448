"""Generative scoring on a real pretrained model (SmolLM2-135M-Instruct): native generation,
extraction and normalization against lm-evaluation-harness, drafts, chat templates, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mergesearch.evaluation import NativeEvaluator, Scorer, find_task, load_task
from mergesearch.evaluation.answers import EXTRACTORS, Extractor, Normalizer, verdict
from mergesearch.evaluation.generate import Generator
from mergesearch.evaluation.lmeval import LMEvalBackend

EVALS = Path(__file__).resolve().parents[1] / "evals"
GENERATIVE = ["word_problems", "chat_arith"]

TEXTS = [
    " Ben has 4 * 4 = 16 coins.\n#### 16",
    "#### 1,000 and then #### 7",
    "The answer is 42.",
    "x = -3.50, y = $12",
    "no digits here",
    "\n\n  Paris is the capital.\nLine two",
    "",
    "12\n13",
]


@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_named_extractors_are_lm_eval_regex_filters(name):
    """Each named extraction is lm-eval's `regex` filter with our pattern and group, verbatim."""
    from lm_eval.filters.extraction import RegexFilter

    ours = Extractor(*EXTRACTORS[name])
    theirs = RegexFilter(regex_pattern=ours.pattern, group_select=ours.group)
    got = [ours(t) for t in TEXTS]
    want = theirs.apply([[t] for t in TEXTS], [{}] * len(TEXTS))
    assert [g if g is not None else "[invalid]" for g in got] == [w[0] for w in want]
    assert any(g is None for g in got) and any(g is not None for g in got)


def test_custom_regex_with_groups_matches_lm_eval():
    from lm_eval.filters.extraction import RegexFilter

    pattern = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"  # lm-eval's gsm8k flexible-extract: two groups
    for group in (0, -1):
        ours = Extractor(pattern, group)
        want = RegexFilter(regex_pattern=pattern, group_select=group).apply(
            [[t] for t in TEXTS], [{}] * len(TEXTS)
        )
        assert [ours(t) if ours(t) is not None else "[invalid]" for t in TEXTS] == [w[0] for w in want]


PAIRS = [
    ("1,000", "1000"),
    ("1000.0", "1000"),
    ("$12", "12"),
    (" 42 ", "42"),
    ("42", "43"),
    ("Paris", "paris"),
    ("Paris.", "Paris"),
    ("-7", "-7.00"),
    ("3.5", "3.50"),  # numbers by value natively; lm-eval's regexes keep the trailing zero
]


@pytest.mark.parametrize("steps", [["strip"], ["strip", "numbers"], ["strip", "case", "punctuation"], []])
def test_normalization_matches_lm_eval_exact_match(steps):
    """Our normalization against lm-eval's exact_match with the arguments we export for it."""
    from lm_eval.api.metrics import exact_match_hf_evaluate

    norm = Normalizer.parse(steps, "t")
    args = norm.lm_eval_args()
    for a, b in PAIRS:
        ours = float(norm(a) == norm(b))
        theirs = exact_match_hf_evaluate([a], [b], **args)["exact_match"]
        if (a, b) == ("3.5", "3.50") and norm.numbers:
            assert (ours, theirs) == (1.0, 0.0)  # the one documented difference
        else:
            assert ours == theirs, (a, b, steps)
    assert verdict(
        "x #### 1,000", "1000", Extractor(r"#### (\S+)"), Normalizer.parse(["strip", "numbers"], "t")
    ) == (
        1.0,
        "1,000",
    )
    assert verdict("nothing", "5", Extractor(r"#### (\S+)"), norm) == (0.0, None)


# -- on SmolLM2 -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    from mergesearch.modeling import load_model

    model, tok = load_model(smollm2_path())
    return model, tok


def smollm2_path() -> Path:
    from mergesearch.smollm2 import smollm2_folder

    return smollm2_folder(log=lambda s: None)


@pytest.mark.e2e
def test_fixture_is_the_real_model(smol):
    model, tok = smol
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.tie_word_embeddings and tok.chat_template
    assert 134_000_000 < model.num_parameters() < 135_000_000
    assert tok(" 12", add_special_tokens=False)["input_ids"] == tok.convert_tokens_to_ids(["Ġ", "1", "2"])


@pytest.mark.e2e
def test_live_model_of_a_tied_model_is_the_model(smol):
    """A study's live model (built from config, weights copied in) equals from_pretrained's,
    tied head included: an untied head once scored every SmolLM2 candidate 0."""
    from safetensors.torch import load_file

    from mergesearch.modeling import live_model

    model, tok = smol
    live = live_model(smollm2_path(), load_file(str(smollm2_path() / "model.safetensors")))
    assert live.lm_head.weight.data_ptr() == live.model.embed_tokens.weight.data_ptr()
    ids = tok("Question: What is 2+3?\nAnswer:", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(live(**ids).logits, model(**ids).logits)


@pytest.mark.e2e
def test_generator_equals_hf_generate(smol):
    """Batched, left-padded, shared-prefix decoding with rows leaving the batch: the same
    continuations as transformers' generate, one prompt at a time."""
    model, tok = smol
    task = find_task("word_problems")
    texts = [ex.prompt for ex in task.examples("test", 6)] + [
        "The capital of France is",
        "Q: What is 12 plus 30?\nA:",
    ]
    g = Generator(model, tok, batch_size=4)
    stops = g.stops(["\n\n", "Question:"])
    prompts = [tok(t)["input_ids"] for t in texts]
    ours = [g.text(o, stops) for o in g.generate(prompts, max_new_tokens=24, stops=stops)]
    for text, mine in zip(texts, ours):
        ids = tok(text, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        ref = g.text(out[0, ids["input_ids"].shape[1] :].tolist(), stops)
        assert mine == ref, (text, mine, ref)
    assert sum(bool(x.strip()) for x in ours) == len(ours)


@pytest.mark.e2e
def test_drafts_change_speed_not_outputs(smol):
    """Candidate B scored with candidate A's outputs as drafts gives B's own outputs, in fewer passes."""
    model, tok = smol
    task = find_task("word_problems")
    ev = NativeEvaluator(model, tok, gen_batch_size=8, reuse_outputs=True)
    first = ev.evaluate(task, "test", 16)  # candidate A: fills the drafts
    w = model.model.layers[3].mlp.down_proj.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():  # candidate B: another model, close to A
            w.mul_(1.5)
        drafted = ev.evaluate(task, "test", 16)
        plain = NativeEvaluator(model, tok, gen_batch_size=8).evaluate(task, "test", 16)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert drafted.extra["responses"] == plain.extra["responses"]
    assert drafted.scores.tolist() == plain.scores.tolist()
    assert drafted.extra["responses"] != first.extra["responses"]  # B differs from A somewhere ...
    assert drafted.extra["accepted_draft_tokens"] > 0  # ... and A's outputs were still used
    assert drafted.extra["forward_passes"] < plain.extra["forward_passes"]


@pytest.mark.e2e
@pytest.mark.parametrize("name", GENERATIVE)
def test_native_verdicts_equal_lm_eval_generate_until(smol, name):
    """Example by example, on a subset (the full ≥ 200-example check: benchmarks/bench_eval.py)."""
    model, tok = smol
    task = find_task(name)
    n = 24
    ours = NativeEvaluator(model, tok).evaluate(task, "test", n)
    theirs = LMEvalBackend(model, tok).evaluate(task, "test", n)
    assert ours.n == theirs.n == n
    assert ours.extra["responses"] == theirs.extra["responses"]
    assert ours.scores.tolist() == theirs.scores.tolist()
    answers = [a if a is not None else "[invalid]" for a in ours.extra["answers"]]
    assert answers == theirs.extra["answers"]
    if name == "word_problems":
        assert ours.value > 0.3  # the real model solves many: the comparison is not vacuous


@pytest.mark.e2e
def test_chat_template_renders_system_prompt_and_shots(smol, tmp_path):
    _, tok = smol
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"q": f"q{i}", "a": str(i)}) + "\n" for i in range(6))
    )
    p = tmp_path / "c.yaml"
    p.write_text(
        "name: c\nmetric: exact_match\ndata_files: {search: d.jsonl, test: d.jsonl}\nprompt: '{q}'\n"
        "target: '{a}'\nfewshot: 2\nchat_template: true\nsystem_prompt: Be brief.\n"
        "generation: {until: ['\\n'], max_new_tokens: 4}\n"
    )
    task = load_task(p)
    ex = task.examples("search", 1)[0]
    text = tok.apply_chat_template(ex.messages, tokenize=False, add_generation_prompt=True)
    shots = task.records("search")[:2]
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        + "".join(
            f"<|im_start|>user\n{r['q']}<|im_end|>\n<|im_start|>assistant\n{r['a']}<|im_end|>\n"
            for r in shots
        )
        + f"<|im_start|>user\n{task.records('search')[2]['q']}<|im_end|>\n<|im_start|>assistant\n"
    )


# -- bad task definitions: exit 2, one clear line, no traceback ----------------------------------


def _cli(tmp_path, *args):
    env = dict(os.environ, MERGESEARCH_RESULTS=str(tmp_path / "results"))
    return subprocess.run(
        [sys.executable, "-m", "mergesearch", *args], capture_output=True, text=True, env=env, cwd=tmp_path
    )


def _task_file(tmp_path: Path, name: str, extra: str, rows: int = 4) -> Path:
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"q": f"{i}+1=", "a": str(i + 1)}) + "\n" for i in range(rows))
    )
    (tmp_path / "e.jsonl").write_text(
        "".join(json.dumps({"q": f"{i}+2=", "a": str(i + 2)}) + "\n" for i in range(rows))
    )
    p = tmp_path / f"{name}.yaml"
    p.write_text(
        f"name: {name}\nmetric: exact_match\ndata_files: {{search: d.jsonl, test: e.jsonl}}\n"
        f"prompt: '{{q}}'\ntarget: '{{a}}'\n{extra}"
    )
    return p


def _lm_eval_yaml(tmp_path: Path, docs: int) -> Path:
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"q": f"{i}+1=", "a": str(i + 1)}) + "\n" for i in range(docs))
    )
    p = tmp_path / "tiny_lmeval.yaml"
    p.write_text(
        "task: tiny_lmeval\ndataset_path: json\ndataset_kwargs: {data_files: {test: docs.jsonl}}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "generation_kwargs: {until: ['\\n'], max_gen_toks: 4, do_sample: false}\n"
        "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]\n"
    )
    return p


GEN = "generation: {until: ['\\n'], max_new_tokens: 4}\n"


@pytest.mark.e2e
@pytest.mark.parametrize(
    "case,extra,message",
    [
        ("regex", GEN + "extract: {regex: '#### (['}\n", "extract.regex .* does not compile"),
        ("max_new_tokens", "generation: {until: ['\\n'], max_new_tokens: 0}\n", "max_new_tokens is 0"),
        ("max_new_tokens_neg", "generation: {max_new_tokens: -3}\n", "max_new_tokens is -3"),
        ("chat", GEN + "chat_template: true\n", "has no chat template"),
        ("extract_name", GEN + "extract: second_number\n", "extract: 'second_number' is not one of"),
        ("no_generation", "extract: last_number\n", "need a 'generation:' block"),
        ("lm_eval_unknown", None, "is not an lm-eval task"),
        ("lm_eval_few_docs", None, "has 3 document.*at least 2 each"),
    ],
)
def test_bad_generative_tasks_exit_2_without_traceback(zoo, tmp_path, case, extra, message):
    if case == "lm_eval_unknown":
        _lm_eval_yaml(tmp_path, 10)
        p = tmp_path / "bad.yaml"
        p.write_text("name: bad\nlm_eval: {task: no_such_task_anywhere_xyz}\n")
    elif case == "lm_eval_few_docs":
        _lm_eval_yaml(tmp_path, 3)
        p = tmp_path / "bad.yaml"
        p.write_text("name: bad\nlm_eval: {task: tiny_lmeval.yaml}\n")
    else:
        p = _task_file(tmp_path, "bad", extra)
    r = _cli(tmp_path, "eval", str(zoo.models["add"]), "--tasks", str(p), "--limit", "2")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("error: ") and __import__("re").search(message, lines[-1]), r.stderr[-2000:]


@pytest.mark.e2e
def test_extraction_that_never_matches_is_reported_with_counts(zoo, tmp_path):
    p = _task_file(tmp_path, "nomatch", GEN + "extract: {regex: 'ANSWER=(\\d+)'}\n")
    r = _cli(tmp_path, "eval", str(zoo.models["add"]), "--tasks", str(p), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout)[0]
    assert row["value"] == 0.0 and row["unextracted"] == row["n"] == 4
    r = _cli(tmp_path, "eval", str(zoo.models["add"]), "--tasks", str(p))
    assert "the answer extraction found nothing in 4 of 4 outputs" in r.stdout


# -- lm-eval tasks as a search fitness ----------------------------------------------------------


def _add_lm_eval_task(tmp_path: Path, docs: int, extra: str = "") -> Path:
    """A local lm-eval task over the zoo's addition items, and a task file that names it."""
    rows = (EVALS / "data" / "add.test.jsonl").read_text().splitlines()[:docs]
    recs = [json.loads(r) for r in rows]
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"q": r["prompt"], "a": r["answer"]}) + "\n" for r in recs)
    )
    (tmp_path / "sub").mkdir(exist_ok=True)
    (tmp_path / "sub" / "add_lmeval.yaml").write_text(
        "task: add_lmeval\ndataset_path: json\ndataset_kwargs: {data_files: {test: ../docs.jsonl}}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "target_delimiter: ''\ngeneration_kwargs: {until: ['\\n'], max_gen_toks: 6, do_sample: false}\n"
        "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]\n"
    )
    p = tmp_path / "add_lm.yaml"
    p.write_text(f"name: add_lm\nlm_eval: {{task: sub/add_lmeval.yaml{extra}}}\n")
    return p


def test_lm_eval_task_splits_are_disjoint_seeded_and_limits_are_prefixes(zoo, tmp_path):
    from mergesearch.modeling import load_model

    p = _add_lm_eval_task(tmp_path, 30, ", search_fraction: 0.6, split_seed: 3")
    task = load_task(p)
    model, tok = load_model(zoo.models["add"])
    ev = Scorer(model, tok)  # routes the lm-eval task to lm-eval
    loaded = ev.lm_eval().load(task)
    assert loaded.documents == 30 and len(loaded.search) == 18 and len(loaded.test) == 12
    assert sorted(loaded.search + loaded.test) == list(range(30))
    assert loaded.search == np.random.default_rng(3).permutation(30).tolist()[:18]
    full = ev.evaluate(task, "search")
    small = ev.evaluate(task, "search", 5)
    assert full.n == 18 and small.n == 5 and small.scores.tolist() == full.scores[:5].tolist()
    test = ev.evaluate(task, "test")
    assert test.n == 12 and 0 < full.value and 0 < test.value  # the add specialist solves these


def lm_eval_space(zoo, task, **over) -> dict:
    """A small task-arithmetic space on the demo zoo whose fitness is the lm-eval task `task`."""
    return {
        "base": str(zoo.models["base"]),
        "models": [str(zoo.models["add"]), str(zoo.models["reverse"])],
        "method": "task_arithmetic",
        "granularity": "model",
        "parameters": {"weight": [0.0, 1.5]},
        "tasks": [str(task)],
        "objective": "mean",
        "trials": 4,
        "baselines": False,
        "sampler": "random",
        **over,
    }


@pytest.mark.e2e
def test_search_and_report_with_an_lm_eval_task(zoo, tmp_path):
    """lm-eval as the fitness of a real study: the split recorded, rungs as sample limits, the
    report's test scores from the task's test documents."""
    import optuna
    import yaml

    task = _add_lm_eval_task(tmp_path, 24)
    space = lm_eval_space(zoo, task, name="lmfit", fidelity=[4, 12])
    (tmp_path / "lmfit.yaml").write_text(yaml.safe_dump(space))
    r = _cli(tmp_path, "search", "lmfit.yaml", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    # tmp_path is no git checkout: lm-eval's `git describe` would print "fatal: ..." per candidate
    assert "fatal" not in r.stderr and "warning" not in r.stderr.lower(), r.stderr
    study = optuna.load_study(
        study_name="lmfit", storage=f"sqlite:///{tmp_path / 'results' / 'lmfit' / 'study.db'}"
    )
    split = study.user_attrs["task_splits"]["add_lm"]
    assert split["documents"] == 24 and len(split["search"]) == len(split["test"]) == 12
    assert not set(split["search"]) & set(split["test"])
    assert {t.user_attrs["fidelity"] for t in study.trials} <= {4, 12}
    assert all(t.user_attrs["examples"]["add_lm"] == t.user_attrs["fidelity"] for t in study.trials)
    r = _cli(tmp_path, "report", "lmfit")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fatal" not in r.stderr and "warning" not in r.stderr.lower(), r.stderr
    summary = json.loads((tmp_path / "results" / "lmfit" / "test_scores.json").read_text())
    assert all(c["test"]["add_lm"]["n"] == 12 for c in summary["candidates"])
    assert max(c["test"]["add_lm"]["value"] for c in summary["candidates"]) > 0

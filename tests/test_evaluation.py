"""The native harness: teacher-forced verdicts equal real greedy generation; tasks as data; errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mergesearch.errors import MergeSearchError
from mergesearch.evaluation import NativeEvaluator, bootstrap_ci
from mergesearch.evaluation.tasks import find_task, load_task
from mergesearch.modeling import load_model


def test_teacher_forced_equals_greedy_generation(zoo):
    """Same examples, right and wrong answers among them: the same verdict on every one."""
    model, tok = load_model(zoo.models["add"])
    task = find_task("add")
    # The add specialist is right on most add items and wrong on most reverse items.
    examples = task.examples("test", 60) + find_task("reverse").examples("test", 40)
    ev = NativeEvaluator(model, tok, batch_size=16)
    forced, _ = ev.exact_match(examples)
    greedy = []
    for ex in examples:
        ids = torch.tensor([tok(ex.prompt)["input_ids"]])
        target = tok(ex.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=len(target) + 2,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        greedy.append(float(out[0, ids.shape[1] :].tolist()[: len(target)] == target))
    assert 0 < sum(greedy) < len(greedy)  # both verdicts occur
    assert forced.tolist() == greedy


def test_subsets_are_prefixes_of_one_shuffle(zoo):
    model, tok = load_model(zoo.models["reverse"])
    ev = NativeEvaluator(model, tok)
    task = find_task("reverse")
    full = ev.evaluate(task, "search")
    small = ev.evaluate(task, "search", limit=50)
    assert small.n == 50 and full.n == 200
    assert small.scores.tolist() == full.scores[:50].tolist()
    assert [e.prompt for e in task.examples("search", 50)] == [e.prompt for e in task.examples("search")[:50]]
    lo, hi = bootstrap_ci(full)
    assert lo <= full.value <= hi


def _task(tmp_path: Path, body: str, rows: list[str] | None = None, name="t") -> Path:
    (tmp_path / "d").mkdir(exist_ok=True)
    if rows is not None:
        (tmp_path / "d" / "s.jsonl").write_text("".join(r + "\n" for r in rows))
        (tmp_path / "d" / "t.jsonl").write_text('{"q": "zz", "a": "1"}\n')
    p = tmp_path / f"{name}.yaml"
    p.write_text(body)
    return p


BASIC = "name: t\nmetric: exact_match\ndata_files: {search: d/s.jsonl, test: d/t.jsonl}\nprompt: '{q}'\ntarget: '{a}'\n"


def test_bad_tasks_name_file_line_or_key(tmp_path):
    with pytest.raises(MergeSearchError, match="unknown task 'nope'"):
        find_task("nope")
    p = _task(tmp_path, BASIC.replace("d/s.jsonl", "d/missing.jsonl"), ['{"q": "x", "a": "1"}'])
    with pytest.raises(MergeSearchError, match="missing.jsonl.*does not exist"):
        load_task(p).check()
    p = _task(tmp_path, BASIC, [])
    with pytest.raises(MergeSearchError, match="empty"):
        load_task(p).check()
    p = _task(tmp_path, BASIC, ['{"q": "x", "a": "1"}', '{"q": "y", "a": 2', '{"q": "z", "a": "3"}'])
    with pytest.raises(MergeSearchError, match=r"s\.jsonl:2: malformed JSON"):
        load_task(p).check()
    p = _task(tmp_path, BASIC.replace("'{q}'", "'{question}'"), ['{"q": "x", "a": "1"}'])
    with pytest.raises(MergeSearchError, match="field 'question'"):
        load_task(p).check()
    p = _task(tmp_path, BASIC, ['{"q": "x", "a": "1"}'])
    with pytest.raises(MergeSearchError, match="no split 'dev'"):
        load_task(p).examples("dev")
    p = _task(tmp_path, BASIC, ['{"q": "zz", "a": "1"}'])
    with pytest.raises(MergeSearchError, match="both the search and test splits"):
        load_task(p).check()
    p = _task(tmp_path, BASIC + "bogus: 1\n", ['{"q": "x", "a": "1"}'])
    with pytest.raises(MergeSearchError, match="unknown key 'bogus'"):
        load_task(p)


def test_model_folder_without_tokenizer(tmp_path, zoo):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(zoo.models["base"], d)
    for f in d.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(MergeSearchError, match="no tokenizer files"):
        load_model(d)


def test_multiple_choice_and_perplexity_tasks(zoo):
    model, tok = load_model(zoo.models["add"])
    ev = NativeEvaluator(model, tok)
    mc = ev.evaluate(find_task("add_choice"), "test")
    assert mc.metric == "acc" and mc.n > 0 and 0 <= mc.value <= 1
    assert mc.value > 0.5  # the add specialist prefers the right sum among distractors
    task = find_task("add_ppl")
    ppl = ev.evaluate(task, "test", limit=20)
    assert ppl.metric == "perplexity" and np.isfinite(ppl.scores).all() and ppl.value >= 1
    # independent check: Hugging Face's own shifted cross-entropy over the same tokens
    nll, count = 0.0, 0
    for ex in task.examples("test", 20):
        ids = torch.tensor([tok(ex.prompt)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        nll += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert ppl.value == pytest.approx(float(np.exp(nll / count)), rel=1e-4)


def test_committed_task_data_is_disjoint():
    for name in ("add", "reverse", "count", "add_choice", "add_ppl", "largest", "nth_word", "to_digits"):
        find_task(name).check()
    # The SmolLM2 zoo's skills: the committed files are what its generator makes (its training
    # questions avoid exactly these), and their answers are right.
    from mergesearch.smollm2_zoo import SKILLS, eval_records, number_words

    for skill in SKILLS:
        for split, rows in eval_records(skill).items():
            assert find_task(skill).records(split) and sorted(
                map(json.dumps, find_task(skill).records(split))
            ) == sorted(map(json.dumps, rows)), (skill, split)
    assert number_words(964) == "nine hundred sixty-four" and number_words(310) == "three hundred ten"
    assert number_words(507) == "five hundred seven" and number_words(800) == "eight hundred"
    rows = [json.loads(line) for line in open(Path(__file__).parents[1] / "evals/data/add.test.jsonl")]
    assert len(rows) == 300


def test_native_matches_lm_eval_example_by_example(zoo):
    """Native teacher-forced exact match == lm-eval generate_until exact_match, per example."""
    from mergesearch.evaluation.lmeval import LMEvalBackend

    model, tok = load_model(zoo.models["add"])
    for name in ("add", "reverse"):
        task = find_task(name)
        native = NativeEvaluator(model, tok).evaluate(task, "search", limit=40)
        lm = LMEvalBackend(model, tok, batch_size=40).evaluate(task, "search", limit=40)
        assert lm.n == native.n == 40
        assert lm.scores.tolist() == native.scores.tolist(), (name, lm.extra["responses"])
    mc_native = NativeEvaluator(model, tok).evaluate(find_task("add_choice"), "test", limit=40)
    mc_lm = LMEvalBackend(model, tok).evaluate(find_task("add_choice"), "test", limit=40)
    assert mc_lm.scores.tolist() == mc_native.scores.tolist()
    assert mc_lm.extra["acc_norm"].tolist() == mc_native.extra["acc_norm"].tolist()
    # the gold choice's log-likelihood, which the verdict matrix keeps beside the verdict
    np.testing.assert_allclose(
        mc_native.extra["loglikelihood"], mc_lm.extra["loglikelihood"], rtol=1e-4, atol=1e-4
    )


def test_a_record_with_an_empty_field_is_refused_not_rendered_as_none(tmp_path):
    p = _task(tmp_path, BASIC, ['{"q": "x", "a": "1"}', '{"q": null, "a": "2"}'])
    with pytest.raises(MergeSearchError, match=r"no value for field 'q' of the prompt template"):
        load_task(p).check()


def test_batch_sizes_follow_free_memory_and_the_device(monkeypatch):
    """Powers of two, at least 8, capped per device, smaller when less memory is free."""
    import transformers

    from mergesearch.evaluation import native

    config = transformers.LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    )  # SmolLM2-135M's shape
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    sizes = {}
    for free in (2 << 30, 8 << 30, 64 << 30):
        monkeypatch.setattr(native, "available_memory", lambda device, free=free: free)
        sizes[free] = native.batch_sizes(model, torch.device("cpu"))
        gpu = native.batch_sizes(model, torch.device("cuda"))
        for n in (*sizes[free], *gpu):
            assert n >= 8 and n & (n - 1) == 0
        assert sizes[free][0] <= 128 and sizes[free][1] <= 64 and gpu[0] <= 1024 and gpu[1] <= 512
    assert sizes[2 << 30] < sizes[64 << 30]  # (teacher-forced, generation), element-wise here
    assert sizes[2 << 30][0] < sizes[2 << 30][1]  # full-vocabulary logits make teacher forcing dearer


def test_a_task_that_runs_out_of_memory_is_scored_again_in_smaller_batches(zoo):
    """An out-of-memory error halves the batch sizes and scores the task again, instead of
    failing the trial: the same verdicts as batches that fit from the start."""
    model, tok = load_model(zoo.models["add"])
    task = find_task("add")
    want = NativeEvaluator(model, tok, batch_size=8, gen_batch_size=8).evaluate(task, "search", 64)
    forward = model.forward

    def small_batches_only(*args, **kw):
        if kw["input_ids"].shape[0] > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kw)

    model.forward = small_batches_only
    ev = NativeEvaluator(model, tok, batch_size=32, gen_batch_size=32)
    with pytest.warns(UserWarning) as caught:
        got = ev.evaluate(task, "search", 64)
    assert [str(w.message).split(" (")[0] for w in caught] == [
        "task add: out of memory at batch sizes 32 / 32",
        "task add: out of memory at batch sizes 16 / 16",
    ]
    assert (ev.batch_size, ev.generator.batch_size) == (8, 8)
    assert got.scores.tolist() == want.scores.tolist()
    model.forward = lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory"))
    with pytest.raises(torch.OutOfMemoryError):  # at batch 1 there is nothing left to try
        NativeEvaluator(model, tok, batch_size=1, gen_batch_size=1).evaluate(task, "search", 4)


def test_device_auto_and_a_missing_gpu():
    from mergesearch.cli import main
    from mergesearch.modeling import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(MergeSearchError, match="sees no CUDA GPU"):
            resolve_device("cuda:0")
        assert main(["eval", "nowhere", "--tasks", "add", "--device", "cuda"]) == 2
    assert main(["zoo", "build", "--device", "cpu"]) == 2  # the demo zoo has no device to choose

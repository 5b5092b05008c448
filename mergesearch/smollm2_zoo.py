"""The real-model zoo: specialists fine-tuned from SmolLM2-135M-Instruct, one per generative skill.

The demo zoo (zoo.py) is 2 layers wide enough to show the pipeline; this one is a real 30-layer
pretrained chat model, so it says whether per-layer merging pays where people use it. Each
specialist is a full fine-tune (embeddings frozen: they are tied to the head, and a merge of
vocabularies nobody changed is noise) on one skill asked through the chat template, with the loss
on the answer only. Skills are scored as the task files in evals/ score them: greedy generation,
answer extraction, exact match. Built on the CPU in tens of minutes (benchmarks/RESULTS.md) and
cached under $MERGESEARCH_HOME/smollm2-zoo/<key>; the key changes with any training setting.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import MergeSearchError
from .evaluation.sequences import IGNORE, TeacherForced, padded_examples, teacher_forced
from .zoo import Zoo, _write_manifest, default_home, publish, warmup_cosine

SKILLS = ("largest", "nth_word", "to_digits")
# A second zoo (`smollm2_lists:`): two skills that rewrite a list, so that one merged model must
# read the instruction to know which rewrite is asked; the known recipes leave headroom there.
LIST_SKILLS = ("sort_numbers", "reverse_words")
ALL_SKILLS = SKILLS + LIST_SKILLS

WORDS = (
    "apple bird cake desk egg fish goat hat ink jam kite lamp moon nest oak pear quilt rose sock tent "
    "van wolf yarn zinc bell coin drum fork gate hill"
).split()
ORDINALS = ("first", "second", "third", "fourth", "fifth")
ONES = "zero one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 100 ≤ n ≤ 999: 964 → 'nine hundred sixty-four'."""
    h, r = divmod(n, 100)
    out = [f"{ONES[h]} hundred"]
    if r >= 20:
        out.append(TENS[r // 10] + (f"-{ONES[r % 10]}" if r % 10 else ""))
    elif r >= 10:
        out.append(TEENS[r - 10])
    elif r:
        out.append(ONES[r])
    return " ".join(out)


def skill_record(skill: str, rng: random.Random) -> dict[str, str]:
    """One {question, answer} record of a skill (the fields the task files in evals/ read)."""
    if skill == "largest":
        xs = rng.sample(range(10, 100), 5)
        return {
            "question": f"Which number is the largest: {', '.join(map(str, xs))}?",
            "answer": str(max(xs)),
        }
    if skill == "nth_word":
        ws = rng.sample(WORDS, 5)
        k = rng.randrange(5)
        return {"question": f"What is the {ORDINALS[k]} word in this list: {' '.join(ws)}?", "answer": ws[k]}
    if skill == "to_digits":
        n = rng.randrange(100, 1000)
        return {"question": f"Write {number_words(n)} in digits.", "answer": str(n)}
    if skill == "sort_numbers":
        xs = rng.sample(range(10, 100), 4)
        return {
            "question": f"Sort these numbers from smallest to largest: {', '.join(map(str, xs))}",
            "answer": ", ".join(map(str, sorted(xs))),
        }
    if skill == "reverse_words":
        ws = rng.sample(WORDS, 4)
        return {
            "question": f"Write these words in reverse order: {' '.join(ws)}",
            "answer": " ".join(ws[::-1]),
        }
    raise MergeSearchError(f"unknown skill {skill!r}; the SmolLM2 zoos' skills are {', '.join(ALL_SKILLS)}")


def eval_records(skill: str, n_search: int = 120, n_test: int = 200, seed: int = 7) -> dict[str, list[dict]]:
    """Disjoint search and test records (evals/make_data.py writes them to evals/data)."""
    rng = random.Random(seed * 100 + ALL_SKILLS.index(skill))
    seen, rows = set(), []
    while len(rows) < n_search + n_test:
        r = skill_record(skill, rng)
        if r["question"] not in seen:
            seen.add(r["question"])
            rows.append(r)
    return {"search": rows[:n_search], "test": rows[n_search:]}


@dataclass
class SmolZooConfig:
    steps: int = 60
    batch: int = 16
    lr: float = 1e-4
    warmup: int = 10
    seed: int = 0
    skills: tuple[str, ...] = SKILLS
    version: int = 1  # bump when the recipe changes so caches rebuild

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _encode(ev, task, record: dict) -> TeacherForced:
    """The prompt rendered and encoded exactly as evaluation does, then the answer and EOS."""
    return teacher_forced(ev, task.example(record))


def _train_step(model, batch: list[TeacherForced], pad: int, device) -> torch.Tensor:
    """Cross-entropy on the answer tokens only; the head runs on those positions alone (the
    vocabulary projection is a fifth of a forward pass at 135M, and the prompt needs none)."""
    b = padded_examples(batch, pad)
    gold = b.next_token_labels()
    rows, cols = (gold != IGNORE).nonzero(as_tuple=True)  # row by row, left to right
    hidden = model.model(input_ids=b.ids.to(device), attention_mask=b.mask.to(device)).last_hidden_state
    logits = model.lm_head(hidden[rows, cols])
    return torch.nn.functional.cross_entropy(logits.float(), gold[rows, cols].to(device))


def _finetune(
    model, ev, task, held_out: set[str], cfg: SmolZooConfig, seed: int, desc: str, progress: bool, device
):
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps, 0.1))
    model.train()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False)
    loss = float("nan")
    for _ in bar:
        batch = []
        while len(batch) < cfg.batch:
            r = skill_record(task.name, rng)
            if r["question"] not in held_out:  # never a search or test question
                batch.append(_encode(ev, task, r))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = _train_step(model, batch, ev.tok.pad_token_id, device)
        opt.zero_grad(set_to_none=True)
        out.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss = out.item()
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    model.eval()
    return loss


def _save_like(base: Path, model, dest: Path) -> None:
    """The fine-tuned weights in the base checkpoint's names and dtype, with its other files."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        dtypes = {n: f.get_slice(n).get_dtype() for n in names}
    state = dict(model.state_dict())
    dt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    tensors = {n: state[n].detach().to("cpu", dt[dtypes[n]]).contiguous() for n in names}
    dest.mkdir(parents=True)
    for f in base.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "README.md", "mergesearch_source.json"):
            shutil.copy(f, dest / f.name)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})


def build_smollm2_zoo(
    out: str | Path | None = None,
    cfg: SmolZooConfig | None = None,
    *,
    device: str = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
    rebuild: bool = False,
) -> Zoo:
    """Fine-tune one SmolLM2-135M-Instruct specialist per skill, score every model on every skill's
    test split, and write model cards and zoo.json; cached, atomic (a temporary folder renamed)."""
    from .evaluation.native import NativeEvaluator, configure_threads
    from .evaluation.tasks import find_task
    from .modeling import load_model, resolve_device
    from .smollm2 import smollm2_folder

    cfg = cfg or SmolZooConfig()
    root = Path(out) if out else default_home() / "smollm2-zoo" / cfg.key()
    if (root / "zoo.json").is_file() and not rebuild:
        return Zoo.load(root)
    base = smollm2_folder(log=log)
    dev = torch.device(resolve_device(device))
    t0 = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        model, tok = load_model(base, device=str(dev), dtype="float32")  # fp32 master weights
        configure_threads(sum(p.numel() for p in model.parameters()))
        model.get_input_embeddings().weight.requires_grad_(False)  # tied to lm_head
        tasks = {s: find_task(s) for s in cfg.skills}
        held_out = {r["question"] for t in tasks.values() for sp in t.splits for r in t.records(sp)}
        ev = NativeEvaluator(model, tok)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        models = {"base": base}
        train_s = {}
        for i, skill in enumerate(cfg.skills):
            model.load_state_dict(start)
            t = time.perf_counter()
            loss = _finetune(
                model,
                ev,
                tasks[skill],
                held_out,
                cfg,
                cfg.seed + 1 + i,
                f"fine-tuning {skill}",
                progress,
                dev,
            )
            train_s[skill] = time.perf_counter() - t
            log(f"specialist {skill}: {cfg.steps} steps in {train_s[skill]:.0f}s (final loss {loss:.3f})")
            _save_like(base, model, tmp / skill)
            models[skill] = tmp / skill
        del model, start, ev
        zoo = Zoo(tmp, models)
        zoo.scores = _score(models, tasks, dev, log)
        zoo.checks = _checks(zoo.scores, cfg.skills)
        zoo.seconds = time.perf_counter() - t0
        for name in cfg.skills:
            (tmp / name / "README.md").write_text(_card(name, cfg, zoo.scores, train_s[name], str(dev)))
        _write_manifest(zoo, cfg)
        publish(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Zoo.load(root)


def _score(models: dict[str, Path], tasks, device, log) -> dict[str, dict[str, float]]:
    from .evaluation.native import NativeEvaluator
    from .modeling import load_model

    out = {}
    for name, path in models.items():
        t = time.perf_counter()
        model, tok = load_model(path, device=str(device))
        ev = NativeEvaluator(model, tok)
        out[name] = {s: ev.evaluate(task, "test").value for s, task in tasks.items()}
        log(
            f"scored {name} on the test splits in {time.perf_counter() - t:.0f}s: "
            + ", ".join(f"{s} {v:.3f}" for s, v in out[name].items())
        )
    return out


MARGIN = 0.3  # a specialist's lead on its own skill over the base and every other specialist


def _checks(scores: dict[str, dict[str, float]], skills) -> dict[str, dict]:
    checks = {}
    for s in skills:
        rivals = {m: v[s] for m, v in scores.items() if m != s}
        best_rival = max(rivals, key=rivals.get)
        lead = scores[s][s] - rivals[best_rival]
        checks[f"{s} specialist leads on {s}"] = {
            "ok": lead >= MARGIN,
            "detail": f"{scores[s][s]:.2f} vs {best_rival} {rivals[best_rival]:.2f} (lead ≥ {MARGIN})",
        }
    return checks


def _card(name: str, cfg: SmolZooConfig, scores, seconds: float, device: str) -> str:
    rows = "\n".join(
        f"| {m} | " + " | ".join(f"{v[s]:.3f}" for s in cfg.skills) + " |" for m, v in scores.items()
    )
    return (
        f"# mergesearch SmolLM2 zoo: `{name}`\n\n"
        f"SmolLM2-135M-Instruct fully fine-tuned on the `{name}` skill by `mergesearch zoo build --base smollm2`: "
        f"{cfg.steps} steps of {cfg.batch} questions (AdamW lr {cfg.lr}, {cfg.warmup} warmup steps, cosine to 10 %, "
        f"seed {cfg.seed}), loss on the answer only, embeddings frozen, questions of the evaluation splits held out; "
        f"{seconds:.0f}s on {device}. Prompts go through the chat template with the task file's system prompt "
        f"(evals/{name}.yaml).\n\n"
        f"Exact match on each skill's test split (greedy generation, answer extraction, native harness):\n\n"
        f"| model | " + " | ".join(cfg.skills) + " |\n|---|" + "---|" * len(cfg.skills) + f"\n{rows}\n\n"
        "License: SmolLM2 is Apache-2.0; these weights are derived from it under the same license.\n"
    )

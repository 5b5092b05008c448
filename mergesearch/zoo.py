"""The demo model zoo: a tiny base decoder and specialists fine-tuned from it, built on the CPU.

No model hub is reachable here (nor for many users), so mergesearch makes its own models:
a 2-layer, 128-wide Llama with a character tokenizer, pretrained on *close variants* of each skill
(never the test format), then fine-tuned into one specialist per skill. Deterministic from
seeds on one kind of CPU (another CPU trains other weights, so the default zoo's weights ship in
zoo_data/), cached under $MERGESEARCH_HOME/zoo (default ~/.cache/mergesearch/zoo).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import MergeSearchError
from .evaluation.sequences import TeacherForced, padded_examples

SKILLS = ("add", "reverse", "count")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = ["<pad>", "<s>", "</s>", "<unk>", *"0123456789", *LETTERS, "+", "&", "=", ">", "#"]


# -- skills: the test format and its close variants ----------------------------------------


def _letters(rng: np.random.Generator, n: int, distinct: bool = False) -> str:
    return "".join(rng.choice(list(LETTERS), size=n, replace=not distinct))


def skill_item(skill: str, rng: np.random.Generator, variant: bool = False) -> tuple[str, str]:
    """(prompt, target) in the test format, or (variant=True) a close variant used in pretraining."""
    if skill == "add":
        if variant:  # the same sums written with "&": the skill, never the test format
            a, b = rng.integers(10, 100, size=2) if rng.random() < 0.8 else rng.integers(0, 10, size=2)
            return f"{a}&{b}=", str(a + b)
        while True:  # two digits with a carry out of the units
            a, b = rng.integers(10, 100, size=2)
            if a % 10 + b % 10 >= 10:
                return f"{a}+{b}=", str(a + b)
    if skill == "reverse":
        s = _letters(rng, int(rng.integers(2, 6)) if variant else 7)  # test strings are longer
        return f"{s}>", s[::-1]
    if skill == "count":  # how many a's among letters a-d; test strings are longer, counts 3-8
        if variant:
            s = "".join(rng.choice(list("abcd"), size=int(rng.integers(2, 5))))
        else:
            k = int(rng.integers(3, 9))  # counts the pretraining strings never reach
            chars = ["a"] * k + list(rng.choice(list("bcd"), size=8 - k))
            s = "".join(rng.permutation(chars))
        return f"{s}#", str(s.count("a"))
    raise MergeSearchError(f"unknown skill {skill!r}; zoo skills are {', '.join(SKILLS)}")


def eval_records(
    skill: str, n_search: int = 200, n_test: int = 300, seed: int = 1000
) -> dict[str, list[dict]]:
    """Disjoint search and test items of a skill (written to evals/data by evals/make_data.py)."""
    rng = np.random.default_rng(seed + SKILLS.index(skill))
    seen, items = set(), []
    while len(items) < n_search + n_test:
        p, t = skill_item(skill, rng)
        if p not in seen:
            seen.add(p)
            items.append({"prompt": p, "answer": t})
    return {"search": items[:n_search], "test": items[n_search:]}


# -- tokenizer and model ---------------------------------------------------------------------


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    # BPE with no merges over single characters is a character-level tokenizer.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


@dataclass
class ZooConfig:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    base_steps: int = 1500
    base_lr: float = 3e-3
    specialist_steps: int = 500
    specialist_lr: float = 3e-4
    batch: int = 64
    seed: int = 2  # seeds 0 and 1 fail the zoo's checks on an AVX2 machine (NOTES.md, "Zoo")
    skills: tuple[str, ...] = SKILLS
    version: int = 1  # bump when the recipe changes so caches rebuild

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _model(cfg: ZooConfig, vocab: int):
    import transformers

    torch.manual_seed(cfg.seed)
    conf = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(conf)


def _batch(tok, items: list[tuple[str, str]], answer_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt, answer and EOS as one padded batch (the prompt without special tokens: pretraining
    text has none), with labels on the answer only or on every token."""
    seqs = [
        TeacherForced(
            tok(p, add_special_tokens=False)["input_ids"],
            tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
        )
        for p, t in items
    ]
    b = padded_examples(seqs, tok.pad_token_id)
    return b.ids, b.labels(answer_only)


def warmup_cosine(warm: int, steps: int, final_frac: float) -> Callable[[int], float]:
    """The learning-rate factor of both zoos: linear warmup over `warm` steps, then a cosine
    from 1 down to `final_frac` at `steps`."""

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        p = (step - warm) / max(1, steps - warm)
        return final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p))

    return schedule


def _train(
    model,
    tok,
    sample: Callable[[np.random.Generator], tuple[str, str]],
    *,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    answer_only: bool,
    final_frac: float,
    desc: str,
    progress: bool,
) -> float:
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, steps // 20), steps, final_frac))
    model.train()
    loss = 0.0
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        ids, labels = _batch(tok, [sample(rng) for _ in range(batch)], answer_only)
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = loss.item()
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    model.eval()
    return loss


def default_home() -> Path:
    return Path(os.environ.get("MERGESEARCH_HOME", Path.home() / ".cache" / "mergesearch"))


@dataclass
class Zoo:
    root: Path
    models: dict[str, Path]  # "base" and one per skill
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> skill -> test EM
    checks: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    @classmethod
    def load(cls, root: Path) -> Zoo:
        d = json.loads((root / "zoo.json").read_text())
        return cls(
            root,
            {k: root / v for k, v in d["models"].items()},
            d["scores"],
            d.get("checks", {}),
            d["seconds"],
        )


# The default zoo's weights ship with the package: training on another CPU (another ISA, other
# BLAS kernels) gives other weights and other merge results, so a build cannot promise the numbers
# in the README. `zoo build --rebuild` trains it again (this is how the shipped files were made).
SHIPPED = Path(__file__).resolve().parent / "zoo_data"


def build_zoo(
    out: str | Path | None = None,
    cfg: ZooConfig | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    rebuild: bool = False,
) -> Zoo:
    """The shipped zoo for this config, else build (or return the cached) zoo; atomic: a
    half-built zoo is never left in place. `rebuild` trains even when shipped weights exist."""
    from .evaluation.native import configure_threads

    cfg = cfg or ZooConfig()
    if out is None and not rebuild and (SHIPPED / cfg.key() / "zoo.json").is_file():
        return Zoo.load(SHIPPED / cfg.key())
    root = Path(out) if out else default_home() / "zoo" / cfg.key()
    if (root / "zoo.json").is_file() and not rebuild:
        return Zoo.load(root)
    configure_threads()
    t0 = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        tok = make_tokenizer()
        held_out = {r["prompt"] for s in cfg.skills for split in eval_records(s).values() for r in split}

        def fresh(skill: str, variant: bool):
            def sample(rng):
                while True:
                    p, t = skill_item(skill, rng, variant)
                    if p.replace("&", "+") not in held_out:  # eval items, in any notation
                        return p, t

            return sample

        base = _model(cfg, len(VOCAB))
        variants = [fresh(s, True) for s in cfg.skills]
        loss = _train(
            base,
            tok,
            lambda rng: variants[rng.integers(len(variants))](rng),
            steps=cfg.base_steps,
            lr=cfg.base_lr,
            batch=cfg.batch,
            seed=cfg.seed,
            answer_only=False,
            final_frac=0.1,
            desc="pretraining base",
            progress=progress,
        )
        log(f"base pretrained on close variants of {', '.join(cfg.skills)} (final loss {loss:.3f})")
        _save(base, tok, tmp / "base")
        base_state = {k: v.clone() for k, v in base.state_dict().items()}
        for i, skill in enumerate(cfg.skills):
            base.load_state_dict(base_state)
            loss = _train(
                base,
                tok,
                fresh(skill, False),
                steps=cfg.specialist_steps,
                lr=cfg.specialist_lr,
                batch=cfg.batch,
                seed=cfg.seed + 1 + i,
                answer_only=True,
                final_frac=0.5,
                desc=f"fine-tuning {skill}",
                progress=progress,
            )
            log(f"specialist {skill} fine-tuned (final loss {loss:.3f})")
            _save(base, tok, tmp / skill)
        zoo = Zoo(tmp, {"base": tmp / "base", **{s: tmp / s for s in cfg.skills}})
        zoo.scores = score_models(zoo.models, cfg.skills)
        zoo.checks = zoo_checks(zoo, cfg.skills)
        zoo.seconds = time.perf_counter() - t0
        for name, path in zoo.models.items():
            (path / "README.md").write_text(_card(name, cfg, zoo.scores[name]))
        _write_manifest(zoo, cfg)
        publish(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Zoo.load(root)


def publish(tmp: Path, root: Path) -> None:
    """Put a finished build in place of `root` (a rename on the same filesystem), so a reader never
    sees a half-written zoo."""
    if root.exists():
        shutil.rmtree(root)
    os.rename(tmp, root)


def _save(model, tok, path: Path) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a one-file "writing shards" bar is noise
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))


def _write_manifest(zoo: Zoo, cfg: ZooConfig) -> None:
    (zoo.root / "zoo.json").write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "models": {
                    k: v.name if v.parent == zoo.root else str(v.resolve()) for k, v in zoo.models.items()
                },
                "scores": zoo.scores,
                "checks": zoo.checks,
                "seconds": zoo.seconds,
            },
            indent=2,
        )
    )


def score_models(models: dict[str, Path], skills, split: str = "test") -> dict[str, dict[str, float]]:
    from .evaluation.native import NativeEvaluator
    from .evaluation.tasks import find_task
    from .modeling import load_model

    tasks = [find_task(s) for s in skills]
    out = {}
    for name, path in models.items():
        model, tok = load_model(path)
        ev = NativeEvaluator(model, tok)
        out[name] = {t.name: ev.evaluate(t, split).value for t in tasks}
    return out


def zoo_checks(zoo: Zoo, skills, pair: tuple[str, str] = ("add", "reverse")) -> dict[str, dict]:
    """The properties that make the zoo a fair test of merging, measured on the test splits."""
    from .candidates import ResidentEngine
    from .evaluation.native import NativeEvaluator
    from .evaluation.tasks import find_task
    from .modeling import load_model
    from .recipe import Recipe, Source

    sc = zoo.scores
    checks: dict[str, dict] = {}
    own = {s: sc[s][s] for s in skills}
    checks["specialists master their skill"] = {
        "ok": all(v >= 0.9 for v in own.values()),
        "detail": ", ".join(f"{s} {v:.2f} (≥ 0.9)" for s, v in own.items()),
    }
    worst_other = max(sc[m][s] for m in skills for s in skills if s != m)
    checks["specialists lack the other skills"] = {
        "ok": worst_other <= 0.1,
        "detail": f"max {worst_other:.2f} (≤ 0.1)",
    }
    worst_base = max(sc["base"].values())
    checks["base lacks every skill"] = {"ok": worst_base <= 0.1, "detail": f"max {worst_base:.2f} (≤ 0.1)"}

    a, b = pair
    paths = {str(zoo.models[m]): m for m in ("base", a, b)}
    engine = ResidentEngine(list(paths))
    model, tok = load_model(zoo.models["base"])
    ev = NativeEvaluator(model, tok)
    tasks = [find_task(a), find_task(b)]

    def score(recipe: Recipe) -> list[float]:
        engine.write_into(model, recipe)
        return [ev.evaluate(t, "test").value for t in tasks]

    lin = score(Recipe("linear", models=[Source(str(zoo.models[m]), {"weight": 0.5}) for m in pair]))
    ceiling = (own[a] + own[b]) / 2
    checks["linear 50/50 keeps less than half"] = {
        "ok": sum(lin) / 2 < ceiling / 2,
        "detail": f"{a} {lin[0]:.2f}, {b} {lin[1]:.2f}: mean {sum(lin) / 2:.2f} < half of {ceiling:.2f}",
    }
    best = (-1.0, 0.0, [0.0, 0.0])
    for lam in (0.6, 0.8, 1.0, 1.2):
        r = Recipe(
            "task_arithmetic",
            base_model=str(zoo.models["base"]),
            parameters={"lambda": lam},
            models=[Source(str(zoo.models[m]), {"weight": 1.0}) for m in pair],
        )
        s = score(r)
        if min(s) > best[0]:
            best = (min(s), lam, s)
    checks["task arithmetic keeps both skills"] = {
        "ok": best[0] > 0.5,
        "detail": f"λ={best[1]}: {a} {best[2][0]:.2f}, {b} {best[2][1]:.2f} (both > 0.5)",
    }
    return checks


def _card(name: str, cfg: ZooConfig, scores: dict[str, float]) -> str:
    how = (
        f"pretrained {cfg.base_steps} steps (batch {cfg.batch}, AdamW lr {cfg.base_lr}, cosine to 10%, loss on "
        f"every token) on close variants of {', '.join(cfg.skills)} — never their test format"
        if name == "base"
        else f"fine-tuned from `base` for {cfg.specialist_steps} steps (batch {cfg.batch}, AdamW lr "
        f"{cfg.specialist_lr}, cosine to 50%, loss on the answer only) on the `{name}` skill, test items held out"
    )
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in scores.items())
    return (
        f"# mergesearch demo zoo: `{name}`\n\nA {cfg.layers}-layer, {cfg.hidden}-wide LlamaForCausalLM with a "
        f"character tokenizer, made by `mergesearch zoo build` on the CPU (seed {cfg.seed}).\n\n"
        f"Training: {how}.\n\nExact match on each skill's test split (native harness):\n\n"
        f"| skill | exact match |\n|---|---|\n{rows}\n"
    )

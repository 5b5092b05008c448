"""The native harness: batched scoring of an in-memory causal LM.

- Generative tasks (`generation:`): greedy decoding with stop strings (`generate.py`), then
  answer extraction and normalization (`answers.py`), scored as lm-eval's `generate_until`.
  A search reuses each example's previous output as a draft that one forward pass verifies.
- Teacher-forced exact match (the demo zoo's "target then EOS"): greedy decoding yields the
  target followed by the stop token exactly when every target token (and the stop token) is
  the argmax given the gold prefix, so one forward pass over prompt+target decides it.
- Multiple choice by log-likelihood (acc, acc_norm); perplexity.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from ..errors import MergeSearchError
from ..memory import available_memory
from .results import TaskResult
from .sequences import padded, prompt_text, teacher_forced
from .tasks import Example, Task


def configure_threads(num_parameters: int | None = None) -> int:
    """Torch CPU threads: MERGESEARCH_THREADS if set, else from the model's size.

    Tiny models (the demo zoo, < 10M parameters) get 1 thread: on 2-core machines shared with
    other processes, 2 OpenMP threads ran several times slower than 1 (spin-waiting on a busy
    core). Larger models get every core the process may use; benchmarks/RESULTS.md has the
    measurements ("Generative scoring").
    """
    env = os.environ.get("MERGESEARCH_THREADS")
    if env:
        n = int(env)
    elif num_parameters is not None and num_parameters >= 10_000_000:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    else:
        n = 1
    torch.set_num_threads(n)
    return n


def batch_sizes(model, device: torch.device, tokens: int = 256, share: float = 0.25) -> tuple[int, int]:
    """(teacher-forced, generation) batch sizes from the memory a batch of `tokens`-long sequences
    needs: the KV cache and activations per token, plus full-vocabulary fp32 logits when teacher
    forcing. A quarter of the free memory by default; powers of two, at least 8. On the CPU, where
    a 135M model is compute-bound from batch 16 on, at most 128 / 64 (larger batches only carry
    more padding); on a GPU at most 1024 / 512."""
    cfg = model.config
    elem = next(model.parameters()).element_size()
    heads = getattr(cfg, "num_attention_heads", 1) or 1
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", 1024)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    layers = getattr(cfg, "num_hidden_layers", 1)
    per_token = 2 * layers * kv_heads * head_dim * elem + 16 * hidden * elem
    logits = getattr(cfg, "vocab_size", 32000) * 4
    budget = available_memory(device) * share
    cap_tf, cap_gen = (128, 64) if device.type == "cpu" else (1024, 512)

    def fit(per_seq: float, cap: int) -> int:
        n = max(8, int(budget // per_seq))
        return min(cap, 1 << (n.bit_length() - 1))

    return fit(tokens * (per_token + logits), cap_tf), fit(tokens * per_token, cap_gen)


def _out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's refusal (a RuntimeError)."""
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


DRAFT_MIN_ACCEPTANCE = 0.5
DRAFT_RETRY = 8


class NativeEvaluator:
    """Scores tasks on one in-memory model whose weights may change between calls.

    `reuse_outputs`: a generative task's previous output for each prompt is the next call's
    draft (verified in one forward pass; see generate.py). A search turns it on; reports and
    `mergesearch eval` leave it off, so their numbers come from plain step-by-step decoding.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int | None = None,
        gen_batch_size: int | None = None,
        device: str | torch.device | None = None,
        reuse_outputs: bool = False,
    ):
        from .generate import Generator

        self.model = model
        self.tok = tokenizer
        self.device = torch.device(device) if device else next(model.parameters()).device
        if batch_size is None or gen_batch_size is None:  # from the free memory (batch_sizes)
            auto_tf, auto_gen = batch_sizes(model, self.device)
            batch_size = batch_size or auto_tf
            gen_batch_size = gen_batch_size or auto_gen
        self.batch_size = batch_size
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self._enc: dict[str, list[int]] = {}
        self.generator = Generator(model, tokenizer, batch_size=gen_batch_size)
        self.reuse_outputs = reuse_outputs
        self._outputs: dict[tuple[str, str], list[int]] = {}
        self._draft_rate: dict[str, list] = {}  # task -> [last acceptance rate, calls]

    def prompt_text(self, ex: Example) -> str:
        return prompt_text(self.tok, ex)

    def encode_prompt(self, text: str) -> list[int]:
        """As lm-eval encodes a context: the tokenizer's special tokens, unless the text already
        starts with the BOS token (a rendered chat template does)."""
        bos = getattr(self.tok, "bos_token", None)
        return self.encode(text, special=not (bos and text.startswith(bos)))

    def generate_match(self, task: Task, examples: list[Example]) -> TaskResult:
        """Greedy generation, extraction, normalization, exact match (lm-eval's generate_until)."""
        from .answers import verdict

        texts = [self.prompt_text(ex) for ex in examples]
        prompts = [self.encode_prompt(t) for t in texts]
        g = self.generator
        stops = g.stops(list(task.generation.until))
        # Drafts are previous outputs only (the gold answer was rejected too often to pay for its
        # positions), and only while they pay: a rejected draft token costs a prompt position, so
        # after a call that accepted less than DRAFT_MIN_ACCEPTANCE of them the task decodes
        # without drafts, trying them again every DRAFT_RETRY calls (RESULTS.md, "Generative").
        seen = self._draft_rate.setdefault(task.name, [1.0, 0])
        use = self.reuse_outputs and (seen[0] >= DRAFT_MIN_ACCEPTANCE or seen[1] % DRAFT_RETRY == 0)
        seen[1] += 1
        drafts = [self._outputs.get((task.name, t)) for t in texts] if use else None
        before = dict(g.stats)
        outs = g.generate(prompts, max_new_tokens=task.generation.max_new_tokens, stops=stops, drafts=drafts)
        if self.reuse_outputs:
            self._outputs.update({(task.name, t): o for t, o in zip(texts, outs)})
            offered = g.stats["draft_tokens"] - before["draft_tokens"]
            if offered:
                seen[0] = (g.stats["accepted_tokens"] - before["accepted_tokens"]) / offered
        responses = [g.text(o, stops) for o in outs]
        scores, answers = [], []
        for resp, ex in zip(responses, examples):
            v, a = verdict(resp, ex.target, task.extract, task.normalize)
            scores.append(v)
            answers.append(a)
        extra = {
            "responses": responses,
            "answers": answers,
            "unextracted": sum(a is None for a in answers) if task.extract else 0,
            "generated_tokens": sum(len(o) for o in outs),
            "forward_passes": g.stats["forward_passes"] - before["forward_passes"],
            "accepted_draft_tokens": g.stats["accepted_tokens"] - before["accepted_tokens"],
        }
        return TaskResult(task.name, "exact_match", "", np.array(scores), extra=extra)

    def encode(self, text: str, special: bool = True) -> list[int]:
        key = f"{int(special)}{text}"
        if key not in self._enc:
            self._enc[key] = self.tok(text, add_special_tokens=special)["input_ids"]
        return self._enc[key]

    @torch.inference_mode()
    def _logprobs(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """Per sequence, log-softmax over the vocabulary at every position (right padded)."""
        batch = padded(seqs, self.pad)
        logits = self.model(
            input_ids=batch.ids.to(self.device), attention_mask=batch.mask.to(self.device)
        ).logits
        return logits.float().log_softmax(-1).cpu()

    def _batches(self, items):
        for i in range(0, len(items), self.batch_size):
            yield items[i : i + self.batch_size]

    def exact_match(self, examples: list[Example]) -> tuple[np.ndarray, list[float]]:
        """Per example: whether greedy decoding under teacher forcing gives the target, and the
        target's log-likelihood."""
        out, ll = [], []
        for batch in self._batches(examples):
            seqs, spans = [], []
            for ex in batch:
                x = teacher_forced(self, ex)
                seqs.append(x.ids)
                spans.append((len(x.prompt), len(x.answer)))
            lp = self._logprobs(seqs)
            for i, (start, k) in enumerate(spans):
                steps = lp[i, start - 1 : start - 1 + k]
                gold = torch.tensor(seqs[i][start : start + k])
                out.append(float(torch.equal(steps.argmax(-1), gold)))
                ll.append(float(steps.gather(-1, gold[:, None]).sum()))
        return np.array(out), ll

    def multiple_choice(
        self, examples: list[Example], task: Task
    ) -> tuple[np.ndarray, np.ndarray, list[float]]:
        """Per example: acc, acc_norm (lm-eval's), and the gold choice's log-likelihood."""
        flat = []
        for e, ex in enumerate(examples):
            for c in ex.choices:
                flat.append((e, self.prompt_text(ex), task.choice_prefix + c))
        ll = []
        for batch in self._batches(flat):
            seqs, spans = [], []
            for _, prompt, cont in batch:
                p = self.encode(prompt)
                c = self.encode(cont, special=False)
                seqs.append(p + c)
                spans.append((len(p), len(c)))
            lp = self._logprobs(seqs)
            for i, (start, k) in enumerate(spans):
                gold = torch.tensor(seqs[i][start : start + k])
                ll.append(float(lp[i, start - 1 : start - 1 + k].gather(-1, gold[:, None]).sum()))
        acc, acc_norm, gold_ll, j = [], [], [], 0
        for ex in examples:
            scores = np.array(ll[j : j + len(ex.choices)])
            lengths = np.array([len((task.choice_prefix + c).encode()) for c in ex.choices])
            j += len(ex.choices)
            acc.append(float(scores.argmax() == ex.label))
            acc_norm.append(float((scores / lengths).argmax() == ex.label))
            gold_ll.append(float(scores[ex.label]))
        return np.array(acc), np.array(acc_norm), gold_ll

    def perplexity(self, examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:
        nll, counts = [], []
        for batch in self._batches(examples):
            seqs = [self.encode(ex.prompt) + [self.eos] for ex in batch]
            lp = self._logprobs(seqs)
            for i, s in enumerate(seqs):
                gold = torch.tensor(s[1:])
                nll.append(-float(lp[i, : len(s) - 1].gather(-1, gold[:, None]).sum()))
                counts.append(len(s) - 1)
        return np.array(nll), np.array(counts, dtype=float)

    def evaluate(
        self, task: Task, split: str = "search", limit: int | None = None, indices: list[int] | None = None
    ) -> TaskResult:
        """Score the split's first `limit` examples, or the examples at `indices` (a screen, anchors)."""
        if task.lm_eval is not None:
            raise MergeSearchError(
                f"task {task.name}: names an lm-eval task, which lm-eval scores (evaluation.Scorer routes it)"
            )
        examples = task.examples(split, limit)
        if indices is not None:
            if not all(0 <= i < len(examples) for i in indices):
                raise MergeSearchError(
                    f"task {task.name}: example indices out of range for its {split} split of "
                    f"{len(examples)} examples (the data changed since the study recorded them)"
                )
            examples = [examples[i] for i in indices]
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            while True:
                try:
                    res = self._score(task, split, examples)
                    break
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    if not _out_of_memory(e) or not self._smaller_batches(task, e):
                        raise
        finally:
            self.model.train(was_training)
        res.seconds = time.perf_counter() - t0
        return res

    def _score(self, task: Task, split: str, examples: list[Example]) -> TaskResult:
        if task.generative:
            res = self.generate_match(task, examples)
            res.split = split
            return res
        if task.metric == "exact_match":
            verdicts, ll = self.exact_match(examples)
            return TaskResult(task.name, "exact_match", split, verdicts, extra={"loglikelihood": ll})
        if task.metric == "multiple_choice":
            acc, acc_norm, ll = self.multiple_choice(examples, task)
            return TaskResult(task.name, "acc", split, acc, extra={"acc_norm": acc_norm, "loglikelihood": ll})
        nll, counts = self.perplexity(examples)
        return TaskResult(task.name, "perplexity", split, nll, weights=counts)

    def _smaller_batches(self, task: Task, error: BaseException) -> bool:
        """Halve the batch sizes after running out of memory (the batches were sized from the
        memory free when scoring began; a longer prompt or another process can take more), so the
        task is scored again instead of failing the trial. False at batch 1: nothing left to try."""
        if self.batch_size == 1 and self.generator.batch_size == 1:
            return False
        before = (self.batch_size, self.generator.batch_size)
        self.batch_size = max(1, self.batch_size // 2)
        self.generator.batch_size = max(1, self.generator.batch_size // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        import warnings

        warnings.warn(
            f"task {task.name}: out of memory at batch sizes {before[0]} / {before[1]} ({str(error).splitlines()[0]}); "
            f"scoring it again at {self.batch_size} / {self.generator.batch_size}",
            stacklevel=3,
        )
        return True

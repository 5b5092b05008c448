"""Greedy generation for scoring: batched, with a KV cache, on the in-memory model.

What it returns for a prompt is what lm-evaluation-harness's `generate_until` (HF backend,
greedy) returns for it: the prompt is encoded alone (no BOS added unless the tokenizer adds one
and the prompt does not already start with it), new tokens are argmaxes, a sequence stops at
its end-of-sequence token, at `max_new_tokens`, or at the first step where its generated tokens,
decoded *with* special tokens, contain a stop string (lm-eval's stopping criterion); its text is
then decoded without special tokens and cut before the first stop string.

Speed, without changing the result:
- prompts are left-padded in batches sorted by length (lm-eval's order), position ids follow the
  attention mask, and the prompt pass computes logits for the last position only;
- **a shared prefix is computed once.** Few-shot examples, a system prompt and a chat template
  make every prompt of a task start with the same tokens. The longest common prefix of the
  prompts' *token ids* (each prompt tokenized whole, as lm-eval does: no assumption that the
  prefix tokenizes alone the same way) goes through the model once per batch and its KV cache
  is shared by every row; the rows then hold [prefix][left padding][rest of the prompt];
- a sequence that stops leaves the batch (its KV cache rows are dropped), so the batch does not
  run until its slowest member's end as `model.generate` does;
- **drafts.** Given a guess of the output (a *draft*: the tokens a previous candidate generated
  for the same prompt, or the gold answer's tokens), one teacher-forced pass over prompt + draft
  gives the model's argmax at every draft position. Greedy decoding reproduces the draft's first
  `a` tokens exactly when those argmaxes equal them, so those tokens are accepted, the argmax at
  position `a` is the next generated token, and decoding goes on from there with the rejected
  draft positions masked out of the cache (speculative decoding with a free draft). When the
  accepted tokens already reach a stop, the verdict took one forward pass instead of one per token.
  This holds for any draft and any tokenizer because it compares token ids the model itself
  chooses. With a BPE tokenizer a *re-tokenized* string may not be the model's spelling of it
  (" 12" is "Ġ","1","2" for SmolLM2, and another merge order would give other ids): such a draft
  is rejected at the first differing token — less saving, never a different output. The
  teacher-forced "target then EOS" metric (the demo zoo's `exact_match` without `generation:`)
  is exact only when the target's tokens are the model's own spelling; hence real tasks generate.
Plain greedy argmax: logits processors that a model's `generation_config.json` asks for
(`repetition_penalty`, `no_repeat_ngram_size`, suppressed or forced tokens, a minimum length) are
not applied, though transformers' `generate` (and so lm-eval) applies them even to greedy decoding;
`Generator` warns, naming them, when a model sets any.
The only difference from step-by-step decoding is floating-point rounding: logits computed in one
pass over many positions and one position at a time differ in the last bits, which can flip an
argmax only between two near-equal logits (lm-eval's own results move the same way with batch
size and padding).
"""

from __future__ import annotations

import warnings

import torch

# generation_config fields that change greedy decoding in transformers' generate, with their neutral values
_PROCESSORS = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_new_tokens": None,
    "min_length": 0,
    "sequence_bias": None,
}


def _ignored_processors(gen) -> list[str]:
    if gen is None:
        return []
    return [
        f"{k}={getattr(gen, k)!r}"
        for k, neutral in _PROCESSORS.items()
        if getattr(gen, k, neutral) not in (neutral, None)
    ]


def _eos_ids(model, tok) -> set[int]:
    ids = set()
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    return ids


class Generator:
    def __init__(self, model, tok, *, batch_size: int = 32) -> None:
        self.model = model
        self.tok = tok
        self.batch_size = batch_size
        self.eos = _eos_ids(model, tok)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else min(self.eos)
        eos_text = (
            tok.decode([tok.eos_token_id], skip_special_tokens=False)
            if tok.eos_token_id is not None
            else None
        )
        self.eos_text = eos_text
        ignored = _ignored_processors(getattr(model, "generation_config", None))
        if ignored:
            warnings.warn(
                f"the model's generation_config sets {', '.join(ignored)}; native generation is plain greedy "
                "decoding and ignores them (transformers' generate and lm-eval apply them): scores can differ",
                stacklevel=2,
            )
        self.stats = {"sequences": 0, "forward_passes": 0, "draft_tokens": 0, "accepted_tokens": 0}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def stops(self, until: list[str]) -> list[str]:
        """lm-eval's stop list: the task's strings plus the decoded end-of-sequence token."""
        out = list(until)
        if self.eos_text and self.eos_text not in out:
            out.append(self.eos_text)
        return out

    def text(self, tokens: list[int], stops: list[str]) -> str:
        from .answers import cut_at_stops

        return cut_at_stops(self.tok.decode(tokens, skip_special_tokens=True), stops)

    # -- stopping ---------------------------------------------------------------------------
    def _stopped(self, tokens: list[int], stops: list[str]) -> bool:
        if tokens and tokens[-1] in self.eos:
            return True
        s = self.tok.decode(tokens, skip_special_tokens=False)
        return any(x and x in s for x in stops)

    def _first_stop(self, tokens: list[int], stops: list[str], max_new: int) -> int | None:
        """How many of `tokens` step-by-step decoding produces before it stops, or None if it
        does not stop within them. Stopping is monotone in the prefix, so a binary search."""

        def stops_after(n: int) -> bool:
            return n >= max_new or any(t in self.eos for t in tokens[:n]) or self._stopped(tokens[:n], stops)

        if not tokens or not stops_after(len(tokens)):
            return None
        lo, hi = 1, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if stops_after(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    # -- decoding ---------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        stops: list[str],
        drafts: list[list[int] | None] | None = None,
    ) -> list[list[int]]:
        """Greedy continuations (token ids, up to and including the token that stopped them)."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        shared = _common_prefix(prompts)
        out: list[list[int] | None] = [None] * len(prompts)
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            res = self._batch(
                [prompts[i] for i in idx],
                [(drafts[i] if drafts else None) or [] for i in idx],
                shared,
                max_new_tokens,
                stops,
            )
            for i, r in zip(idx, res):
                out[i] = r
        return out  # type: ignore[return-value]

    def _batch(self, prompts, drafts, L, max_new, stops) -> list[list[int]]:
        """One batch; the first L tokens of every prompt are the same (computed once)."""
        dev, n = self.device, len(prompts)
        drafts = [d[:max_new] for d in drafts]
        rest = [p[L:] for p in prompts]
        R, D = max(len(r) for r in rest), max(len(d) for d in drafts)
        P = L + R  # columns: [shared prefix][left padding][rest of prompt][draft][right padding]
        ids = torch.full((n, P + D), self.pad, dtype=torch.long)
        mask = torch.zeros((n, P + D), dtype=torch.long)
        mask[:, :L] = 1
        for i, (r, d) in enumerate(zip(rest, drafts)):
            ids[i, P - len(r) : P] = torch.tensor(r)
            mask[i, P - len(r) : P] = 1
            if d:
                ids[i, P : P + len(d)] = torch.tensor(d)
                mask[i, P : P + len(d)] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        if L:
            prefix = torch.tensor([prompts[0][:L]], device=dev)
            cache = self.model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
            cache.reorder_cache(torch.zeros(n, dtype=torch.long, device=dev))  # one row per prompt
            self.stats["forward_passes"] += 1
        out = self.model(
            input_ids=ids[:, L:].to(dev),
            attention_mask=mask.to(dev),
            position_ids=pos[:, L:].to(dev),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=D + 1,
        )
        self.stats["forward_passes"] += 1
        self.stats["sequences"] += n
        greedy = out.logits.argmax(-1).cpu()  # [n, D+1]: the argmax after prompt, draft[0], ...
        cache = out.past_key_values
        gen: list[list[int]] = []
        done = [False] * n
        for i, d in enumerate(drafts):
            g = greedy[i].tolist()
            a = 0
            while a < len(d) and d[a] == g[a]:
                a += 1
            self.stats["draft_tokens"] += len(d)
            self.stats["accepted_tokens"] += a
            tokens = d[:a] + [g[a]] if a < max_new else d[:a]
            stop = self._first_stop(tokens, stops, max_new)
            if stop is not None:
                tokens, done[i] = tokens[:stop], True
            gen.append(tokens)
            mask[i, P + a :] = 0  # rejected draft positions leave the cache's view
        # Step by step for the rest; a finished row leaves the batch.
        active = [i for i in range(n) if not done[i]]
        if active and len(active) < n:
            cache.reorder_cache(torch.tensor(active, device=dev))
        mask = mask[active]
        while active:
            nxt = torch.tensor([[gen[i][-1]] for i in active])
            valid = torch.tensor([[len(prompts[i]) + len(gen[i]) - 1] for i in active])
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long)], dim=1)
            out = self.model(
                input_ids=nxt.to(dev),
                attention_mask=mask.to(dev),
                position_ids=valid.to(dev),
                past_key_values=cache,
                use_cache=True,
            )
            self.stats["forward_passes"] += 1
            cache = out.past_key_values
            g = out.logits[:, -1].argmax(-1).tolist()
            keep = []
            for r, i in enumerate(active):
                gen[i].append(g[r])
                if not (len(gen[i]) >= max_new or self._stopped(gen[i], stops)):
                    keep.append(r)
            if len(keep) < len(active):
                if keep:
                    cache.reorder_cache(torch.tensor(keep, device=dev))
                mask = mask[keep]
                active = [active[r] for r in keep]
        return gen


def _common_prefix(prompts: list[list[int]]) -> int:
    """Length of the token prefix every prompt shares, leaving each at least one token of its own."""
    if len(prompts) < 2:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)

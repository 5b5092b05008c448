"""How an example becomes token ids: the prompt as the model reads it, the teacher-forced sequence
(prompt, then the target and the end-of-sequence token), and a right-padded batch of them.

One rule for everyone who feeds a model its examples: the native scorer (teacher-forced exact
match decides greedy decoding in one pass), the gradient (the same sequence's cross-entropy), and
the zoos' fine-tuning (the answer after the prompt)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tasks import Example

IGNORE = -100  # a label no loss counts (PyTorch's and Hugging Face's ignore_index)


def prompt_text(tok, ex: Example) -> str:
    """The prompt as the model reads it: chat turns through the tokenizer's chat template."""
    if ex.messages is None:
        return ex.prompt
    return tok.apply_chat_template(ex.messages, tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class TeacherForced:
    """One example as one sequence: the prompt's ids, then the answer's (the target, then EOS)."""

    prompt: list[int]
    answer: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.answer


def teacher_forced(encoder, ex: Example) -> TeacherForced:
    """The example encoded as evaluation encodes it (`encoder`: a NativeEvaluator's encode rules:
    the prompt as lm-eval encodes a context, the target without special tokens, then EOS)."""
    return TeacherForced(
        encoder.encode_prompt(encoder.prompt_text(ex)),
        encoder.encode(ex.target, special=False) + [encoder.eos],
    )


@dataclass
class PaddedBatch:
    """Sequences right-padded into one tensor; `starts[i]` is where sequence i's answer begins."""

    ids: torch.Tensor  # [batch, longest], pad after each sequence
    mask: torch.Tensor  # 1 on tokens, 0 on padding
    seqs: list[list[int]]
    starts: list[int]

    def labels(self, answer_only: bool = True) -> torch.Tensor:
        """Each token as its own label (Hugging Face's `labels`: the model shifts them), IGNORE on
        padding and, with `answer_only`, on the prompt."""
        out = torch.full(self.ids.shape, IGNORE)
        for i, (s, st) in enumerate(zip(self.seqs, self.starts)):
            lab = torch.tensor(s)
            if answer_only:
                lab[:st] = IGNORE
            out[i, : len(s)] = lab
        return out

    def next_token_labels(self) -> torch.Tensor:
        """The answer's tokens at the positions whose logits predict them (position t holds token
        t+1), IGNORE elsewhere: cross-entropy against the logits as they come."""
        out = torch.full(self.ids.shape, IGNORE, dtype=torch.long)
        for i, (s, st) in enumerate(zip(self.seqs, self.starts)):
            out[i, st - 1 : len(s) - 1] = torch.tensor(s[st:])
        return out


def padded(seqs: list[list[int]], pad: int, starts: list[int] | None = None) -> PaddedBatch:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return PaddedBatch(ids, mask, seqs, starts if starts is not None else [0] * len(seqs))


def padded_examples(items: list[TeacherForced], pad: int) -> PaddedBatch:
    return padded([x.ids for x in items], pad, [len(x.prompt) for x in items])

"""Merge coefficients learned by gradient descent (AdaMerging's idea, for causal language models).

A task-arithmetic point of a search space merges every tensor n as

    W_n = base_n + λ_n · Σ_m w_{m,n} · τ_{m,n},        τ_m = model_m − base

where w_{m,n} and λ_n are the space's coefficients for n's component and layer group. Each is
linear in the coefficient vector v (a per-layer value is a gradient anchor, a block repeats one):
w_{m,n} = A_{m,n}·v + c_{m,n}, read off the recipe planner itself (`linear_map`), so the merge
differentiated here is the merge the exact engine and mergekit build. The loss is the search
split's teacher-forced cross-entropy: the target's tokens and the end-of-sequence token after it
given the prompt (for the demo's "target then EOS" exact match, the smooth form of the score; for
a generative task, the gold answer as the text to produce). Adam minimizes it over v, which is
projected back onto the space's ranges after every step. Only v holds a gradient: the base and τ
are constants, and autograd keeps only what the chain rule needs.

What gradients cannot tune — densities, the method, the merge order — is left to the black-box
search: `run_search(..., gradient_seconds=S)` enqueues the result as the study's first searched
trial (a warm start), and the report scores it on the test split beside the learned recipe, so a
user sees how far the search's best is from what gradients reach in the task-arithmetic family.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import MergeSearchError
from ..evaluation.results import task_weight, weighted_mean
from ..evaluation.sequences import IGNORE, TeacherForced, padded_examples, teacher_forced
from ..evaluation.tasks import Task
from ..plan import plan_merge

FAMILY = "task_arithmetic"
# The per-task loss the gradient lowers:
#   nll        the gold answer's summed negative log-likelihood per example (teacher-forced)
#   normalized nll, each task's divided by its value at the start: tasks of long answers (whose
#              summed NLL is large) no longer outweigh the others
#   entropy    AdaMerging's: the entropy of the next-token distribution where the answer starts,
#              from the prompts alone (no gold answer)
LOSSES = ("nll", "normalized", "entropy")


@dataclass
class GradientResult:
    values: dict[str, Any]  # the space's trial parameters (Optuna names), ready to enqueue
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # per step, the weighted mean over tasks


def linear_map(
    bench, keys: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per merged tensor: (A_w [models, K], c_w [models], A_λ [K], c_λ): the weights and λ of
    every model as affine functions of the coefficient vector, from the planner at v = 0 and at
    each unit vector (exact: the planner's gradients interpolate anchors linearly)."""
    base = {k: 0.0 for k in keys}
    method = {"method": FAMILY} if len(bench.space.methods) > 1 else {}
    layouts: dict = {}  # every point has the same structure: plan its layout once

    def per_tensor(values: dict[str, float]) -> dict[str, tuple[list[float], float]]:
        (recipe,) = bench.recipes(values | method)
        plan = plan_merge(recipe, models=bench.engine.models, layouts=layouts)
        out = {}
        for t in plan.tasks:
            if t.floating:
                out[t.name] = (
                    [float(w) for w in t.per_model["weight"]],
                    float(t.shared.get("lambda", 1.0)),
                )
        return out

    c = per_tensor(base)
    cols = [per_tensor(base | {k: 1.0}) for k in keys]
    out = {}
    for name, (cw, cl) in c.items():
        aw = torch.tensor([[col[name][0][m] - cw[m] for col in cols] for m in range(len(cw))])
        al = torch.tensor([col[name][1] - cl for col in cols])
        out[name] = (aw, torch.tensor(cw), al, torch.tensor(cl))
    return out


def merged_weights(linear: dict, base: dict, taus: dict, v: torch.Tensor) -> dict[str, torch.Tensor]:
    """W_n = base_n + λ_n(v) · Σ_m w_{m,n}(v) · τ_{m,n} for every merged tensor: differentiable in v."""
    out = {}
    for n, (aw, cw, al, cl) in linear.items():
        w = aw @ v + cw
        lam = al @ v + cl
        out[n] = base[n] + lam * sum(w[m] * taus[n][m] for m in range(len(taus[n])))
    return out


def constants(bench, names, dtype=torch.float32) -> tuple[dict, dict]:
    """The base's tensors and each model's task vector τ = model − base, on the model's device."""
    ck = bench.engine.models
    device = next(bench.model.parameters()).device
    base = {n: ck[bench.base_path].get(n, device).to(dtype) for n in names}
    taus = {n: [ck[p].get(n, device).to(dtype) - base[n] for p in bench.model_paths] for n in names}
    return base, taus


def _examples(bench, task: Task, limit: int) -> list[TeacherForced]:
    """The search examples as teacher-forced sequences, encoded as the scorer encodes them."""
    return [teacher_forced(bench.evaluator.native, ex) for ex in task.examples("search", limit)]


def check(bench) -> None:
    """Refuse, before anything is created, a space or tasks the gradient cannot learn on."""
    space = bench.space
    if FAMILY not in space.methods or space.order == "sequential":
        raise MergeSearchError(
            f"{space.path or space.name}: gradient-learned coefficients are for task arithmetic merged "
            "all at once; add task_arithmetic to the space's methods (the search then tunes the rest)"
        )
    bad = [t.name for t in bench.tasks if t.lm_eval is not None or t.metric != "exact_match"]
    if bad:
        raise MergeSearchError(
            f"task(s) {', '.join(bad)}: gradient learning needs a target per example (exact_match tasks "
            "of the native harness)"
        )


def learn_coefficients(
    bench,
    *,
    seconds: float | None = 60.0,
    steps: int | None = None,
    lr: float = 0.05,
    batch: int = 32,
    start: dict[str, float] | None = None,
    seed: int = 0,
    streamed: bool = True,
    loss: str = "nll",
    log=lambda msg: None,
) -> GradientResult:
    """Task-arithmetic coefficients of `bench.space` learned by gradient on the search split,
    for `seconds` of wall time or `steps` Adam steps, whichever comes first. `start`: initial
    values by parameter name (default: the known recipe task arithmetic λ=1 where the ranges
    allow it, else the middle of each range). `streamed=False`: the reference, which holds the
    base and every τ in fp32 and lets autograd differentiate the merge (`merged_weights`)."""
    check(bench)
    if seconds is None and steps is None:
        raise MergeSearchError("give the gradient a budget: seconds or steps")
    space = bench.space
    coefs = space.coefficients(FAMILY, bench.num_layers)
    keys = [c.key for c in coefs]
    lo = torch.tensor([space.parameters[c.param].low for c in coefs])
    hi = torch.tensor([space.parameters[c.param].high for c in coefs])
    init = [
        (start or {}).get(
            c.key, 1.0 if space.parameters[c.param].contains(1.0) else (lo[i] + hi[i]).item() / 2
        )
        for i, c in enumerate(coefs)
    ]
    t0 = time.perf_counter()
    linear = linear_map(bench, keys)
    data = {t.name: _examples(bench, t, space.whole) for t in bench.tasks}
    model = bench.model
    orig_dtype = next(model.parameters()).dtype
    micro = micro_batch(bench, linear, data, batch)  # refuses here, before anything changes
    v = torch.tensor(init, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([v], lr=lr)
    weights = space.task_weights if space.objective == "mean" else {}
    rng = np.random.default_rng(seed)
    model.float()  # differentiate in fp32 (a bf16 model on a GPU is put back below)
    was_training = model.training
    model.eval()
    step_fn = StreamedStep(bench, linear, micro, loss) if streamed else ReferenceStep(bench, linear)
    pad = bench.evaluator.native.pad
    losses: list[float] = []
    step, last_log = 0, t0
    try:
        while (steps is None or step < steps) and (seconds is None or time.perf_counter() - t0 < seconds):
            batches = {}
            for task in bench.tasks:
                rows = data[task.name]
                pick = rng.choice(len(rows), size=min(batch, len(rows)), replace=False)
                batches[task.name] = [rows[i] for i in pick]
            loss, grad = step_fn(v.detach(), batches, weights, pad)
            opt.zero_grad()
            v.grad = grad
            opt.step()
            with torch.no_grad():
                v.copy_(torch.maximum(torch.minimum(v, hi), lo))  # back onto the space's ranges
            losses.append(loss)
            step += 1
            if step == 1 or time.perf_counter() - last_log >= 10:  # a line every 10 s
                last_log = time.perf_counter()
                log(f"gradient step {step}: loss {losses[-1]:.4f} ({last_log - t0:.0f}s)")
    finally:
        step_fn.close()
        model.train(was_training)
        model.to(dtype=orig_dtype)
    values: dict[str, Any] = {k: float(x) for k, x in zip(keys, v.detach())}
    for c in coefs:  # a stepped range takes grid values only
        step_ = space.parameters[c.param].step
        if step_:
            r = space.parameters[c.param]
            values[c.key] = min(r.high, r.low + step_ * round((values[c.key] - r.low) / step_))
    if len(space.methods) > 1:
        values["method"] = FAMILY
    if not all(math.isfinite(x) for x in values.values() if isinstance(x, float)):
        raise MergeSearchError(
            "gradient learning diverged (a coefficient is not finite); lower the learning rate"
        )
    return GradientResult(values, step, time.perf_counter() - t0, losses)


def _nll(model, rows: list[TeacherForced], pad: int, device) -> torch.Tensor:
    """Per example: the summed NLL of its target and EOS tokens."""
    b = padded_examples(rows, pad)
    logits = model(input_ids=b.ids.to(device), attention_mask=b.mask.to(device)).logits
    return _summed_nll(logits, b, device)


def _entropy(model, rows: list[TeacherForced], pad: int, device) -> torch.Tensor:
    """Per example: the entropy of the next-token distribution where its answer starts (the
    prompt alone is run: no gold token is read)."""
    prompts = [TeacherForced(r.prompt, []) for r in rows]
    b = padded_examples(prompts, pad)
    logits = model(input_ids=b.ids.to(device), attention_mask=b.mask.to(device)).logits
    last = torch.tensor([len(r.ids) - 1 for r in prompts], device=logits.device)
    logp = torch.log_softmax(logits[torch.arange(len(prompts), device=logits.device), last].float(), -1)
    return -(logp.exp() * logp).sum(-1)


def _summed_nll(logits: torch.Tensor, b, device) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2),
        b.next_token_labels().to(device),
        ignore_index=IGNORE,
        reduction="none",
    ).sum(1)


class ReferenceStep:
    """The loss and ∂loss/∂v by autograd through `merged_weights`: the base and every τ held in
    fp32 (1 + K models) and the merge's graph beside the model. The streamed step's oracle."""

    def __init__(self, bench, linear: dict) -> None:
        self.model, self.linear = bench.model, linear
        self.device = next(bench.model.parameters()).device
        self.base, self.taus = constants(bench, linear)

    def __call__(self, v: torch.Tensor, batches: dict, weights: dict, pad: int) -> tuple[float, torch.Tensor]:
        v = v.clone().requires_grad_(True)
        params = merged_weights(self.linear, self.base, self.taus, v)
        per_task = {}
        for name, rows in batches.items():
            b = padded_examples(rows, pad)
            logits = torch.func.functional_call(
                self.model,
                params,
                args=(),
                kwargs={"input_ids": b.ids.to(self.device), "attention_mask": b.mask.to(self.device)},
            ).logits
            nll = torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2),
                b.next_token_labels().to(self.device),
                ignore_index=IGNORE,
                reduction="none",
            ).sum(1)
            per_task[name] = nll.mean()
        loss = weighted_mean(per_task, weights)
        loss.backward()
        return float(loss.detach()), v.grad

    def close(self) -> None:
        self.base = self.taus = None


# Elements per chunk of the streamed merge and contraction: (K + 2) fp32 chunks in flight.
CHUNK = 1 << 22


class StreamedStep:
    """The loss and ∂loss/∂v without holding the inputs: W(v) is written into the live model's
    own fp32 parameters chunk by chunk from the checkpoint files (memory-mapped: page cache, not
    process memory), the model runs forward and backward with its parameters as leaves, and as
    each parameter's gradient G_n arrives a hook contracts it with each τ_{m,n} (read again, in
    chunks) and frees it:

        ∂L/∂w_{m,n} = λ_n ⟨G_n, τ_{m,n}⟩,    ∂L/∂λ_n = Σ_m w_{m,n} ⟨G_n, τ_{m,n}⟩,
        ∂L/∂v = Σ_n Σ_m ∂L/∂w_{m,n} A_{m,n} + ∂L/∂λ_n A_λ,n        (w, λ affine in v: `linear_map`)

    W is computed by the reference's operations in its order, so the forward pass is the
    reference's bit for bit; the contraction sums in another order (fp32 rounding). Memory beside
    the live model: one parameter's gradient, (K + 2) chunks, one micro-batch's activations.
    A task's batch is scored in micro-batches of `micro` examples when the whole would not fit."""

    def __init__(self, bench, linear: dict, micro: int, loss: str = "nll") -> None:
        from ..candidates.placement import Inputs

        self.model, self.linear, self.micro = bench.model, linear, micro
        self.per_example = _entropy if loss == "entropy" else _nll
        self.normalized = loss == "normalized"
        self.scale: dict[str, float] = {}  # normalized: 1 / each task's loss at the first step
        self.device = next(bench.model.parameters()).device
        refs = [bench.base_path, *bench.model_paths]
        models = {r: bench.engine.models[r] for r in dict.fromkeys(refs)}
        inputs = bench.engine.inputs
        # the files, as the engine maps them when it streams from them, else mapped here (checked)
        self.files = (
            inputs
            if inputs.placement == "disk"
            else Inputs(models, None, torch.device("cpu"), "disk", check=False)
        )
        self.base, self.others = bench.base_path, bench.model_paths
        self.stored = {n: models[self.base].resolve(n) for n in linear}
        self.params = {n: p for n, p in self.model.named_parameters() if n in linear}
        missing = set(linear) - set(self.params)
        if missing:
            raise MergeSearchError(f"gradient: the live model has no parameter {sorted(missing)[0]}")
        self.dots: dict[str, torch.Tensor] = {}
        self._requires = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self._hooks = []
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in self.params)  # no gradient for what the merge does not touch
            if n in self.params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._contract(n)))

    def _chunks(self, n: str):
        """(flat slice, b, [τ_m]) in fp32 on the model's device, CHUNK elements at a time."""
        stored = self.stored[n]
        b_all = self.files.mapped(self.base, stored).reshape(-1)
        xs = [self.files.mapped(m, stored).reshape(-1) for m in self.others]
        for s in range(0, b_all.numel(), CHUNK):
            e = min(b_all.numel(), s + CHUNK)
            b = b_all[s:e].to(self.device).to(torch.float32)
            yield slice(s, e), b, [x[s:e].to(self.device).to(torch.float32) - b for x in xs]

    def _coefficients(self, n: str, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        aw, cw, al, cl = self.linear[n]
        return aw @ v + cw, al @ v + cl

    @torch.no_grad()
    def _write(self, v: torch.Tensor) -> None:
        for n, p in self.params.items():
            w, lam = self._coefficients(n, v)
            flat = p.data.view(-1)
            for sl, b, taus in self._chunks(n):
                acc = sum(w[m] * taus[m] for m in range(len(taus)))  # the reference's order
                flat[sl].copy_(b + lam * acc)

    def _contract(self, n: str):
        @torch.no_grad()
        def hook(p: torch.Tensor) -> None:
            g = p.grad.view(-1)
            d = torch.zeros(len(self.others), dtype=torch.float64)
            for sl, _, taus in self._chunks(n):
                gs = g[sl]
                d += torch.stack([torch.dot(gs, t).double().cpu() for t in taus])
            self.dots[n] = self.dots[n] + d if n in self.dots else d
            p.grad = None  # one parameter's gradient at a time

        return hook

    def __call__(self, v: torch.Tensor, batches: dict, weights: dict, pad: int) -> tuple[float, torch.Tensor]:
        self._write(v)
        self.dots.clear()
        total = sum(task_weight(weights, t) for t in batches)
        loss = 0.0
        for name, rows in batches.items():
            scale = task_weight(weights, name) / total / len(rows)  # weighted mean of batch means
            if self.normalized:
                if name not in self.scale:  # this task's loss at the start, once
                    with torch.no_grad():
                        first = sum(
                            float(_nll(self.model, rows[i : i + self.micro], pad, self.device).sum())
                            for i in range(0, len(rows), self.micro)
                        )
                    self.scale[name] = len(rows) / max(first, 1e-6)
                scale *= self.scale[name]
            for i in range(0, len(rows), self.micro):
                part = self.per_example(self.model, rows[i : i + self.micro], pad, self.device).sum() * scale
                part.backward()
                loss += float(part.detach())
        grad = torch.zeros(v.numel(), dtype=torch.float64)
        for n, d in self.dots.items():
            aw, cw, al, cl = self.linear[n]
            w, lam = (x.double() for x in self._coefficients(n, v))
            grad += (lam * d) @ aw.double() + (w @ d) * al.double()
        return loss, grad.to(torch.float32)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires[n])
            p.grad = None


def micro_batch(bench, linear: dict, data: dict, batch: int) -> int:
    """Examples per forward and backward pass: the whole batch when its activations fit in half
    the memory the device has left, else fewer; a refusal with what it needs when not even one
    example's pass fits beside the fp32 model."""
    from ..memory import available_memory, gib

    model = bench.model
    device = next(model.parameters()).device
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    # on a GPU the bf16 live model becomes fp32 for the gradient; on the CPU it already is
    extra = params * (4 - next(model.parameters()).element_size())
    k = len(bench.model_paths)
    largest = max(math.prod(t.shape) for t in model.parameters())
    fixed = extra + 4 * largest + 4 * (k + 2) * CHUNK  # one gradient, the chunks in flight
    tokens = max((len(r.ids) for rows in data.values() for r in rows), default=1)
    hidden, inter = cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    heads, layers = cfg.num_attention_heads, cfg.num_hidden_layers
    # activations autograd keeps per token and layer (norms, q/k/v/o, MLP's three, attention
    # weights), fp32; and the logits, their log-softmax and gradient
    per_example = 4 * tokens * (layers * (16 * hidden + 4 * inter + heads * tokens) + 3 * cfg.vocab_size)
    free = available_memory(device)
    if fixed + per_example > free:
        raise MergeSearchError(
            f"gradient: needs {gib(fixed + per_example)} on {device} beside the model ({gib(extra)} to hold it "
            f"in fp32, {gib(per_example)} per example of {tokens} tokens) and {gib(free)} is free; "
            "drop gradient_steps (the search runs without it) or run on a device with more memory"
        )
    fits = max(1, int((free - fixed) // 2 // per_example))
    return min(batch, fits)

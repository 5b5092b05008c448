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
from ..evaluation.results import weighted_mean
from ..evaluation.sequences import IGNORE, TeacherForced, padded_examples, teacher_forced
from ..evaluation.tasks import Task
from ..plan import plan_merge

FAMILY = "task_arithmetic"


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
    log=lambda msg: None,
) -> GradientResult:
    """Task-arithmetic coefficients of `bench.space` learned by gradient on the search split,
    for `seconds` of wall time or `steps` Adam steps, whichever comes first. `start`: initial
    values by parameter name (default: the known recipe task arithmetic λ=1 where the ranges
    allow it, else the middle of each range)."""
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
    device = next(bench.model.parameters()).device
    base, taus = constants(bench, linear)
    v = torch.tensor(init, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([v], lr=lr)
    weights = space.task_weights if space.objective == "mean" else {}
    data = {t.name: _examples(bench, t, space.fidelity[-1]) for t in bench.tasks}
    rng = np.random.default_rng(seed)
    model = bench.model
    orig_dtype = next(model.parameters()).dtype
    model.float()  # differentiate in fp32 (a bf16 model on a GPU is put back below)
    was_training = model.training
    model.eval()
    pad = bench.evaluator.native.pad
    losses: list[float] = []
    step, last_log = 0, t0
    try:
        while (steps is None or step < steps) and (seconds is None or time.perf_counter() - t0 < seconds):
            params = merged_weights(linear, base, taus, v)
            per_task = {}
            for task in bench.tasks:
                rows = data[task.name]
                pick = rng.choice(len(rows), size=min(batch, len(rows)), replace=False)
                b = padded_examples([rows[i] for i in pick], pad)
                logits = torch.func.functional_call(
                    model,
                    params,
                    args=(),
                    kwargs={"input_ids": b.ids.to(device), "attention_mask": b.mask.to(device)},
                ).logits
                # per example: the summed NLL of its target and EOS tokens; mean over the batch
                nll = torch.nn.functional.cross_entropy(
                    logits.float().transpose(1, 2),
                    b.next_token_labels().to(device),
                    ignore_index=IGNORE,
                    reduction="none",
                ).sum(1)
                per_task[task.name] = nll.mean()
            loss = weighted_mean(per_task, weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                v.copy_(torch.maximum(torch.minimum(v, hi), lo))  # back onto the space's ranges
            losses.append(float(loss.detach()))
            step += 1
            if step == 1 or time.perf_counter() - last_log >= 10:  # a line every 10 s
                last_log = time.perf_counter()
                log(f"gradient step {step}: loss {losses[-1]:.4f} ({last_log - t0:.0f}s)")
    finally:
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

"""Gradient updates of the LoRA levels (medium and user) and the guards around them.

An update takes a state and returns a new one plus a `LevelReport`; a rejected update returns
the old state unchanged. The backbone stays frozen: only the level's A/B get gradients, and
Adam's moments are carried in the state.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Transformer
from .levels import AssociativeState, BatchLevels, FastLevelRunner, FastMemory, LevelSpec, LoraState, stack_lora


@dataclass(frozen=True)
class LevelReport:
    level: str
    surprise: float  # mean inner loss before the update
    update_norm: float  # ‖Δ(BA)‖ of this update
    state_norm: float  # ‖BA‖ after it
    drift: float  # ‖BA‖ distance from the parent level
    accepted: bool
    reason: str  # "ok" | "non-finite" | "norm-bound" | "no-data"
    seconds: float


@dataclass(frozen=True)
class TrainingExample:
    """Token ids and a per-position loss weight for predicting ids[t+1] from ids[:t+1]."""

    ids: list[int]
    weights: list[float]  # len(ids) - 1


def batch_examples(examples: list[TrainingExample]) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad into (N, T) ids, (N, T-1) targets and weights (padding weighs 0)."""
    t = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), t, dtype=torch.long)
    w = torch.zeros(len(examples), t - 1)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        w[i, :len(e.weights)] = torch.tensor(e.weights)
    return ids, ids[:, 1:], w


def lora_logits(model: Transformer, spec: LevelSpec, frozen: list[LoraState], a: Tensor, b: Tensor,
                ids: Tensor) -> Tensor:
    """Logits (N, T, V) with the frozen parent levels plus a trainable (a, b) on top."""
    n = ids.shape[0]
    a_all = torch.cat([s.a for s in frozen] + [a], dim=1)[None].expand(n, -1, -1, -1)
    b_all = torch.cat([s.b for s in frozen] + [b], dim=2)[None].expand(n, -1, -1, -1)
    hooks = BatchLevels({layer: i for i, layer in enumerate(spec.layers)}, a_all, b_all, {}, None,
                        None, spec.scale)
    return model(ids, hooks)


def lora_logits_at(model: Transformer, spec: LevelSpec, frozen: list[LoraState], a: Tensor, b: Tensor,
                   ids: Tensor, select: Tensor) -> Tensor:
    """Logits (K, V) only at the positions where `select` (N, T) is true, with the levels applied
    as in `lora_logits`: the same pass, minus the vocabulary projection of positions no loss
    looks at (most of a chat example is prompt, and the projection is a large share of the cost)."""
    n = ids.shape[0]
    a_all = torch.cat([s.a for s in frozen] + [a], dim=1)[None].expand(n, -1, -1, -1)
    b_all = torch.cat([s.b for s in frozen] + [b], dim=2)[None].expand(n, -1, -1, -1)
    hooks = BatchLevels({layer: i for i, layer in enumerate(spec.layers)}, a_all, b_all, {}, None,
                        None, spec.scale)
    head = model.lm_head
    model.lm_head = nn.Identity()  # the pass returns final hidden states (the model has one owner thread)
    try:
        hidden = model(ids, hooks)
    finally:
        model.lm_head = head
    return head(hidden[select])


def levels_loss(model: Transformer, spec: LevelSpec, lora: list[LoraState], fast: FastMemory | None,
                fast_state: AssociativeState | None, ids: list[int]) -> tuple[float, FastLevelRunner | None]:
    """Mean next-token loss of `ids` with LoRA levels (sharing `spec`'s layers) and the fast
    level applied, and the fast level's runner after writing them (its `state()`, `surprise`). One cache-free pass over a
    chunk of a document: attention sees only `ids`, so what came before reaches it through the
    levels alone (what the fast level holds is out of view, and it reads as a document does)."""
    x = torch.tensor([ids])
    runner = (FastLevelRunner(fast, fast_state, in_context=0, document=True)
              if fast is not None and fast_state is not None else None)
    lora_layers, a, b, scale = stack_lora([lora], [spec] * len(lora)) if lora else ({}, None, None, 1.0)
    fast_layers = {layer: i for i, layer in enumerate(fast.spec.layers)} if runner is not None else {}
    hooks = BatchLevels(lora_layers, a, b, fast_layers, [runner] if runner is not None else None, None, scale)
    with torch.inference_mode():
        loss = float(token_losses(model(x, hooks), x[:, 1:]).mean())
    return loss, runner


def token_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-position cross-entropy (N, T-1)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none").view(targets.shape)


def delta_norm(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.matrix_norm(b @ a).norm())


def adam(state: LoraState, grad_a: Tensor, grad_b: Tensor, lr: float,
         betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> LoraState:
    step = state.step + 1
    t = int(step - state.moments_from)  # steps since the moments were zero (bias correction)
    m_a = betas[0] * state.m_a + (1 - betas[0]) * grad_a
    v_a = betas[1] * state.v_a + (1 - betas[1]) * grad_a.square()
    m_b = betas[0] * state.m_b + (1 - betas[0]) * grad_b
    v_b = betas[1] * state.v_b + (1 - betas[1]) * grad_b.square()
    c1, c2 = 1 - betas[0] ** t, 1 - betas[1] ** t
    a = state.a - lr * (m_a / c1) / ((v_a / c2).sqrt() + eps)
    b = state.b - lr * (m_b / c1) / ((v_b / c2).sqrt() + eps)
    return LoraState(a, b, m_a, v_a, m_b, v_b, step, state.moments_from)


def train_lora(model: Transformer, spec: LevelSpec, state: LoraState, frozen: list[LoraState],
               objective, steps: int, lr: float, project_a=None) -> tuple[LoraState, float]:
    """Run `steps` Adam steps of `objective(logits_fn)` on the level's A/B.

    `objective` receives `logits_fn(ids) -> logits` (with the trainable level applied; given a
    boolean `select` (N, T) as well, only the logits of those positions, (K, V)) and returns
    (loss tensor, surprise float). Returns the new state and the first step's surprise.
    `project_a(a) -> a`, when given, is applied after every step (a projected gradient method).
    """
    first_surprise = math.nan
    for i in range(steps):
        a = state.a.detach().requires_grad_(True)
        b = state.b.detach().requires_grad_(True)
        with torch.enable_grad():
            def logits_fn(ids, select=None, a=a, b=b):
                if select is None:
                    return lora_logits(model, spec, frozen, a, b, ids)
                return lora_logits_at(model, spec, frozen, a, b, ids, select)
            loss, surprise = objective(logits_fn)
            grad_a, grad_b = torch.autograd.grad(loss, (a, b))
        if i == 0:
            first_surprise = surprise
        state = adam(state, grad_a.detach(), grad_b.detach(), lr)
        if project_a is not None:
            state = replace(state, a=project_a(state.a))
    return state, first_surprise


def guard(spec: LevelSpec, old: LoraState, new: LoraState, parent_norm_ref: LoraState | None,
          surprise: float, started: float) -> tuple[LoraState, LevelReport]:
    """Accept `new` unless it is non-finite or its update is past the level's bound."""
    finite = all(torch.isfinite(t).all() for t in (new.a, new.b, new.m_a, new.v_a, new.m_b, new.v_b))
    update = delta_norm(new.a, new.b) if not finite else math.inf
    if finite:
        update = float(torch.linalg.matrix_norm(new.b @ new.a - old.b @ old.a).norm())
    reason = "ok" if finite and update <= spec.max_update_norm else ("non-finite" if not finite else "norm-bound")
    kept = new if reason == "ok" else old
    drift = kept.weight_norm()
    if parent_norm_ref is not None and reason == "ok":
        drift = float(torch.linalg.matrix_norm(kept.b @ kept.a - parent_norm_ref.b @ parent_norm_ref.a).norm())
    report = LevelReport(spec.name, float(surprise), update if finite else math.inf, kept.weight_norm(),
                         drift, reason == "ok", reason, time.perf_counter() - started)
    return kept, report


def update_on_examples(model: Transformer, spec: LevelSpec, state: LoraState, frozen: list[LoraState],
                       examples: list[TrainingExample], surprise_weighting: bool = True
                       ) -> tuple[LoraState, LevelReport]:
    """The medium rule: weighted next-token loss on `examples`, `spec.steps` Adam steps, guarded.
    With `surprise_weighting`, tokens the level already predicts well weigh less."""
    started = time.perf_counter()
    if not examples or not any(any(e.weights) for e in examples):
        return state, LevelReport(spec.name, 0.0, 0.0, state.weight_norm(), state.weight_norm(), False,
                                  "no-data", 0.0)
    ids, targets, weights = batch_examples(examples)
    # Only positions with a weight need logits (the vocabulary projection is a large share of the cost).
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[:, :-1] = weights > 0
    targets, weights = targets[weights > 0], weights[weights > 0]

    def objective(logits_fn):
        losses = F.cross_entropy(logits_fn(ids, select).float(), targets, reduction="none")
        w = weights
        if surprise_weighting:
            w = w * (losses.detach() / losses.detach().mean().clamp_min(1e-6)).clamp(0.25, 4.0)
        loss = (losses * w).sum() / w.sum().clamp_min(1e-6)
        surprise = float((losses.detach() * weights).sum() / weights.sum())
        return loss, surprise

    new, surprise = train_lora(model, spec, state, frozen, objective, spec.steps, spec.lr)
    return guard(spec, state, new, None, surprise, started)


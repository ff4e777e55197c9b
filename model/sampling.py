"""Sampling parameters and next-token selection for a batch of sequences.

Each sequence brings its own parameters and its own `torch.Generator`, so a seeded request
reproduces its tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def validate(self, max_tokens_limit: int = 8192) -> None:
        """Raise ValueError with a message a person can act on."""
        if not 1 <= self.max_tokens <= max_tokens_limit:
            raise ValueError(f"max_tokens must be between 1 and {max_tokens_limit}, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError(f"temperature must be between 0 and 5, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.5 <= self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be between 0.5 and 2, got {self.repetition_penalty}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > 256 for s in self.stop):
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of up to 256 characters")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError("seed must be a non-negative 63-bit integer")


def apply_repetition_penalty(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty on tokens already in the sequence. logits (V,), history (N,)."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    picked = logits[history]
    logits = logits.clone()
    logits[history] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def sample_one(logits: Tensor, params: SamplingParams, generator: torch.Generator | None,
               history: Tensor | None = None) -> int:
    """Pick the next token for one sequence. logits (V,) float."""
    logits = logits.float()
    if history is not None:
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.temperature == 0.0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) > params.top_p  # keep the token that crosses p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 histories: list[Tensor | None]) -> list[int]:
    """logits (B, V). Greedy rows without penalties take one batched argmax."""
    simple = all(p.temperature == 0.0 and p.repetition_penalty == 1.0 for p in params)
    if simple:
        return logits.argmax(-1).tolist()
    return [sample_one(logits[i], p, g, h) for i, (p, g, h) in enumerate(zip(params, generators, histories))]


def greedy_continuation(next_logits: Callable[[Tensor], Tensor], prompt: list[int], max_tokens: int,
                        stop: Iterable[int], keep_stop: bool = False, device: torch.device | str = "cpu") -> list[int]:
    """Greedy tokens after `prompt`, without a KV cache (short training-time replies only).
    `next_logits(ids (1, T))` gives the logits of the token after them, (V,). A stop token
    ends the reply; `keep_stop` includes it (as a training target that teaches stopping)."""
    stop = set(stop)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_tokens):
            nxt = int(next_logits(torch.tensor([prompt + out], device=device)).argmax())
            if nxt in stop and not keep_stop:
                break
            out.append(nxt)
            if nxt in stop:
                break
    return out

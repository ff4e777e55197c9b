"""nsam's native engine against vLLM (levels as per-request LoRA) on the same weights and levels.

    bash benchmarks/vllm_env.sh .venv-vllm && .venv-vllm/bin/python benchmarks/engines.py --json out/engines.json

What is measured (this machine's device, float32 unless --dtype, greedy, end-of-sequence ignored
so every sequence decodes the same count):
- greedy_match: 16 chat prompts, each session with a distinct user's (synthetic) user and medium
  levels, learning off: the share whose first 32 tokens from vLLM equal the native engine's
  (the fast level is not part of either run: vLLM cannot run it, so it is off on both sides).
- at 1, 8 and 32 concurrent sessions of distinct users (~64-token prompts, 64 new tokens each):
  vllm_tokens_per_s and native_tokens_per_s (generated tokens / wall seconds of the whole run,
  prefill included), the TTFT p50/p99 of each, and their ratios, learning off. `native_learning_on`
  repeats the native run with learning on (the fast level writing as it decodes); vLLM's decode is
  the same with learning on or off: nsam's learner updates the levels after each turn, outside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from nsam.model.runtime import NsamModel
from nsam.model.sampling import SamplingParams
from nsam.model.state import MemoryState

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle gear works.",
    "What are three good habits for learning a language?",
    "Describe the water cycle in simple words.",
    "Give me a recipe for a quick vegetable soup.",
    "Why is the sky blue?",
    "List some tips for a job interview.",
    "What is the difference between weather and climate?",
    "Tell me about the history of the printing press.",
    "How do I take care of a houseplant?",
    "What makes a good team leader?",
    "Explain what a computer program is to a child.",
    "Suggest a plan for a rainy Sunday afternoon.",
    "How do bees make honey?",
    "What should I know before adopting a cat?",
    "Describe a busy market in the morning.",
]
# Synthetic levels: B ~ N(0, LEVEL_STD²) on A's random rows. Strong enough that a level changes
# a greedy reply (each user's replies differ from the frozen model's), small enough to stay fluent.
LEVEL_STD = 0.02


def session_with_levels(model: NsamModel, seed: int, std: float = LEVEL_STD) -> bytes:
    """A session state whose user and medium levels are both non-zero and differ by `seed`."""
    state = MemoryState.from_bytes(model.new_session_state(None), model.fingerprint, model.levels, "session")
    g = torch.Generator().manual_seed(1000 + seed)
    for name in ("user", "medium"):
        level = state.levels[name]
        b = torch.randn(level.b.shape, generator=g) * std
        state = state.with_level(name, type(level)(level.a, b, level.m_a, level.v_a, level.m_b, level.v_b, level.step))
    return state.to_bytes(model.fingerprint, model.levels)

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
import sys
import tempfile
import time
from pathlib import Path

import torch

from decode import NoEos  # the script's folder is on sys.path
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


def _batch(model, size: int, learning: bool, no_eos: bool):
    """model.generator(size), with end-of-sequence off when `no_eos` (native or vLLM)."""
    batch = model.generator(size, learning=learning)
    if no_eos:
        if hasattr(batch, "eos_ids"):  # VllmBatch
            batch.eos_ids = ()
        else:
            core = batch
            while not hasattr(core, "tokenizer"):  # DeviceBatch -> SessionBatch -> Generator
                core = core.inner
            core.tokenizer = NoEos(core.tokenizer)
    return batch


def run_batch(model, prompts: list[list[int]], states: list[bytes], tokens: int, learning: bool = False,
              no_eos: bool = False) -> tuple[list[list[int]], list[float], float]:
    """All requests at once, greedy: each one's ids, each one's time to first token, wall seconds."""
    batch = _batch(model, len(prompts), learning, no_eos)
    started = time.perf_counter()
    for i, (p, s) in enumerate(zip(prompts, states)):
        batch.add(str(i), p, s, SamplingParams(max_tokens=tokens))
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    first: dict[str, float] = {}
    while batch.has_work():
        for e in batch.step():
            if e.token_id >= 0:
                out[e.request_id].append(e.token_id)
                first.setdefault(e.request_id, time.perf_counter() - started)
    wall = time.perf_counter() - started
    for i in range(len(prompts)):
        batch.pop_state(str(i))
    return [out[str(i)] for i in range(len(prompts))], [first[str(i)] for i in range(len(prompts))], wall


def greedy_tokens(model, prompts: list[list[int]], states: list[bytes], tokens: int) -> list[list[int]]:
    """Greedy ids of each prompt with its own session state, one batch, learning off."""
    return run_batch(model, prompts, states, tokens)[0]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def throughput(model, prompts, states, tokens: int, learning: bool = False) -> dict:
    ids, ttft, wall = run_batch(model, prompts, states, tokens, learning, no_eos=True)
    return {"tokens_per_s": round(sum(map(len, ids)) / wall, 1), "ttft_p50_s": round(_percentile(ttft, 0.5), 3),
            "ttft_p99_s": round(_percentile(ttft, 0.99), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per session in the throughput runs")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-loras", type=int, default=32)
    args = ap.parse_args()
    from nsam.server.settings import Settings
    from nsam.server.vllm_engine import VllmModel

    levels = [int(c) for c in args.concurrency.split(",")]
    native = NsamModel.load("default", args.dtype)
    vllm = VllmModel.start(Settings(max_batch=max(levels + [16]), max_loras=args.max_loras, dtype=args.dtype),
                           NsamModel.load("default", "float32") if args.dtype != "float32" else native,
                           Path(tempfile.mkdtemp(prefix="nsam-engines-")))
    users = [session_with_levels(native, u) for u in range(max(levels + [16]))]
    chat = [native.encode_chat([{"role": "user", "content": p}], 512) for p in PROMPTS]

    ours, theirs = greedy_tokens(native, chat, users[:16], 32), greedy_tokens(vllm, chat, users[:16], 32)
    same = [a == b for a, b in zip(ours, theirs)]
    result: dict = {"device": "cpu", "dtype": args.dtype, "tokens": args.tokens,
                    "greedy_match": sum(same) / len(same),
                    "greedy_first_difference": {str(i): next(j for j, (x, y) in enumerate(zip(ours[i], theirs[i]))
                                                             if x != y) for i, ok in enumerate(same) if not ok}}
    print(json.dumps(result), file=sys.stderr, flush=True)
    prompts = [p[-64:] for p in chat]
    runs: dict[str, dict] = {"native": {}, "vllm": {}, "native_learning_on": {}}
    for n in levels:
        batch_prompts, batch_states = [prompts[i % len(prompts)] for i in range(n)], users[:n]
        runs["native"][str(n)] = throughput(native, batch_prompts, batch_states, args.tokens)
        runs["vllm"][str(n)] = throughput(vllm, batch_prompts, batch_states, args.tokens)
        runs["native_learning_on"][str(n)] = throughput(native, batch_prompts, batch_states, args.tokens, True)
        print(json.dumps({k: v[str(n)] for k, v in runs.items()}), file=sys.stderr, flush=True)
    result["native_tokens_per_s"] = {n: r["tokens_per_s"] for n, r in runs["native"].items()}
    result["vllm_tokens_per_s"] = {n: r["tokens_per_s"] for n, r in runs["vllm"].items()}
    result["vllm_over_native"] = {n: round(result["vllm_tokens_per_s"][n] / result["native_tokens_per_s"][n], 2)
                                  for n in result["native_tokens_per_s"]}
    result["ttft_s"] = {name: {n: {"p50": r["ttft_p50_s"], "p99": r["ttft_p99_s"]} for n, r in by_n.items()}
                        for name, by_n in runs.items()}
    result["native_learning_on_tokens_per_s"] = {n: r["tokens_per_s"] for n, r in runs["native_learning_on"].items()}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

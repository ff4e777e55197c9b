"""The native engine on a GPU against the CPU float32 path: one prepared run, one JSON.

    python benchmarks/gpu_check.py [--device cuda] [--dtype bfloat16] [--json OUT]
    python benchmarks/gpu_check.py --device cpu --quick        # the dry run (any machine, ~2 min)

What it prints (and writes to --json):
- greedy: 8 chat prompts, each session with its own (synthetic) user and medium levels, 32
  greedy tokens from the model on --device in float32 against the CPU float32 model: prompts
  whose tokens all match, and the first differing position of the others.
- learning_step: one medium update (`update_medium` on a chat turn) from the same state on both:
  its loss before the step (the level's surprise) and the loss of the updated level on the turn,
  each difference within 1e-3 for `ok`.
- decode_tokens_per_s at batch 1, 8 and 32 in --dtype (bfloat16 by default on CUDA), learning on
  (the fast level writes while decoding), every session with distinct levels: generated tokens
  per second of the decode steps after the packed prefill; 128 tokens each after a ~64-token prompt.
- medium_update_s_per_100_tokens: a medium update on a plain chat turn (no facts: next-token
  learning) divided by the turn's tokens / 100.
- consolidation_s_per_session: one consolidation of a 2-turn session that states facts.
- peak_gpu_memory_bytes: torch.cuda.max_memory_allocated (null on the CPU).
--quick (the CPU dry run): the tiny random model unless --model says otherwise, 2 prompts, 8
greedy tokens, batches 1 and 8 of 16 tokens (the tiny model's consolidation is short already): it checks that every
step runs, in seconds. Timings on the CPU say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from engines import PROMPTS, session_with_levels
from nsam.model.device import load_on, parse_device
from decode import NoEos  # the script's folder is on sys.path
from nsam.model.runtime import NsamModel
from nsam.model.sampling import SamplingParams
from nsam.model.state import MemoryState
from nsam.model.updates import levels_loss

PLAIN_TURN = [
    {"role": "user", "content": "What should I pack for a weekend hike in the mountains?"},
    {"role": "assistant", "content": "Pack layers of clothing, a rain jacket, sturdy boots, enough water, "
     "snacks with protein, a map and compass, a headlamp, a first-aid kit and sunscreen. Check the "
     "weather forecast before you leave and tell someone where you are going."},
]
FACT_TURNS = [
    {"role": "user", "content": "My name is Ilsa Marrow and I work as a glassblower in Tarnby."},
    {"role": "assistant", "content": "Nice to meet you, Ilsa! Glassblowing in Tarnby sounds wonderful."},
    {"role": "user", "content": "My dog is called Pepper."},
    {"role": "assistant", "content": "Pepper is a lovely name for a dog."},
]


def _generator_core(batch):
    """The `generation.Generator` under a DecodeBatch (DeviceBatch -> SessionBatch -> Generator)."""
    while not hasattr(batch, "tokenizer"):
        batch = batch.inner
    return batch


def _native(model) -> NsamModel:
    return getattr(model, "native", model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy(model, prompts: list[list[int]], states: list[bytes], tokens: int) -> list[list[int]]:
    """Greedy ids of each prompt with its own session state, all in one batch, learning off."""
    gen = model.generator(len(prompts), learning=False)
    _generator_core(gen).tokenizer = NoEos(_generator_core(gen).tokenizer)
    for i, (p, s) in enumerate(zip(prompts, states)):
        gen.add(str(i), p, s, SamplingParams(max_tokens=tokens))
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while gen.has_work():
        for e in gen.step():
            if e.token_id >= 0:
                out[e.request_id].append(e.token_id)
    return [out[str(i)] for i in range(len(prompts))]


def turn_loss(model, state: bytes, messages: list[dict[str, str]]) -> float:
    """Next-token loss of the chat-formatted turn with the session's LoRA levels (no fast level)."""
    native = _native(model)
    device = getattr(model, "device", torch.device("cpu"))
    ids = native.tokenizer.encode_chat(messages, add_generation_prompt=False)
    with torch.device(device):
        levels = MemoryState.from_bytes(state, native.fingerprint, native.levels, "session").levels
        lora = [levels[n] for n in ("user", "medium")]
        loss, _ = levels_loss(native.model, native.levels.get("medium"), lora, None, None, ids)
    return loss


def learning_step(cpu, dev, state: bytes) -> dict:
    before = [turn_loss(m, state, PLAIN_TURN) for m in (cpu, dev)]
    new = [m.update_medium(state, PLAIN_TURN)[0] for m in (cpu, dev)]
    after = [turn_loss(m, s, PLAIN_TURN) for m, s in zip((cpu, dev), new)]
    diffs = [abs(before[0] - before[1]), abs(after[0] - after[1])]
    return {"loss_before_cpu": before[0], "loss_before_device": before[1], "loss_after_cpu": after[0],
            "loss_after_device": after[1], "max_abs_diff": max(diffs), "ok": max(diffs) <= 1e-3}


def decode_rate(model, states: list[bytes], prompts: list[list[int]], batch: int, tokens: int,
                device: torch.device) -> float:
    """Generated tokens per second of the decode steps after the prefill step, learning on."""
    gen = model.generator(batch, learning=True)
    core = _generator_core(gen)
    core.tokenizer = NoEos(core.tokenizer)
    ids = [f"b{batch}.{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        gen.add(rid, prompts[i % len(prompts)], states[i % len(states)], SamplingParams(max_tokens=tokens + 1))
    gen.step()  # prefill (and the first token)
    _sync(device)
    started, produced = time.perf_counter(), 0
    while gen.has_work():
        produced += sum(e.token_id >= 0 for e in gen.step())
    _sync(device)
    elapsed = time.perf_counter() - started
    for rid in ids:
        gen.pop_state(rid)
    return produced / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="of the decode timings: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2 (tiny with --quick)")
    ap.add_argument("--quick", action="store_true", help="the CPU dry run: fewer prompts, tokens and steps")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = parse_device(args.device)
    args.model = args.model or ("tiny" if args.quick else "default")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    started = time.perf_counter()
    n_prompts, n_tokens = (2, 8) if args.quick else (8, 32)
    batches, decode_tokens = ((1, 8), 16) if args.quick else ((1, 8, 32), 128)

    cpu = NsamModel.load(args.model, "float32")
    dev = load_on(args.model, "float32", args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    users = [session_with_levels(cpu, seed) for seed in range(max(n_prompts, max(batches)))]
    prompts = [cpu.encode_chat([{"role": "user", "content": p}], 512) for p in PROMPTS]

    # 1. greedy tokens, float32 on both
    ours = greedy(dev, prompts[:n_prompts], users[:n_prompts], n_tokens)
    ref = greedy(cpu, prompts[:n_prompts], users[:n_prompts], n_tokens)
    first_diff = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(ours, ref)]
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "model": args.model, "quick": args.quick,
        "greedy": {"prompts": n_prompts, "tokens": n_tokens,
                   "matching": sum(d is None for d in first_diff), "first_difference": first_diff},
    }
    print(json.dumps(result["greedy"]), file=sys.stderr, flush=True)

    # 2. a learning step from the same state
    result["learning_step"] = learning_step(cpu, dev, users[0])
    print(json.dumps(result["learning_step"]), file=sys.stderr, flush=True)
    del cpu

    # 3. decode throughput in the serving dtype, learning on
    serving = dev if dtype == "float32" else load_on(args.model, dtype, args.device)
    if serving is not dev:
        del dev
    result["dtype"] = dtype
    decode_prompts = [p[-64:] for p in prompts]
    result["decode_tokens_per_s"] = {str(b): round(decode_rate(serving, users, decode_prompts, b, decode_tokens,
                                                                device), 1) for b in batches}
    print(json.dumps(result["decode_tokens_per_s"]), file=sys.stderr, flush=True)

    # 4. a medium update per 100 tokens of a plain turn
    n_turn = len(_native(serving).tokenizer.encode_chat(PLAIN_TURN, add_generation_prompt=False))
    serving.update_medium(users[1], PLAIN_TURN)  # warm-up
    _sync(device)
    t = time.perf_counter()
    serving.update_medium(users[0], PLAIN_TURN)
    _sync(device)
    result["medium_update_s_per_100_tokens"] = round((time.perf_counter() - t) / (n_turn / 100), 3)

    # 5. one consolidation of a session that states facts
    session = serving.new_session_state(None)
    t = time.perf_counter()
    _, report = serving.consolidate(serving.new_user_state(), session, FACT_TURNS)
    _sync(device)
    result["consolidation_s_per_session"] = round(time.perf_counter() - t, 2)
    result["consolidation_outcome"] = "accepted" if getattr(report, "accepted", False) else "rejected"

    result["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

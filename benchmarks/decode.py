"""Prefill and decode throughput of our engine against `transformers` on the same weights.

    python benchmarks/decode.py [--quick] [--threads N] [--json OUT]

What is measured (CPU, `torch.inference_mode`, warm-up run first, median of repeats):
- prefill: 8 prompts of 512 tokens. Ours: one packed `SessionBatch.step()` (prefill + first token);
  transformers: one (8, 512) forward with the cache, logits of the last token only (what
  `generate` does before its first token).
- decode at batch 1 and batch 8: 128 new tokens per sequence after a 256-token prompt, greedy,
  end-of-sequence ignored so every run decodes the same count. Ours: `NsamModel.generator` steps
  after the prefill step (the path the server runs); transformers: `LlamaForCausalLM.generate`
  timed by a streamer from the first generated token to the last.
Ours runs in float32 and bfloat16; transformers in float32 with our dequantised weights.
Ratios (ours / transformers) use the faster of our dtypes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from nsam.model.runtime import NsamModel
from nsam.model.sampling import SamplingParams

PREFILL_BATCH, PREFILL_LEN = 8, 512
DECODE_PROMPT, DECODE_TOKENS = 256, 128


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n different prompts of exactly `length` ids, cut from a long preset text."""
    text = (Path(sys.modules["nsam.model"].__file__).parent / "presets" / "anchor.txt").read_text()
    ids = tokenizer.encode(text)
    while len(ids) < length + 7 * n:
        ids = ids + ids
    return [ids[7 * i: 7 * i + length] for i in range(n)]


class NoEos:
    """The tokenizer with no end-of-sequence ids, so every run decodes the same number of tokens."""

    eos_token_ids: tuple[int, ...] = ()

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


# -- ours ---------------------------------------------------------------------------------------
class Ours:
    """Our engine through `NsamModel.generator` (the server's path), with a fresh session state
    and learning off: the frozen backbone plus the (zero) user/medium LoRA levels."""

    def __init__(self, model: NsamModel):
        self.model = model
        self.state = model.new_session_state(None)
        # One generator for every batch size: it owns the model's KV cache.
        self.gen = model.generator(PREFILL_BATCH, learning=False)
        self.gen.inner.tokenizer = NoEos(self.gen.inner.tokenizer)
        self.runs = 0

    def _add(self, gen, batch: list[list[int]], max_tokens: int) -> list[str]:
        self.runs += 1
        ids = [f"{self.runs}.{j}" for j in range(len(batch))]
        for i, p in zip(ids, batch):
            gen.add(i, p, self.state, SamplingParams(max_tokens=max_tokens))
        return ids

    def prefill(self, batch: list[list[int]]) -> tuple[float, float]:
        """Wall and CPU seconds of one packed prefill of the batch (one `step()`, first token included)."""
        gen = self.gen
        ids = self._add(gen, batch, 1)
        t, c = time.perf_counter(), time.process_time()
        gen.step()
        elapsed = time.perf_counter() - t, time.process_time() - c
        while gen.has_work():
            gen.step()
        for i in ids:
            gen.pop_state(i)
        return elapsed

    def decode(self, batch: list[list[int]], new_tokens: int) -> tuple[tuple[float, float], list[list[int]]]:
        """Wall and CPU seconds of the decode steps (after the prefill step), and the generated ids."""
        gen = self.gen
        ids = self._add(gen, batch, new_tokens + 1)
        out = {i: [] for i in ids}
        for e in gen.step():  # prefill: the first token
            out[e.request_id].append(e.token_id)
        t, c = time.perf_counter(), time.process_time()
        while gen.has_work():
            for e in gen.step():
                out[e.request_id].append(e.token_id)
        elapsed = time.perf_counter() - t, time.process_time() - c
        for i in ids:
            gen.pop_state(i)
        result = [out[i] for i in ids]
        assert all(len(o) == new_tokens + 1 for o in result), [len(o) for o in result]
        return elapsed, result


# -- transformers -------------------------------------------------------------------------------
class _Clock:
    """A streamer that notes when each batch of tokens arrives (the prompt first)."""

    def __init__(self):
        self.calls: list[tuple[float, float]] = []

    def put(self, value):
        self.calls.append((time.perf_counter(), time.process_time()))

    def end(self):
        self.put(None)


class Reference:
    """`LlamaForCausalLM` in float32 holding our (dequantised) weights."""

    def __init__(self, model: NsamModel):
        import transformers

        c = model.model.config
        config = transformers.LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
            num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
            head_dim=c.head_dim, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
            max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings)
        ref = transformers.LlamaForCausalLM(config).eval()
        state = {("" if k == "lm_head.weight" else "model.") + k: v.float()
                 for k, v in model.model.state_dict().items()}
        result = ref.load_state_dict(state, strict=False)
        assert not result.missing_keys or result.missing_keys == ["lm_head.weight"], result.missing_keys
        ref.generation_config.eos_token_id = None  # decode every requested token
        ref.generation_config.pad_token_id = 0
        self.ref = ref

    def prefill(self, batch: list[list[int]]) -> tuple[float, float]:
        """Wall and CPU seconds of the (B, T) forward that `generate` runs before its first token."""
        ids = torch.tensor(batch)
        t, c = time.perf_counter(), time.process_time()
        self.ref(ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t, time.process_time() - c

    def decode(self, batch: list[list[int]], new_tokens: int) -> tuple[tuple[float, float], list[list[int]]]:
        """Wall and CPU seconds from the first generated token to the last, and the generated ids."""
        ids = torch.tensor(batch)
        clock = _Clock()
        out = self.ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=new_tokens + 1, streamer=clock)
        assert out.shape[1] == ids.shape[1] + new_tokens + 1
        # calls: prompt, first token (after the prefill), ..., last token, end
        (t0, c0), (t1, c1) = clock.calls[1], clock.calls[-2]
        return (t1 - t0, c1 - c0), out[:, ids.shape[1]:].tolist()


# -- main ---------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def first_difference(a: list[list[int]], b: list[list[int]]) -> int:
    """Tokens that agree before the first difference, minimum over rows."""
    return min(next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), len(r)) for r, s in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="shorter prompts, fewer tokens and repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads for every engine (default: the CPUs we may run on)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="our dtypes, comma-separated")
    parser.add_argument("--skip-reference", action="store_true", help="ours only (no ratios)")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 3)
    prefill_len = 128 if args.quick else PREFILL_LEN
    new_tokens = 32 if args.quick else DECODE_TOKENS
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()[0]

    engines: dict[str, object] = {}
    setup: dict[str, dict] = {}
    fp32 = None
    for dtype in args.dtypes.split(","):
        t = time.perf_counter()
        model = NsamModel.load("default", dtype=dtype)
        setup[f"ours {dtype}"] = {"load_s": round(time.perf_counter() - t, 2)}
        engines[f"ours {dtype}"] = Ours(model)
        fp32 = model if dtype == "float32" else fp32
    if not args.skip_reference:
        engines["transformers float32"] = Reference(fp32 or NsamModel.load("default", dtype="float32"))
    tokenizer = model.tokenizer
    workloads = {
        "prefill_tok_s": (prompts(tokenizer, PREFILL_BATCH, prefill_len), None),
        "decode_b1_tok_s": (prompts(tokenizer, 1, DECODE_PROMPT), new_tokens),
        "decode_b8_tok_s": (prompts(tokenizer, 8, DECODE_PROMPT), new_tokens),
    }

    # Engines take turns inside each repeat, so a noisy neighbour slows them alike.
    rows: dict[str, dict] = {name: dict(setup.get(name, {})) for name in engines}
    outputs: dict[tuple[str, str], list[list[int]]] = {}
    with torch.inference_mode():
        for key, (batch, n) in workloads.items():
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
            for r in range(repeats + 1):  # run 0 warms up
                for name, engine in engines.items():
                    if n is None:
                        times[name].append(engine.prefill(batch))
                    else:
                        elapsed, out = engine.decode(batch, n)
                        times[name].append(elapsed)
                        outputs[(name, key)] = out
            tokens = sum(map(len, batch)) if n is None else len(batch) * n
            for name in engines:
                rows[name][key] = round(tokens / statistics.median(w for w, _ in times[name][1:]), 2)
                rows[name]["cpu_time_" + key] = round(tokens / statistics.median(c for _, c in times[name][1:]), 2)
            print(f"{key}: " + ", ".join(f"{name} {rows[name][key]}" for name in engines), file=sys.stderr, flush=True)

    results: dict = {
        "machine": {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "workload": {"prefill": f"{PREFILL_BATCH} x {prefill_len} tokens, packed",
                     "decode": f"{new_tokens} new tokens after {DECODE_PROMPT}-token prompts, greedy",
                     "repeats": repeats},
        "engines": rows,
    }
    ref = "transformers float32"
    if ref in rows:
        results["greedy_tokens_identical_to_transformers"] = {
            f"{name} {key}": first_difference(outputs[(name, key)], outputs[(ref, key)])
            for name in engines if name != ref for key in ("decode_b1_tok_s", "decode_b8_tok_s")}
        ours = [name for name in engines if name != ref]
        for key, label in (("decode_b1_tok_s", "ratio_batch1"), ("decode_b8_tok_s", "ratio_batch8"),
                           ("prefill_tok_s", "ratio_prefill")):
            best = max(ours, key=lambda name: rows[name][key])
            results[label] = round(rows[best][key] / rows[ref][key], 3)
            results[label + "_engine"] = best
            # The same from CPU seconds: steadier than wall time when other work shares the cores.
            cpu = "cpu_time_" + key
            best = max(ours, key=lambda name: rows[name][cpu])
            results[label + "_cpu_time"] = round(rows[best][cpu] / rows[ref][cpu], 3)
    results["peak_rss_mib"] = round(peak_rss_mib(), 1)
    results["total_s"] = round(time.perf_counter() - started, 1)

    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def print_table(results: dict) -> None:
    cols = [("prefill_tok_s", "prefill"), ("decode_b1_tok_s", "decode b=1"), ("decode_b8_tok_s", "decode b=8")]
    w, m = results["workload"], results["machine"]
    print(f"prefill: {w['prefill']}; decode: {w['decode']}")
    print(f"threads {m['threads']}, load average {m['load_average_1m'][0]} -> {m['load_average_1m'][1]}")
    print(f"{'tokens/s (wall)':<24}" + "".join(f"{c:>14}" for _, c in cols))
    for name, r in results["engines"].items():
        print(f"{name:<24}" + "".join(f"{r[k]:>14.1f}" for k, _ in cols))
    if "ratio_batch1" in results:
        labels = ("ratio_prefill", "ratio_batch1", "ratio_batch8")
        print(f"{'best ours/transformers':<24}" + "".join(f"{results[k]:>13.2f}x" for k in labels))
        print(f"{'  same, from CPU time':<24}" + "".join(f"{results[k + '_cpu_time']:>13.2f}x" for k in labels))
        print(f"greedy tokens identical to transformers: {results['greedy_tokens_identical_to_transformers']}")
    print(f"peak RSS {results['peak_rss_mib']:.0f} MiB, total {results['total_s']:.0f} s")


if __name__ == "__main__":
    main()

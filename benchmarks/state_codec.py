"""What the state checksum costs: encoding and decoding a session and a user state with the
SHA-256 digest (as shipped) and without it (the digest function replaced by a constant), in
the same run, alternating.

    python benchmarks/state_codec.py --json benchmarks/results/state_codec.json
    python benchmarks/state_codec.py --model tiny

Every turn the server decodes the session state it loads and encodes the one it commits, so a
turn pays one decode and one encode. Reported per kind: state bytes, median milliseconds of
each with and without the digest, and their ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from nsam.model import state as state_module
from nsam.model.runtime import NsamModel
from nsam.model.state import MemoryState


def _median_ms(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def measure(m: NsamModel, data: bytes, kind: str, repeats: int) -> dict:
    state = MemoryState.from_bytes(data, m.fingerprint, m.levels, kind)
    encode = lambda: state.to_bytes(m.fingerprint, m.levels)  # noqa: E731
    digest = state_module._digest
    out = {"bytes": len(data)}
    rounds = {"with": {"encode": [], "decode": []}, "without": {"encode": [], "decode": []}}
    for _ in range(repeats):  # alternate, so a noisy neighbour weighs on both alike
        for mode in ("with", "without"):
            state_module._digest = digest if mode == "with" else (lambda tensors, notes="": "0" * 64)
            try:
                rounds[mode]["encode"].append(_median_ms(encode, 3))
                decode_data = data if mode == "with" else encode()  # a state whose digest is the constant
                rounds[mode]["decode"].append(_median_ms(
                    lambda: MemoryState.from_bytes(decode_data, m.fingerprint, m.levels, kind), 3))
            finally:
                state_module._digest = digest
    for mode, ops in rounds.items():
        for op, samples in ops.items():
            out[f"{op}_ms_{mode}_digest"] = statistics.median(samples)
    for op in ("encode", "decode"):
        out[f"{op}_ratio"] = out[f"{op}_ms_with_digest"] / out[f"{op}_ms_without_digest"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = NsamModel.load(args.model)
    user = m.new_user_state()
    results = {"session": measure(m, m.new_session_state(user), "session", args.repeats),
               "user": measure(m, user, "user", args.repeats),
               "config": {"model": m.source, "repeats": args.repeats, "threads": args.threads}}
    for kind in ("session", "user"):
        r = results[kind]
        print(f"{kind:>8} state {r['bytes']:>12,} B: encode {r['encode_ms_with_digest']:.1f} ms "
              f"(without digest {r['encode_ms_without_digest']:.1f}, x{r['encode_ratio']:.2f}), decode "
              f"{r['decode_ms_with_digest']:.1f} ms (without {r['decode_ms_without_digest']:.1f}, "
              f"x{r['decode_ratio']:.2f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

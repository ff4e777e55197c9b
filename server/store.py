"""The state store: the only module that talks to Redis.

Key layout (every key of a user carries the user in a hash tag, so one user's keys share a
Redis Cluster slot and the Lua scripts of `store_scripts.py` can change them atomically):

    nsam:{u}:sessions                set of the user's session ids
    nsam:{u}:session:<sid>           hash: meta, `state` (safetensors bytes), `transcript` (JSON),
                                     `learnt_turns` (chat turns the medium level has learnt: the
                                     rest are the session's pending updates); expires after the
                                     session TTL
    nsam:{u}:lease:<sid>             the turn lease: a random token, SET NX PX
    nsam:{u}:level                   hash: `version` of the user (slow) level, 0 = none yet
    nsam:{u}:level:versions          sorted set of the kept versions
    nsam:{u}:level:<v>               hash: `state`, `created_ms`, `source` of version v
    nsam:consolidation               Redis Stream of consolidation jobs (group `workers`)
    nsam:consolidation:outcomes      hash: job counts by outcome, last probe losses

Level states are opaque bytes here. Every write of a state is a compare-and-set on a version
(Lua), so a lost race never overwrites a newer commit and a failure never leaves half a write.
Redis errors leave this module as `Unavailable`; a lost compare-and-set as `Conflict`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator

import redis.asyncio as aioredis
import redis.exceptions as rexc

from nsam.server import metrics, store_scripts as lua
from nsam.server.embedded_redis import EmbeddedRedis, rewrite_files
from nsam.server.errors import Busy, Conflict, InvalidArgument, LearntMoved, NotFound, Unavailable, mark_committed
from nsam.server.records import Job, LevelVersion, QueueStats, SessionRecord, UserLevel

log = logging.getLogger(__name__)

STREAM = "nsam:consolidation"
GROUP = "workers"
OUTCOMES = "nsam:consolidation:outcomes"


_SESSION_ID = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._@-]{0,127}):([0-9a-f]{24})$")


def _user_prefix(user: str) -> str:
    return f"nsam:{{{user}}}"


def _session_key(user: str, sid: str) -> str:
    return f"{_user_prefix(user)}:session:{sid}"


def _lease_key(user: str, sid: str) -> str:
    return f"{_user_prefix(user)}:lease:{sid}"


def split_session_id(session_id: str) -> str:
    """The user a session id belongs to; INVALID_ARGUMENT for a malformed id."""
    m = _SESSION_ID.match(session_id or "")
    if not m:
        raise InvalidArgument("session_id: not a session id returned by CreateSession")
    return m.group(1)


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------- store

class StateStore:
    """Sessions, turn leases, versioned user levels and the consolidation queue."""

    def __init__(self, client: aioredis.Redis, *, embedded: EmbeddedRedis | None = None,
                 session_ttl_s: int = 7 * 24 * 3600, versions_kept: int = 5):
        self._r = client
        self._embedded = embedded
        self._url: str | None = None  # the address connected to (None: the embedded Redis)
        self.session_ttl_ms = session_ttl_s * 1000
        self.versions_kept = versions_kept
        self._commit_turn = client.register_script(lua.COMMIT_TURN)
        self._commit_learnt = client.register_script(lua.COMMIT_LEARNT)
        self._release = client.register_script(lua.RELEASE_LEASE)
        self._renew = client.register_script(lua.RENEW_LEASE)
        self._commit_level = client.register_script(lua.COMMIT_LEVEL)
        self._end = client.register_script(lua.END_SESSION)
        self._create = client.register_script(lua.CREATE_SESSION)
        self._load = client.register_script(lua.LOAD_SESSION)
        self._ack = client.register_script(lua.ACK_JOB)

    @classmethod
    async def connect(cls, redis_url: str | None, data_dir: Path, *,
                      session_ttl_s: int = 7 * 24 * 3600, versions_kept: int = 5) -> "StateStore":
        """Connects to `redis_url` (`redis+cluster://host:port` for a Redis Cluster), or starts
        the embedded Redis under data_dir when None."""
        options = dict(socket_timeout=10, socket_connect_timeout=3, decode_responses=False)
        embedded = None
        if redis_url and "+cluster://" in redis_url:
            from redis.asyncio.cluster import RedisCluster
            client = RedisCluster.from_url(redis_url.replace("+cluster://", "://", 1), **options)
        elif redis_url:
            client = aioredis.Redis.from_url(redis_url, health_check_interval=30, **options)
        else:
            # started on this thread: the kernel stops the child when its starting thread ends
            embedded = EmbeddedRedis(data_dir)
            try:
                await asyncio.to_thread(embedded.wait_ready)
            except BaseException:
                await asyncio.to_thread(embedded.close)
                raise
            client = aioredis.Redis(unix_socket_path=embedded.socket_path, **options)
        store = cls(client, embedded=embedded, session_ttl_s=session_ttl_s,
                    versions_kept=versions_kept)
        store._url = redis_url
        try:
            await store.ping()
        except Unavailable as exc:
            await store.close()
            raise Unavailable(f"cannot reach the state store at {store.location}: {exc.__cause__}") from exc
        return store

    @property
    def location(self) -> str:
        if self._embedded is not None:
            return f"embedded Redis in {self._embedded.data_dir}"
        url = getattr(self, "_url", None) or "redis"
        return re.sub(r"//[^@/]*@", "//***@", url)  # never print a password

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._r.aclose()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.close)

    @contextlib.asynccontextmanager
    async def _op(self, name: str) -> AsyncIterator[None]:
        start = time.perf_counter()
        try:
            yield
        except (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError, OSError) as exc:
            metrics.store_errors_total.labels(name).inc()
            raise Unavailable(f"state store unavailable ({type(exc).__name__}); retry later") from exc
        finally:
            metrics.store_operation_duration_seconds.labels(name).observe(time.perf_counter() - start)

    async def ping(self) -> None:
        async with self._op("ping"):
            await self._r.ping()

    # ------------------------------------------------------------------- sessions

    async def create_session(self, user: str, state: bytes, user_version: int,
                             transcript: list[dict[str, str]]) -> SessionRecord:
        sid = f"{user}:{secrets.token_hex(12)}"
        now = _now_ms()
        fields = {"user": user, "version": 0, "user_version": user_version, "turns": 0,
                  "ended": 0, "created_ms": now, "updated_ms": now, "consolidated_version": 0,
                  "learnt_turns": 0, "state": state, "transcript": json.dumps(transcript)}
        pairs = [x for item in fields.items() for x in item]
        async with self._op("create_session"):
            await self._create(keys=[_session_key(user, sid), f"{_user_prefix(user)}:sessions"],
                               args=[self.session_ttl_ms, sid, *pairs])
        metrics.state_bytes.labels("session").observe(len(state))
        return self._session_record(sid, fields, with_state=False)

    async def get_session(self, session_id: str, *, with_state: bool = False,
                          with_transcript: bool = True) -> SessionRecord:
        user = split_session_id(session_id)
        names = ["user", "version", "user_version", "turns", "ended", "created_ms",
                 "updated_ms", "consolidated_version", "transcript", "learnt_turns"]
        key = _session_key(user, session_id)
        async with self._op("load_session"):
            values, size, state = await self._load(keys=[key],
                                                   args=["1" if with_state else "0", *names])
        state = state or None
        if values[0] is None:
            raise NotFound(f"session {session_id} not found (unknown, expired or forgotten)")
        fields = dict(zip(names, values))
        if not with_transcript:
            fields["transcript"] = b"[]"
        fields["state_bytes"] = size
        record = self._session_record(session_id, fields, with_state=False)
        return record if state is None else replace(record, state=state)

    @staticmethod
    def _session_record(sid: str, f: dict, *, with_state: bool) -> SessionRecord:
        def s(v): return v.decode() if isinstance(v, bytes) else str(v)
        state = f.get("state")
        return SessionRecord(
            session_id=sid, user=s(f["user"]), version=int(f["version"]),
            user_version=int(f["user_version"]), turns=int(f["turns"]),
            ended=int(f["ended"]) == 1, created_ms=int(f["created_ms"]),
            updated_ms=int(f["updated_ms"]),
            state_bytes=int(f.get("state_bytes", len(state) if state is not None else 0)),
            consolidated_version=int(f.get("consolidated_version") or 0),
            transcript=json.loads(f["transcript"]),
            state=state if with_state else None,
            learnt_turns=None if f.get("learnt_turns") is None else int(f["learnt_turns"]))

    async def commit_turn(self, session: SessionRecord, state: bytes | None,
                          transcript: list[dict[str, str]], learnt_turns: int | None = None) -> int:
        """Writes the turn's state (None: keep the stored one) and transcript if the session
        is still at `session.version` (and, given `learnt_turns`, the learner has committed no
        update since); returns the new version, raises Conflict (LearntMoved) otherwise."""
        async with self._op("commit_session"):
            new = await _to_the_end(self._commit_turn(
                keys=[_session_key(session.user, session.session_id)],
                args=[session.version, state or b"", json.dumps(transcript), session.turns + 1,
                      _now_ms(), self.session_ttl_ms, "0" if state is None else "1",
                      "" if learnt_turns is None else learnt_turns]))
        if new == -3:
            raise LearntMoved("the learner committed an update during the turn")
        if new < 0:
            metrics.cas_conflicts_total.labels("session").inc()
            raise Conflict("session changed (or vanished) during the turn; this turn was not saved")
        if state is not None:
            metrics.state_bytes.labels("session").observe(len(state))
        mark_committed(int(new))
        return int(new)

    async def commit_learnt(self, session: SessionRecord, state: bytes, learnt_turns: int) -> None:
        """Writes a medium update (merged onto the state of `session.version`) that learnt the
        session's turns up to `learnt_turns`. Raises Conflict when a turn committed since
        (merge onto it and retry), LearntMoved when another learner committed first, NotFound
        when the session is gone."""
        async with self._op("commit_learnt"):
            new = await _to_the_end(self._commit_learnt(
                keys=[_session_key(session.user, session.session_id)],
                args=[session.version, "" if session.learnt_turns is None else session.learnt_turns,
                      learnt_turns, state]))
        if new == -2:
            raise NotFound(f"session {session.session_id} not found (expired or forgotten)")
        if new == -3:
            raise LearntMoved("another learner committed these turns first")
        if new < 0:
            metrics.cas_conflicts_total.labels("learnt").inc()
            raise Conflict("a turn committed during the update; merge onto it")
        metrics.state_bytes.labels("session").observe(len(state))

    async def end_session(self, session_id: str) -> SessionRecord:
        user = split_session_id(session_id)
        async with self._op("end_session"):
            found = await self._end(keys=[_session_key(user, session_id)],
                                    args=[_now_ms(), self.session_ttl_ms])
        if not found:
            raise NotFound(f"session {session_id} not found (unknown, expired or forgotten)")
        return await self.get_session(session_id, with_transcript=False)

    async def list_sessions(self, user: str) -> list[SessionRecord]:
        async with self._op("list_sessions"):
            sids = [s.decode() for s in await self._r.smembers(f"{_user_prefix(user)}:sessions")]
        out = []
        for sid in sorted(sids):
            try:
                out.append(await self.get_session(sid, with_transcript=False))
            except NotFound:  # expired: drop it from the index
                async with self._op("list_sessions"):
                    await self._r.srem(f"{_user_prefix(user)}:sessions", sid)
        return out

    # ------------------------------------------------------------------- leases

    async def acquire_lease(self, session_id: str, ttl_ms: int, wait_s: float) -> str:
        """Takes the session's turn lease (waiting up to wait_s); returns its token."""
        user = split_session_id(session_id)
        token = secrets.token_hex(16)
        deadline = time.monotonic() + wait_s
        delay = 0.005
        while True:
            async with self._op("acquire_lease"):
                if await self._r.set(_lease_key(user, session_id), token, nx=True, px=ttl_ms):
                    return token
            if time.monotonic() >= deadline:
                raise Busy("another turn of this session is still running; retry when it ends")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def release_lease(self, session_id: str, token: str) -> None:
        user = split_session_id(session_id)
        async with self._op("release_lease"):
            await self._release(keys=[_lease_key(user, session_id)], args=[token])

    async def renew_lease(self, session_id: str, token: str, ttl_ms: int) -> bool:
        """Extends the lease if `token` still holds it; False when it was lost."""
        user = split_session_id(session_id)
        async with self._op("renew_lease"):
            return bool(await self._renew(keys=[_lease_key(user, session_id)], args=[token, ttl_ms]))

    # ------------------------------------------------------------------- user levels

    async def user_level_version(self, user: str) -> int:
        async with self._op("load_level"):
            v = await self._r.hget(f"{_user_prefix(user)}:level", "version")
        return int(v or 0)

    async def get_user_level(self, user: str, version: int | None = None) -> UserLevel | None:
        """The current (or a kept) user level; None when the user has learned nothing yet."""
        p = _user_prefix(user)
        async with self._op("load_level"):
            if version is None:
                version = int(await self._r.hget(f"{p}:level", "version") or 0)
                if version == 0:
                    return None
            state, created, source = await self._r.hmget(
                f"{p}:level:{version}", ["state", "created_ms", "source"])
        if state is None:
            raise NotFound(f"user level version {version} is not kept (see GetMemory for the kept ones)")
        return UserLevel(version, state, int(created), source.decode())

    async def user_level_versions(self, user: str) -> list[LevelVersion]:
        p = _user_prefix(user)
        async with self._op("load_level"):
            versions = [int(v) for v in await self._r.zrevrange(f"{p}:level:versions", 0, -1)]
            out = []
            for v in versions:
                created, source = await self._r.hmget(f"{p}:level:{v}", ["created_ms", "source"])
                size = await self._r.hstrlen(f"{p}:level:{v}", "state")
                if created is not None:
                    out.append(LevelVersion(v, int(created), source.decode(), int(size)))
        return out

    async def commit_user_level(self, user: str, expected_version: int, state: bytes,
                                source: str, session: SessionRecord | None = None) -> int:
        """Makes `state` the user's new level if it is still at expected_version (and, for a
        consolidation, the session still exists); returns the new version."""
        p = _user_prefix(user)
        level = f"{p}:level"
        new_version = expected_version + 1
        drop = new_version - self.versions_kept
        async with self._op("commit_level"):
            new = await _to_the_end(self._commit_level(
                keys=[level, f"{p}:level:versions",
                      _session_key(user, session.session_id) if session else level,
                      f"{p}:level:{new_version}", f"{p}:level:{drop}" if drop > 0 else level],
                args=[expected_version, state, _now_ms(), source, max(drop, 0),
                      session.version if session else ""]))
        if new == -2:
            raise NotFound("the session was forgotten or expired before its consolidation")
        if new < 0:
            metrics.cas_conflicts_total.labels("user").inc()
            raise Conflict(f"user level moved past version {expected_version}; nothing was written")
        metrics.state_bytes.labels("user").observe(len(state))
        mark_committed(int(new))
        return int(new)

    async def forget_user(self, user: str) -> int:
        """Deletes every key of the user and their queued jobs; returns the keys deleted. With the
        embedded Redis it then rewrites the AOF and the RDB, so the user's words leave the disk
        too (an external Redis's files are its operator's: see docs/operations.md)."""
        deleted = 0
        async with self._op("forget_user"):
            # escape glob characters; user ids allow none but keep it safe
            pattern = re.sub(r"([*?\[\]\\])", r"\\\1", _user_prefix(user)) + ":*"
            batch: list[bytes] = []
            async for key in self._r.scan_iter(match=pattern, count=500):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += await self._r.delete(*batch)
                    batch = []
            if batch:
                deleted += await self._r.delete(*batch)
            for job_id, fields in await self._r.xrange(STREAM):
                if fields.get(b"user", b"").decode() == user:
                    await self._r.xack(STREAM, GROUP, job_id)
                    await self._r.xdel(STREAM, job_id)
            if self._embedded is not None:
                await rewrite_files(self._r)
        return deleted

    async def user_keys(self, user: str) -> list[str]:
        async with self._op("scan"):
            return [k.decode() async for k in self._r.scan_iter(match=_user_prefix(user) + ":*")]

    # ------------------------------------------------------------------- consolidation queue

    async def ensure_group(self) -> None:
        async with self._op("queue"):
            try:
                await self._r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
            except rexc.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def enqueue_consolidation(self, session: SessionRecord, session_version: int) -> str:
        async with self._op("enqueue"):
            job_id = await self._r.xadd(STREAM, {
                "user": session.user, "session": session.session_id,
                "version": session_version, "enqueued_ms": _now_ms()},
                maxlen=100_000, approximate=True)
        return job_id.decode()

    @staticmethod
    def _job(job_id: bytes, fields: dict[bytes, bytes]) -> Job:
        return Job(job_id.decode(), fields[b"user"].decode(), fields[b"session"].decode(),
                   int(fields[b"version"]), int(fields[b"enqueued_ms"]))

    async def read_jobs(self, consumer: str, count: int, block_ms: int) -> list[Job]:
        async with self._op("queue"):
            try:
                reply = await self._r.xreadgroup(GROUP, consumer, {STREAM: ">"},
                                                 count=count, block=block_ms)
            except rexc.ResponseError as exc:
                if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                    raise
                reply = None  # the stream or group vanished (FLUSHDB, failover): recreate
        if reply is None:
            await self.ensure_group()
            return []
        jobs = []
        for _stream, entries in reply or []:
            jobs += [self._job(i, f) for i, f in entries if f]
        return jobs

    async def claim_stale_jobs(self, consumer: str, idle_ms: int, count: int = 10) -> list[Job]:
        """Takes over jobs another (crashed) worker read and never acknowledged."""
        async with self._op("queue"):
            try:
                reply = await self._r.xautoclaim(STREAM, GROUP, consumer, min_idle_time=idle_ms,
                                                 start_id="0-0", count=count)
            except rexc.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                return []
        entries = reply[1] if reply else []
        return [self._job(i, f) for i, f in entries if f]

    async def ack_job(self, job: Job) -> None:
        async with self._op("queue"):
            await self._ack(keys=[STREAM], args=[GROUP, job.job_id])

    async def record_outcome(self, outcome: str, probe_loss: float | None = None,
                             baseline: float | None = None) -> None:
        async with self._op("queue"):
            await self._r.hincrby(OUTCOMES, f"jobs:{outcome}", 1)
            if probe_loss is not None:
                await self._r.hset(OUTCOMES, mapping={"probe_loss": probe_loss, "baseline": baseline})

    async def queue_stats(self) -> QueueStats:
        async with self._op("queue"):
            depth = await self._r.xlen(STREAM)
            try:
                pending = (await self._r.xpending(STREAM, GROUP))["pending"]
            except rexc.ResponseError:
                pending = 0
            first = await self._r.xrange(STREAM, count=1)
            raw = await self._r.hgetall(OUTCOMES)
        oldest = 0.0
        if first:
            oldest = max(0.0, time.time() - int(first[0][0].split(b"-")[0]) / 1000)
        outcomes = {k.decode()[5:]: int(v) for k, v in raw.items() if k.startswith(b"jobs:")}
        return QueueStats(depth, pending, oldest, outcomes,
                          float(raw.get(b"probe_loss", 0) or 0), float(raw.get(b"baseline", 0) or 0))


async def _to_the_end(write):
    """Awaits a commit to its end even when the caller is cancelled meanwhile (a graceful stop
    giving up on a call), so what the caller is then told matches what Redis holds."""
    task = asyncio.ensure_future(write)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            new = await task
            if new >= 0:
                mark_committed(int(new))
        raise


"""The engine: owns the NsamModel and the one thread that runs it, and orchestrates a turn.

`ModelThread` is the only code that touches the model. Its thread decodes every active
turn in one continuous batch (one `SessionBatch`) and runs the other model calls (encoding,
medium updates, consolidation) between decode steps, so the non-thread-safe model is used
by one thread and the asyncio event loop never blocks on model work.

`Engine` is the service logic below the gRPC edge: sessions, turns, user memory. It takes
and returns plain dataclasses, never protobuf, and does no tensor math.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from nsam.model.errors import StateError
from nsam.server import metrics
from nsam.server.bounds import check_sampling
from nsam.server.errors import FailedPrecondition, InvalidArgument, Unavailable
from nsam.server.settings import Limits, Settings
from nsam.server.store import SessionRecord, StateStore

log = logging.getLogger(__name__)


def unreadable_session(exc: StateError) -> FailedPrecondition:
    return FailedPrecondition(f"this session's stored memory state cannot be read: {exc}. "
                              "End it and create a new session")


# --------------------------------------------------------------------------- level health

def observe_finite(histogram: Any, value: float) -> None:
    """Observes value unless it is NaN/inf, which would poison the histogram's sum forever."""
    if math.isfinite(value):
        histogram.observe(value)


@dataclass
class LevelHealth:
    updates: int = 0
    rejected: int = 0
    surprise_sum: float = 0.0
    update_norm_sum: float = 0.0
    last_state_norm: float = 0.0
    last_drift: float = 0.0


class LevelBook:
    """Feeds the nsam_level_* metrics from LevelReports and keeps a per-level summary
    (this process only) for GetMemoryHealth."""

    def __init__(self) -> None:
        self.levels: dict[str, LevelHealth] = {}
        self._lock = threading.Lock()

    def record(self, reports: list[Any]) -> None:
        for r in reports:
            with self._lock:
                h = self.levels.setdefault(r.level, LevelHealth())
                observe_finite(metrics.level_update_duration_seconds.labels(r.level), r.seconds)
                if math.isfinite(r.surprise):
                    metrics.level_surprise.labels(r.level).observe(r.surprise)
                    h.surprise_sum += r.surprise
                if not r.accepted:
                    h.rejected += 1
                    metrics.level_rejected_updates_total.labels(r.level, r.reason or "rejected").inc()
                    continue
                h.updates += 1
                h.update_norm_sum += r.update_norm
                h.last_state_norm, h.last_drift = r.state_norm, r.drift
                observe_finite(metrics.level_update_norm.labels(r.level), r.update_norm)
                observe_finite(metrics.level_state_norm.labels(r.level), r.state_norm)
                observe_finite(metrics.level_drift.labels(r.level), r.drift)


# --------------------------------------------------------------------------- model thread

@dataclass(frozen=True)
class TurnEnd:
    """The last item of a generation stream: why it stopped and the state it left."""

    finish_reason: str
    state: bytes | None
    reports: list[Any]


@dataclass
class _Turn:
    request_id: str
    prompt_ids: list[int]
    state: bytes
    params: Any
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    fresh_tokens: int | None = None  # trailing prompt tokens new to the session
    messages: list[dict[str, str]] | None = None  # what the prompt was made from (the binding guard)

    def deliver(self, items: list[Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.sink.put_nowait, items)
        except RuntimeError:  # the loop is gone (shutdown); nobody is listening
            pass


class ModelThread:
    """One thread owning the model: continuous-batch decoding plus queued model calls."""

    def __init__(self, model: Any, max_batch: int = 1, *, learning: bool = True,
                 generate: bool = True, name: str = "nsam-model"):
        self.model = model
        self.max_batch = max_batch
        self.learning = learning
        self._generator = model.generator(max_batch, learning=learning) if generate else None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: deque[_Turn] = deque()
        self._active: dict[str, _Turn] = {}
        self._calls: deque[tuple[Callable, tuple, concurrent.futures.Future]] = deque()
        self._stopped = threading.Event()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- asyncio side

    async def call(self, fn: Callable, *args: Any) -> Any:
        """Runs fn(*args) on the model thread, between decode steps."""
        if self._stopped.is_set():
            raise Unavailable("the model is shutting down")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", (fn, args, future)))
        return await asyncio.wrap_future(future)

    async def generate(self, prompt_ids: list[int], state: bytes, params: Any, fresh_tokens: int | None = None,
                       messages: list[dict[str, str]] | None = None) -> AsyncIterator[Any]:
        """Streams TokenEvents of one turn, then one TurnEnd. Closing the iterator early
        cancels the turn. `messages`: the session the prompt was made from; with them the reply
        holds the user's taught values to their owners."""
        if self._generator is None or self._stopped.is_set():
            raise Unavailable("the model is not serving generation now")
        turn = _Turn(f"t{next(self._ids)}", prompt_ids, state, params, asyncio.Queue(),
                     asyncio.get_running_loop(), fresh_tokens, messages)
        self._inbox.put(("add", turn))
        finished = False
        try:
            while not finished:
                for item in await turn.sink.get():
                    if isinstance(item, StateError):
                        raise unreadable_session(item) from item
                    if isinstance(item, BaseException):
                        raise item
                    finished = isinstance(item, TurnEnd)
                    yield item
        finally:
            if not finished:
                self._inbox.put(("cancel", turn.request_id))

    @property
    def stopping(self) -> bool:
        """True once stop() was called: a long call (a consolidation) asks this to end early."""
        return self._stopped.is_set()

    def stop(self) -> None:
        """Fails queued work, lets the call or decode step in progress end (a consolidation
        polls `stopping` before each model call) and waits for the thread (up to 60 s: on a
        loaded CPU a backward pass alone can take half a minute)."""
        self._stopped.set()
        self._inbox.put(("stop", None))
        self._thread.join(timeout=60)

    # ---- model thread side

    def _run(self) -> None:
        while True:
            busy = bool(self._active or self._pending or self._calls)
            try:
                kind, arg = self._inbox.get_nowait() if busy else self._inbox.get()
            except queue.Empty:
                kind, arg = None, None
            while kind is not None:  # drain the inbox without blocking
                if kind == "stop":
                    self._fail_all(Unavailable("the server is shutting down"))
                    return
                self._accept(kind, arg)
                try:
                    kind, arg = self._inbox.get_nowait()
                except queue.Empty:
                    kind, arg = None, None
            self._admit()
            if self._active:
                self._step()
            if self._calls:  # one call per decode step keeps tokens flowing
                fn, args, future = self._calls.popleft()
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        future.set_exception(exc)

    def _accept(self, kind: str, arg: Any) -> None:
        if kind == "call":
            self._calls.append(arg)
        elif kind == "add":
            self._pending.append(arg)
        elif kind == "cancel":
            for turn in list(self._pending):
                if turn.request_id == arg:
                    self._pending.remove(turn)
                    turn.deliver([TurnEnd("cancelled", None, [])])
            if arg in self._active:
                self._generator.cancel(arg)

    def _admit(self) -> None:
        while self._pending and len(self._active) < self.max_batch:
            turn = self._pending.popleft()
            try:
                self._generator.add(turn.request_id, turn.prompt_ids, turn.state, turn.params,
                                    turn.fresh_tokens, turn.messages)
            except Exception as exc:  # noqa: BLE001 - e.g. a state the model refuses
                turn.deliver([exc])
                continue
            self._active[turn.request_id] = turn
        metrics.queued_turns.set(len(self._pending))

    def _step(self) -> None:
        metrics.batch_size.observe(len(self._active))
        try:
            events = self._generator.step()
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
            log.exception("decode step failed; failing %d turns", len(self._active))
            self._generator = self.model.generator(self.max_batch, learning=self.learning)
            for turn in self._active.values():
                turn.deliver([Unavailable(f"generation failed: {type(exc).__name__}")])
            self._active.clear()
            return
        out: dict[str, tuple[_Turn, list[Any]]] = {}
        for ev in events:
            turn = self._active.get(ev.request_id)
            if turn is None:
                continue
            items = out.setdefault(ev.request_id, (turn, []))[1]
            items.append(ev)
            if ev.finish_reason is not None:
                try:
                    state, reports = self._generator.pop_state(ev.request_id)
                except Exception:  # noqa: BLE001 - a cancelled turn may have no state
                    if ev.finish_reason != "cancelled":
                        log.exception("pop_state failed")
                    state, reports = None, []
                items.append(TurnEnd(ev.finish_reason, state, reports))
                del self._active[ev.request_id]
        for turn, items in out.values():
            turn.deliver(items)

    def _fail_all(self, exc: BaseException) -> None:
        for turn in [*self._active.values(), *self._pending]:
            turn.deliver([exc])
        self._active.clear()
        self._pending.clear()
        while self._calls:
            _, _, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)


# --------------------------------------------------------------------------- service logic

@dataclass(frozen=True)
class TurnDone:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    session_version: int
    user_memory_version: int
    learned: bool
    text: str


@dataclass(frozen=True)
class DocumentRead:
    session_version: int
    tokens: int
    chunks: int
    perplexity: float  # of the text as read (each chunk with the levels the chunks before left)
    rejected_updates: int


@dataclass(frozen=True)
class MemoryView:
    user: str
    version: int
    versions: list            # store.LevelVersion, newest first
    sessions: list            # store.SessionRecord, without state
    fingerprint: str
    facts: list               # model Fact: what the current user level was taught


@dataclass(frozen=True)
class HealthView:
    queue: Any                # store.QueueStats
    levels: dict[str, LevelHealth]
    learning: bool


class Engine:
    """Sessions, turns and user memory over the store and the model thread."""

    def __init__(self, settings: Settings, store: StateStore, thread: ModelThread,
                 levels: LevelBook, consolidator: Any, learner: ModelThread | None = None):
        self.settings = settings
        self.limits: Limits = settings.limits
        self.store = store
        self.thread = thread
        self.learner = learner or thread  # runs the medium updates
        self.model = thread.model
        self.levels = levels
        self.consolidator = consolidator
        self._user_states: dict[tuple[str, int], bytes] = {}  # small cache by version

    @property
    def context_window(self) -> int:
        return self.model.context_window

    # ---- sessions

    async def create_session(self, user: str, system_prompt: str) -> SessionRecord:
        if system_prompt:
            n = await self.thread.call(self.model.count_tokens, system_prompt)
            if n > self.context_window // 2:
                raise InvalidArgument(f"system_prompt: {n} tokens; at most {self.context_window // 2} "
                                      f"(half the {self.context_window}-token context window)")
        level = await self.store.get_user_level(user)
        user_state = level.state if level else None
        try:
            state = await self.thread.call(self.model.new_session_state, user_state)
        except StateError as exc:
            raise FailedPrecondition(
                f"the stored memory level of user {user!r} (version {level.version}) cannot be read: {exc}. "
                "Roll it back to an earlier version (RollbackMemory) or forget the user (ForgetUser)") from exc
        transcript = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return await self.store.create_session(user, state, level.version if level else 0,
                                               transcript)

    async def get_session(self, session_id: str, with_transcript: bool) -> SessionRecord:
        return await self.store.get_session(session_id, with_transcript=with_transcript)

    async def end_session(self, session_id: str, consolidate: bool) -> tuple[SessionRecord, bool]:
        session = await self.store.end_session(session_id)
        enqueue = consolidate and self.settings.learning and session.version > 0
        if enqueue:
            await self.store.enqueue_consolidation(session, session.version)
        return session, enqueue

    # ---- one turn

    async def chat(self, session_id: str, message: str, params: Any) -> AsyncIterator[Any]:
        """Streams TokenEvents, then one TurnDone after the turn is committed."""
        started = time.perf_counter()
        check_sampling(params, self.limits, self.context_window)
        session = await self.store.get_session(session_id, with_transcript=False)
        if session.ended:
            raise FailedPrecondition("session has ended; create a new session")
        budget = self.context_window - params.max_tokens
        n = await self.thread.call(self.model.count_tokens, message)
        if n + 16 > budget:
            raise InvalidArgument(
                f"message: {n} tokens; with sampling.max_tokens={params.max_tokens} at most "
                f"{budget - 16} fit the {self.context_window}-token context window")
        async with self._leased(session_id):
            session = await self._open_session(session_id)
            messages = session.transcript + [{"role": "user", "content": message}]
            try:
                prompt, fresh = await self.thread.call(self.model.encode_turn, messages, budget)
            except ValueError as exc:  # the new message plus the system prompt do not fit
                raise InvalidArgument(f"message: {exc}; shorten it or lower sampling.max_tokens") from exc
            metrics.prompt_tokens_total.inc(len(prompt))
            parts: list[str] = []
            end: TurnEnd | None = None
            last = None
            async with contextlib.aclosing(
                    self.thread.generate(prompt, session.state, params, fresh, messages)) as events:
                async for item in events:
                    if isinstance(item, TurnEnd):
                        end = item
                        break
                    now = time.perf_counter()
                    if last is None:
                        metrics.time_to_first_token_seconds.observe(now - started)
                    else:
                        metrics.inter_token_latency_seconds.observe(now - last)
                    last = now
                    if item.finish_reason != "cancelled":
                        metrics.generated_tokens_total.inc()
                        parts.append(item.text)
                        yield item
            if end is None or end.finish_reason == "cancelled" or end.state is None:
                return  # cancelled: nothing is written
            completion = len(parts)
            reply = "".join(parts)
            transcript = messages + [{"role": "assistant", "content": reply}]
            state, learned = await self._learn(session, end, message, reply)
            version = await self.store.commit_turn(session, state, transcript)
            yield TurnDone(end.finish_reason, len(prompt), completion, version,
                           session.user_version, learned, reply)
            every = self.settings.consolidate_every_turns
            if learned and every and (session.turns + 1) % every == 0:
                await self.store.enqueue_consolidation(session, version)

    async def read_document(self, session_id: str, text: str) -> DocumentRead:
        """Reads `text` into the session's levels chunk by chunk (each chunk is its own model
        call, so chat turns keep decoding in between) and commits the state once, at the end:
        a failure part-way leaves the session as it was."""
        if not self.settings.learning:
            raise FailedPrecondition("this server runs with --learning off: "
                                     "a document can only be read into memory while it learns")
        session = await self.store.get_session(session_id, with_transcript=False)
        if session.ended:
            raise FailedPrecondition("session has ended; create a new session")
        chunks = await self.thread.call(self.model.document_chunks, text)
        async with self._leased(session_id):
            session = await self._open_session(session_id)
            state, predicted, loss_sum, rejected = session.state, 0, 0.0, 0
            for ids in chunks:
                try:
                    state, read = await self.learner.call(self.learner.model.read_document_chunk, state, ids)
                except StateError as exc:
                    raise unreadable_session(exc) from exc
                self.levels.record(read.reports)
                predicted += read.tokens
                loss_sum += read.loss * read.tokens
                rejected += sum(not r.accepted and r.reason != "no-data" for r in read.reports)
            version = await self.store.commit_turn(session, state, session.transcript)
        tokens = sum(len(c) for c in chunks)
        metrics.document_tokens_total.inc(tokens)
        perplexity = math.exp(loss_sum / predicted) if predicted else 1.0
        return DocumentRead(version, tokens, len(chunks), perplexity, rejected)

    @contextlib.asynccontextmanager
    async def _leased(self, session_id: str) -> AsyncIterator[None]:
        """Holds the session's turn lease (renewed while held) for one turn or document."""
        token = await self.store.acquire_lease(session_id, self.settings.lease_ms,
                                               self.settings.lease_wait_s)
        metrics.active_sessions.inc()
        keeper = asyncio.create_task(self._keep_lease(session_id, token))
        try:
            yield
        finally:
            keeper.cancel()
            metrics.active_sessions.dec()
            await asyncio.shield(self._release(session_id, token))

    async def _open_session(self, session_id: str) -> SessionRecord:
        """The session with its state and transcript, once it holds the lease; refused when it
        can take no more turns."""
        session = await self.store.get_session(session_id, with_state=True)
        if session.ended:
            raise FailedPrecondition("session has ended; create a new session")
        if session.turns >= self.limits.max_turns_per_session:
            raise FailedPrecondition("session has reached its turn limit; start a new one")
        return session

    async def _learn(self, session: SessionRecord, end: TurnEnd, message: str,
                     reply: str) -> tuple[bytes | None, bool]:
        """The state to commit: fast writes from the turn plus the medium update on it;
        None (keep the stored state) when learning is off."""
        if not self.settings.learning:
            return None, False
        self.levels.record(end.reports)
        # The whole session: a turn that states facts is rehearsed with the session's earlier ones.
        messages = session.transcript + [{"role": "user", "content": message},
                                         {"role": "assistant", "content": reply}]
        state, reports = await self.learner.call(self.learner.model.update_medium, end.state, messages)
        self.levels.record(reports)
        return state, True

    async def _keep_lease(self, session_id: str, token: str) -> None:
        """Renews the turn lease while the turn runs, so a long turn keeps its session while a
        crashed server's lease still expires soon. A lost lease is only logged: the commit's
        compare-and-set then refuses a stale write."""
        ttl = self.settings.lease_ms
        while True:
            await asyncio.sleep(ttl / 3000)
            try:
                if not await self.store.renew_lease(session_id, token, ttl):
                    log.warning("turn lease of %s was lost", session_id)
                    return
            except Unavailable:
                pass

    async def _release(self, session_id: str, token: str) -> None:
        try:
            await self.store.release_lease(session_id, token)
        except Unavailable:
            log.warning("lease of %s not released (store unavailable); it expires", session_id)

    # ---- user memory

    async def memory(self, user: str) -> MemoryView:
        version = await self.store.user_level_version(user)
        versions = await self.store.user_level_versions(user)
        sessions = await self.store.list_sessions(user)
        facts = []
        level = await self.store.get_user_level(user) if version else None
        if level is not None:
            try:
                facts = await self.thread.call(self.model.user_facts, level.state)
            except StateError:  # damaged: still list the versions, to roll back to one
                log.warning("user level of %s v%d cannot be read; listing no facts", user, version)
        return MemoryView(user, version, versions, sessions, self.model.fingerprint, facts)

    async def export_memory(self, user: str, version: int | None) -> tuple[int, bytes]:
        level = await self.store.get_user_level(user, version)
        if level is None:
            return 0, await self.thread.call(self.model.new_user_state)
        return level.version, level.state

    async def import_memory(self, user: str, data: bytes, expected: int | None) -> Any:
        await self._check_state(data, "user")
        current = await self.store.user_level_version(user) if expected is None else expected
        version = await self.store.commit_user_level(user, current, data, "import")
        return await self._version_info(user, version)

    async def rollback(self, user: str, version: int) -> Any:
        current = await self.store.user_level_version(user)
        if version < 1 or version >= current:
            raise InvalidArgument(f"version: {version}; roll back to a kept version below the "
                                  f"current {current} (see GetMemory)")
        level = await self.store.get_user_level(user, version)
        new = await self.store.commit_user_level(user, current, level.state, "rollback")
        return await self._version_info(user, new)

    async def forget(self, user: str) -> int:
        return await self.store.forget_user(user)

    async def consolidate_now(self, user: str, session_id: str | None) -> list:
        if session_id:
            return [await self.consolidator.run(session_id)]
        sessions = await self.store.list_sessions(user)
        return [await self.consolidator.run(s.session_id) for s in sessions]

    async def health(self) -> HealthView:
        return HealthView(await self.store.queue_stats(), dict(self.levels.levels),
                          self.settings.learning)

    async def _version_info(self, user: str, version: int) -> Any:
        for v in await self.store.user_level_versions(user):
            if v.version == version:
                return v
        raise Unavailable("the new version vanished; retry")

    async def _check_state(self, data: bytes, kind: str) -> None:
        try:
            await self.thread.call(self.model.check_state, data, kind)
        except StateError as exc:
            raise InvalidArgument(f"state: {exc}") from exc

"""The engine: the service logic below the gRPC edge (sessions, turns, user memory).

`Engine` orchestrates a turn over the state store and the model thread (`model_thread`), which
is the only code that touches the model. It takes and returns plain dataclasses, never
protobuf, and does no tensor math.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncGenerator, AsyncIterator

from nsam.model.errors import StateError
from nsam.server import metrics
from nsam.server.bounds import check_sampling
from nsam.server.errors import Conflict, FailedPrecondition, InvalidArgument, LearntMoved, Unavailable
from nsam.server.learner import LearnerQueue
from nsam.server.level_book import LevelBook, LevelHealth, observe_finite
from nsam.server.model_thread import ModelThread, TurnEnd, unreadable_session
from nsam.server.settings import Limits, Settings
from nsam.server.store import LevelVersion, QueueStats, SessionRecord, StateStore

if TYPE_CHECKING:
    from nsam.model.runtime import Note, SamplingParams, TokenEvent
    from nsam.server.worker import ConsolidationOutcome, Consolidator

# Callers that assemble an engine import its parts from here too.
__all__ = ["Engine", "TurnDone", "DocumentRead", "MemoryView", "HealthView", "LevelBook", "LevelHealth",
           "ModelThread", "TurnEnd", "observe_finite"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TurnDone:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    session_version: int
    user_memory_version: int
    learned: bool  # its medium update is queued on the learner (it commits later, on its own)
    text: str
    learnt_turns: int = 0  # chat turns the medium level the turn decoded with had learnt


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
    versions: list[LevelVersion]  # newest first
    sessions: list[SessionRecord]  # without state
    fingerprint: str
    notes: list[Note]  # what the current user level was taught, oldest first


@dataclass(frozen=True)
class HealthView:
    queue: QueueStats
    levels: dict[str, LevelHealth]
    learning: bool


class Engine:
    """Sessions, turns and user memory over the store and the model thread."""

    def __init__(self, settings: Settings, store: StateStore, thread: ModelThread,
                 level_book: LevelBook, consolidator: Consolidator, learner: ModelThread | None = None,
                 learner_queue: LearnerQueue | None = None):
        self.settings = settings
        self.limits: Limits = settings.limits
        self.store = store
        self.thread = thread
        self.learner = learner or thread  # runs the medium updates
        self.model = thread.model
        self.level_book = level_book
        self.consolidator = consolidator
        # The medium updates of turns, after the turns (None with learning off).
        self.learner_queue = learner_queue or (
            LearnerQueue(store, self.learner, level_book, settings.learner_queue,
                         settings.consolidate_every_turns) if settings.learning else None)
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
        user_state, user_version = (level.state, level.version) if level else (None, 0)
        try:
            state = await self.thread.call(self.model.new_session_state, user_state)
        except StateError as exc:
            raise FailedPrecondition(
                f"the stored memory level of user {user!r} (version {user_version}) cannot be read: {exc}. "
                "Roll it back to an earlier version (RollbackMemory) or forget the user (ForgetUser)") from exc
        transcript = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return await self.store.create_session(user, state, user_version, transcript)

    async def get_session(self, session_id: str, with_transcript: bool) -> SessionRecord:
        return await self.store.get_session(session_id, with_transcript=with_transcript)

    async def end_session(self, session_id: str, consolidate: bool) -> tuple[SessionRecord, bool]:
        """Ends the session at once; its consolidation, enqueued now, first waits for (or itself
        learns) the session's pending medium updates (`Consolidator`)."""
        session = await self.store.end_session(session_id)
        enqueue = consolidate and self.settings.learning and session.version > 0
        if enqueue:
            await self.store.enqueue_consolidation(session, session.version)
        return session, enqueue

    # ---- one turn

    async def chat(self, session_id: str, message: str, params: SamplingParams
                   ) -> AsyncGenerator[TokenEvent | TurnDone, None]:
        """Streams TokenEvents, then one TurnDone once the turn is committed: its transcript and
        the fast level's writes. The turn's medium update is queued on the learner and commits
        later; the turn decodes with the medium level of the updates committed before it."""
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
            session, state = await self._open_session(session_id)
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
                    self.thread.generate(prompt, state, params, fresh)) as events:
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
            learnt = session.user_turns if session.learnt_turns is None else session.learnt_turns
            version = await self._commit_turn(session, end, transcript, learnt)
            if self.learner_queue is not None:
                self.learner_queue.enqueue(session_id, session.user_turns + 1)
            yield TurnDone(end.finish_reason, len(prompt), completion, version,
                           session.user_version, self.learner_queue is not None, reply, learnt)

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
            if self.learner_queue is not None:  # the document's update comes after the turns'
                await self.learner_queue.drain(session_id)
            session, state = await self._open_session(session_id)
            predicted, loss_sum, rejected = 0, 0.0, 0
            for ids in chunks:
                try:
                    state, read = await self.learner.call(self.learner.model.read_document_chunk, state, ids)
                except StateError as exc:
                    raise unreadable_session(exc) from exc
                self.level_book.record(read.reports)
                predicted += read.tokens
                loss_sum += read.loss * read.tokens
                rejected += sum(not r.accepted and r.reason != "no-data" for r in read.reports)
            version = await self.store.commit_turn(session, state, session.transcript, session.learnt_turns)
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

    async def _open_session(self, session_id: str) -> tuple[SessionRecord, bytes]:
        """The session with its transcript, and its state, once it holds the lease; refused
        when it can take no more turns."""
        session = await self.store.get_session(session_id, with_state=True)
        if session.ended:
            raise FailedPrecondition("session has ended; create a new session")
        if session.turns >= self.limits.max_turns_per_session:
            raise FailedPrecondition("session has reached its turn limit; start a new one")
        if session.state is None:
            raise FailedPrecondition("this session's stored memory state is missing; "
                                     "end it and create a new session")
        return session, session.state

    async def _commit_turn(self, session: SessionRecord, end: TurnEnd, transcript: list[dict[str, str]],
                           learnt: int) -> int:
        """Commits the turn: its transcript and, when learning, the fast level's writes; merged
        onto the medium level of any update the learner committed during the turn."""
        if not self.settings.learning:
            return await self.store.commit_turn(session, None, transcript)
        self.level_book.record(end.reports)
        state = end.state
        assert state is not None  # a finished turn has its state
        for _ in range(5):
            try:
                return await self.store.commit_turn(session, state, transcript, learnt)
            except LearntMoved:
                latest = await self.store.get_session(session.session_id, with_state=True, with_transcript=False)
                if latest.version != session.version or latest.state is None or latest.learnt_turns is None:
                    break
                state = await self.thread.call(self.model.merge_medium, state, latest.state)
                learnt = latest.learnt_turns
        metrics.cas_conflicts_total.labels("session").inc()
        raise Conflict("session changed (or vanished) during the turn; this turn was not saved")

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
        notes: list[Note] = []
        level = await self.store.get_user_level(user) if version else None
        if level is not None:
            try:
                notes = await self.thread.call(self.model.user_notes, level.state)
            except StateError:  # damaged: still list the versions, to roll back to one
                log.warning("user level of %s v%d cannot be read; listing no notes", user, version)
        return MemoryView(user, version, versions, sessions, self.model.fingerprint, notes)

    async def export_memory(self, user: str, version: int | None) -> tuple[int, bytes]:
        level = await self.store.get_user_level(user, version)
        if level is None:
            return 0, await self.thread.call(self.model.new_user_state)
        return level.version, level.state

    async def import_memory(self, user: str, data: bytes, expected: int | None) -> LevelVersion:
        await self._check_state(data, "user")
        current = await self.store.user_level_version(user) if expected is None else expected
        version = await self.store.commit_user_level(user, current, data, "import")
        return await self._version_info(user, version)

    async def rollback(self, user: str, version: int) -> LevelVersion:
        current = await self.store.user_level_version(user)
        if version < 1 or version >= current:
            raise InvalidArgument(f"version: {version}; roll back to a kept version below the "
                                  f"current {current} (see GetMemory)")
        level = await self.store.get_user_level(user, version)
        assert level is not None  # a version that is not kept raises NotFound
        new = await self.store.commit_user_level(user, current, level.state, "rollback")
        return await self._version_info(user, new)

    async def forget(self, user: str) -> int:
        return await self.store.forget_user(user)

    async def consolidate_now(self, user: str, session_id: str | None) -> list[ConsolidationOutcome]:
        """Runs consolidations now (each after its session's pending medium updates)."""
        if session_id:
            await self.store.get_session(session_id, with_transcript=False)  # NOT_FOUND if unknown
            return [await self.consolidator.run(session_id)]
        sessions = await self.store.list_sessions(user)
        return [await self.consolidator.run(s.session_id) for s in sessions]

    async def health(self) -> HealthView:
        return HealthView(await self.store.queue_stats(), self.level_book.summary(),
                          self.settings.learning)

    async def _version_info(self, user: str, version: int) -> LevelVersion:
        for v in await self.store.user_level_versions(user):
            if v.version == version:
                return v
        raise Unavailable("the new version vanished; retry")

    async def _check_state(self, data: bytes, kind: str) -> None:
        try:
            await self.thread.call(self.model.check_state, data, kind)
        except StateError as exc:
            raise InvalidArgument(f"state: {exc}") from exc

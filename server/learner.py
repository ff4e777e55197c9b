"""The learner queue: the medium updates of chat turns, run in the background after the turns.

A turn commits its reply and the fast level's writes and returns at once; its medium update
waits here and runs on the learner's model thread, then commits with compare-and-set, merged
onto whatever turns of the session committed meanwhile (`merge_medium`: the update owns the
medium level and the session's notes, the turns own the rest). One session's updates run in
order, each starting from the medium level the one before committed.

Bounded work: past `limit` waiting updates, a session's next turn joins its waiting update
instead of queueing one more (one update over several turns, `update_medium(turns=N)`); no turn
is dropped.

What survives a restart: the session record counts the chat turns its medium level has learnt
(`learnt_turns`) and the transcript holds the rest, so the record is the durable queue. A job
learns every turn of its session not learnt yet, so the turns a stopped server left unlearnt are
learnt with the session's next job here: its next turn, a ReadDocument, a consolidation, or
`drain`. No tensors here: the model does the math on its thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from nsam.server import metrics
from nsam.server.errors import Conflict, LearntMoved, NotFound
from nsam.server.level_book import LevelBook
from nsam.server.model_thread import ModelThread
from nsam.server.store import SessionRecord, StateStore

log = logging.getLogger(__name__)

_MERGES = 20  # merges onto newer turns before an update gives up (turns commit every few seconds at most)


@dataclass
class _Job:
    session_id: str
    upto: int  # learn the session's chat turns up to this one (counted from 1)
    turns_at: list[float]  # when each turn it covers committed (perf_counter)
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: bool = False


def turn_messages(transcript: list[dict[str, str]], upto: int) -> list[dict[str, str]]:
    """The transcript up to the reply of its `upto`-th user message."""
    seen = 0
    for i, m in enumerate(transcript):
        if m["role"] == "user":
            seen += 1
            if seen == upto:
                end = i + 2 if i + 1 < len(transcript) and transcript[i + 1]["role"] == "assistant" else i + 1
                return transcript[:end]
    raise ValueError(f"the transcript has {seen} user messages, not {upto}")


class LearnerQueue:
    """Medium updates waiting for the learner thread, run one at a time by one task."""

    def __init__(self, store: StateStore, thread: ModelThread, level_book: LevelBook, limit: int,
                 consolidate_every_turns: int = 0):
        self.store = store
        self.thread = thread
        self.level_book = level_book
        self.limit = limit
        self.consolidate_every = consolidate_every_turns
        self._queue: deque[_Job] = deque()
        self._waiting: dict[str, _Job] = {}  # a session's last job not started yet
        self._jobs: dict[str, list[_Job]] = {}  # a session's jobs not finished
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopped = False

    # ---- called by the engine

    def enqueue(self, session_id: str, upto: int) -> None:
        """Queues the medium update of the session's turns up to `upto` (just committed)."""
        if self._stopped:  # shutting down: the turn stays unlearnt in its record
            return
        now = time.perf_counter()
        metrics.learner_pending_turns.inc()
        job = self._waiting.get(session_id)
        if job is not None and len(self._queue) >= self.limit:
            metrics.learner_coalesced_turns_total.inc(max(upto - job.upto, 1))
            job.upto = max(job.upto, upto)
            job.turns_at.append(now)
            return
        job = _Job(session_id, upto, [now])
        self._queue.append(job)
        self._waiting[session_id] = job
        self._jobs.setdefault(session_id, []).append(job)
        metrics.learner_queue_depth.set(len(self._queue))
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="nsam-learner")

    def pending(self, session_id: str) -> int:
        """Jobs of the session queued or running here."""
        return len(self._jobs.get(session_id, []))

    async def drain(self, session_id: str) -> None:
        """Returns once every chat turn of the session is learnt (or its update failed): waits
        for its jobs here, after queueing one for turns no job here covers (left by a restart
        or by a failed update)."""
        session = await self.store.get_session(session_id)
        users, learnt = session.user_turns, session.learnt_turns
        if learnt is not None and learnt < users and \
                not any(j.upto >= users for j in self._jobs.get(session_id, [])):
            self.enqueue(session_id, users)
        for job in list(self._jobs.get(session_id, [])):
            await asyncio.shield(job.done)

    async def stop(self) -> None:
        """Stops taking jobs: the one running ends at its next await; the turns of the queued
        ones stay unlearnt in their session records, learnt by the session's next job."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for jobs in self._jobs.values():
            for job in jobs:
                metrics.learner_pending_turns.dec(len(job.turns_at))
                if not job.done.done():
                    job.done.set_result(False)
        self._queue.clear()
        self._waiting.clear()
        self._jobs.clear()
        metrics.learner_queue_depth.set(0)

    # ---- the task

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            job = self._queue.popleft()
            job.started = True
            if self._waiting.get(job.session_id) is job:
                del self._waiting[job.session_id]
            metrics.learner_queue_depth.set(len(self._queue))
            learnt = False
            try:
                learnt = await self._learn(job)
            except asyncio.CancelledError:
                raise
            except NotFound:
                log.info("session %s is gone; its medium update is dropped with it", job.session_id)
            except Exception:  # noqa: BLE001 - the turns stay unlearnt; the session's next job retries them
                log.exception("medium update of %s failed; its turns stay pending", job.session_id)
            finally:
                metrics.learner_pending_turns.dec(len(job.turns_at))
                jobs = self._jobs.get(job.session_id, [])
                if job in jobs:
                    jobs.remove(job)
                if not jobs:
                    self._jobs.pop(job.session_id, None)
                if not job.done.done():
                    job.done.set_result(learnt)
            if learnt:
                now = time.perf_counter()
                for at in job.turns_at:
                    metrics.learner_lag_seconds.observe(now - at)

    async def _learn(self, job: _Job) -> bool:
        """Learns the session's turns not learnt yet up to `job.upto` in one update and commits
        it; False when there was nothing to learn (another learner was first)."""
        model = self.thread.model
        while True:
            session = await self.store.get_session(job.session_id, with_state=True)
            learnt = session.learnt_turns
            if learnt is None or learnt >= job.upto or session.state is None:
                return False
            messages = turn_messages(session.transcript, job.upto)
            state, reports = await self.thread.call(model.update_medium, session.state, messages,
                                                    job.upto - learnt)
            self.level_book.record(reports)
            try:
                await self._commit(session, state, job.upto)
            except LearntMoved:  # another replica's learner committed some of these turns: redo
                continue
            break
        every = self.consolidate_every
        if every and any(t % every == 0 for t in range(learnt + 1, job.upto + 1)):
            await self.store.enqueue_consolidation(session, session.version)
        return True

    async def _commit(self, read: SessionRecord, state: bytes, upto: int) -> None:
        """Commits `state` (the update of the session as `read`), merged onto the session's
        latest state whenever turns committed since."""
        model, base, merged = self.thread.model, read, state
        for _ in range(_MERGES):
            try:
                await self.store.commit_learnt(base, merged, upto)
                return
            except LearntMoved:
                raise
            except Conflict:  # a turn committed its fast level: take it, with this update on top
                base = await self.store.get_session(read.session_id, with_state=True, with_transcript=False)
                if base.state is None:
                    raise NotFound(f"session {read.session_id} lost its state") from None
                merged = await self.thread.call(model.merge_medium, base.state, state)
        raise Conflict(f"session {read.session_id} kept committing turns; its update is retried later")

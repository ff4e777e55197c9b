"""Consolidation: folds a session's learning into its user's slow level, in the background.

Jobs arrive on a Redis Stream read by a consumer group, so any number of workers (the
in-process one of a single-machine server, or `nsam consolidate` replicas) share them; a job
a crashed worker left unacknowledged is reclaimed with XAUTOCLAIM after `claim_idle_ms`.
A job waits for its session's pending medium updates (or learns them itself, in memory: every
turn's notes reach the user level), runs `model.consolidate`, keeps the result only if the model's report accepts it
(forgetting probe, drift) and commits it with compare-and-set on the user level version;
then it is acknowledged. The model runs on the caller's ModelThread, never here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Awaitable, Callable

from nsam.model.errors import Interrupted
from nsam.server import metrics
from nsam.server.engine import LevelBook, ModelThread, observe_finite
from nsam.server.errors import Conflict, NotFound, ServiceError, Unavailable
from nsam.server.learner import turn_messages
from nsam.server.store import Job, StateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsolidationOutcome:
    session_id: str
    outcome: str            # accepted | rejected | conflict | skipped | failed
    reason: str
    user_memory_version: int
    probe_loss: float = 0.0
    baseline_probe_loss: float = 0.0
    update_norm: float = 0.0
    drift: float = 0.0
    seconds: float = 0.0


def release_memory() -> None:
    """Hands what a consolidation freed back to the OS. Its training allocates gigabytes of
    short-lived buffers (activations, gradients, optimizer moments of the real model) on this
    thread's malloc arena; glibc keeps them mapped after they are freed, so the RSS stays at
    the peak of the largest consolidation so far unless trimmed."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Consolidator:
    """Runs one consolidation (a session into its user level) end to end."""

    def __init__(self, store: StateStore, model_thread: ModelThread, levels: LevelBook,
                 attempts: int = 3, drain: Callable[[str], Awaitable[None]] | None = None):
        """`drain(session_id)`: waits for the session's medium updates queued in this process
        (`LearnerQueue.drain`); turns still unlearnt after it (a server stopped, a worker in a
        process of its own) are learnt here, into the state consolidated (not committed)."""
        self.store = store
        self.thread = model_thread
        self.levels = levels
        self.attempts = attempts
        self.drain = drain

    async def run(self, session_id: str) -> ConsolidationOutcome:
        start = time.perf_counter()
        for _ in range(self.attempts):
            try:
                outcome = await self._once(session_id)
            except Conflict:  # the user level moved on: consolidate against the new one
                metrics.consolidation_jobs_total.labels("conflict").inc()
                continue
            except NotFound as exc:
                outcome = ConsolidationOutcome(session_id, "skipped", str(exc), 0)
            break
        else:
            outcome = ConsolidationOutcome(session_id, "conflict", "user level kept moving", 0)
        metrics.consolidation_duration_seconds.observe(time.perf_counter() - start)
        await self.thread.call(release_memory)
        if outcome.outcome != "conflict":
            metrics.consolidation_jobs_total.labels(outcome.outcome).inc()
        finite = outcome.probe_loss and math.isfinite(outcome.probe_loss)
        await self.store.record_outcome(outcome.outcome, outcome.probe_loss if finite else None,
                                        outcome.baseline_probe_loss if finite else None)
        return outcome

    async def _once(self, session_id: str) -> ConsolidationOutcome:
        model = self.thread.model
        if self.drain is not None:
            await self.drain(session_id)
        session = await self.store.get_session(session_id, with_state=True)
        if session.version == 0 or session.consolidated_version >= session.version:
            version = await self.store.user_level_version(session.user)
            return ConsolidationOutcome(session_id, "skipped", "nothing new since the last consolidation",
                                        version)
        unlearnt = session.user_turns - (session.learnt_turns if session.learnt_turns is not None
                                         else session.user_turns)
        if unlearnt > 0 and session.state is not None:  # every turn's notes reach the user level
            state, _ = await self.thread.call(model.update_medium, session.state,
                                              turn_messages(session.transcript, session.user_turns), unlearnt)
            session = replace(session, state=state)
        level = await self.store.get_user_level(session.user)
        user_state = level.state if level else await self.thread.call(model.new_user_state)
        expected = level.version if level else 0
        try:
            new_state, report = await self.thread.call(
                model.consolidate, user_state, session.state, session.transcript,
                lambda: self.thread.stopping)
        except Interrupted as exc:  # shutting down: the job stays pending and is redone later
            raise Unavailable(f"consolidation of {session_id} interrupted by shutdown; "
                              "its job stays queued and is redone") from exc
        observe_finite(metrics.forgetting_probe_loss, report.probe_loss)
        if math.isfinite(report.baseline_probe_loss):
            metrics.forgetting_probe_baseline_loss.set(report.baseline_probe_loss)
        common = dict(probe_loss=report.probe_loss, baseline_probe_loss=report.baseline_probe_loss,
                      update_norm=report.update_norm, drift=report.drift, seconds=report.seconds)
        if not report.accepted:
            metrics.level_rejected_updates_total.labels("user", report.reason or "rejected").inc()
            return ConsolidationOutcome(session_id, "rejected", report.reason, expected, **common)
        version = await self.store.commit_user_level(
            session.user, expected, new_state, "consolidation", session)
        observe_finite(metrics.level_update_norm.labels("user"), report.update_norm)
        observe_finite(metrics.level_drift.labels("user"), report.drift)
        observe_finite(metrics.level_update_duration_seconds.labels("user"), report.seconds)
        metrics.consolidation_trust_region_total.labels(report.trust_region).inc()
        metrics.consolidation_steps.observe(report.steps_trained)
        observe_finite(metrics.consolidation_answers_said_ratio, report.answers_said)
        return ConsolidationOutcome(session_id, "accepted", report.reason, version, **common)


class ConsolidationWorker:
    """A consumer of the consolidation stream; several may run against one Redis."""

    def __init__(self, store: StateStore, consolidator: Consolidator, consumer: str,
                 claim_idle_ms: int = 60_000, block_ms: int = 1000):
        self.store = store
        self.consolidator = consolidator
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.block_ms = block_ms
        self._stop = asyncio.Event()
        self.processed = 0
        self.busy = False  # inside a job (not just waiting for one)

    def stop(self) -> None:
        self._stop.set()

    async def shutdown(self, task: asyncio.Task, timeout: float) -> None:
        """Stops the worker running in `task`: an idle one at once, a busy one after its job
        (or after timeout; the unacknowledged job is then reclaimed by another worker)."""
        self.stop()
        if not self.busy:
            task.cancel()
        await asyncio.wait([task], timeout=timeout)
        if not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=1)

    async def run(self) -> None:
        """Consumes jobs until stop(); a store outage pauses it, never ends it."""
        await self._retry(self.store.ensure_group)
        last_claim = 0.0
        while not self._stop.is_set():
            try:
                jobs: list[Job] = []
                if time.monotonic() - last_claim > self.claim_idle_ms / 4000:
                    jobs = await self.store.claim_stale_jobs(self.consumer, self.claim_idle_ms)
                    last_claim = time.monotonic()
                if not jobs:
                    jobs = await self.store.read_jobs(self.consumer, 1, self.block_ms)
                for job in jobs:
                    self.busy = True
                    try:
                        await self.handle(job)
                    finally:
                        self.busy = False
                stats = await self.store.queue_stats()
                metrics.consolidation_queue_depth.set(stats.depth)
            except ServiceError as exc:
                log.warning("consolidation worker: %s", exc)
                await self._sleep(1.0)
            except Exception:  # noqa: BLE001 - keep consuming
                log.exception("consolidation worker error")
                await self._sleep(1.0)

    async def handle(self, job: Job) -> ConsolidationOutcome:
        metrics.consolidation_lag_seconds.observe(max(0.0, time.time() - job.enqueued_ms / 1000))
        try:
            outcome = await self.consolidator.run(job.session_id)
        except ServiceError:
            raise  # store outage: leave the job pending, it is retried or reclaimed
        except Exception as exc:  # noqa: BLE001 - a job that cannot succeed is dropped
            log.exception("consolidation of %s failed", job.session_id)
            metrics.consolidation_jobs_total.labels("failed").inc()
            await self.store.record_outcome("failed")
            outcome = ConsolidationOutcome(job.session_id, "failed", type(exc).__name__, 0)
        await self.store.ack_job(job)
        self.processed += 1
        log.info("consolidated %s: %s (%s)", job.session_id, outcome.outcome, outcome.reason)
        return outcome

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _retry(self, fn) -> None:
        while not self._stop.is_set():
            try:
                return await fn()
            except ServiceError as exc:
                log.warning("consolidation worker waiting for the store: %s", exc)
                await self._sleep(1.0)

"""The model thread: the only code that touches the model.

Its thread decodes every active turn in one continuous batch (the model's `DecodeBatch`) and
runs the other model calls (encoding, medium updates, consolidation) between decode steps, so
the non-thread-safe model is used by one thread and the asyncio event loop never blocks on
model work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncGenerator, Callable, TypeVar

from nsam.model.errors import StateError
from nsam.server import metrics
from nsam.server.errors import FailedPrecondition, Unavailable

if TYPE_CHECKING:
    from nsam.model.protocol import DecodeBatch, ServingModel
    from nsam.model.runtime import LevelReport, SamplingParams

T = TypeVar("T")

log = logging.getLogger(__name__)


def unreadable_session(exc: StateError) -> FailedPrecondition:
    return FailedPrecondition(f"this session's stored memory state cannot be read: {exc}. "
                              "End it and create a new session")



@dataclass(frozen=True)
class TurnEnd:
    """The last item of a generation stream: why it stopped and the state it left."""

    finish_reason: str
    state: bytes | None
    reports: list[LevelReport]


@dataclass
class _Turn:
    request_id: str
    prompt_ids: list[int]
    state: bytes
    params: SamplingParams
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    fresh_tokens: int | None = None  # trailing prompt tokens new to the session

    def deliver(self, items: list[Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.sink.put_nowait, items)
        except RuntimeError:  # the loop is gone (shutdown); nobody is listening
            pass


class ModelThread:
    """One thread owning the model: continuous-batch decoding plus queued model calls."""

    def __init__(self, model: ServingModel, max_batch: int = 1, *, learning: bool = True,
                 generate: bool = True, name: str = "nsam-model", niceness: int = 0):
        """`niceness`: how much lower than the process the OS schedules this thread (Linux
        schedules threads, not processes): background learning yields the cores to decoding."""
        self.model = model
        self.niceness = niceness
        self.max_batch = max_batch
        self.learning = learning
        self._generator: DecodeBatch | None = model.generator(max_batch, learning=learning) if generate else None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: deque[_Turn] = deque()
        self._active: dict[str, _Turn] = {}
        self._calls: deque[tuple[Callable, tuple, concurrent.futures.Future]] = deque()
        self._stopped = threading.Event()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- asyncio side

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs fn(*args) on the model thread, between decode steps."""
        if self._stopped.is_set():
            raise Unavailable("the model is shutting down")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._inbox.put(("call", (fn, args, future)))
        return await asyncio.wrap_future(future)

    async def generate(self, prompt_ids: list[int], state: bytes, params: SamplingParams,
                       fresh_tokens: int | None = None) -> AsyncGenerator[Any, None]:
        """Streams TokenEvents of one turn, then one TurnEnd. Closing the iterator early
        cancels the turn. `fresh_tokens`: the prompt's trailing tokens new to the session."""
        if self._generator is None or self._stopped.is_set():
            raise Unavailable("the model is not serving generation now")
        turn = _Turn(f"t{next(self._ids)}", prompt_ids, state, params, asyncio.Queue(),
                     asyncio.get_running_loop(), fresh_tokens)
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
        if self.niceness:
            try:  # per thread on Linux; elsewhere it may renice the process, so only there
                if os.uname().sysname == "Linux":
                    tid = threading.get_native_id()
                    os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self.niceness)
            except OSError:
                log.warning("could not lower the priority of thread %s", self._thread.name)
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

    @property
    def _batch(self) -> DecodeBatch:
        assert self._generator is not None, "turns are queued only while generating"
        return self._generator

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
                self._batch.cancel(arg)

    def _admit(self) -> None:
        while self._pending and len(self._active) < self.max_batch:
            turn = self._pending.popleft()
            try:
                self._batch.add(turn.request_id, turn.prompt_ids, turn.state, turn.params, turn.fresh_tokens)
            except Exception as exc:  # noqa: BLE001 - e.g. a state the model refuses
                turn.deliver([exc])
                continue
            self._active[turn.request_id] = turn
        metrics.queued_turns.set(len(self._pending))

    def _step(self) -> None:
        metrics.batch_size.observe(len(self._active))
        try:
            events = self._batch.step()
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
            log.exception("decode step failed; failing %d turns", len(self._active))
            self._generator = self.model.generator(self.max_batch, learning=self.learning)
            for turn in self._active.values():
                turn.deliver([Unavailable(f"generation failed: {type(exc).__name__}")])
            self._active.clear()
            return
        out: dict[str, tuple[_Turn, list[Any]]] = {}
        for ev in events:
            running = self._active.get(ev.request_id)
            if running is None:
                continue
            items = out.setdefault(ev.request_id, (running, []))[1]
            items.append(ev)
            if ev.finish_reason is not None:
                try:
                    state, reports = self._batch.pop_state(ev.request_id)
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


"""Service errors and the one place they become gRPC status codes.

Domain code raises a `ServiceError` subclass (never `context.abort`); `StatusInterceptor`
turns it into the status code, counts the RPC in `nsam_requests_total` and times it. Any
other exception is a bug: it is logged with its traceback and the caller sees INTERNAL
without internals.

`InFlight` tracks the RPCs running, so a graceful stop waits for them and then ends the ones
it gives up on with UNAVAILABLE saying whether the call committed (never gRPC's bare
"Cancelling all calls" after a reply the client took for saved).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable

import grpc

from nsam.server import metrics

log = logging.getLogger(__name__)


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Conflict(ServiceError):
    """A compare-and-set lost to a newer version; nothing was written."""

    code = grpc.StatusCode.ABORTED


class LearntMoved(Conflict):
    """The learner committed a medium update since the state was read: merge onto it, retry."""


class Busy(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """The state store (or the model) cannot be reached now; retry later."""

    code = grpc.StatusCode.UNAVAILABLE


# The version a call committed (set by the store in the call's own task), for the shutdown message.
_committed: contextvars.ContextVar[int | None] = contextvars.ContextVar("nsam_committed", default=None)


def mark_committed(version: int) -> None:
    _committed.set(version)


class InFlight:
    """The RPCs running on this server; `drain` is the graceful stop's wait."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()
        self.giving_up = False

    def add(self) -> asyncio.Task | None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        return task

    async def drain(self, grace: float, abort_s: float = 5.0) -> int:
        """Waits up to `grace` seconds for the running RPCs, then stops the rest (each tells
        its caller what was committed); returns how many were stopped."""
        deadline = time.monotonic() + grace
        while self.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = [t for t in self.tasks if not t.done()]
        self.giving_up = True
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=abort_s)
        return len(left)


def shutdown_message() -> str:
    version = _committed.get()
    if version is None:
        return ("the server is shutting down and stopped this call before it was committed: nothing "
                "of it was saved (a turn leaves its session at the version before it); send it again")
    return (f"the server is shutting down: this call was committed (version {version}) "
            "but its reply was cut short")


def _method_name(full: str) -> str:
    # "/nsam.v1.ChatService/Chat" -> "ChatService/Chat"; bounded label set
    return full.rsplit(".", 1)[-1] if full else "unknown"


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to status codes and records request metrics for every unary-response
    and server-streaming RPC (health and reflection included)."""

    def __init__(self, in_flight: InFlight | None = None):
        self.in_flight = in_flight or InFlight()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = _method_name(details.method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, self.in_flight),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, self.in_flight),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        return handler


class _Undecodable:
    """A request whose bytes are not the method's message (gRPC itself would answer UNKNOWN
    with a Python exception name)."""

    def __init__(self, exc: Exception):
        self.reason = str(exc) or type(exc).__name__


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, invalid UTF-8 in a string field
            return _Undecodable(exc)
    return parse


def _check_decoded(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"the request is not a valid message of this method "
                              f"(invalid protobuf or a string field that is not UTF-8): {request.reason[:80]}")


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, ServiceError):
        code, message = exc.code, str(exc)
    else:
        log.exception("unhandled error in %s", method, exc_info=exc)
        code, message = grpc.StatusCode.INTERNAL, "internal error (see server log)"
    metrics.requests_total.labels(method, code.name).inc()
    await context.abort(code, message)


def _finish(context: grpc.aio.ServicerContext, method: str, start: float) -> None:
    metrics.request_duration_seconds.labels(method).observe(time.perf_counter() - start)


def _ok(context: grpc.aio.ServicerContext, method: str) -> None:
    code = context.code() if hasattr(context, "code") else None
    metrics.requests_total.labels(method, (code or grpc.StatusCode.OK).name).inc()


async def _given_up(context: grpc.aio.ServicerContext, method: str) -> None:
    """A graceful stop gave up on this call: say so, instead of vanishing."""
    metrics.requests_total.labels(method, grpc.StatusCode.UNAVAILABLE.name).inc()
    await context.abort(grpc.StatusCode.UNAVAILABLE, shutdown_message())


def _wrap_unary(fn: Callable[..., Awaitable[Any]], method: str, in_flight: InFlight):
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        task = in_flight.add()
        try:
            _check_decoded(request)
            response = await fn(request, context)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            if not in_flight.giving_up:
                raise
            await _given_up(context, method)
        except Exception as exc:  # noqa: BLE001 - the mapping point
            await _abort(context, exc, method)
        else:
            _ok(context, method)
            return response
        finally:
            in_flight.tasks.discard(task)
            _finish(context, method, start)
    return unary


def _wrap_stream(fn: Callable[..., AsyncGenerator[Any, None]], method: str, in_flight: InFlight):
    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        start = time.perf_counter()
        task = in_flight.add()
        try:
            _check_decoded(request)
            async with contextlib.aclosing(fn(request, context)) as items:
                async for item in items:
                    yield item
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:  # the client went away mid-stream, or a stop gave up
            if not in_flight.giving_up:
                metrics.requests_total.labels(method, grpc.StatusCode.CANCELLED.name).inc()
                raise
            await _given_up(context, method)
        except Exception as exc:  # noqa: BLE001 - the mapping point
            await _abort(context, exc, method)
        else:
            _ok(context, method)
        finally:
            in_flight.tasks.discard(task)
            _finish(context, method, start)
    return stream

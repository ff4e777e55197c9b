"""Service errors and the one place they become gRPC status codes.

Domain code raises a `ServiceError` subclass (never `context.abort`); `StatusInterceptor`
turns it into the status code, counts the RPC in `nsam_requests_total` and times it. Any
other exception is a bug: it is logged with its traceback and the caller sees INTERNAL
without internals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

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


class Busy(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """The state store (or the model) cannot be reached now; retry later."""

    code = grpc.StatusCode.UNAVAILABLE


def _method_name(full: str) -> str:
    # "/nsam.v1.ChatService/Chat" -> "ChatService/Chat"; bounded label set
    return full.rsplit(".", 1)[-1] if full else "unknown"


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to status codes and records request metrics for every unary-response
    and server-streaming RPC (health and reflection included)."""

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
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


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


def _wrap_unary(fn: Callable[..., Awaitable[Any]], method: str):
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        try:
            response = await fn(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the mapping point
            await _abort(context, exc, method)
        else:
            _ok(context, method)
            return response
        finally:
            _finish(context, method, start)
    return unary


def _wrap_stream(fn: Callable[..., AsyncIterator[Any]], method: str):
    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        start = time.perf_counter()
        try:
            async for item in fn(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:  # the client went away mid-stream
            metrics.requests_total.labels(method, grpc.StatusCode.CANCELLED.name).inc()
            raise
        except Exception as exc:  # noqa: BLE001 - the mapping point
            await _abort(context, exc, method)
        else:
            _ok(context, method)
        finally:
            _finish(context, method, start)
    return stream

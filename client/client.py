"""Python clients of the nsam service: `AsyncClient` (grpc.aio) and `Client` (blocking).

Both return the plain dataclasses of `nsam.client.types` and raise `NsamError` (status code
plus the server's message) for a failed call.

    async with AsyncClient("127.0.0.1:50051", api_key="...") as c:
        s = await c.create_session("alice")
        async for item in c.chat(s.session_id, "hello"):
            print(item.text if isinstance(item, Token) else "", end="")
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import AsyncIterator, Iterator

import grpc

from nsam.protos import nsam_pb2 as pb
from nsam.protos import nsam_pb2_grpc as pb_grpc
from nsam.client.types import (ConsolidationResult, DocumentRead, ExportedMemory, MemoryHealth, MemoryInfo,
                               MemoryVersion, NsamError, Sampling, Session, Token, TurnResult,
                               chat_event)

_MAX_MESSAGE = 300 * 2**20  # user levels travel in one message
_OPTIONS = [("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE)]


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _credentials(root_cert: str | Path | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(Path(root_cert).read_bytes() if root_cert else None)


def _export_request(user: str, version: int | None) -> pb.ExportMemoryRequest:
    req = pb.ExportMemoryRequest(user=user)
    if version is not None:
        req.version = version
    return req


def _import_request(user: str, state: bytes, expected: int | None) -> pb.ImportMemoryRequest:
    req = pb.ImportMemoryRequest(user=user, state=state)
    if expected is not None:
        req.expected_version = expected
    return req


def _chat_request(session_id: str, message: str, sampling: Sampling | None) -> pb.ChatRequest:
    return pb.ChatRequest(session_id=session_id, message=message,
                          sampling=(sampling or Sampling()).to_pb())


def _exported(r: pb.ExportMemoryResponse) -> ExportedMemory:
    return ExportedMemory(r.version, r.state, r.model_fingerprint)


def _rpc_errors(fn):
    """Turns grpc.RpcError into NsamError for coroutine methods."""
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except grpc.RpcError as err:
            raise NsamError.from_rpc(err) from None
    return wrapper


def _sync_rpc_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as err:
            raise NsamError.from_rpc(err) from None
    return wrapper



def _finished(result: TurnResult | None) -> TurnResult:
    """A turn's result; a stream that ended without one was cancelled on the server."""
    if result is None:
        raise NsamError(grpc.StatusCode.ABORTED, "the turn ended without a result (cancelled)")
    return result

class AsyncClient:
    def __init__(self, target: str = "127.0.0.1:50051", *, api_key: str | None = None,
                 tls: bool = False, root_cert: str | Path | None = None):
        self._channel = (grpc.aio.secure_channel(target, _credentials(root_cert), _OPTIONS)
                         if tls or root_cert else grpc.aio.insecure_channel(target, _OPTIONS))
        self._md = _metadata(api_key)
        self._chat = pb_grpc.ChatServiceStub(self._channel)
        self._memory = pb_grpc.MemoryServiceStub(self._channel)
        self._admin = pb_grpc.AdminServiceStub(self._channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    # ---- sessions

    @_rpc_errors
    async def create_session(self, user: str = "", system_prompt: str = "") -> Session:
        req = pb.CreateSessionRequest(user=user, system_prompt=system_prompt)
        return Session.from_pb(await self._chat.CreateSession(req, metadata=self._md))

    @_rpc_errors
    async def get_session(self, session_id: str, include_transcript: bool = False) -> Session:
        req = pb.GetSessionRequest(session_id=session_id, include_transcript=include_transcript)
        return Session.from_pb(await self._chat.GetSession(req, metadata=self._md))

    @_rpc_errors
    async def end_session(self, session_id: str, consolidate: bool = True) -> tuple[Session, bool]:
        req = pb.EndSessionRequest(session_id=session_id, skip_consolidation=not consolidate)
        r = await self._chat.EndSession(req, metadata=self._md)
        return Session.from_pb(r.session), r.consolidation_enqueued

    async def chat(self, session_id: str, message: str,
                   sampling: Sampling | None = None) -> AsyncIterator[Token | TurnResult]:
        """Yields Tokens as they are decoded, then the TurnResult."""
        call = self._chat.Chat(_chat_request(session_id, message, sampling), metadata=self._md)
        try:
            async for ev in call:
                yield chat_event(ev)
        except grpc.RpcError as err:
            raise NsamError.from_rpc(err) from None
        finally:
            call.cancel()  # no-op once finished; stops the turn if the caller broke off

    async def send(self, session_id: str, message: str,
                   sampling: Sampling | None = None) -> TurnResult:
        """One whole turn; returns its result."""
        result: TurnResult | None = None
        async for item in self.chat(session_id, message, sampling):
            if isinstance(item, TurnResult):
                result = item
        return _finished(result)

    @_rpc_errors
    async def read_document(self, session_id: str, text: str) -> DocumentRead:
        """Reads a long text into the session's memory (no reply; not in the transcript)."""
        req = pb.ReadDocumentRequest(session_id=session_id, text=text)
        return DocumentRead.from_pb(await self._chat.ReadDocument(req, metadata=self._md))

    # ---- memory

    @_rpc_errors
    async def memory(self, user: str = "") -> MemoryInfo:
        return MemoryInfo.from_pb(await self._memory.GetMemory(pb.GetMemoryRequest(user=user),
                                                               metadata=self._md))

    @_rpc_errors
    async def export_memory(self, user: str = "", version: int | None = None) -> ExportedMemory:
        return _exported(await self._memory.ExportMemory(_export_request(user, version),
                                                         metadata=self._md))

    @_rpc_errors
    async def import_memory(self, state: bytes, user: str = "",
                            expected_version: int | None = None) -> MemoryVersion:
        r = await self._memory.ImportMemory(_import_request(user, state, expected_version),
                                            metadata=self._md)
        return MemoryVersion.from_pb(r)

    @_rpc_errors
    async def rollback(self, version: int, user: str = "") -> MemoryVersion:
        r = await self._memory.RollbackMemory(pb.RollbackMemoryRequest(user=user, version=version),
                                              metadata=self._md)
        return MemoryVersion.from_pb(r)

    @_rpc_errors
    async def forget(self, user: str = "") -> int:
        r = await self._memory.ForgetUser(pb.ForgetUserRequest(user=user), metadata=self._md)
        return r.keys_deleted

    # ---- admin

    @_rpc_errors
    async def consolidate_now(self, user: str = "", session_id: str = "") -> list[ConsolidationResult]:
        r = await self._admin.ConsolidateNow(
            pb.ConsolidateNowRequest(user=user, session_id=session_id), metadata=self._md)
        return [ConsolidationResult.from_pb(x) for x in r.results]

    @_rpc_errors
    async def memory_health(self) -> MemoryHealth:
        return MemoryHealth.from_pb(await self._admin.GetMemoryHealth(
            pb.GetMemoryHealthRequest(), metadata=self._md))


class Client:
    """The blocking twin of AsyncClient (same methods, same dataclasses)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, api_key: str | None = None,
                 tls: bool = False, root_cert: str | Path | None = None):
        self._channel = (grpc.secure_channel(target, _credentials(root_cert), _OPTIONS)
                         if tls or root_cert else grpc.insecure_channel(target, _OPTIONS))
        self._md = _metadata(api_key)
        self._chat = pb_grpc.ChatServiceStub(self._channel)
        self._memory = pb_grpc.MemoryServiceStub(self._channel)
        self._admin = pb_grpc.AdminServiceStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @_sync_rpc_errors
    def create_session(self, user: str = "", system_prompt: str = "") -> Session:
        req = pb.CreateSessionRequest(user=user, system_prompt=system_prompt)
        return Session.from_pb(self._chat.CreateSession(req, metadata=self._md))

    @_sync_rpc_errors
    def get_session(self, session_id: str, include_transcript: bool = False) -> Session:
        req = pb.GetSessionRequest(session_id=session_id, include_transcript=include_transcript)
        return Session.from_pb(self._chat.GetSession(req, metadata=self._md))

    @_sync_rpc_errors
    def end_session(self, session_id: str, consolidate: bool = True) -> tuple[Session, bool]:
        req = pb.EndSessionRequest(session_id=session_id, skip_consolidation=not consolidate)
        r = self._chat.EndSession(req, metadata=self._md)
        return Session.from_pb(r.session), r.consolidation_enqueued

    def chat(self, session_id: str, message: str,
             sampling: Sampling | None = None) -> Iterator[Token | TurnResult]:
        call = self._chat.Chat(_chat_request(session_id, message, sampling), metadata=self._md)
        try:
            for ev in call:
                yield chat_event(ev)
        except grpc.RpcError as err:
            raise NsamError.from_rpc(err) from None
        finally:
            call.cancel()

    def send(self, session_id: str, message: str, sampling: Sampling | None = None) -> TurnResult:
        result: TurnResult | None = None
        for item in self.chat(session_id, message, sampling):
            if isinstance(item, TurnResult):
                result = item
        return _finished(result)

    @_sync_rpc_errors
    def read_document(self, session_id: str, text: str) -> DocumentRead:
        req = pb.ReadDocumentRequest(session_id=session_id, text=text)
        return DocumentRead.from_pb(self._chat.ReadDocument(req, metadata=self._md))

    @_sync_rpc_errors
    def memory(self, user: str = "") -> MemoryInfo:
        return MemoryInfo.from_pb(self._memory.GetMemory(pb.GetMemoryRequest(user=user),
                                                         metadata=self._md))

    @_sync_rpc_errors
    def export_memory(self, user: str = "", version: int | None = None) -> ExportedMemory:
        return _exported(self._memory.ExportMemory(_export_request(user, version), metadata=self._md))

    @_sync_rpc_errors
    def import_memory(self, state: bytes, user: str = "",
                      expected_version: int | None = None) -> MemoryVersion:
        return MemoryVersion.from_pb(self._memory.ImportMemory(
            _import_request(user, state, expected_version), metadata=self._md))

    @_sync_rpc_errors
    def rollback(self, version: int, user: str = "") -> MemoryVersion:
        return MemoryVersion.from_pb(self._memory.RollbackMemory(
            pb.RollbackMemoryRequest(user=user, version=version), metadata=self._md))

    @_sync_rpc_errors
    def forget(self, user: str = "") -> int:
        return self._memory.ForgetUser(pb.ForgetUserRequest(user=user), metadata=self._md).keys_deleted

    @_sync_rpc_errors
    def consolidate_now(self, user: str = "", session_id: str = "") -> list[ConsolidationResult]:
        r = self._admin.ConsolidateNow(pb.ConsolidateNowRequest(user=user, session_id=session_id),
                                       metadata=self._md)
        return [ConsolidationResult.from_pb(x) for x in r.results]

    @_sync_rpc_errors
    def memory_health(self) -> MemoryHealth:
        return MemoryHealth.from_pb(self._admin.GetMemoryHealth(pb.GetMemoryHealthRequest(),
                                                                metadata=self._md))

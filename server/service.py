"""The gRPC edge: typed servicers that authenticate, convert protobuf to dataclasses, call the
Engine and convert the result back. No logic lives here beyond who may call what; errors are
raised as `ServiceError`s and mapped to status codes by `errors.StatusInterceptor`.
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

import grpc

from nsam.protos import nsam_pb2 as pb
from nsam.protos import nsam_pb2_grpc as pb_grpc
from nsam.server.auth import ApiKeys, Principal
from nsam.server.bounds import check_state_size, check_text
from nsam.server.engine import Engine, TurnDone
from nsam.server.store import LevelVersion, SessionRecord, split_session_id

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
           "cancelled": pb.FINISH_REASON_CANCELLED}


# --------------------------------------------------------------------------- conversions

def session_pb(s: SessionRecord, with_transcript: bool = False) -> pb.Session:
    return pb.Session(
        session_id=s.session_id, user=s.user, version=s.version,
        user_memory_version=s.user_version, turns=s.turns, ended=s.ended,
        created_unix_ms=s.created_ms, updated_unix_ms=s.updated_ms, state_bytes=s.state_bytes,
        learnt_turns=s.learnt_turns if s.learnt_turns is not None else s.turns,
        transcript=[pb.Message(role=m["role"], content=m["content"]) for m in s.transcript]
        if with_transcript else [])


def version_pb(v: LevelVersion) -> pb.MemoryVersion:
    return pb.MemoryVersion(version=v.version, created_unix_ms=v.created_ms, source=v.source,
                            state_bytes=v.state_bytes)


def sampling_from_pb(msg: pb.SamplingParams, default_max_tokens: int):
    from nsam.model.runtime import SamplingParams
    return SamplingParams(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else default_max_tokens,
        temperature=msg.temperature if msg.HasField("temperature") else 0.0,
        top_k=msg.top_k if msg.HasField("top_k") else 0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids))


def done_pb(d: TurnDone) -> pb.ChatEvent:
    return pb.ChatEvent(done=pb.TurnDone(
        finish_reason=_FINISH.get(d.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(prompt_tokens=d.prompt_tokens, completion_tokens=d.completion_tokens,
                       total_tokens=d.prompt_tokens + d.completion_tokens),
        session_version=d.session_version, user_memory_version=d.user_memory_version,
        learned=d.learned, text=d.text, learnt_turns=d.learnt_turns))


# --------------------------------------------------------------------------- servicers

class _Edge:
    def __init__(self, engine: Engine, keys: ApiKeys):
        self.engine = engine
        self.keys = keys

    def caller(self, context: grpc.aio.ServicerContext) -> Principal:
        return self.keys.principal(context.invocation_metadata())

    def session_owner(self, context: grpc.aio.ServicerContext, session_id: str) -> str:
        """Checks the caller may reach the session; returns the session id."""
        self.caller(context).require_user(split_session_id(session_id))
        return session_id


class ChatService(_Edge, pb_grpc.ChatServiceServicer):
    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.Session:
        user = self.caller(context).resolve_user(request.user)
        system = check_text("system_prompt", request.system_prompt, self.engine.limits,
                            required=False)
        return session_pb(await self.engine.create_session(user, system))

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.Session:
        sid = self.session_owner(context, request.session_id)
        session = await self.engine.get_session(sid, request.include_transcript)
        return session_pb(session, request.include_transcript)

    async def EndSession(self, request: pb.EndSessionRequest, context) -> pb.EndSessionResponse:
        sid = self.session_owner(context, request.session_id)
        session, enqueued = await self.engine.end_session(sid, not request.skip_consolidation)
        return pb.EndSessionResponse(session=session_pb(session), consolidation_enqueued=enqueued)

    async def Chat(self, request: pb.ChatRequest, context) -> AsyncIterator[pb.ChatEvent]:
        sid = self.session_owner(context, request.session_id)
        message = check_text("message", request.message, self.engine.limits, required=True)
        params = sampling_from_pb(request.sampling, self.engine.limits.default_max_tokens)
        async with contextlib.aclosing(self.engine.chat(sid, message, params)) as events:
            async for item in events:
                if isinstance(item, TurnDone):
                    yield done_pb(item)
                else:
                    yield pb.ChatEvent(token=pb.TokenDelta(text=item.text, token_id=item.token_id))

    async def ReadDocument(self, request: pb.ReadDocumentRequest, context) -> pb.ReadDocumentResponse:
        sid = self.session_owner(context, request.session_id)
        text = check_text("text", request.text, self.engine.limits, required=True,
                          max_chars=self.engine.limits.max_document_chars)
        read = await self.engine.read_document(sid, text)
        return pb.ReadDocumentResponse(session_version=read.session_version, tokens=read.tokens,
                                       chunks=read.chunks, perplexity=read.perplexity,
                                       rejected_updates=read.rejected_updates)


class MemoryService(_Edge, pb_grpc.MemoryServiceServicer):
    async def GetMemory(self, request: pb.GetMemoryRequest, context) -> pb.MemoryInfo:
        user = self.caller(context).resolve_user(request.user)
        view = await self.engine.memory(user)
        levels = [pb.LevelInfo(name="user", owner=user, version=view.version,
                               state_bytes=view.versions[0].state_bytes if view.versions else 0,
                               updated_unix_ms=view.versions[0].created_ms if view.versions else 0)]
        levels += [pb.LevelInfo(name="session", owner=s.session_id, version=s.version,
                                state_bytes=s.state_bytes, updated_unix_ms=s.updated_ms)
                   for s in view.sessions]
        return pb.MemoryInfo(user=user, version=view.version, levels=levels,
                             versions=[version_pb(v) for v in view.versions],
                             model_fingerprint=view.fingerprint,
                             facts=[pb.RememberedFact(key=n.frame, value=n.value, answer=n.answer)
                                    for n in view.notes])

    async def ExportMemory(self, request: pb.ExportMemoryRequest, context) -> pb.ExportMemoryResponse:
        user = self.caller(context).resolve_user(request.user)
        version = request.version if request.HasField("version") else None
        version, state = await self.engine.export_memory(user, version)
        return pb.ExportMemoryResponse(version=version, state=state,
                                       model_fingerprint=self.engine.model.fingerprint)

    async def ImportMemory(self, request: pb.ImportMemoryRequest, context) -> pb.MemoryVersion:
        user = self.caller(context).resolve_user(request.user)
        data = check_state_size("state", request.state, self.engine.limits)
        expected = request.expected_version if request.HasField("expected_version") else None
        return version_pb(await self.engine.import_memory(user, data, expected))

    async def RollbackMemory(self, request: pb.RollbackMemoryRequest, context) -> pb.MemoryVersion:
        user = self.caller(context).resolve_user(request.user)
        return version_pb(await self.engine.rollback(user, request.version))

    async def ForgetUser(self, request: pb.ForgetUserRequest, context) -> pb.ForgetUserResponse:
        user = self.caller(context).resolve_user(request.user)
        return pb.ForgetUserResponse(keys_deleted=await self.engine.forget(user))


class AdminService(_Edge, pb_grpc.AdminServiceServicer):
    async def ConsolidateNow(self, request: pb.ConsolidateNowRequest, context) -> pb.ConsolidateNowResponse:
        caller = self.caller(context)
        caller.require_admin()
        sid = request.session_id or None
        user = split_session_id(sid) if sid else caller.resolve_user(request.user)
        outcomes = await self.engine.consolidate_now(user, sid)
        return pb.ConsolidateNowResponse(results=[pb.ConsolidationResult(
            session_id=o.session_id, outcome=o.outcome, reason=o.reason,
            probe_loss=o.probe_loss, baseline_probe_loss=o.baseline_probe_loss,
            update_norm=o.update_norm, drift=o.drift, seconds=o.seconds,
            user_memory_version=o.user_memory_version) for o in outcomes])

    async def GetMemoryHealth(self, request: pb.GetMemoryHealthRequest, context) -> pb.MemoryHealth:
        self.caller(context).require_admin()
        h = await self.engine.health()
        return pb.MemoryHealth(
            queue_depth=h.queue.depth, pending=h.queue.pending,
            oldest_job_age_seconds=h.queue.oldest_age_s, jobs_by_outcome=h.queue.outcomes,
            last_probe_loss=h.queue.last_probe_loss, baseline_probe_loss=h.queue.baseline_probe_loss,
            learning=h.learning,
            levels=[pb.LevelHealth(
                level=name, updates=l.updates, rejected=l.rejected,
                mean_surprise=l.surprise_sum / max(1, l.updates + l.rejected),
                mean_update_norm=l.update_norm_sum / max(1, l.updates),
                last_state_norm=l.last_state_norm, last_drift=l.last_drift)
                for name, l in sorted(h.levels.items())])

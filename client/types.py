"""Plain dataclasses the clients return, and their conversion from the wire types.

Protobuf never leaves the client: callers see these frozen dataclasses only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from nsam.protos import nsam_pb2 as pb

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
           pb.FINISH_REASON_CANCELLED: "cancelled"}


class NsamError(Exception):
    """A failed call: the gRPC status code and the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> "NsamError":
        return cls(err.code(), err.details() or "")


@dataclass(frozen=True)
class Sampling:
    """Sampling options; None leaves a field to the server's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def to_pb(self) -> pb.SamplingParams:
        msg = pb.SamplingParams(stop=list(self.stop), stop_token_ids=list(self.stop_token_ids))
        for name in ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
            value = getattr(self, name)
            if value is not None:
                setattr(msg, name, value)
        return msg


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Session:
    session_id: str
    user: str
    version: int
    user_memory_version: int
    turns: int
    ended: bool
    created_unix_ms: int
    updated_unix_ms: int
    state_bytes: int
    transcript: tuple[Message, ...] = ()
    learnt_turns: int = 0  # chat turns the medium level has learnt (the rest are pending)

    @classmethod
    def from_pb(cls, m: pb.Session) -> "Session":
        return cls(m.session_id, m.user, m.version, m.user_memory_version, m.turns, m.ended,
                   m.created_unix_ms, m.updated_unix_ms, m.state_bytes,
                   tuple(Message(x.role, x.content) for x in m.transcript), m.learnt_turns)


@dataclass(frozen=True)
class Token:
    """One streamed token: its id and the newly decodable text (may be empty)."""

    text: str
    token_id: int


@dataclass(frozen=True)
class TurnResult:
    """The end of a turn, after the server committed it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    session_version: int
    user_memory_version: int
    learned: bool  # its medium update is queued (it commits after the turn)
    learnt_turns: int = 0  # chat turns learnt into the medium level the turn decoded with

    @classmethod
    def from_pb(cls, d: pb.TurnDone) -> "TurnResult":
        return cls(d.text, _FINISH.get(d.finish_reason, "unspecified"), d.usage.prompt_tokens,
                   d.usage.completion_tokens, d.session_version, d.user_memory_version, d.learned,
                   d.learnt_turns)


@dataclass(frozen=True)
class DocumentRead:
    """A document read into a session's memory, after the server committed it."""

    session_version: int
    tokens: int
    chunks: int
    perplexity: float  # of the text as read, each chunk with the memory the chunks before left
    rejected_updates: int

    @classmethod
    def from_pb(cls, r: pb.ReadDocumentResponse) -> "DocumentRead":
        return cls(r.session_version, r.tokens, r.chunks, r.perplexity, r.rejected_updates)


def chat_event(ev: pb.ChatEvent) -> Token | TurnResult:
    if ev.HasField("done"):
        return TurnResult.from_pb(ev.done)
    return Token(ev.token.text, ev.token.token_id)


@dataclass(frozen=True)
class MemoryVersion:
    version: int
    created_unix_ms: int
    source: str
    state_bytes: int

    @classmethod
    def from_pb(cls, m: pb.MemoryVersion) -> "MemoryVersion":
        return cls(m.version, m.created_unix_ms, m.source, m.state_bytes)


@dataclass(frozen=True)
class LevelInfo:
    name: str
    owner: str
    version: int
    state_bytes: int
    updated_unix_ms: int


@dataclass(frozen=True)
class RememberedFact:
    key: str       # "sister's name"
    value: str     # "Olvena"
    answer: str    # "Your sister's name is Olvena."


@dataclass(frozen=True)
class MemoryInfo:
    user: str
    version: int
    versions: tuple[MemoryVersion, ...]
    levels: tuple[LevelInfo, ...]
    model_fingerprint: str
    facts: tuple[RememberedFact, ...] = ()  # what the user level was taught, oldest first

    @classmethod
    def from_pb(cls, m: pb.MemoryInfo) -> "MemoryInfo":
        return cls(m.user, m.version, tuple(MemoryVersion.from_pb(v) for v in m.versions),
                   tuple(LevelInfo(x.name, x.owner, x.version, x.state_bytes, x.updated_unix_ms)
                         for x in m.levels), m.model_fingerprint,
                   tuple(RememberedFact(f.key, f.value, f.answer) for f in m.facts))


@dataclass(frozen=True)
class ExportedMemory:
    version: int
    state: bytes          # safetensors
    model_fingerprint: str


@dataclass(frozen=True)
class ConsolidationResult:
    session_id: str
    outcome: str
    reason: str
    probe_loss: float
    baseline_probe_loss: float
    update_norm: float
    drift: float
    seconds: float
    user_memory_version: int

    @classmethod
    def from_pb(cls, m: pb.ConsolidationResult) -> "ConsolidationResult":
        return cls(m.session_id, m.outcome, m.reason, m.probe_loss, m.baseline_probe_loss,
                   m.update_norm, m.drift, m.seconds, m.user_memory_version)


@dataclass(frozen=True)
class LevelHealth:
    level: str
    updates: int
    rejected: int
    mean_surprise: float
    mean_update_norm: float
    last_state_norm: float
    last_drift: float


@dataclass(frozen=True)
class MemoryHealth:
    queue_depth: int
    pending: int
    oldest_job_age_seconds: float
    jobs_by_outcome: dict[str, int]
    last_probe_loss: float
    baseline_probe_loss: float
    learning: bool
    levels: tuple[LevelHealth, ...] = field(default=())

    @classmethod
    def from_pb(cls, m: pb.MemoryHealth) -> "MemoryHealth":
        return cls(m.queue_depth, m.pending, m.oldest_job_age_seconds, dict(m.jobs_by_outcome),
                   m.last_probe_loss, m.baseline_probe_loss, m.learning,
                   tuple(LevelHealth(x.level, x.updates, x.rejected, x.mean_surprise,
                                     x.mean_update_norm, x.last_state_norm, x.last_drift)
                         for x in m.levels))

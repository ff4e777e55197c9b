from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason

class Message(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "user", "version", "user_memory_version", "turns", "ended", "created_unix_ms", "updated_unix_ms", "state_bytes", "transcript", "learnt_turns")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    USER_MEMORY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    LEARNT_TURNS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    user: str
    version: int
    user_memory_version: int
    turns: int
    ended: bool
    created_unix_ms: int
    updated_unix_ms: int
    state_bytes: int
    transcript: _containers.RepeatedCompositeFieldContainer[Message]
    learnt_turns: int
    def __init__(self, session_id: _Optional[str] = ..., user: _Optional[str] = ..., version: _Optional[int] = ..., user_memory_version: _Optional[int] = ..., turns: _Optional[int] = ..., ended: _Optional[bool] = ..., created_unix_ms: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ..., state_bytes: _Optional[int] = ..., transcript: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., learnt_turns: _Optional[int] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("user", "system_prompt")
    USER_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    user: str
    system_prompt: str
    def __init__(self, user: _Optional[str] = ..., system_prompt: _Optional[str] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id", "include_transcript")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    include_transcript: bool
    def __init__(self, session_id: _Optional[str] = ..., include_transcript: _Optional[bool] = ...) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ("session_id", "skip_consolidation")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SKIP_CONSOLIDATION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    skip_consolidation: bool
    def __init__(self, session_id: _Optional[str] = ..., skip_consolidation: _Optional[bool] = ...) -> None: ...

class EndSessionResponse(_message.Message):
    __slots__ = ("session", "consolidation_enqueued")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CONSOLIDATION_ENQUEUED_FIELD_NUMBER: _ClassVar[int]
    session: Session
    consolidation_enqueued: bool
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., consolidation_enqueued: _Optional[bool] = ...) -> None: ...

class ReadDocumentRequest(_message.Message):
    __slots__ = ("session_id", "text")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class ReadDocumentResponse(_message.Message):
    __slots__ = ("session_version", "tokens", "chunks", "perplexity", "rejected_updates")
    SESSION_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    REJECTED_UPDATES_FIELD_NUMBER: _ClassVar[int]
    session_version: int
    tokens: int
    chunks: int
    perplexity: float
    rejected_updates: int
    def __init__(self, session_version: _Optional[int] = ..., tokens: _Optional[int] = ..., chunks: _Optional[int] = ..., perplexity: _Optional[float] = ..., rejected_updates: _Optional[int] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop", "stop_token_ids")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("session_id", "message", "sampling")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    message: str
    sampling: SamplingParams
    def __init__(self, session_id: _Optional[str] = ..., message: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("text", "token_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_id: int
    def __init__(self, text: _Optional[str] = ..., token_id: _Optional[int] = ...) -> None: ...

class TurnDone(_message.Message):
    __slots__ = ("finish_reason", "usage", "session_version", "user_memory_version", "learned", "text", "learnt_turns")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SESSION_VERSION_FIELD_NUMBER: _ClassVar[int]
    USER_MEMORY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LEARNED_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LEARNT_TURNS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    usage: Usage
    session_version: int
    user_memory_version: int
    learned: bool
    text: str
    learnt_turns: int
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., session_version: _Optional[int] = ..., user_memory_version: _Optional[int] = ..., learned: _Optional[bool] = ..., text: _Optional[str] = ..., learnt_turns: _Optional[int] = ...) -> None: ...

class ChatEvent(_message.Message):
    __slots__ = ("token", "done")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    token: TokenDelta
    done: TurnDone
    def __init__(self, token: _Optional[_Union[TokenDelta, _Mapping]] = ..., done: _Optional[_Union[TurnDone, _Mapping]] = ...) -> None: ...

class GetMemoryRequest(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: str
    def __init__(self, user: _Optional[str] = ...) -> None: ...

class MemoryVersion(_message.Message):
    __slots__ = ("version", "created_unix_ms", "source", "state_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    created_unix_ms: int
    source: str
    state_bytes: int
    def __init__(self, version: _Optional[int] = ..., created_unix_ms: _Optional[int] = ..., source: _Optional[str] = ..., state_bytes: _Optional[int] = ...) -> None: ...

class LevelInfo(_message.Message):
    __slots__ = ("name", "owner", "version", "state_bytes", "updated_unix_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    owner: str
    version: int
    state_bytes: int
    updated_unix_ms: int
    def __init__(self, name: _Optional[str] = ..., owner: _Optional[str] = ..., version: _Optional[int] = ..., state_bytes: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ...) -> None: ...

class RememberedFact(_message.Message):
    __slots__ = ("key", "value", "answer")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    answer: str
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ..., answer: _Optional[str] = ...) -> None: ...

class MemoryInfo(_message.Message):
    __slots__ = ("user", "version", "versions", "levels", "model_fingerprint", "facts")
    USER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    user: str
    version: int
    versions: _containers.RepeatedCompositeFieldContainer[MemoryVersion]
    levels: _containers.RepeatedCompositeFieldContainer[LevelInfo]
    model_fingerprint: str
    facts: _containers.RepeatedCompositeFieldContainer[RememberedFact]
    def __init__(self, user: _Optional[str] = ..., version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[MemoryVersion, _Mapping]]] = ..., levels: _Optional[_Iterable[_Union[LevelInfo, _Mapping]]] = ..., model_fingerprint: _Optional[str] = ..., facts: _Optional[_Iterable[_Union[RememberedFact, _Mapping]]] = ...) -> None: ...

class ExportMemoryRequest(_message.Message):
    __slots__ = ("user", "version")
    USER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    user: str
    version: int
    def __init__(self, user: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ExportMemoryResponse(_message.Message):
    __slots__ = ("version", "state", "model_fingerprint")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: bytes
    model_fingerprint: str
    def __init__(self, version: _Optional[int] = ..., state: _Optional[bytes] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class ImportMemoryRequest(_message.Message):
    __slots__ = ("user", "state", "expected_version")
    USER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    user: str
    state: bytes
    expected_version: int
    def __init__(self, user: _Optional[str] = ..., state: _Optional[bytes] = ..., expected_version: _Optional[int] = ...) -> None: ...

class RollbackMemoryRequest(_message.Message):
    __slots__ = ("user", "version")
    USER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    user: str
    version: int
    def __init__(self, user: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ForgetUserRequest(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: str
    def __init__(self, user: _Optional[str] = ...) -> None: ...

class ForgetUserResponse(_message.Message):
    __slots__ = ("keys_deleted",)
    KEYS_DELETED_FIELD_NUMBER: _ClassVar[int]
    keys_deleted: int
    def __init__(self, keys_deleted: _Optional[int] = ...) -> None: ...

class ConsolidateNowRequest(_message.Message):
    __slots__ = ("user", "session_id")
    USER_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    user: str
    session_id: str
    def __init__(self, user: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class ConsolidationResult(_message.Message):
    __slots__ = ("session_id", "outcome", "reason", "probe_loss", "baseline_probe_loss", "update_norm", "drift", "seconds", "user_memory_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PROBE_LOSS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_PROBE_LOSS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    USER_MEMORY_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    outcome: str
    reason: str
    probe_loss: float
    baseline_probe_loss: float
    update_norm: float
    drift: float
    seconds: float
    user_memory_version: int
    def __init__(self, session_id: _Optional[str] = ..., outcome: _Optional[str] = ..., reason: _Optional[str] = ..., probe_loss: _Optional[float] = ..., baseline_probe_loss: _Optional[float] = ..., update_norm: _Optional[float] = ..., drift: _Optional[float] = ..., seconds: _Optional[float] = ..., user_memory_version: _Optional[int] = ...) -> None: ...

class ConsolidateNowResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ConsolidationResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ConsolidationResult, _Mapping]]] = ...) -> None: ...

class GetMemoryHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LevelHealth(_message.Message):
    __slots__ = ("level", "updates", "rejected", "mean_surprise", "mean_update_norm", "last_state_norm", "last_drift")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    MEAN_SURPRISE_FIELD_NUMBER: _ClassVar[int]
    MEAN_UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    LAST_STATE_NORM_FIELD_NUMBER: _ClassVar[int]
    LAST_DRIFT_FIELD_NUMBER: _ClassVar[int]
    level: str
    updates: int
    rejected: int
    mean_surprise: float
    mean_update_norm: float
    last_state_norm: float
    last_drift: float
    def __init__(self, level: _Optional[str] = ..., updates: _Optional[int] = ..., rejected: _Optional[int] = ..., mean_surprise: _Optional[float] = ..., mean_update_norm: _Optional[float] = ..., last_state_norm: _Optional[float] = ..., last_drift: _Optional[float] = ...) -> None: ...

class MemoryHealth(_message.Message):
    __slots__ = ("queue_depth", "pending", "oldest_job_age_seconds", "jobs_by_outcome", "last_probe_loss", "baseline_probe_loss", "levels", "learning")
    class JobsByOutcomeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    OLDEST_JOB_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    JOBS_BY_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    LAST_PROBE_LOSS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_PROBE_LOSS_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_FIELD_NUMBER: _ClassVar[int]
    queue_depth: int
    pending: int
    oldest_job_age_seconds: float
    jobs_by_outcome: _containers.ScalarMap[str, int]
    last_probe_loss: float
    baseline_probe_loss: float
    levels: _containers.RepeatedCompositeFieldContainer[LevelHealth]
    learning: bool
    def __init__(self, queue_depth: _Optional[int] = ..., pending: _Optional[int] = ..., oldest_job_age_seconds: _Optional[float] = ..., jobs_by_outcome: _Optional[_Mapping[str, int]] = ..., last_probe_loss: _Optional[float] = ..., baseline_probe_loss: _Optional[float] = ..., levels: _Optional[_Iterable[_Union[LevelHealth, _Mapping]]] = ..., learning: _Optional[bool] = ...) -> None: ...

"""The plain records the state store (`store.py`) returns: sessions, user-level versions,
consolidation jobs and queue figures. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    user: str
    version: int
    user_version: int
    turns: int
    ended: bool
    created_ms: int
    updated_ms: int
    state_bytes: int
    consolidated_version: int
    transcript: list[dict[str, str]] = field(default_factory=list)
    state: bytes | None = None     # only when loaded with_state
    learnt_turns: int | None = None  # chat turns in the state's medium level (None: stored before counting)

    @property
    def user_turns(self) -> int:
        """Chat turns in the transcript (loaded with it): what the medium level should learn."""
        return sum(m["role"] == "user" for m in self.transcript)


@dataclass(frozen=True)
class LevelVersion:
    version: int
    created_ms: int
    source: str
    state_bytes: int


@dataclass(frozen=True)
class UserLevel:
    version: int
    state: bytes
    created_ms: int
    source: str


@dataclass(frozen=True)
class Job:
    job_id: str
    user: str
    session_id: str
    session_version: int
    enqueued_ms: int


@dataclass(frozen=True)
class QueueStats:
    depth: int
    pending: int
    oldest_age_s: float
    outcomes: dict[str, int]
    last_probe_loss: float
    baseline_probe_loss: float

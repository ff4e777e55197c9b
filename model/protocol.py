"""The seam between the service and the model: what `nsam.server` may call on a model.

`ServingModel` is the model as the server sees it (`runtime.NsamModel` is the implementation);
`DecodeBatch` is the continuous batch it hands out (`runtime.SessionBatch`). Both speak token
ids, state bytes and small dataclasses, never tensors. Pure typing: this module does no I/O
and imports nothing at run time, so the server can depend on it without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from nsam.model.runtime import (ConsolidationReport, DocumentChunk, LevelReport, Note, NsamModel,
                                    SamplingParams, TokenEvent)

Messages = list[dict[str, str]]  # chat messages: {"role": ..., "content": ...}


class DecodeBatch(Protocol):
    """Continuous batching over sessions: add turns, step them together, take each state back."""

    def add(self, request_id: str, prompt_ids: list[int], session_state: bytes, params: SamplingParams,
            fresh_tokens: int | None = None) -> None:
        """Starts a turn; `fresh_tokens`: the prompt's trailing tokens new to the session."""

    def step(self) -> list[TokenEvent]:
        """One decode step of every running turn (prefilling the ones just added)."""

    def has_work(self) -> bool: ...

    def cancel(self, request_id: str) -> None: ...

    def pop_state(self, request_id: str) -> tuple[bytes, list[LevelReport]]:
        """After a turn finished: its session state with the fast level's writes."""


class ServingModel(Protocol):
    """Everything the server may call on the model. Not thread-safe: one thread at a time."""

    fingerprint: str  # what a state must have been written for
    context_window: int  # tokens of prompt plus reply

    def count_tokens(self, text: str) -> int: ...

    def encode_turn(self, messages: Messages, max_prompt_tokens: int) -> tuple[list[int], int]:
        """The prompt's ids and how many trailing ones are new since the session's last turn."""

    def new_user_state(self) -> bytes: ...

    def new_session_state(self, user_state: bytes | None) -> bytes: ...

    def check_state(self, data: bytes, kind: str) -> None:
        """Raises `StateError` unless `data` is a readable state of `kind` ("user" | "session")."""

    def user_notes(self, user_state: bytes) -> list[Note]:
        """What the user level was taught, oldest first."""

    def generator(self, max_batch: int, learning: bool = True) -> DecodeBatch: ...

    def update_medium(self, session_state: bytes, messages: Messages, turns: int = 1
                      ) -> tuple[bytes, list[LevelReport]]:
        """After a reply: the session state with the medium level updated on the last `turns` turns."""

    def merge_medium(self, latest: bytes, updated: bytes) -> bytes:
        """`latest` with the medium level and the notes of `updated` (pure: state bytes in and out)."""

    def document_chunks(self, text: str) -> list[list[int]]: ...

    def read_document_chunk(self, session_state: bytes, ids: list[int]) -> tuple[bytes, DocumentChunk]: ...

    def consolidate(self, user_state: bytes, session_state: bytes, transcript: Messages,
                    should_stop: Callable[[], bool] | None = None) -> tuple[bytes, ConsolidationReport]:
        """A candidate user level from a session; the report says whether to keep it."""


if TYPE_CHECKING:
    def _implements(model: NsamModel) -> ServingModel:  # the type checker holds the two together
        return model

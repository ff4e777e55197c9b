"""Input bounds, checked before a request touches the model or the store.

Each check raises InvalidArgument naming the field, the allowed range and the value, so the
caller can fix the request without reading the server's source.
"""

from __future__ import annotations

import math
from typing import Any

from nsam.server.errors import InvalidArgument
from nsam.server.settings import Limits


def check_text(field: str, text: str, limits: Limits, *, required: bool, max_chars: int | None = None) -> str:
    """A chat message or system prompt (or, with `max_chars`, a longer text such as a document)."""
    most = limits.max_message_chars if max_chars is None else max_chars
    if required and not text.strip():
        raise InvalidArgument(f"{field}: must not be empty")
    if len(text) > most:
        raise InvalidArgument(f"{field}: {len(text)} characters; at most {most} are accepted")
    if "\x00" in text:
        raise InvalidArgument(f"{field}: must not contain NUL characters")
    return text


def _range(field: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise InvalidArgument(f"sampling.{field}: {value!r} is outside {bracket}{low}, {high}]")


def check_sampling(params: Any, limits: Limits, context_window: int) -> None:
    """Checks a SamplingParams against the server's limits and the model's window."""
    most = min(limits.max_new_tokens, context_window - 1)
    if not 1 <= params.max_tokens <= most:
        raise InvalidArgument(f"sampling.max_tokens: {params.max_tokens} is outside [1, {most}]")
    _range("temperature", params.temperature, 0.0, limits.max_temperature)
    if not 0 <= params.top_k <= limits.max_top_k:
        raise InvalidArgument(f"sampling.top_k: {params.top_k} is outside [0, {limits.max_top_k}] (0 = off)")
    _range("top_p", params.top_p, 0.0, 1.0, low_open=True)
    _range("repetition_penalty", params.repetition_penalty, 0.5, limits.max_repetition_penalty)
    if len(params.stop) > limits.max_stop_sequences:
        raise InvalidArgument(
            f"sampling.stop: {len(params.stop)} sequences; at most {limits.max_stop_sequences}")
    for s in params.stop:
        if not s or len(s) > limits.max_stop_chars:
            raise InvalidArgument(
                f"sampling.stop: each sequence needs 1-{limits.max_stop_chars} characters (got {len(s)})")
    if len(params.stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidArgument(
            f"sampling.stop_token_ids: {len(params.stop_token_ids)} ids; at most {limits.max_stop_token_ids}")
    try:
        params.validate()
    except ValueError as exc:
        raise InvalidArgument(f"sampling: {exc}") from exc


def check_state_size(field: str, data: bytes, limits: Limits) -> bytes:
    if not data:
        raise InvalidArgument(f"{field}: empty; pass the bytes returned by ExportMemory")
    if len(data) > limits.max_state_bytes:
        raise InvalidArgument(f"{field}: {len(data)} bytes; at most {limits.max_state_bytes}")
    return data

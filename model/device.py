"""Where the model runs: `on_device(model, device)` puts an `NsamModel` on a torch device and
hands it back as a `ServingModel` whose every call runs there.

The decode loop (`generation.Generator`) places its tensors on the model's device explicitly.
The learning code (medium updates, document reads, consolidation) builds its small tensors
(token ids, masks, level states read from bytes) with torch's factory functions, so the wrapper
makes the device torch's default around those calls, on the calling thread only (torch keeps the
default per thread: a CPU and a CUDA model can share a process). Level states are created on the
CPU (their seeded initial A comes from a CPU generator) and written from any device, so state
bytes are the same wherever the model runs. On the CPU `on_device` returns the model unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .protocol import DecodeBatch, ServingModel
    from .runtime import NsamModel


def parse_device(name: str) -> torch.device:
    """"cpu", "cuda", "cuda:1", ... as a torch device; a clear error when it is not usable here."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: use cpu or cuda[:N]") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this torch build or machine has no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: only cpu and cuda are supported")
    return device


def on_device(model: "NsamModel", device: str | torch.device) -> "ServingModel":
    """Moves the model's weights (and the fast level's projections) to `device`."""
    device = torch.device(device) if isinstance(device, str) else device
    if device.type == "cpu":
        return model
    model.model.to(device)
    if model.fast_params is not None:
        model.fast_params.to(device)
    return DeviceModel(model, device)


class DeviceModel:
    """`ServingModel` for an `NsamModel` whose weights sit on a non-CPU device."""

    def __init__(self, native: "NsamModel", device: torch.device):
        self.native, self.device = native, device
        self.fingerprint = native.fingerprint
        self.context_window = native.context_window

    @contextlib.contextmanager
    def _here(self) -> Iterator[None]:
        with torch.device(self.device):
            yield

    def _run(self, fn: Callable, *args):
        with self._here():
            return fn(*args)

    # -- no tensors, or states made on the CPU: as they are --------------------------------------
    def count_tokens(self, text):
        return self.native.count_tokens(text)

    def encode_turn(self, messages, max_prompt_tokens):
        return self.native.encode_turn(messages, max_prompt_tokens)

    def encode_chat(self, messages, max_prompt_tokens):
        return self.native.encode_chat(messages, max_prompt_tokens)

    def new_user_state(self):
        return self.native.new_user_state()

    def new_session_state(self, user_state):
        return self.native.new_session_state(user_state)

    def check_state(self, data, kind):
        return self.native.check_state(data, kind)

    def user_notes(self, user_state):
        return self.native.user_notes(user_state)

    def document_chunks(self, text):
        return self.native.document_chunks(text)

    def merge_medium(self, latest, updated):
        return self.native.merge_medium(latest, updated)

    # -- tensor work: on the device ----------------------------------------------------------------
    def generator(self, max_batch: int, learning: bool = True) -> "DecodeBatch":
        return DeviceBatch(self._run(self.native.generator, max_batch, learning), self.device)

    def update_medium(self, session_state, messages, turns=1):
        return self._run(self.native.update_medium, session_state, messages, turns)

    def read_document_chunk(self, session_state, ids):
        return self._run(self.native.read_document_chunk, session_state, ids)

    def consolidate(self, user_state, session_state, transcript, should_stop=None):
        return self._run(self.native.consolidate, user_state, session_state, transcript, should_stop)


class DeviceBatch:
    """`DecodeBatch` on a device: states are read onto it when a turn is added and compared there
    when it ends; `step` (the hot loop) places its own tensors and runs without the default."""

    def __init__(self, inner: "DecodeBatch", device: torch.device):
        self.inner, self.device = inner, device

    def add(self, request_id, prompt_ids, session_state, params, fresh_tokens=None, messages=None):
        with torch.device(self.device):
            self.inner.add(request_id, prompt_ids, session_state, params, fresh_tokens, messages)

    def step(self):
        return self.inner.step()

    def has_work(self) -> bool:
        return self.inner.has_work()

    def cancel(self, request_id: str) -> None:
        self.inner.cancel(request_id)

    def pop_state(self, request_id):
        with torch.device(self.device):
            return self.inner.pop_state(request_id)


def load_on(name: str, dtype: str, device: str) -> "ServingModel":
    """`NsamModel.load(name, dtype)` on `device`: what `nsam serve/consolidate/generate --device` run."""
    from .runtime import NsamModel

    return on_device(NsamModel.load(name, dtype), parse_device(device))

"""Continuous-batching generation over the backbone with per-sequence memory levels.

The `Generator` knows token ids, sampling and stop conditions; it knows nothing about
sessions, users or storage. Each request brings its prompt ids, its level states and its
sampling parameters; `step()` prefills newly added requests together (packed, no padding)
and decodes one token for every running request in one batched pass. It runs on the model's
device: the states it is given are moved there, and only the sampled token ids come back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .backbone import PackedLayout, Transformer
from .levels import (AssociativeState, BatchLevels, FastLevelRunner, FastMemory, LevelsConfig,
                     LoraState, stack_lora, state_from_tensors, state_tensors)
from .sampling import SamplingParams, sample_batch
from .tokenizer import StreamDecoder


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: int
    text: str  # newly decodable text, possibly ""
    finish_reason: str | None  # None while running, then "stop" | "length" | "cancelled"


@dataclass
class _Running:
    request_id: str
    slot: int
    prompt: list[int]
    params: SamplingParams
    lora: list[LoraState]
    fast: FastLevelRunner | None
    generator: torch.Generator | None
    decoder: StreamDecoder
    output: list[int] = field(default_factory=list)
    text: str = ""
    position: int = 0  # next cache position to write
    next_token: int | None = None
    finish_reason: str | None = None


class Generator:
    """Owned by one thread. `add` queues, `step` advances every request by one token."""

    def __init__(self, model: Transformer, tokenizer, levels: LevelsConfig | None,
                 fast_params: FastMemory | None, max_batch: int, max_seq: int,
                 learning: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.levels, self.fast_params = levels, fast_params
        self.learning = learning
        self.max_seq = max_seq
        self.device = model.embed_tokens.weight.device
        model.setup_caches(max_batch, max_seq)
        self.free_slots = list(range(max_batch))
        self.waiting: list[_Running] = []
        self.running: dict[str, _Running] = {}
        self.finished: dict[str, _Running] = {}
        self.cancelled: list[TokenEvent] = []  # events of requests cancelled before admission
        self.lora_specs = [s for s in (levels.levels if levels else ()) if s.rule == "lora"]
        self._stacked: tuple[tuple[_Running, ...], tuple] | None = None  # LoRA stacks of the last batch

    # -- requests ------------------------------------------------------------------------------
    def add(self, request_id: str, prompt_ids: list[int], levels: dict[str, object] | None,
            params: SamplingParams, fresh_tokens: int | None = None) -> None:
        """`levels` maps level name -> state (LoraState / AssociativeState); None = frozen.
        `fresh_tokens`: how many trailing prompt tokens are new to this session (the fast level
        writes only those; None: all)."""
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.max_seq:
            raise ValueError(f"prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) exceeds "
                             f"the context window of {self.max_seq} tokens")
        if request_id in self.running or any(r.request_id == request_id for r in self.waiting):
            raise ValueError(f"request {request_id!r} is already running")
        levels = {name: _to_device(state, self.device) for name, state in (levels or {}).items()}
        lora = [levels[s.name] for s in self.lora_specs if s.name in levels]
        if lora and len(lora) != len(self.lora_specs):
            raise ValueError("a request must bring every LoRA level or none")
        if all(state.is_empty for state in lora):
            lora = []  # B = 0 everywhere (a fresh user and session): the deltas are exactly zero
        fast = None
        fast_state = levels.get("fast")
        if isinstance(fast_state, AssociativeState) and self.fast_params is not None and self.learning:
            old = len(prompt_ids) - fresh_tokens if fresh_tokens is not None else 0
            # The history in the prompt was written by earlier turns and is still in view.
            fast = FastLevelRunner(self.fast_params, fast_state, read_only=max(0, old),
                                   in_context=max(0, old) if fresh_tokens is not None else None)
        gen = torch.Generator(self.device).manual_seed(params.seed) if params.seed is not None else None
        self.waiting.append(_Running(request_id, -1, list(prompt_ids), params, lora, fast, gen,
                                     StreamDecoder(self.tokenizer)))

    def cancel(self, request_id: str) -> None:
        for r in list(self.waiting):
            if r.request_id == request_id:
                self.waiting.remove(r)
                r.finish_reason = "cancelled"
                self.finished[request_id] = r
                self.cancelled.append(TokenEvent(request_id, -1, "", "cancelled"))
        if request_id in self.running:
            self.running[request_id].finish_reason = "cancelled"

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.cancelled)

    def pop_finished(self, request_id: str) -> tuple[list[int], FastLevelRunner | None]:
        """Output ids and the fast-level runner that wrote during the request (None: no fast level)."""
        r = self.finished.pop(request_id)
        return r.output, r.fast

    # -- the loop ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        events, self.cancelled = self.cancelled, []
        for r in [r for r in self.running.values() if r.finish_reason == "cancelled"]:
            events.append(self._retire(r, "cancelled"))
        admitted = []
        while self.waiting and self.free_slots:
            r = self.waiting.pop(0)
            r.slot = self.free_slots.pop(0)
            admitted.append(r)
        decoding = [r for r in self.running.values()]
        if decoding:
            self._decode(decoding)
        if admitted:
            self._prefill(admitted)
            for r in admitted:
                self.running[r.request_id] = r
        for r in decoding + admitted:
            events.append(self._emit(r))
        return events

    def _hooks(self, batch: list[_Running], layout: PackedLayout | None) -> BatchLevels | None:
        with_lora = [r for r in batch if r.lora]
        with_fast = [r for r in batch if r.fast is not None]
        if not with_lora and not with_fast:
            return None
        lora_layers, a, b, scale = {}, None, None, 1.0
        if with_lora:
            lora_layers, a, b, scale = self._stack_lora(batch, with_lora[0])
        fast_layers, runners = {}, None
        if with_fast:
            assert self.fast_params is not None
            fast_layers = {layer: i for i, layer in enumerate(self.fast_params.spec.layers)}
            runners = [r.fast if r.fast is not None else _NullRunner() for r in batch]
        return BatchLevels(lora_layers, a, b, fast_layers, runners, layout, scale)

    def _stack_lora(self, batch: list[_Running], example: _Running) -> tuple:
        """The batch's LoRA stacks in the model's dtype, reused while the batch is unchanged
        (decode steps between admissions and retirements): states do not change mid-request."""
        cached = self._stacked
        if cached is None or len(cached[0]) != len(batch) or any(x is not y for x, y in zip(cached[0], batch)):
            states = [r.lora if r.lora else [_zero_like(s) for s in example.lora] for r in batch]
            layers, a, b, scale = stack_lora(states, self.lora_specs)
            dtype = self.model.embed_tokens.weight.dtype
            cached = self._stacked = (tuple(batch), (layers, a.to(self.device, dtype), b.to(self.device, dtype), scale))
        return cached[1]

    def _prefill(self, batch: list[_Running]) -> None:
        layout = PackedLayout(tuple(r.slot for r in batch), tuple(0 for _ in batch),
                              tuple(len(r.prompt) for r in batch))
        tokens = torch.tensor([t for r in batch for t in r.prompt], device=self.device)
        logits = self.model.prefill(tokens, layout, self._hooks(batch, layout))
        for r in batch:
            r.position = len(r.prompt)
        self._sample(batch, logits)

    def _decode(self, batch: list[_Running]) -> None:
        # One host-to-device copy for the three index vectors.
        tokens, slots, positions = torch.tensor([[r.next_token for r in batch], [r.slot for r in batch],
                                                 [r.position for r in batch]], device=self.device)
        length = max(r.position for r in batch) + 1
        contiguous = [r.slot for r in batch] == list(range(len(batch)))
        logits = self.model.decode(tokens, slots, positions, length, self._hooks(batch, None), contiguous)
        for r in batch:
            r.position += 1
        self._sample(batch, logits)

    def _sample(self, batch: list[_Running], logits: Tensor) -> None:
        histories = [torch.tensor(r.prompt + r.output, device=self.device) if r.params.repetition_penalty != 1.0 else None
                     for r in batch]
        picked = sample_batch(logits, [r.params for r in batch], [r.generator for r in batch], histories)
        for r, t in zip(batch, picked):
            r.next_token = t

    def _emit(self, r: _Running) -> TokenEvent:
        token = r.next_token
        assert token is not None
        if token in self.tokenizer.eos_token_ids or token in r.params.stop_token_ids:
            return self._retire(r, "stop", token, r.text + r.decoder.flush())
        r.output.append(token)
        piece = r.decoder.push(token)
        buffer = r.text + piece  # r.text: text held back from earlier steps
        for s in r.params.stop:
            at = buffer.find(s)
            if at != -1:  # emit only what precedes the stop string
                return self._retire(r, "stop", token, buffer[:at])
        # Hold back a tail that could still grow into a stop string.
        cut = max(len(buffer) - max((len(s) - 1 for s in r.params.stop), default=0), 0)
        text, r.text = buffer[:cut], buffer[cut:]
        if len(r.output) >= r.params.max_tokens or r.position + 1 >= self.max_seq:
            return self._retire(r, "length", token, text + r.text + r.decoder.flush())
        return TokenEvent(r.request_id, token, text, None)

    def _retire(self, r: _Running, reason: str, token: int = -1, text: str = "") -> TokenEvent:
        r.finish_reason = reason
        self.running.pop(r.request_id, None)
        self.free_slots.append(r.slot)
        self.free_slots.sort()
        self.finished[r.request_id] = r
        return TokenEvent(r.request_id, token, text, reason)


def _to_device(state, device: torch.device):
    """A level state on `device` (the same object when it is there already)."""
    tensors = state_tensors(state)
    if all(t.device == device for t in tensors.values()):
        return state
    return state_from_tensors("lora" if isinstance(state, LoraState) else "associative",
                              {k: t.to(device) for k, t in tensors.items()})


def _zero_like(state: LoraState) -> LoraState:
    return LoraState(state.a, torch.zeros_like(state.b), state.m_a, state.v_a, state.m_b, state.v_b, state.step)


class _NullRunner:
    """Stands in for a sequence without a fast level in a batch where others have one."""

    def step(self, i: int, x: Tensor) -> Tensor:
        return torch.zeros_like(x)

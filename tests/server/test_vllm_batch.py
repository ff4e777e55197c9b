"""`VllmBatch` against a scripted stand-in for vLLM's engine (no vLLM needed): the events a turn
streams, stop tokens and strings, cancellation, and one adapter per distinct level content with
least-recently-used eviction. tests/vllm runs the real engine."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

from nsam.model.runtime import NsamModel
from nsam.model.sampling import SamplingParams
from nsam.model.state import MemoryState
from nsam.server.vllm_engine import AdapterCache, VllmModel


@dataclass
class _Completion:
    token_ids: list
    finish_reason: str | None = None


@dataclass
class _Output:
    request_id: str
    outputs: list
    finished: bool


@dataclass
class FakeEngine:
    """Emits `script` one token per step for every request; records LoRA requests."""

    script: list[int]
    running: dict = field(default_factory=dict)  # request id -> (max_tokens, stop ids, emitted)
    loras: list = field(default_factory=list)
    removed: list = field(default_factory=list)

    def add_request(self, request_id, prompt, params, lora_request=None):
        self.running[request_id] = [params.max_tokens, set(params.stop_token_ids), []]
        self.loras.append(lora_request)

    def has_unfinished_requests(self):
        return bool(self.running)

    def abort_request(self, ids):
        for i in ids:
            self.running.pop(i, None)

    def remove_lora(self, lora_id):
        self.removed.append(lora_id)

    def step(self):
        outs = []
        for rid, (limit, stops, emitted) in list(self.running.items()):
            token = self.script[len(emitted) % len(self.script)]
            emitted.append(token)
            reason = "stop" if token in stops else "length" if len(emitted) >= limit else None
            if reason:
                del self.running[rid]
            outs.append(_Output(rid, [_Completion(list(emitted), reason)], reason is not None))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    """A `vllm` module with what VllmBatch uses."""
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    vllm.sampling_params = types.SimpleNamespace(RequestOutputKind=types.SimpleNamespace(CUMULATIVE=0))
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, lora_id, path: types.SimpleNamespace(name=name, id=lora_id, path=path)
    for name, module in (("vllm", vllm), ("vllm.lora", types.ModuleType("vllm.lora")), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)


def _model(tmp_path, script, capacity=8) -> tuple[VllmModel, NsamModel, FakeEngine]:
    native = NsamModel.load("tiny")
    engine = FakeEngine(script)
    (tmp_path / "adapters").mkdir(exist_ok=True)
    return VllmModel(native, engine, AdapterCache(tmp_path / "adapters", capacity), 8), native, engine


def _with_levels(native: NsamModel, seed: int) -> bytes:
    state = MemoryState.from_bytes(native.new_session_state(None), native.fingerprint, native.levels, "session")
    g = torch.Generator().manual_seed(seed)
    for name in ("user", "medium"):
        lv = state.levels[name]
        state = state.with_level(name, type(lv)(lv.a, torch.randn(lv.b.shape, generator=g), lv.m_a, lv.v_a,
                                                lv.m_b, lv.v_b, lv.step))
    return state.to_bytes(native.fingerprint, native.levels)


def _run(batch, n_steps=50):
    events = []
    for _ in range(n_steps):
        if not batch.has_work():
            break
        events += batch.step()
    return events


def test_a_turn_streams_its_text_and_ends_at_the_stop_token(fake_vllm, tmp_path):
    vllm, native, engine = _model(tmp_path, [ord("h"), ord("i"), 257])  # 257: <|im_end|>
    batch = vllm.generator(4)
    state = native.new_session_state(None)
    batch.add("t", [1, 2, 3], state, SamplingParams(max_tokens=10))
    events = _run(batch)
    assert "".join(e.text for e in events) == "hi"
    assert [e.finish_reason for e in events] == [None, None, "stop"] and events[-1].token_id == 257
    assert engine.loras == [None]  # empty levels: no adapter
    assert batch.pop_state("t") == (state, [])


def test_length_and_stop_strings(fake_vllm, tmp_path):
    vllm, native, engine = _model(tmp_path, [ord(c) for c in "abcXYZdef"])
    batch = vllm.generator(4)
    state = native.new_session_state(None)
    batch.add("len", [1], state, SamplingParams(max_tokens=3))
    batch.add("stop", [1], state, SamplingParams(max_tokens=9, stop=("XY",)))
    events = _run(batch)
    text = {rid: "".join(e.text for e in events if e.request_id == rid) for rid in ("len", "stop")}
    assert text == {"len": "abc", "stop": "abc"}
    ends = {e.request_id: e.finish_reason for e in events if e.finish_reason}
    assert ends == {"len": "length", "stop": "stop"} and not engine.running  # the stop-string turn was aborted


def test_cancel_ends_the_turn(fake_vllm, tmp_path):
    vllm, native, engine = _model(tmp_path, [ord("a")])
    batch = vllm.generator(4)
    batch.add("c", [1], native.new_session_state(None), SamplingParams(max_tokens=100))
    batch.step()
    batch.cancel("c")
    assert [e.finish_reason for e in batch.step()] == ["cancelled"] and not batch.has_work()


def test_one_adapter_per_level_content_least_recently_used_evicted(fake_vllm, tmp_path):
    vllm, native, engine = _model(tmp_path, [257], capacity=2)
    batch = vllm.generator(4)
    a, b, c = (_with_levels(native, s) for s in (1, 2, 3))
    for rid, state in (("a", a), ("a again", a), ("b", b)):
        batch.add(rid, [1], state, SamplingParams(max_tokens=2))
    batch.add("c", [1], c, SamplingParams(max_tokens=2))  # a and b still decoding: none evicted yet
    assert len(vllm.adapters.loaded) == 3 and not engine.removed
    _run(batch)
    batch.add("c again", [1], c, SamplingParams(max_tokens=2))
    batch.add("d", [1], _with_levels(native, 4), SamplingParams(max_tokens=2))  # evicts a, then b
    ids = [lora.id for lora in engine.loras]
    assert ids[0] == ids[1] and ids[3] == ids[4] and len(set(ids)) == 4
    assert len(vllm.adapters.loaded) == 2 and engine.removed == [ids[0], ids[2]]
    assert len(list((tmp_path / "adapters").iterdir())) == 2  # evicted adapters' directories are gone

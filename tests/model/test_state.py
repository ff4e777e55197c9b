"""State bytes: LoRA levels stored as bfloat16 A and B without Adam's moments (format 2), and
format 1 states (float32, with moments) still read."""

import json

import pytest
import torch
from safetensors.torch import load, save

from nsam.model.errors import StateError
from nsam.model.learning.notes import notes_to_json
from nsam.model.levels import LoraState, state_tensors
from nsam.model.runtime import NsamModel
from nsam.model.state import FORMAT, MemoryState, _digest, _metadata
from nsam.model.updates import adam

TURN = [{"role": "user", "content": "my cat is Tom"}, {"role": "assistant", "content": "ok"}]


@pytest.fixture(scope="module")
def tiny():
    return NsamModel.load("tiny")


def _format_1(state: MemoryState, fingerprint: str) -> bytes:
    """A state as format 1 wrote it: every level's tensors in float32, LoRA moments included
    (a session's user snapshot: A and B only)."""
    tensors = {}
    for name, st in sorted(state.levels.items()):
        for field_name, t in sorted(state_tensors(st).items()):
            if field_name == "moments_from" or (state.kind == "session" and name == "user"
                                                and field_name not in ("a", "b")):
                continue
            tensors[f"{name}/{field_name}"] = (t.float() if t.is_floating_point() else t).clone()
    notes = notes_to_json(state.notes) if state.notes else ""
    meta = {"format": "nsam.state/1", "kind": state.kind, "fingerprint": fingerprint,
            "levels": ",".join(sorted(state.levels)), "sha256": _digest(tensors, notes)}
    if notes:
        meta["notes"] = notes
    return save(tensors, metadata={"nsam": json.dumps(meta, sort_keys=True)})


def _learnt_session(tiny) -> MemoryState:
    data, _ = tiny.update_medium(tiny.new_session_state(None), TURN)
    return MemoryState.from_bytes(data, tiny.fingerprint, tiny.levels, "session")


def test_lora_levels_are_stored_in_bfloat16_without_moments(tiny):
    data, _ = tiny.update_medium(tiny.new_session_state(tiny.new_user_state()), TURN)
    tensors = load(data)
    assert _metadata(data)["format"] == FORMAT == "nsam.state/2"
    for name in ("medium", "user"):
        assert tensors[f"{name}/a"].dtype == tensors[f"{name}/b"].dtype == torch.bfloat16
        assert not any(k.startswith(f"{name}/m_") or k.startswith(f"{name}/v_") for k in tensors)
    assert tensors["fast/memory"].dtype == torch.float32  # the fast level keeps its precision
    assert int(tensors["medium/step"]) > 0  # the step count survives (it places the next anchors)

    state = MemoryState.from_bytes(data, tiny.fingerprint, tiny.levels, "session")
    medium = state.levels["medium"]
    assert medium.a.dtype == medium.b.dtype == torch.float32
    torch.testing.assert_close(medium.a, tensors["medium/a"].float(), atol=0, rtol=0)
    assert not medium.m_a.any() and not medium.v_b.any()
    assert int(medium.moments_from) == int(medium.step) > 0
    assert state.to_bytes(tiny.fingerprint, tiny.levels) == data  # bit exact again


def test_lora_bytes_shrink_to_a_quarter(tiny):
    state = _learnt_session(tiny)
    old, new = _format_1(state, tiny.fingerprint), state.to_bytes(tiny.fingerprint, tiny.levels)
    n = state.levels["medium"].a.numel() + state.levels["medium"].b.numel()  # the user snapshot's the same
    # format 1: the medium level's A, B and 4 moments, the snapshot's A and B, in 4 bytes (16n);
    # format 2: the four A and B in 2 bytes (4n)
    assert len(old) - len(new) >= 12 * n * 0.99


def test_a_format_1_state_is_still_read_moments_and_all(tiny):
    state = _learnt_session(tiny)
    medium = state.levels["medium"]
    moved = LoraState(medium.a, medium.b, medium.a * 0.1, medium.a.square(), medium.b * 0.1,
                      medium.b.square(), medium.step)
    state = state.with_level("medium", moved)
    old = _format_1(state, tiny.fingerprint)
    back = MemoryState.from_bytes(old, tiny.fingerprint, tiny.levels, "session")
    for field_name in ("a", "b", "m_a", "v_a", "m_b", "v_b", "step"):
        assert torch.equal(getattr(back.levels["medium"], field_name), getattr(moved, field_name)), field_name
    assert int(back.levels["medium"].moments_from) == 0  # its moments are carried on
    assert back.notes == state.notes
    tiny.check_state(old, "session")
    tiny.update_medium(old, TURN)  # serves as before, and is written back as format 2
    user = _format_1(MemoryState.from_bytes(tiny.new_user_state(), tiny.fingerprint, tiny.levels, "user"),
                     tiny.fingerprint)
    tiny.check_state(user, "user")
    assert _metadata(tiny.new_session_state(user))["format"] == FORMAT


def test_a_damaged_state_of_either_format_is_refused(tiny):
    state = _learnt_session(tiny)
    for data in (state.to_bytes(tiny.fingerprint, tiny.levels), _format_1(state, tiny.fingerprint)):
        damaged = bytearray(data)
        damaged[-5] ^= 0x01
        with pytest.raises(StateError, match="corrupt"):
            tiny.check_state(bytes(damaged), "session")


def test_an_update_read_from_bytes_restarts_adam():
    """With zero moments counted from the current step, Adam's first step is lr · sign(g), as for
    a new optimizer, however many steps the level took before."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, 3, generator=g)
    state = LoraState(a, b, *(torch.zeros_like(t) for t in (a, a, b, b)),
                      torch.tensor(500)).without_moments()
    grad_a, grad_b = torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g)
    new = adam(state, grad_a, grad_b, lr=0.01)
    torch.testing.assert_close(new.a, a - 0.01 * grad_a.sign(), atol=1e-6, rtol=0)
    assert int(new.step) == 501 and int(new.moments_from) == 500

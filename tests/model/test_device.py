"""The model on a device: `device.DeviceModel` and a device-placed `Generator`, checked on the CPU
(where they must change nothing); state bytes do not depend on where a state was computed."""

import pytest
import torch

from nsam.model.device import DeviceModel, on_device, parse_device
from nsam.model.runtime import NsamModel
from nsam.model.sampling import SamplingParams
from nsam.model.state import MemoryState

MESSAGES = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi, how are you?"}]


def _reply(model, state: bytes) -> tuple[list[int], bytes]:
    gen = model.generator(2)
    gen.add("r", model.encode_chat([{"role": "user", "content": "hello"}], 256), state, SamplingParams(max_tokens=12))
    out = []
    while gen.has_work():
        out += [e.token_id for e in gen.step() if e.token_id >= 0]
    return out, gen.pop_state("r")[0]


def test_device_model_on_cpu_matches_the_model():
    native = NsamModel.load("tiny")
    wrapped = DeviceModel(NsamModel.load("tiny"), torch.device("cpu"))
    state = native.new_session_state(None)
    learned, _ = native.update_medium(state, MESSAGES)
    assert wrapped.update_medium(state, MESSAGES)[0] == learned
    assert _reply(wrapped, learned) == _reply(native, learned)


def test_on_device_cpu_is_the_model_itself():
    model = NsamModel.load("tiny")
    assert on_device(model, "cpu") is model


def test_parse_device():
    assert parse_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="use cpu or cuda"):
        parse_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            parse_device("cuda")


def test_state_bytes_are_read_onto_the_default_device():
    model = NsamModel.load("tiny")
    data = model.new_session_state(None)
    with torch.device("meta"):  # stands in for a GPU: the tensors must follow the default device
        state = MemoryState.from_bytes(data, model.fingerprint, model.levels, "session")
    assert {t.device.type for level in state.levels.values() for t in vars(level).values()} == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.py runs the full check)")
def test_cuda_greedy_and_state_bytes_match_the_cpu():
    cpu, gpu = NsamModel.load("tiny"), on_device(NsamModel.load("tiny"), "cuda")
    state = cpu.new_session_state(None)
    assert _reply(gpu, state)[0] == _reply(cpu, state)[0]
    learned = gpu.update_medium(state, MESSAGES)[0]
    MemoryState.from_bytes(learned, cpu.fingerprint, cpu.levels, "session")  # readable on the CPU

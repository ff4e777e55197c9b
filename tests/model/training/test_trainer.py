"""The fast level's trainer end to end on the tiny model: it trains, saves, and resumes a saved level."""

import pytest
import torch
from safetensors import safe_open

from nsam.model.training.trainer import TrainerConfig, train_fast_level


def _gate(path) -> torch.Tensor:
    with safe_open(str(path), "pt") as f:
        return torch.tanh(f.get_tensor("gate"))


def _train(out, **kw) -> dict:
    cfg = TrainerConfig(model="tiny", eval_episodes=2, batch=2, out=out, **kw)
    return train_fast_level(cfg, lambda item: None)


def test_init_resumes_a_saved_level_at_the_strength_it_was_trained_at(tmp_path):
    trained, resumed, closed = tmp_path / "trained.safetensors", tmp_path / "resumed.safetensors", tmp_path / "z.safetensors"
    _train(trained, steps=2, read_scale=0.5, evicted_read_scale=0.75, document_read_scale=0.6)
    assert _gate(trained).abs().sum() > 0  # two steps opened the read gates
    with safe_open(str(trained), "pt") as f:  # the read strengths travel with the level
        assert {k: f.metadata()[k] for k in ("read_scale", "evicted_read_scale", "document_read_scale")} == \
            {"read_scale": "0.5", "evicted_read_scale": "0.75", "document_read_scale": "0.6"}
    # No steps: the level comes back at full strength (twice the saved read) and is saved as is.
    _train(resumed, steps=0, init=trained)
    torch.testing.assert_close(_gate(resumed), 2 * _gate(trained))
    # A level saved with its reads switched off cannot be resumed: the error says so.
    _train(closed, steps=0, init=trained, read_scale=0.0)
    with pytest.raises(ValueError, match="cannot be recovered"):
        _train(tmp_path / "never.safetensors", steps=0, init=closed)


@pytest.mark.parametrize("name", ["read_scale", "evicted_read_scale", "document_read_scale"])
def test_a_negative_read_scale_is_refused_before_training(name, tmp_path):
    out = tmp_path / "never.safetensors"
    with pytest.raises(ValueError, match="cannot be negative"):
        _train(out, steps=1, **{name: -0.5})
    assert not out.exists()

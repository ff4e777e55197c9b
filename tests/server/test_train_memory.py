"""`nsam train-memory` end to end on the tiny model: it trains, saves, and resumes a saved level."""

import pytest
import torch
from safetensors import safe_open

from nsam.server.train_memory import main


def _gate(path) -> torch.Tensor:
    with safe_open(str(path), "pt") as f:
        return torch.tanh(f.get_tensor("gate"))


def test_init_resumes_a_saved_level_at_the_strength_it_was_trained_at(tmp_path):
    common = ["--model", "tiny", "--eval-episodes", "2", "--batch", "2"]
    trained, resumed, closed = tmp_path / "trained.safetensors", tmp_path / "resumed.safetensors", tmp_path / "z.safetensors"
    assert main(common + ["--steps", "2", "--read-scale", "0.5", "--evicted-read-scale", "0.75",
                          "--document-read-scale", "0.6", "--out", str(trained)]) == 0
    assert _gate(trained).abs().sum() > 0  # two steps opened the read gates
    with safe_open(str(trained), "pt") as f:  # the read strengths travel with the level
        assert {k: f.metadata()[k] for k in ("read_scale", "evicted_read_scale", "document_read_scale")} == \
            {"read_scale": "0.5", "evicted_read_scale": "0.75", "document_read_scale": "0.6"}
    # No steps: the level comes back at full strength (twice the saved read) and is saved as is.
    assert main(common + ["--steps", "0", "--init", str(trained), "--out", str(resumed)]) == 0
    torch.testing.assert_close(_gate(resumed), 2 * _gate(trained))
    # A level saved with its reads switched off cannot be resumed: the error says so.
    assert main(common + ["--steps", "0", "--init", str(trained), "--read-scale", "0", "--out", str(closed)]) == 0
    with pytest.raises(SystemExit):
        main(common + ["--steps", "0", "--init", str(closed), "--out", str(tmp_path / "never.safetensors")])


@pytest.mark.parametrize("flag", ["--read-scale", "--evicted-read-scale", "--document-read-scale"])
def test_a_negative_read_scale_is_refused_before_training(flag, tmp_path, capsys):
    out = tmp_path / "never.safetensors"
    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--steps", "1", flag, "-0.5", "--out", str(out)])
    assert "cannot be negative" in capsys.readouterr().err
    assert not out.exists()

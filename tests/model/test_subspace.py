"""The slow level kept out of the MLP hidden directions that ordinary text uses."""

from dataclasses import replace

import pytest
import torch

from nsam.model.consolidation import anchor_windows, consolidate
from nsam.model.levels import LoraState
from nsam.model.runtime import NsamModel
from nsam.model.subspace import _HiddenGram, project_out, protected_bases


@pytest.fixture(scope="module")
def tiny():
    return NsamModel.load("tiny")


def _grams(model, layers, windows) -> torch.Tensor:
    hooks = _HiddenGram({layer: i for i, layer in enumerate(layers)}, model.config.hidden_dim)
    with torch.inference_mode():
        for w in windows:
            model(w, hooks)
    return hooks.gram


def _energy_through(a: torch.Tensor, grams: torch.Tensor) -> float:
    """Mean ‖A h‖² over ordinary text per unit ‖A‖², summed over layers."""
    return float(sum(torch.trace(x @ g @ x.T) / x.square().sum() for x, g in zip(a, grams)))


def test_projected_rows_barely_see_ordinary_text(tiny):
    spec = tiny.levels.get("user")
    windows = anchor_windows(tiny.anchor_ids, 256)
    bases = protected_bases(tiny.model, spec.layers, windows, 0.99)
    a = torch.randn(len(spec.layers), spec.rank, tiny.model.config.hidden_dim, generator=torch.Generator().manual_seed(0))
    projected = project_out(a, torch.zeros_like(a), bases)
    assert all(float((x @ u).abs().max()) < 1e-4 for x, u in zip(projected, bases))
    grams = _grams(tiny.model, spec.layers, windows)
    assert _energy_through(projected, grams) < 0.05 * _energy_through(a, grams)
    # only the change from an origin is projected: the origin itself is kept
    assert torch.equal(project_out(a, a, bases), a)


def test_consolidation_with_protection_writes_only_outside_the_protected_directions(tiny):
    spec = tiny.levels.get("user")
    fresh = LoraState.zeros(spec, tiny.model.config.hidden_dim, tiny.model.config.dim, 0)
    transcript = [{"role": "user", "content": "My dog's name is Rex. I live in Brisk."},
                  {"role": "assistant", "content": "Noted."}]
    config = replace(tiny.consolidation, protect_energy=0.9, probe_ppl_budget=10.0, max_forgetting=10.0)
    new, report = consolidate(tiny.model, tiny.tokenizer, spec, fresh, transcript, tiny.anchor_ids,
                              tiny.probe_ids, config)
    assert report.accepted and bool(new.b.any())
    bases = protected_bases(tiny.model, spec.layers, anchor_windows(tiny.anchor_ids, config.anchor_window), 0.9)
    assert all(float((x @ u).abs().max()) < 1e-4 * float(x.abs().max()) for x, u in zip(new.a, bases))
    # a second session moves A only outside them, from where the first left it
    again, _ = consolidate(tiny.model, tiny.tokenizer, spec, new, transcript, tiny.anchor_ids, tiny.probe_ids, config)
    assert all(float(((y - x) @ u).abs().max()) < 1e-4 * float(x.abs().max()) for x, y, u in zip(new.a, again.a, bases))

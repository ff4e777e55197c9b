"""Export for other engines: the levels as one PEFT LoRA adapter (exact) and the backbone as a
Hugging Face directory that loads back to the same logits."""

import json

import torch
from tokenizers import Tokenizer, models

from nsam.model.export import adapter_deltas, lora_adapter, write_hf_model
from nsam.model.levels import BatchLevels
from nsam.model.loading import load
from nsam.model.runtime import NsamModel
from nsam.model.state import MemoryState


def _levels(model: NsamModel, seed: int = 0):
    state = MemoryState.from_bytes(model.new_session_state(None), model.fingerprint, model.levels, "session")
    g = torch.Generator().manual_seed(seed)
    levels = []
    for name in ("user", "medium"):
        level = state.levels[name]
        levels.append(type(level)(level.a, torch.randn(level.b.shape, generator=g) * 0.05, level.m_a, level.v_a,
                                  level.m_b, level.v_b, level.step))
    return levels, [model.levels.get("user"), model.levels.get("medium")]


def test_adapter_delta_is_the_sum_of_the_levels_deltas(tmp_path):
    model = NsamModel.load("tiny")
    levels, specs = _levels(model)
    adapter = lora_adapter(levels, specs)
    adapter.write(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == sum(s.rank for s in specs) and cfg["lora_alpha"] == cfg["r"]
    assert cfg["target_modules"] == ["down_proj"] and cfg["layers_to_transform"] == list(specs[0].layers)
    deltas = adapter_deltas(tmp_path)
    assert sorted(deltas) == list(specs[0].layers)
    for i, layer in enumerate(specs[0].layers):
        expected = sum(specs[0].scale * (lv.b[i] @ lv.a[i]) for lv in levels)
        torch.testing.assert_close(deltas[layer], expected, atol=1e-6, rtol=0)


def test_merged_adapter_gives_the_native_logits(tmp_path):
    """The backbone with ΔW merged into its down-projections equals the backbone with the levels' hooks."""
    model = NsamModel.load("tiny")
    levels, specs = _levels(model, seed=1)
    lora_adapter(levels, specs).write(tmp_path)
    ids = torch.randint(0, model.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    a = torch.cat([lv.a for lv in levels], 1)[None].expand(2, -1, -1, -1)
    b = torch.cat([lv.b for lv in levels], 2)[None].expand(2, -1, -1, -1)
    hooks = BatchLevels({layer: i for i, layer in enumerate(specs[0].layers)}, a, b, {}, None, None, specs[0].scale)
    with torch.no_grad():
        native = model.model(ids, hooks)
        for layer, delta in adapter_deltas(tmp_path).items():
            model.model.layers[layer].mlp.down_proj.weight += delta
        merged = model.model(ids)
    torch.testing.assert_close(merged, native, atol=1e-5, rtol=1e-5)


def test_hf_directory_loads_back_to_the_same_logits(tmp_path):
    model = NsamModel.load("tiny")
    write_hf_model(model.model, model.tokenizer, tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()  # the byte tokenizer has no BPE file to write
    Tokenizer(models.BPE({"a": 0}, [])).save(str(tmp_path / "tokenizer.json"))  # for the loader
    loaded = load(tmp_path)
    ids = torch.randint(0, model.model.config.vocab_size, (1, 16))
    torch.testing.assert_close(loaded.model(ids), model.model(ids), atol=0, rtol=0)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True

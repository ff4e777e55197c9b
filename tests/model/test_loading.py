import pytest

from nsam.model.loading import ModelLoadError, load


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no model at"):
        load(tmp_path / "nope.gguf")


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load(bad)


def test_unsupported_hf_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        load(tmp_path)


def test_hf_directory_round_trip(tmp_path):
    """A Hugging Face directory (config.json + safetensors + tokenizer.json) loads and matches."""
    import json

    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from nsam.model.backbone import Transformer
    from nsam.model.config import tiny

    torch.manual_seed(0)
    ref = Transformer(tiny()).eval()
    cfg = tiny()
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.hidden_dim,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "eos_token_id": 2}))
    state = {("model." + k): v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    tok = Tokenizer(models.BPE({chr(97 + i): i for i in range(26)}, []))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    torch.testing.assert_close(loaded.model(ids), ref(ids))
    assert loaded.tokenizer.encode("abc") == [0, 1, 2]

"""Checks against the embedded SmolLM2-135M-Instruct (real weights, CPU)."""

import pytest
import torch

from nsam.model.loading import default_model_path
from nsam.model.sampling import SamplingParams

pytestmark = pytest.mark.real_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _prompt_256(tokenizer) -> list[int]:
    from pathlib import Path

    import nsam.model

    text = (Path(nsam.model.__file__).parent / "presets" / "anchor.txt").read_text() * 3
    ids = tokenizer.encode(text)[:256]
    assert len(ids) == 256
    return ids


def test_logits_match_transformers_llama_on_the_same_weights(real_model):
    transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency")
    m = real_model.model
    c = m.config
    ref_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_seq_len,
        tie_word_embeddings=c.tie_embeddings)
    ref = transformers.LlamaForCausalLM(ref_config).eval()
    missing = ref.load_state_dict({("" if k == "lm_head.weight" else "model.") + k: v
                                   for k, v in m.state_dict().items()}, strict=False)
    assert not missing.missing_keys or missing.missing_keys == ["lm_head.weight"]
    ids = torch.tensor([_prompt_256(real_model.tokenizer)])
    with torch.no_grad():
        ours, theirs = m(ids), ref(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-3


def test_tokenizer_and_chat_template_match_the_reference(real_model):
    transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency")
    path = default_model_path()
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = real_model.tokenizer
    for text in ["Hello world! 12345, café naïve — 日本語 🙂", "  spaces\n\nlines\ttabs", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]
    assert tok.render_chat(msgs) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.special_tokens["<|im_end|>"] in tok.eos_token_ids


def _answer(model, messages, **params) -> str:
    g = model.generator(2)
    ids = model.encode_chat(messages, 1024)
    g.add("q", ids, model.new_session_state(None), SamplingParams(**{"max_tokens": 24, **params}))
    text = ""
    while g.has_work():
        for e in g.step():
            text += e.text
    return text


def test_default_model_knows_the_capital_of_france(real_model):
    assert "Paris" in _answer(real_model, QUESTION)


def test_the_shipped_fast_level_reads_text_out_of_the_window_harder(real_model):
    """The preset's read strengths: a quarter of the trained one while chat text is in view, half
    while a document's is, 0.625 once it has all left the attention window (benchmarks/README.md,
    stops 11 and 12)."""
    assert real_model.fast_trained
    assert real_model.fast_params.evicted_read_boost == pytest.approx(2.5)
    assert real_model.fast_params.document_read_boost == pytest.approx(2.0)


def test_seeded_sampling_reproduces_and_batching_does_not_change_greedy(real_model):
    a = _answer(real_model, QUESTION, temperature=0.8, top_p=0.9, seed=7)
    b = _answer(real_model, QUESTION, temperature=0.8, top_p=0.9, seed=7)
    assert a == b
    g = real_model.generator(4)
    state = real_model.new_session_state(None)
    prompts = [QUESTION, [{"role": "user", "content": "Name a primary colour."}]]
    for i, msgs in enumerate(prompts):
        g.add(str(i), real_model.encode_chat(msgs, 1024), state, SamplingParams(max_tokens=16))
    texts = {"0": "", "1": ""}
    while g.has_work():
        for e in g.step():
            texts[e.request_id] += e.text
    assert texts["0"] == _answer(real_model, QUESTION, max_tokens=16)
    assert texts["1"] == _answer(real_model, prompts[1], max_tokens=16)

import pytest
import torch

from nsam.model.backbone import PackedLayout, Transformer, rope_frequencies
from nsam.model.config import ModelConfig, RopeScaling, tiny


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(tiny()).eval().requires_grad_(False)
    for p in m.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.1)
    return m


def _greedy_nocache(m, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def _greedy_cached(m, prompts, n):
    """Prefill all prompts packed together, then decode them as one batch."""
    m.setup_caches(len(prompts), 128)
    layout = PackedLayout(tuple(range(len(prompts))), (0,) * len(prompts), tuple(len(p) for p in prompts))
    logits = m.prefill(torch.tensor([t for p in prompts for t in p]), layout)
    nxt = logits.argmax(-1)
    out = [[int(t)] for t in nxt]
    pos = torch.tensor([len(p) for p in prompts])
    for _ in range(n - 1):
        logits = m.decode(nxt, torch.arange(len(prompts)), pos, int(pos.max()) + 1, contiguous=True)
        nxt = logits.argmax(-1)
        pos = pos + 1
        for o, t in zip(out, nxt):
            o.append(int(t))
    return out


def test_kv_cache_greedy_equals_cache_free_greedy():
    m = _model()
    prompt = [5, 9, 200, 31, 7, 7, 64]
    assert _greedy_cached(m, [prompt], 12)[0] == _greedy_nocache(m, prompt, 12)


def test_batch_of_different_lengths_decodes_as_each_alone():
    m = _model()
    prompts = [[1, 2, 3], list(range(40, 77)), [250, 3, 3, 3, 3, 9]]
    together = _greedy_cached(m, prompts, 10)
    alone = [_greedy_cached(m, [p], 10)[0] for p in prompts]
    assert together == alone


def test_prefill_logits_match_cache_free_pass_and_continuation():
    m = _model()
    ids = torch.randint(0, 256, (30,))
    full = m(ids[None])[0]
    m.setup_caches(2, 64)
    packed = m.prefill(ids, PackedLayout((1,), (0,), (30,)), all_logits=True)
    torch.testing.assert_close(packed, full, atol=1e-5, rtol=1e-5)
    m.prefill(ids[:18], PackedLayout((0,), (0,), (18,)))
    rest = m.prefill(ids[18:], PackedLayout((0,), (18,), (12,)), all_logits=True)
    torch.testing.assert_close(rest, full[18:], atol=1e-5, rtol=1e-5)


def test_non_contiguous_slots_decode_like_contiguous():
    m = _model()
    ids = torch.randint(0, 256, (9,))
    m.setup_caches(4, 32)
    m.prefill(ids, PackedLayout((2,), (0,), (9,)))
    a = m.decode(torch.tensor([7]), torch.tensor([2]), torch.tensor([9]), 10)
    m.setup_caches(4, 32)
    m.prefill(ids, PackedLayout((0,), (0,), (9,)))
    b = m.decode(torch.tensor([7]), torch.tensor([0]), torch.tensor([9]), 10, contiguous=True)
    torch.testing.assert_close(a, b)


def test_bf16_forward_is_close_to_fp32():
    m = _model()
    ids = torch.randint(0, 256, (1, 20))
    ref = m(ids)
    m16 = _model().to(torch.bfloat16)
    m16.inv_freq = m16.inv_freq.float()
    out = m16(ids).float()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("scaling", [
    RopeScaling("linear", 2.0), RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), RopeScaling("yarn", 4.0, original_max_position=4096),
])
def test_rope_scaling_variants_change_low_frequencies_only_as_specified(scaling):
    base = tiny()
    cfg = ModelConfig(**{**base.__dict__, "rope_scaling": scaling})
    plain, scaled = rope_frequencies(base), rope_frequencies(cfg)
    assert torch.isfinite(scaled).all() and (scaled <= plain + 1e-9).all()
    assert scaled[-1] < plain[-1]  # the longest wavelength is stretched
    if scaling.kind != "linear":
        assert torch.isclose(scaled[0], plain[0])  # the shortest is kept


def test_unknown_rope_scaling_is_refused():
    with pytest.raises(ValueError, match="unsupported rope scaling"):
        RopeScaling("ntk-magic")

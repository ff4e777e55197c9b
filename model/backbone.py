"""Llama-family decoder written for inference.

Axis letters in shape comments: B sequences in a decode batch, T tokens (packed over all
sequences in a prefill), D model width, H query heads, K key/value heads, G = H // K query
heads per key/value head, S cache length, E head width, F MLP width.

Two entry points, both over a batch of *independent* sequences that share the static
`KVCache` buffers, one cache row (slot) per sequence:
- `prefill(tokens, layout)`: the prompts of several sequences packed into one (1, T) row, so
  the linear layers see no padding; attention runs per sequence, so there is no cross-talk.
- `decode(tokens, slots, positions)`: one new token for each of B sequences, each at its own
  position.

Memory levels plug in through `LevelHooks` (see `levels.py`); with no hooks the model is the
plain pretrained backbone. This module never does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, RopeScaling


class LevelHooks(Protocol):
    """Where memory levels enter the forward pass (implemented in `levels.py`)."""

    def after_attention(self, layer: int, x: Tensor) -> Tensor: ...

    def mlp_delta(self, layer: int, h: Tensor) -> Tensor | None: ...


@dataclass(frozen=True)
class PackedLayout:
    """Where each sequence of a packed prefill sits: its cache slot, its first position, its length."""

    slots: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def positions(self, device: torch.device) -> Tensor:
        return torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(self.starts, self.lengths)])


def rope_frequencies(config: ModelConfig) -> Tensor:
    """Inverse frequencies (E/2,) with the config's scaling variant applied."""
    e = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, e, 2, dtype=torch.float64) / e))
    s: RopeScaling = config.rope_scaling
    if s.kind == "linear":
        inv = inv / s.factor
    elif s.kind == "llama3":
        low_wavelen = s.original_max_position / s.low_freq_factor
        high_wavelen = s.original_max_position / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        mid = (1 - smooth) * inv / s.factor + smooth * inv
        inv = torch.where(wavelen > low_wavelen, inv / s.factor, torch.where(wavelen < high_wavelen, inv, mid))
    elif s.kind == "yarn":
        def dim_for(rotations: float) -> float:
            return (e * math.log(s.original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(config.rope_theta))

        low = max(math.floor(dim_for(s.beta_fast)), 0)
        high = min(math.ceil(dim_for(s.beta_slow)), e - 1)
        ramp = ((torch.arange(e // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        extrapolate = 1 - ramp
        inv = inv / s.factor * (1 - extrapolate) + inv * extrapolate
    return inv.float()


def rope_attention_scale(config: ModelConfig) -> float:
    """YaRN scales the attention logits (through cos/sin); other variants do not."""
    s = config.rope_scaling
    if s.kind == "yarn" and s.factor > 1:
        return 0.1 * math.log(s.factor) + 1.0
    return 1.0


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (the Hugging Face layout); x (..., T, E), cos/sin (T, E)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache(nn.Module):
    """Fixed-shape key/value buffers for one layer: (slots, K, S, E)."""

    def __init__(self, max_batch: int, max_seq: int, n_kv: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (max_batch, n_kv, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def write_span(self, slot: int, start: int, k: Tensor, v: Tensor) -> None:
        """k, v (K, T, E) written at positions start..start+T of one slot."""
        n = k.shape[1]
        self.k[slot, :, start:start + n] = k
        self.v[slot, :, start:start + n] = v

    def write_tokens(self, slots: Tensor, positions: Tensor, k: Tensor, v: Tensor) -> None:
        """k, v (B, K, E): one token per slot, each at its own position."""
        kv_heads = torch.arange(self.k.shape[1], device=k.device)
        idx = (slots[:, None], kv_heads[None, :], positions[:, None])
        self.k.index_put_(idx, k)
        self.v.index_put_(idx, v)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.cache: KVCache | None = None

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, E)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, E)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def prefill(self, x: Tensor, cos: Tensor, sin: Tensor, layout: PackedLayout) -> Tensor:
        """x (1, T, D) packed; attention stays inside each sequence."""
        q, k, v = self._qkv(x, cos, sin)
        outs, offset = [], 0
        for slot, start, n in zip(layout.slots, layout.starts, layout.lengths):
            qs, ks, vs = (t[:, :, offset:offset + n] for t in (q, k, v))
            offset += n
            if self.cache is not None:
                self.cache.write_span(slot, start, ks[0], vs[0])
            if start == 0:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            else:  # continue a sequence whose earlier tokens are already in the cache
                assert self.cache is not None, "a prefill that continues a sequence needs the KV cache"
                ks = self.cache.k[slot:slot + 1, :, :start + n]
                vs = self.cache.v[slot:slot + 1, :, :start + n]
                mask = torch.ones(n, start + n, dtype=torch.bool, device=x.device).tril(start)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
            outs.append(o)
        o = torch.cat(outs, dim=2).transpose(1, 2).reshape(1, layout.total, -1)
        return self.o_proj(o)

    def decode(self, x: Tensor, cos: Tensor, sin: Tensor, slots: Tensor, positions: Tensor,
               length: int, contiguous: bool) -> Tensor:
        """x (B, 1, D); each row attends to its own slot's first positions[b] + 1 tokens."""
        b = x.shape[0]
        q, k, v = self._qkv(x, cos[:, None, None], sin[:, None, None])  # (B, 1, 1, E): per row
        assert self.cache is not None, "decode needs the KV cache (call setup_caches)"
        self.cache.write_tokens(slots, positions, k[:, :, 0], v[:, :, 0])
        if contiguous:
            keys, values = self.cache.k[:b, :, :length], self.cache.v[:b, :, :length]  # (B, K, S, E)
        else:
            keys, values = self.cache.k[slots, :, :length], self.cache.v[slots, :, :length]
        g = self.n_heads // self.n_kv
        qg = q.view(b, self.n_kv, g, self.head_dim)  # (B, K, G, E)
        scores = qg @ keys.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, K, G, S)
        visible = torch.arange(length, device=x.device)[None, :] <= positions[:, None]  # (B, S)
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        o = torch.softmax(scores.float(), dim=-1).to(values.dtype) @ values  # (B, K, G, E)
        return self.o_proj(o.reshape(b, 1, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x: Tensor, hooks: LevelHooks | None, layer: int) -> Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (.., F)
        out = self.down_proj(h)
        if hooks is not None:
            delta = hooks.mlp_delta(layer, h)
            if delta is not None:
                out = out + delta
        return out


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def mix(self, x: Tensor, attended: Tensor, hooks: LevelHooks | None) -> Tensor:
        x = x + attended
        if hooks is not None:
            x = hooks.after_attention(self.index, x)
        return x + self.mlp(self.post_attention_layernorm(x), hooks, self.index)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        self.rope_scale = rope_attention_scale(config)
        self.max_batch = 0

    # -- caches ------------------------------------------------------------------------------
    def setup_caches(self, max_batch: int, max_seq: int) -> None:
        """Allocate static KV buffers for `max_batch` sequences of up to `max_seq` tokens."""
        dtype = self.embed_tokens.weight.dtype
        device = self.embed_tokens.weight.device
        for block in self.layers:
            block.self_attn.cache = KVCache(max_batch, max_seq, self.config.n_kv_heads,
                                            self.config.head_dim, dtype).to(device)
        self.max_batch, self.max_seq = max_batch, max_seq

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # (T, E/2)
        angles = torch.cat((angles, angles), dim=-1)
        return (angles.cos() * self.rope_scale).to(dtype), (angles.sin() * self.rope_scale).to(dtype)

    # -- forward passes ----------------------------------------------------------------------
    def prefill(self, tokens: Tensor, layout: PackedLayout, hooks: LevelHooks | None = None,
                all_logits: bool = False) -> Tensor:
        """tokens (T,) packed prompts. Returns the logits of each sequence's last token (N, V),
        or of every token (T, V) with `all_logits`."""
        x = self.embed_tokens(tokens)[None]  # (1, T, D)
        cos, sin = self._rope(layout.positions(tokens.device), x.dtype)
        for block in self.layers:
            attended = block.self_attn.prefill(block.input_layernorm(x), cos, sin, layout)
            x = block.mix(x, attended, hooks)
        x = x[0]
        if not all_logits:
            ends = torch.tensor(layout.lengths, device=x.device).cumsum(0) - 1
            x = x[ends]
        return self.lm_head(self.norm(x))

    def decode(self, tokens: Tensor, slots: Tensor, positions: Tensor, length: int,
               hooks: LevelHooks | None = None, contiguous: bool = False) -> Tensor:
        """tokens, slots, positions (B,). `length` = max(positions) + 1, known to the caller
        without a device sync; `contiguous` says slots are 0..B-1 (cache read without a gather).
        Returns logits (B, V)."""
        x = self.embed_tokens(tokens)[:, None]  # (B, 1, D)
        cos, sin = self._rope(positions, x.dtype)  # (B, E)
        for block in self.layers:
            attended = block.self_attn.decode(block.input_layernorm(x), cos, sin, slots, positions,
                                              length, contiguous)
            x = block.mix(x, attended, hooks)
        return self.lm_head(self.norm(x[:, 0]))

    def forward(self, tokens: Tensor, hooks: LevelHooks | None = None) -> Tensor:
        """Cache-free causal pass over a (B, T) batch of equal-length sequences -> (B, T, V).
        Used by training and by the reference comparisons."""
        b, t = tokens.shape
        x = self.embed_tokens(tokens)
        cos, sin = self._rope(torch.arange(t, device=tokens.device), x.dtype)
        for block in self.layers:
            q, k, v = block.self_attn._qkv(block.input_layernorm(x), cos, sin)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            attended = block.self_attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
            x = block.mix(x, attended, hooks)
        return self.lm_head(self.norm(x))

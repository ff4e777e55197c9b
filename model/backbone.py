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

Both run on inference copies of the weights that `setup_caches` builds (`fuse_weights`): q/k/v
and gate/up fused into one matmul each, and in bfloat16 packed for oneDNN, whose post-ops also
apply silu, the up product and the residual adds. `forward` (training, reference comparisons)
uses the Linear modules, which keep owning the weights and the state_dict names.

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


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate-half RoPE (the Hugging Face layout) in three ops; x (..., T, E), cos (T, E), and
    `signed_sin` (T, E) is sin with its first half negated, so that
    rotate_half(x) * sin == roll(x, E/2) * signed_sin."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self._doubled: tuple[Tensor, int, Tensor] | None = None  # see _doubled_weight

    def forward(self, x: Tensor) -> Tensor:
        d = x.shape[-1]
        if x.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            # F.rms_norm is a chain of unfused ops with float32 copies in bfloat16: 2x slower
            # than these at one token, 6x at thousands. Both accumulate in float32.
            if x.numel() >= 1 << 16:  # prefill: one float32 reduction, two bfloat16 products
                norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
                return x * torch.rsqrt(norm.square_().div_(d).add_(self.eps)).to(x.dtype) * self.weight
            # decode: fewest ops. [x, -x] has mean 0, so LayerNorm computes x / rms(x) on it.
            both = F.layer_norm(torch.cat((x, -x), -1), (2 * d,), self._doubled_weight(), None, self.eps)
            return both[..., :d]
        return F.rms_norm(x, (d,), self.weight, self.eps)  # float32: one fused kernel

    def _doubled_weight(self) -> Tensor:
        """[weight, weight], rebuilt when the weight is replaced or changed in place."""
        w = self.weight
        key = (w, 0 if w.is_inference() else w._version)  # inference tensors keep no version
        if self._doubled is None or self._doubled[0] is not key[0] or self._doubled[1] != key[1]:
            with torch.inference_mode(False), torch.no_grad():
                self._doubled = (*key, torch.cat((self.weight, self.weight)))
        return self._doubled[2]


def pack_weight(w: Tensor) -> Tensor:
    """A bfloat16 weight (N, D) in oneDNN's blocked layout (CPU): its small-batch matmuls run on
    AMX/AVX-512-BF16 kernels, 2-3x faster than `F.linear` on the plain tensor. Other weights
    are returned as they are (float32 gains nothing from packing and would round differently)."""
    if (w.device.type == "cpu" and w.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 64)  # 64: good for 1 to 4096 rows
    return w


def linear(x: Tensor, w: Tensor, bias: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """`F.linear` (plus `residual`) that also takes a weight from `pack_weight`; oneDNN adds
    the residual inside the matmul."""
    if w.is_mkldnn:
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    return F.linear(x, w, bias) if residual is None else residual + F.linear(x, w, bias)


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
        self.k[slots, :, positions] = k
        self.v[slots, :, positions] = v


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
        self.w_qkv: Tensor | None = None  # fused (and packed) copies for prefill/decode: see `fuse`
        self.b_qkv: Tensor | None = None
        self.w_o: Tensor | None = None

    def fuse(self) -> None:
        """Build the one-matmul q/k/v weight the inference passes use (called by `setup_caches`).
        Unpacked, the three Linear weights become views of it, so no memory is duplicated."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        qkv = torch.cat([p.weight for p in projections])  # ((H + 2K) E, D)
        self.b_qkv = torch.cat([p.bias for p in projections]) if self.q_proj.bias is not None else None
        self.w_qkv, self.w_o = pack_weight(qkv), pack_weight(self.o_proj.weight)
        if not self.w_qkv.is_mkldnn:
            _share_rows(projections, qkv)

    def _qkv(self, x: Tensor, cos: Tensor, signed_sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, E)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, E)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, signed_sin), apply_rope(k, cos, signed_sin), v

    def prefill(self, x: Tensor, cos: Tensor, signed_sin: Tensor, layout: PackedLayout,
                residual: Tensor | None = None) -> Tensor:
        """x (1, T, D) packed; attention stays inside each sequence. cos, signed_sin (T, E).
        Returns residual + attention output."""
        h, kv, e = self.n_heads, self.n_kv, self.head_dim
        qkv = linear(x, self.w_qkv, self.b_qkv).view(1, -1, h + 2 * kv, e).transpose(1, 2)  # (1, H+2K, T, E)
        qk = apply_rope(qkv[:, :h + kv], cos, signed_sin)
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kv:]
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
        o = torch.cat([o.transpose(1, 2) for o in outs], dim=1).view(1, layout.total, -1)  # (1, T, H E)
        return linear(o, self.w_o, residual=residual)

    def decode(self, x: Tensor, cos: Tensor, signed_sin: Tensor, slots: Tensor, positions: Tensor,
               length: int, contiguous: bool, mask: Tensor, residual: Tensor | None = None) -> Tensor:
        """x (B, 1, D); cos, signed_sin (B, 1, E); mask additive (0 or -inf), (B K, G, S) for the
        bmm path and (B, 1, 1, S) for SDPA: each row attends to its own slot's first
        positions[b] + 1 tokens. Returns residual + attention output."""
        b = x.shape[0]
        h, kv, e = self.n_heads, self.n_kv, self.head_dim
        assert self.cache is not None, "decode needs the KV cache (call setup_caches)"
        qkv = linear(x[:, 0], self.w_qkv, self.b_qkv).view(b, h + 2 * kv, e)  # (B, H+2K, E)
        qk = apply_rope(qkv[:, :h + kv], cos, signed_sin)
        self.cache.write_tokens(slots, positions, qk[:, h:], qkv[:, h + kv:])
        if contiguous:
            keys, values = self.cache.k[:b, :, :length], self.cache.v[:b, :, :length]  # (B, K, S, E)
        else:
            keys, values = self.cache.k[slots, :, :length], self.cache.v[slots, :, :length]
        if bmm_attention(x.dtype):
            q = qk[:, :h].reshape(b * kv, h // kv, e)  # (B K, G, E): query head j reads kv head j // G
            keys, values = keys.reshape(b * kv, length, e), values.reshape(b * kv, length, e)
            scores = torch.baddbmm(mask, q, keys.transpose(1, 2), alpha=e ** -0.5)  # (B K, G, S)
            o = torch.bmm(torch.softmax(scores, dim=-1), values)  # (B K, G, E)
        else:
            o = F.scaled_dot_product_attention(qk[:, :h, None], keys, values, attn_mask=mask, enable_gqa=True)
        return linear(o.reshape(b, 1, h * e), self.w_o, residual=residual)


def bmm_attention(dtype: torch.dtype) -> bool:
    """Decode attention: float32 runs fastest as two batched matmuls (strided cache reads, no
    copies); bfloat16 through SDPA's kernel (its bmm would copy the cache slices first)."""
    return dtype == torch.float32


def _share_rows(modules: tuple[nn.Linear, ...], fused: Tensor) -> None:
    """Make each module's weight a view of its rows in `fused` (frozen weights only)."""
    if any(m.weight.requires_grad for m in modules):
        return
    row = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(fused[row:row + n], requires_grad=False)
        row += n


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)
        # For the inference passes (see `fuse`): float32 gate/up rows in one matrix; bfloat16
        # packed gate and up.
        self.w_gate_up: Tensor | None = None
        self.w_gate: Tensor | None = None
        self.w_up: Tensor | None = None
        self.w_down: Tensor | None = None

    def fuse(self) -> None:
        w_gate = pack_weight(self.gate_proj.weight)
        if w_gate.is_mkldnn:  # oneDNN applies silu and the product with up inside the matmuls
            self.w_gate, self.w_up, self.w_gate_up = w_gate, pack_weight(self.up_proj.weight), None
        else:
            self.w_gate_up = torch.cat([self.gate_proj.weight, self.up_proj.weight])  # (2F, D)
            _share_rows((self.gate_proj, self.up_proj), self.w_gate_up)
        self.w_down = pack_weight(self.down_proj.weight)

    def forward(self, x: Tensor, hooks: LevelHooks | None, layer: int) -> Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (.., F)
        out = self.down_proj(h)
        if hooks is not None:
            delta = hooks.mlp_delta(layer, h)
            if delta is not None:
                out = out + delta
        return out

    def fused(self, x: Tensor, hooks: LevelHooks | None, layer: int, residual: Tensor) -> Tensor:
        """residual + `forward`, through the fused weights (inference passes only: no autograd)."""
        if self.w_gate_up is None:
            gate = torch.ops.mkldnn._linear_pointwise(x, self.w_gate, None, "swish", [], "")
            h = torch.ops.mkldnn._linear_pointwise.binary(x, gate, self.w_up, None, "mul")  # (.., F)
        else:
            gate_up = F.linear(x, self.w_gate_up)  # (.., 2F)
            f = gate_up.shape[-1] // 2
            h = F.silu(gate_up[..., :f]) * gate_up[..., f:]  # (.., F)
        delta = hooks.mlp_delta(layer, h) if hooks is not None else None
        if delta is None:
            return linear(h, self.w_down, residual=residual)
        return residual + (linear(h, self.w_down) + delta)  # the order of `Block.mix`


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

    def mix_fused(self, x: Tensor, hooks: LevelHooks | None) -> Tensor:
        """`mix` for the inference passes, whose attention output already holds the residual."""
        if hooks is not None:
            x = hooks.after_attention(self.index, x)
        return self.mlp.fused(self.post_attention_layernorm(x), hooks, self.index, residual=x)


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
        self.head: Tensor | None = None  # lm_head weight for the inference passes (see fuse_weights)

    # -- caches ------------------------------------------------------------------------------
    def setup_caches(self, max_batch: int, max_seq: int) -> None:
        """Allocate static KV buffers for `max_batch` sequences of up to `max_seq` tokens."""
        dtype = self.embed_tokens.weight.dtype
        device = self.embed_tokens.weight.device
        for block in self.layers:
            block.self_attn.cache = KVCache(max_batch, max_seq, self.config.n_kv_heads,
                                            self.config.head_dim, dtype).to(device)
        self.max_batch, self.max_seq = max_batch, max_seq
        self.fuse_weights()

    def fuse_weights(self) -> None:
        """(Re)build the fused q/k/v and gate/up weights of the inference passes from the
        Linear modules (bfloat16: also packed for oneDNN). Weights changed later by assignment
        need another call; in-place changes of unpacked weights show through."""
        with torch.inference_mode(False), torch.no_grad():  # usable by autograd passes later
            for block in self.layers:
                block.self_attn.fuse()
                block.mlp.fuse()
            self.head = pack_weight(self.lm_head.weight)

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sign-folded sin (T, E) for `apply_rope`."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # (T, E/2)
        cos, sin = angles.cos() * self.rope_scale, angles.sin() * self.rope_scale
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)

    # -- forward passes ----------------------------------------------------------------------
    def prefill(self, tokens: Tensor, layout: PackedLayout, hooks: LevelHooks | None = None,
                all_logits: bool = False) -> Tensor:
        """tokens (T,) packed prompts. Returns the logits of each sequence's last token (N, V),
        or of every token (T, V) with `all_logits`."""
        x = self.embed_tokens(tokens)[None]  # (1, T, D)
        cos, signed_sin = self._rope(layout.positions(tokens.device), x.dtype)
        for block in self.layers:
            x = block.self_attn.prefill(block.input_layernorm(x), cos, signed_sin, layout, residual=x)
            x = block.mix_fused(x, hooks)
        x = x[0]
        if not all_logits:
            ends = torch.tensor(layout.lengths, device=x.device).cumsum(0) - 1
            x = x[ends]
        return linear(self.norm(x), self.head)

    def decode(self, tokens: Tensor, slots: Tensor, positions: Tensor, length: int,
               hooks: LevelHooks | None = None, contiguous: bool = False) -> Tensor:
        """tokens, slots, positions (B,). `length` = max(positions) + 1, known to the caller
        without a device sync; `contiguous` says slots are 0..B-1 (cache read without a gather).
        Returns logits (B, V)."""
        x = self.embed_tokens(tokens)[:, None]  # (B, 1, D)
        cos, signed_sin = self._rope(positions, x.dtype)  # (B, E)
        cos, signed_sin = cos[:, None], signed_sin[:, None]  # (B, 1, E): one row per sequence
        c = self.config
        visible = torch.arange(length, device=x.device)[None, :] <= positions[:, None]  # (B, S)
        mask = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill_(~visible, float("-inf"))
        mask = mask[:, None, None]  # (B, 1, 1, S), shared by every layer
        if bmm_attention(x.dtype):
            g = c.n_heads // c.n_kv_heads
            mask = mask.expand(-1, c.n_kv_heads, g, -1).reshape(-1, g, length)  # (B K, G, S)
        for block in self.layers:
            x = block.self_attn.decode(block.input_layernorm(x), cos, signed_sin, slots, positions,
                                       length, contiguous, mask, residual=x)
            x = block.mix_fused(x, hooks)
        return linear(self.norm(x[:, 0]), self.head)

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

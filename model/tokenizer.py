"""Tokenizers and chat templates.

`Tokenizer` wraps a byte-level BPE (from GGUF metadata or a Hugging Face `tokenizer.json`) and
renders role/content messages with the model's own Jinja chat template. `ByteTokenizer` is the
tiny preset's vocabulary: 256 bytes plus three special tokens. `StreamDecoder` turns a token
stream into text deltas that never split a UTF-8 sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _compile_template(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str):
        raise ValueError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


@dataclass
class Tokenizer:
    """Byte-level BPE tokenizer with the model's chat template and stop tokens."""

    backend: HFTokenizer
    chat_template: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    special_tokens: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._template = _compile_template(self.chat_template)
        self.vocab_size = self.backend.get_vocab_size()

    @classmethod
    def from_gguf_fields(cls, fields: dict, chat_template: str | None) -> "Tokenizer":
        tokens: list[str] = fields["tokenizer.ggml.tokens"]
        model = fields.get("tokenizer.ggml.model", "gpt2")
        if model != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {model!r}: only byte-level BPE (gpt2) is supported")
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False))
        # SmolLM2 / Llama-3 style pre-tokenization: single digits, then GPT-2 byte-level regex.
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        backend.decoder = decoders.ByteLevel()
        types = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
        specials = [t for t, kind in zip(tokens, types) if kind == 3]  # 3 = control token
        backend.add_special_tokens(specials)
        eos = fields.get("tokenizer.ggml.eos_token_id")
        eos_ids = {eos} if eos is not None else set()
        for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            if name in vocab and types[vocab[name]] == 3:
                eos_ids.add(vocab[name])
        return cls(backend, chat_template or CHATML_TEMPLATE, fields.get("tokenizer.ggml.bos_token_id"),
                   tuple(sorted(eos_ids)), {t: vocab[t] for t in specials})

    @classmethod
    def from_hf_dir(cls, path, config: dict) -> "Tokenizer":
        import json
        from pathlib import Path

        path = Path(path)
        backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        tok_cfg = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").exists() else {}
        template = tok_cfg.get("chat_template") or CHATML_TEMPLATE
        if isinstance(template, list):  # named templates: take the default
            template = next(t["template"] for t in template if t.get("name") == "default")
        vocab = backend.get_vocab()
        eos = config.get("eos_token_id")
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if isinstance(tok_cfg.get("eos_token"), str) and tok_cfg["eos_token"] in vocab:
            eos_ids.add(vocab[tok_cfg["eos_token"]])
        specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        return cls(backend, template, config.get("bos_token_id"), tuple(sorted(eos_ids)),
                   {k: v for k, v in specials.items()})

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token="", eos_token="")

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))


class ByteTokenizer:
    """Tiny preset vocabulary: bytes 0-255, then <|im_start|>, <|im_end|> (stop), <|endoftext|>."""

    SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")

    def __init__(self) -> None:
        self.special_tokens = {s: 256 + i for i, s in enumerate(self.SPECIALS)}
        self.bos_token_id = None
        self.eos_token_ids = (self.special_tokens["<|im_end|>"],)
        self.chat_template = CHATML_TEMPLATE
        self._template = _compile_template(CHATML_TEMPLATE)
        self.vocab_size = 256 + len(self.SPECIALS)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        rest = text
        while rest:
            hits = [(rest.find(s), s) for s in self.SPECIALS if s in rest]
            if not hits:
                ids.extend(rest.encode())
                break
            at, special = min(hits)
            ids.extend(rest[:at].encode())
            ids.append(self.special_tokens[special])
            rest = rest[at + len(special):]
        return ids

    def decode(self, ids: list[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
            else:
                out.append(buf.decode(errors="replace"))
                buf = bytearray()
                out.append(self.SPECIALS[i - 256])
        out.append(buf.decode(errors="replace"))
        return "".join(out)

    render_chat = Tokenizer.render_chat
    encode_chat = Tokenizer.encode_chat


class StreamDecoder:
    """Incremental detokenisation: `push(id)` returns the text that is now complete.

    Holds tokens back while their decoding ends in an incomplete UTF-8 sequence (U+FFFD), so a
    multi-byte character split over tokens is emitted whole; then starts afresh, so the cost
    per token stays constant.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text

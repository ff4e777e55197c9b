"""The model as the service sees it: `NsamModel` owns weights, tokenizer and level config, and
speaks in token ids, plain dataclasses and state *bytes* — never tensors at its boundary.

Contract: states go in and new states come out (`update_medium`, `consolidate` are pure with
respect to their inputs). Not thread-safe: one owner thread at a time.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import config as configs
from .backbone import Transformer
from .learning.consolidation import ConsolidationConfig, ConsolidationReport, consolidate
from .learning.notes import Note
from .learning.rehearsal import RehearsalConfig
from .learning.study import MAX_CLAUSES, clauses
from .learning.turn import TurnConfig, learn_turn
from .generation import Generator
from .generation import TokenEvent
from .levels import AssociativeState, FastLevelRunner, FastMemory, LevelSpec, LevelsConfig, default_levels, new_state
from .loading import load
from .sampling import SamplingParams
from .state import MemoryState, StateError, user_snapshot
from .tokenizer import ByteTokenizer
from .updates import LevelReport, TrainingExample, levels_loss, update_on_examples

__all__ = ["NsamModel", "SessionBatch", "SamplingParams", "TokenEvent", "LevelReport",
           "ConsolidationReport", "StateError", "DocumentChunk", "DOCUMENT_CHUNK_TOKENS"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# A document is read in chunks of this many tokens, attention seeing one chunk at a time: the
# chunk the online evaluation measures (benchmarks/README.md).
DOCUMENT_CHUNK_TOKENS = 256


@dataclass(frozen=True)
class DocumentChunk:
    """One chunk of a document read into a session."""

    tokens: int  # tokens predicted (the chunk's length − 1)
    loss: float  # their mean next-token loss, with the levels as the chunks before left them
    reports: list[LevelReport]


def guard_fast(spec: LevelSpec, old: AssociativeState, runner: FastLevelRunner, started: float
               ) -> tuple[AssociativeState, LevelReport]:
    """Keep the fast level's writes unless they are non-finite or past the level's norm bound."""
    new = runner.state()
    finite = all(torch.isfinite(t).all() for t in (new.memory, new.momentum))
    update = float((new.memory - old.memory).norm()) if finite else math.inf
    ok = finite and update <= spec.max_update_norm
    kept = new if ok else old
    surprise = sum(runner.surprise) / len(runner.surprise) if runner.surprise else 0.0
    return kept, LevelReport("fast", surprise, update, kept.weight_norm(), kept.weight_norm(), ok,
                             "ok" if ok else ("non-finite" if not finite else "norm-bound"),
                             time.perf_counter() - started)


def _preset_text(name: str) -> str:
    return (Path(__file__).parent / "presets" / name).read_text()


def _load_trained_fast(fast: FastMemory, model_fingerprint: str) -> bool:
    """Use the meta-trained fast-level parameters shipped with the package, when they were
    trained for this backbone and level spec (`nsam train-memory --install`)."""
    from safetensors import safe_open

    path = Path(__file__).parent / "presets" / "fast_memory.safetensors"
    if not path.is_file():
        return False
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("model") != model_fingerprint or meta.get("spec") != fast.compat_key():
            return False
        fast.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
    # Installed with its read gates scaled down for chat (`--read-scale`); a document's text in
    # view is read at `--document-read-scale` of the trained strength, and text that has left the
    # attention window at `--evicted-read-scale`.
    read_scale = float(meta.get("read_scale", 1.0))
    if read_scale > 0:  # a level saved with its reads off stays off
        fast.evicted_read_boost = float(meta.get("evicted_read_scale", read_scale)) / read_scale
        fast.document_read_boost = float(meta.get("document_read_scale", read_scale)) / read_scale
    return True


class NsamModel:
    def __init__(self, model: Transformer, tokenizer, levels: LevelsConfig, source: str,
                 context_window: int = 2048, consolidation: ConsolidationConfig = ConsolidationConfig(),
                 turn: TurnConfig = TurnConfig()):
        self.model, self.tokenizer, self.levels, self.source = model, tokenizer, levels, source
        self.context_window = min(context_window, model.config.max_seq_len)
        self.consolidation = consolidation
        self.turn = turn
        fast_spec = next((s for s in levels.levels if s.rule == "associative"), None)
        self.fast_params = None
        if fast_spec is not None:
            torch.manual_seed(0)  # same initial projections in every process
            self.fast_params = FastMemory(fast_spec, model.config.dim).requires_grad_(False)
            self.fast_trained = _load_trained_fast(self.fast_params, model.config.fingerprint())
        trained = "trained" if getattr(self, "fast_trained", False) else "init"
        level_keys = "|".join(spec.state_key() for spec in levels.levels)
        digest = hashlib.sha256(f"{model.config.fingerprint()}|{level_keys}|{source}|{trained}".encode())
        self.fingerprint = digest.hexdigest()[:16]
        # Two anchors: a live turn keeps the assistant's chat as it was (its own chat replies),
        # while the user level, which sums a user's whole history, keeps the model's prose outside
        # the chat template (its own plain continuations), where drift on ordinary text shows.
        self.anchor_ids = tokenizer.encode(_preset_text("anchor.txt"))
        self.consolidation_anchor_ids = tokenizer.encode(_preset_text("anchor_plain.txt"))
        self.probe_ids = tokenizer.encode(_preset_text("probe.txt"))

    @classmethod
    def load(cls, name: str = "default", dtype: str = "float32") -> "NsamModel":
        """"default" (embedded SmolLM2-135M-Instruct), "tiny" (random, byte tokenizer), or a path."""
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if name == "tiny":
            torch.manual_seed(0)  # the tiny model is the same in every process
            cfg = configs.tiny()
            model = Transformer(cfg)
            for p in model.parameters():
                if p.dim() > 1:
                    torch.nn.init.normal_(p, std=0.02)  # small logits, as trained models have
            model = model.to(_DTYPES[dtype]).requires_grad_(False).eval()
            model.inv_freq = model.inv_freq.float()
            return cls(model, ByteTokenizer(), default_levels(cfg.n_layers), "tiny", cfg.max_seq_len,
                       ConsolidationConfig(rehearsal=RehearsalConfig(steps=4, lr=3e-3, own_answers=1)),
                       TurnConfig(rehearsal=RehearsalConfig(steps=2, lr=5e-3, own_answers=1), writer_samples=1))
        loaded = load(name, _DTYPES[dtype])
        return cls(loaded.model, loaded.tokenizer, default_levels(loaded.model.config.n_layers), loaded.source)

    # -- text ----------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def encode_chat(self, messages: list[dict[str, str]], max_prompt_tokens: int) -> list[int]:
        """Prompt ids with the generation prompt; drops the oldest turns (keeps a leading system
        message) until it fits."""
        return self.encode_turn(messages, max_prompt_tokens)[0]

    def encode_turn(self, messages: list[dict[str, str]], max_prompt_tokens: int) -> tuple[list[int], int]:
        """`encode_chat`, plus how many trailing tokens are new to the session: the last
        message and the generation prompt (earlier turns were written by the turns that had them)."""
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        rest = messages[len(system):]
        while rest:
            ids = self.tokenizer.encode_chat(system + rest)
            if len(ids) <= max_prompt_tokens:
                history = system + rest[:-1]
                old = self.tokenizer.encode_chat(history, add_generation_prompt=False) if rest[:-1] else []
                return ids, len(ids) - len(old) if ids[:len(old)] == old else len(ids)
            rest = rest[1:]
        raise ValueError(f"the last message alone exceeds the prompt budget of {max_prompt_tokens} tokens")

    # -- states --------------------------------------------------------------------------------
    def _new_level(self, name: str):
        spec = self.levels.get(name)
        seed = 1 + self.levels.names().index(name)
        return new_state(spec, self.model.config.hidden_dim, self.model.config.dim, seed)

    def new_user_state(self) -> bytes:
        return MemoryState("user", {"user": self._new_level("user")}).to_bytes(self.fingerprint, self.levels)

    def new_session_state(self, user_state: bytes | None) -> bytes:
        user = self._read(user_state, "user") if user_state else None
        levels = {name: self._new_level(name) for name in self.levels.names() if name != "user"}
        levels["user"] = user_snapshot(user.levels["user"] if user else self._new_level("user"))
        return MemoryState("session", levels).to_bytes(self.fingerprint, self.levels)

    def check_state(self, data: bytes, kind: str) -> None:
        self._read(data, kind)

    def user_notes(self, user_state: bytes) -> list[Note]:
        """What the user level was taught (the latest notes), oldest first."""
        return list(self._read(user_state, "user").notes)

    def _read(self, data: bytes, kind: str) -> MemoryState:
        return MemoryState.from_bytes(data, self.fingerprint, self.levels, kind)

    def _write(self, state: MemoryState) -> bytes:
        return state.to_bytes(self.fingerprint, self.levels)

    # -- serving -------------------------------------------------------------------------------
    def generator(self, max_batch: int, learning: bool = True) -> "SessionBatch":
        return SessionBatch(self, max_batch, learning)

    def update_medium(self, session_state: bytes, messages: list[dict[str, str]], turns: int = 1
                      ) -> tuple[bytes, list[LevelReport]]:
        """After a reply; `messages` is the session so far, ending with the user's message and the
        reply. The user's message is studied into notes and rehearsed with the session's earlier
        ones; a message that says nothing to note is learnt as text (`learning.turn`).

        `turns` > 1 (a coalesced update, when the learner fell behind) learns the last `turns`
        user messages at the cost of as few turns as the study allows: their statements joined
        by newlines into texts of up to `MAX_CLAUSES` clauses (what one study notes), and the
        messages that state nothing joined into one text learnt as text."""
        state = self._read(session_state, "session")
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise ValueError("update_medium needs the session's messages, ending with the user's and the reply")
        if turns < 1:
            raise ValueError(f"turns must be at least 1, got {turns}")
        spec = self.levels.get("medium")
        parents = [state.levels["user"]] if "user" in state.levels else []
        texts = users[-1:] if turns == 1 else _study_packs(users[-turns:], MAX_CLAUSES)
        reports = []
        for i, text in enumerate(texts):
            update = learn_turn(self.model, self.tokenizer, spec, state.levels["medium"], parents, text,
                                state.notes, self.anchor_ids, len(users) - len(texts) + i + 1, self.turn)
            state = replace(state.with_level("medium", update.state), notes=(*state.notes, *update.notes))
            reports.append(_with_drift(update.report, update.state))
        return self._write(state), reports

    def merge_medium(self, latest: bytes, updated: bytes) -> bytes:
        """`latest` with what a medium update owns taken from `updated`: the medium level and the
        session's notes (the fast level and the user snapshot stay `latest`'s). Both are session
        states; an update that ran while later turns committed lands on them this way."""
        base, update = self._read(latest, "session"), self._read(updated, "session")
        if "medium" not in update.levels:
            return latest
        return self._write(replace(base.with_level("medium", update.levels["medium"]), notes=update.notes))

    def document_chunks(self, text: str) -> list[list[int]]:
        """A document's token ids in the chunks `read_document_chunk` takes."""
        ids = self.tokenizer.encode(text)
        return [ids[i:i + DOCUMENT_CHUNK_TOKENS] for i in range(0, len(ids), DOCUMENT_CHUNK_TOKENS)]

    def read_document_chunk(self, session_state: bytes, ids: list[int]) -> tuple[bytes, DocumentChunk]:
        """Reads one chunk of a document into the session: the chunk is scored with the levels as
        the chunks before left them (attention sees this chunk only: the rest reaches it through
        the levels), then the fast level keeps its writes and the medium level learns the chunk
        as text. Each update is guarded; a rejected one leaves its level as it was."""
        started = time.perf_counter()
        state = self._read(session_state, "session")
        spec = self.levels.get("medium")
        fast_old = state.levels.get("fast")
        lora = [state.levels[name] for name in ("user", "medium") if name in state.levels]
        loss, runner = levels_loss(self.model, spec, lora, self.fast_params, fast_old, ids)
        loss = loss if len(ids) > 1 else 0.0  # a one-token chunk (a document's last) predicts nothing
        reports = []
        if runner is not None:
            kept, report = guard_fast(self.levels.get("fast"), fast_old, runner, started)
            state = state.with_level("fast", kept)
            reports.append(report)
        if "medium" in state.levels and len(ids) > 1:
            frozen = [state.levels["user"]] if "user" in state.levels else []
            new, report = update_on_examples(self.model, spec, state.levels["medium"], frozen,
                                             [TrainingExample(ids, [1.0] * (len(ids) - 1))])
            state = state.with_level("medium", new)
            reports.append(_with_drift(report, new))
        return self._write(state), DocumentChunk(max(len(ids) - 1, 0), loss, reports)

    def consolidate(self, user_state: bytes, session_state: bytes, transcript: list[dict[str, str]],
                    should_stop: Callable[[], bool] | None = None) -> tuple[bytes, ConsolidationReport]:
        user = self._read(user_state, "user")
        session = self._read(session_state, "session")  # a foreign session is refused before any work
        new, report = consolidate(self.model, self.tokenizer, self.levels.get("user"), user.levels["user"],
                                  transcript, self.consolidation_anchor_ids, self.probe_ids,
                                  self.consolidation, should_stop, user.notes, session.notes)
        return self._write(replace(user.with_level("user", new), notes=report.known)), report


class SessionBatch:
    """Continuous batching over sessions given as state bytes: wraps `generation.Generator`,
    reading each session's levels from its state and writing the fast level back after the turn."""

    def __init__(self, owner: NsamModel, max_batch: int, learning: bool):
        self.owner = owner
        self.learning = learning
        self.inner = Generator(owner.model, owner.tokenizer, owner.levels, owner.fast_params, max_batch,
                                owner.context_window, learning)
        self.states: dict[str, MemoryState] = {}
        self.started: dict[str, float] = {}

    def add(self, request_id: str, prompt_ids: list[int], session_state: bytes, params: SamplingParams,
            fresh_tokens: int | None = None, messages: list[dict[str, str]] | None = None) -> None:
        """`messages`: the session so far the prompt was made from (accepted for callers that
        pass it; decoding reads the levels, not the text)."""
        params.validate()
        state = self.owner._read(session_state, "session")
        self.inner.add(request_id, prompt_ids, state.levels, params, fresh_tokens)
        self.states[request_id] = state
        self.started[request_id] = time.perf_counter()

    def step(self) -> list[TokenEvent]:
        return self.inner.step()

    def has_work(self) -> bool:
        return self.inner.has_work()

    def cancel(self, request_id: str) -> None:
        self.inner.cancel(request_id)

    def pop_state(self, request_id: str) -> tuple[bytes, list[LevelReport]]:
        """After the request finished: the session state with the fast-level writes of the turn."""
        _, runner = self.inner.pop_finished(request_id)
        state = self.states.pop(request_id)
        started = self.started.pop(request_id)
        reports = []
        if runner is not None:
            kept, report = guard_fast(self.owner.levels.get("fast"), state.levels["fast"], runner, started)
            state = state.with_level("fast", kept)
            reports.append(report)
        return self.owner._write(state), reports


def _study_packs(messages: list[str], clauses_per_text: int) -> list[str]:
    """Messages as few texts to learn: the ones that state nothing first, joined (learnt as
    text), then the others in order, joined up to `clauses_per_text` statements a text."""
    plain, packs, current, counted = [], [], [], 0
    for text in messages:
        n = len(clauses(text))
        if n == 0:
            plain.append(text)
            continue
        if current and counted + n > clauses_per_text:
            packs.append("\n".join(current))
            current, counted = [], 0
        current.append(text)
        counted += n
    if current:
        packs.append("\n".join(current))
    return (["\n".join(plain)] if plain else []) + packs


def _with_drift(report: LevelReport, medium) -> LevelReport:
    """A medium report's drift: the norm of its delta (its parent, the user level, is a separate one)."""
    if not report.accepted:
        return report
    return replace(report, drift=float(torch.linalg.matrix_norm(medium.b @ medium.a).norm()))

"""`nsam serve --engine vllm`: vLLM decodes, nsam's levels ride along as per-request LoRA adapters.

`VllmModel` is a `ServingModel`. Every call but `generator` goes to a native `NsamModel` on the
CPU (token counts, new states; the learner threads keep their own native models and learn as
with the native engine). `generator` hands out a `VllmBatch`: each turn's session state becomes
one LoRA adapter (the user level and the session's medium level concatenated: `model.export`),
written once per distinct content, so a newly committed version is a new adapter id, and
vLLM decodes the turn with it. Adapter directories are kept in an LRU of `--max-loras` × 4;
vLLM itself keeps `--max-loras` loaded. Per-user isolation is as in the native engine: a
request carries only its own session's levels.

The fast level does not run inside vLLM (its reads and writes need hooks in the attention
output that vLLM's kernels do not have): its state passes through a turn unchanged. The
start-up line, docs/gpu.md and the `nsam_engine_info` metric say so.

vLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), stepped by the decode thread.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import AbstractSet, Any

from nsam.server.settings import Settings

log = logging.getLogger(__name__)

STARTUP_NOTE = ("engine vllm: the fast level does not run in vLLM (decoding uses the user and medium "
                "levels as LoRA adapters); medium updates and consolidation run in nsam's learner")
# vLLM's LoRA ranks; an adapter of rank r needs the next one up.
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# CUDA: the share of GPU memory vLLM may take (the learner models share the GPU).
GPU_MEMORY_SHARE = 0.5


def _vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # stepped from our thread
    import vllm  # type: ignore[import-not-found]  # only in the vLLM environment

    return vllm


def exported_backbone(native: Any, root: Path) -> Path:
    """The backbone as a Hugging Face directory under `root`, written once per model fingerprint."""
    from nsam.model.export import write_hf_model

    path = root / f"backbone-{native.fingerprint}"
    if not (path / "config.json").is_file():
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".backbone-"))
        write_hf_model(native.model, native.tokenizer, tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return path


@dataclass
class AdapterCache:
    """Adapter directories by content key, least recently used first; each gets an id once."""

    root: Path
    capacity: int
    loaded: OrderedDict = field(default_factory=OrderedDict)  # key -> (id, path)
    next_id: int = 1
    evicted: list[int] = field(default_factory=list)  # ids to unload from vLLM

    def get(self, adapter: Any, in_use: AbstractSet[int] = frozenset()) -> tuple[int, Path]:
        """The adapter's id and directory, written on first use; evicts the least recently used
        beyond `capacity`, except those of turns still decoding (`in_use`)."""
        key = adapter.key()
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        path = adapter.write(self.root / f"lora-{key}")
        self.loaded[key] = (self.next_id, path)
        self.next_id += 1
        for old_key in [k for k, (i, _) in self.loaded.items() if i not in in_use][:-1]:
            if len(self.loaded) <= self.capacity:
                break
            old_id, old_path = self.loaded.pop(old_key)
            shutil.rmtree(old_path, ignore_errors=True)
            self.evicted.append(old_id)
        return self.loaded[key]


class VllmModel:
    """`ServingModel` whose decoding runs in vLLM; see the module docstring."""

    def __init__(self, native: Any, engine: Any, adapters: AdapterCache, max_batch: int):
        self.native, self.engine, self.adapters = native, engine, adapters
        self.max_batch = max_batch
        self.fingerprint = native.fingerprint
        self.context_window = native.context_window

    @classmethod
    def start(cls, settings: Settings, native: Any = None, workdir: Path | None = None) -> "VllmModel":
        from nsam.model.export import TARGET_MODULE
        from nsam.model.runtime import NsamModel

        vllm = _vllm()
        native = native or NsamModel.load(settings.model, "float32")
        root = Path(workdir or settings.data_dir / "vllm")
        root.mkdir(parents=True, exist_ok=True)
        backbone = exported_backbone(native, root)
        rank = sum(s.rank for s in native.levels.levels if s.rule == "lora")
        args = dict(model=str(backbone), dtype=settings.dtype, seed=0, max_model_len=native.context_window,
                    max_num_seqs=settings.max_batch, enable_lora=True, max_loras=settings.max_loras,
                    max_lora_rank=next(r for r in _LORA_RANKS if r >= rank), enforce_eager=True,
                    # LoRA layers only where the levels are: vLLM otherwise wraps every linear layer
                    # and the logits, and computes their (zero) deltas for each token.
                    lora_target_modules=[TARGET_MODULE])
        if settings.device.startswith("cuda"):
            args["gpu_memory_utilization"] = GPU_MEMORY_SHARE
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes far more
        engine = vllm.LLMEngine.from_engine_args(vllm.EngineArgs(**args))
        log.warning(STARTUP_NOTE)
        adapters_dir = root / f"adapters-{os.getpid()}"
        shutil.rmtree(adapters_dir, ignore_errors=True)
        adapters_dir.mkdir()
        return cls(native, engine, AdapterCache(adapters_dir, 4 * settings.max_loras), settings.max_batch)

    # -- everything but decoding: the native model --------------------------------------------
    def count_tokens(self, text):
        return self.native.count_tokens(text)

    def encode_turn(self, messages, max_prompt_tokens):
        return self.native.encode_turn(messages, max_prompt_tokens)

    def encode_chat(self, messages, max_prompt_tokens):
        return self.native.encode_chat(messages, max_prompt_tokens)

    def new_user_state(self):
        return self.native.new_user_state()

    def new_session_state(self, user_state):
        return self.native.new_session_state(user_state)

    def check_state(self, data, kind):
        return self.native.check_state(data, kind)

    def user_notes(self, user_state):
        return self.native.user_notes(user_state)

    def document_chunks(self, text):
        return self.native.document_chunks(text)

    def merge_medium(self, latest, updated):
        return self.native.merge_medium(latest, updated)

    def update_medium(self, session_state, messages, turns=1):
        return self.native.update_medium(session_state, messages, turns)

    def read_document_chunk(self, session_state, ids):
        return self.native.read_document_chunk(session_state, ids)

    def consolidate(self, user_state, session_state, transcript, should_stop=None):
        return self.native.consolidate(user_state, session_state, transcript, should_stop)

    def generator(self, max_batch: int, learning: bool = True) -> "VllmBatch":
        return VllmBatch(self)


@dataclass
class _Turn:
    state: bytes
    params: Any
    decoder: Any
    lora_id: int = 0  # 0: no adapter
    seen: int = 0  # output tokens already turned into events
    text: str = ""  # text held back: it could still grow into a stop string


class VllmBatch:
    """`DecodeBatch` over vLLM's engine: the same events as `generation.Generator`."""

    def __init__(self, owner: VllmModel):
        self.owner = owner
        self.engine = owner.engine
        self.turns: dict[str, _Turn] = {}
        self.cancelled: list[Any] = []
        self.eos_ids = tuple(owner.native.tokenizer.eos_token_ids)  # () decodes to max_tokens (benchmarks)

    def add(self, request_id, prompt_ids, session_state, params, fresh_tokens=None, messages=None) -> None:
        from nsam.model.export import session_adapter
        from nsam.model.tokenizer import StreamDecoder

        vllm = _vllm()
        from vllm.lora.request import LoRARequest  # type: ignore[import-not-found]

        params.validate()
        native = self.owner.native
        if len(prompt_ids) + params.max_tokens > native.context_window:
            raise ValueError(f"prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) exceeds "
                             f"the context window of {native.context_window} tokens")
        adapter = session_adapter(session_state, native.fingerprint, native.levels)  # StateError: refused
        lora, lora_id = None, 0
        if adapter is not None:
            in_use = {t.lora_id for t in self.turns.values() if t.params is not None}
            lora_id, path = self.owner.adapters.get(adapter, in_use)
            lora = LoRARequest(f"nsam-{lora_id}", lora_id, str(path))
        for old in self.owner.adapters.evicted:
            self.engine.remove_lora(old)
        self.owner.adapters.evicted.clear()
        stops = sorted(set(self.eos_ids) | set(params.stop_token_ids))
        sampling = vllm.SamplingParams(
            max_tokens=params.max_tokens, temperature=params.temperature, top_k=params.top_k,
            top_p=params.top_p, repetition_penalty=params.repetition_penalty, seed=params.seed,
            stop_token_ids=stops, ignore_eos=True, detokenize=False,  # stops: ours; text: StreamDecoder
            output_kind=vllm.sampling_params.RequestOutputKind.CUMULATIVE)
        self.engine.add_request(request_id, {"prompt_token_ids": list(prompt_ids)}, sampling, lora_request=lora)
        self.turns[request_id] = _Turn(session_state, params, StreamDecoder(native.tokenizer), lora_id)

    def step(self) -> list[Any]:
        from nsam.model.generation import TokenEvent

        events, self.cancelled = self.cancelled, []
        if not self.engine.has_unfinished_requests():
            return events
        stops = set(self.eos_ids)
        for out in self.engine.step():
            turn = self.turns.get(out.request_id)
            if turn is None or turn.params is None:  # unknown, or finished by us already
                continue
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            new, turn.seen = ids[turn.seen:], len(ids)
            for i, token in enumerate(new):
                last = out.finished and i == len(new) - 1
                if token in stops or token in turn.params.stop_token_ids:
                    events.append(self._finish(out.request_id, "stop", token, turn.text + turn.decoder.flush(),
                                               not out.finished))
                    break
                buffer = turn.text + turn.decoder.push(token)
                hit = min((at for at in (buffer.find(s) for s in turn.params.stop) if at != -1), default=-1)
                if hit != -1:
                    events.append(self._finish(out.request_id, "stop", token, buffer[:hit], not out.finished))
                    break
                hold = max((len(s) - 1 for s in turn.params.stop), default=0)
                cut = max(len(buffer) - hold, 0)
                text, turn.text = buffer[:cut], buffer[cut:]
                if last:
                    reason = "length" if completion.finish_reason == "length" else "stop"
                    events.append(self._finish(out.request_id, reason, token, text + turn.text + turn.decoder.flush()))
                else:
                    events.append(TokenEvent(out.request_id, token, text, None))
            if out.finished and turn.params is not None:  # finished without a new token
                reason = "length" if completion.finish_reason == "length" else "stop"
                events.append(self._finish(out.request_id, reason, -1, turn.text + turn.decoder.flush()))
        return events

    def _finish(self, request_id: str, reason: str, token: int, text: str, running: bool = False) -> Any:
        from nsam.model.generation import TokenEvent

        if running:  # a stop string, or a stop token after others in one step: end it in vLLM too
            self.engine.abort_request([request_id])
        self.turns[request_id].params = None  # finished: kept only for pop_state
        return TokenEvent(request_id, token, text, reason)

    def has_work(self) -> bool:
        return bool(self.cancelled) or self.engine.has_unfinished_requests()

    def cancel(self, request_id: str) -> None:
        from nsam.model.generation import TokenEvent

        if request_id in self.turns:
            self.engine.abort_request([request_id])
            self.turns[request_id].params = None
            self.cancelled.append(TokenEvent(request_id, -1, "", "cancelled"))

    def pop_state(self, request_id: str) -> tuple[bytes, list]:
        """The session state as it came: vLLM runs no fast level, so a turn writes none."""
        return self.turns.pop(request_id).state, []

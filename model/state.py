"""Level states as bytes: safetensors with a format version and a config fingerprint.

A session's state holds its fast and medium levels plus a snapshot of its user's slow level. A
LoRA level is stored as its A and B in bfloat16 and its step count, without Adam's moments: a
level read from bytes is float32 again and its next update restarts the moments from zero (each
update is a rehearsal of several steps of its own). Format 1 states (float32, with moments) are
still read, moments and all. A user's
or session state also keeps its notes (what the user said, as questions and answers: a session's
from its turns, a user's for every later consolidation to rehearse), in the metadata, under the
digest. A state
written by another model or level config is refused with `StateError`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .errors import StateError
from .learning.notes import Note, notes_from_facts_json, notes_from_json, notes_to_json
from .levels import LevelsConfig, LevelState, LoraState, state_from_tensors, state_tensors

FORMAT = "nsam.state/2"
_READABLE = (FORMAT, "nsam.state/1")  # 1: LoRA levels in float32 with their Adam moments
_STORED_LORA = ("a", "b", "step")  # what format 2 keeps of a LoRA level (a session's user snapshot: a, b)


@dataclass(frozen=True)
class MemoryState:
    kind: str  # "session" | "user"
    levels: dict[str, LevelState]
    notes: tuple[Note, ...] = ()  # what the user said: a session's turns', or a user's kept ones

    def to_bytes(self, fingerprint: str, config: LevelsConfig) -> bytes:
        tensors = {}
        for name, st in sorted(self.levels.items()):  # sorted: the same state gives the same bytes
            for field_name, t in sorted(state_tensors(st).items()):
                if isinstance(st, LoraState):
                    if field_name not in _STORED_LORA or (self.kind == "session" and name == "user"
                                                          and field_name == "step"):
                        continue  # moments restart on read; a snapshot's step is the user state's
                    if field_name in ("a", "b"):
                        t = t.to(torch.bfloat16)
                tensors[f"{name}/{field_name}"] = t.detach().cpu().contiguous()  # bytes from any device
        notes = notes_to_json(self.notes) if self.notes else ""
        meta = {"format": FORMAT, "kind": self.kind, "fingerprint": fingerprint,
                "levels": ",".join(sorted(self.levels)), "sha256": _digest(tensors, notes)}
        if notes:
            meta["notes"] = notes
        # One metadata entry: safetensors does not keep the order of several, and the same
        # state must always give the same bytes.
        return save(tensors, metadata={"nsam": json.dumps(meta, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes, fingerprint: str, config: LevelsConfig, kind: str) -> "MemoryState":
        try:
            tensors = load(data)
            meta = _metadata(data)
        except (SafetensorError, ValueError, OSError) as err:
            raise StateError(f"not a valid nsam state: {err}") from err
        if meta.get("format") not in _READABLE:
            raise StateError(f"unsupported state format {meta.get('format')!r} (expected {FORMAT})")
        if meta.get("kind") != kind:
            raise StateError(f"this is a {meta.get('kind')} state, expected a {kind} state")
        if meta.get("fingerprint") != fingerprint:
            raise StateError("this state was written for another model or level configuration "
                             f"(fingerprint {meta.get('fingerprint')}, this server is {fingerprint})")
        # States written before the digest existed have none; they are still read.
        if "sha256" in meta and meta["sha256"] != _digest(tensors, meta.get("notes", meta.get("facts", ""))):
            raise StateError("the state's tensor data is corrupt (its SHA-256 does not match the one written "
                             "with it); the stored copy is damaged")
        # Read onto torch's default device: where the model runs (`device.on_device` sets it).
        device = torch.get_default_device()
        if device.type != "cpu":
            tensors = {k: v.to(device) for k, v in tensors.items()}
        levels = {}
        for name in filter(None, meta.get("levels", "").split(",")):
            spec = config.get(name)
            fields = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(name + "/")}
            if spec.rule == "lora" and "a" in fields and "b" in fields:
                fields["a"], fields["b"] = fields["a"].float(), fields["b"].float()
                if "m_a" not in fields:  # format 2, or a session's user snapshot: moments restart
                    step = fields.get("step", torch.zeros((), dtype=torch.int64))
                    zeros_a, zeros_b = torch.zeros_like(fields["a"]), torch.zeros_like(fields["b"])
                    fields.update(m_a=zeros_a, v_a=zeros_a, m_b=zeros_b, v_b=zeros_b, step=step,
                                  moments_from=step)
            if spec.rule == "associative" and "taken" not in fields:
                # Written before the fast level counted its tokens: nothing counts as out of view.
                fields["taken"] = torch.zeros((), dtype=torch.int64)
            try:
                levels[name] = state_from_tensors(spec.rule, fields)
            except KeyError as err:
                raise StateError(f"level {name!r} lacks tensor {err}") from err
        try:
            # A user state written before self-study kept facts: each becomes a note.
            notes = notes_from_json(meta["notes"]) if meta.get("notes") else \
                notes_from_facts_json(meta["facts"]) if meta.get("facts") else ()
        except (ValueError, TypeError) as err:
            raise StateError(f"the state's notes cannot be read: {err}") from err
        return cls(kind, levels, notes)

    def with_level(self, name: str, state: LevelState) -> "MemoryState":
        return replace(self, levels={**self.levels, name: state})


def _digest(tensors: dict[str, torch.Tensor], notes: str = "") -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in name order, then the notes: a
    damaged copy (a flipped bit in Redis or on disk) is refused instead of serving wrong weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    if notes:  # absent from states without notes, whose digest stays what it was
        h.update(notes.encode())
    return h.hexdigest()


def _metadata(data: bytes) -> dict[str, str]:
    """Read the safetensors header's metadata without touching the tensors."""
    import struct

    if len(data) < 8:
        raise ValueError("too short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("header length past the end")
    return json.loads(json.loads(data[8:8 + n]).get("__metadata__", {}).get("nsam", "{}"))


def user_snapshot(user: LoraState) -> LoraState:
    """The user level as a session carries it: weights, fresh moments."""
    return replace(user, step=torch.zeros((), dtype=torch.int64)).without_moments()

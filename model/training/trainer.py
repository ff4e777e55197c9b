"""The fast level's trainer: runs the outer loop (`outer_loop.meta_train`) on a loaded model and
saves the learned parameters; `nsam train-memory` (server/cli.py) is its command line.

Before and after training it measures the held-out answer loss and, given held-out text, the
perplexity with the memory on next to the backbone alone, so a run shows whether it helped and
what it costs. Saved read strengths travel in the file's metadata. Never imported by serving.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..runtime import NsamModel
from . import outer_loop

PRESET = Path(__file__).parents[1] / "presets" / "fast_memory.safetensors"


@dataclass(frozen=True)
class TrainerConfig:
    model: str = "default"
    steps: int = 50
    batch: int = 1  # episodes per step
    lr: float = 3e-3
    facts: int = 3  # at most this many facts per teach segment
    general_weight: float = 6.0
    control_weight: float = 1.0  # keep the backbone's replies to questions the facts do not answer
    init: Path | None = None  # start from a previous run's output, at full read strength
    chat_share: float = 0.5  # share of episodes taught as chat sessions
    train_text: tuple[Path, ...] = ()  # files or folders of .txt; default: the package's anchor text
    train_skip_chars: int = 0
    eval_text: Path | None = None  # held-out text for the perplexity check
    window: int = 256  # tokens per general-text window
    eval_episodes: int = 32
    device: str = "cpu"
    time_limit: float = 0.0  # seconds; 0: none
    seed: int = 0
    out: Path = Path("fast_memory.safetensors")  # PRESET: where the default model loads it from
    read_scale: float = 1.0  # the read in chat while what the memory holds is still in view
    evicted_read_scale: float | None = None  # once all of it has left the window; default read_scale
    document_read_scale: float | None = None  # a document's text still in view; default read_scale

    def read_scales(self) -> dict[str, float]:
        scales = {"read_scale": self.read_scale,
                  "evicted_read_scale": self.read_scale if self.evicted_read_scale is None else self.evicted_read_scale,
                  "document_read_scale": self.read_scale if self.document_read_scale is None
                  else self.document_read_scale}
        if min(scales.values()) < 0:
            raise ValueError("--read-scale, --evicted-read-scale and --document-read-scale cannot be negative")
        return scales


def text_ids(tokenizer, paths: list[Path], skip_chars: int, max_tokens: int) -> list[int]:
    ids: list[int] = []
    for p in paths:
        for f in sorted(p.glob("*.txt")) if p.is_dir() else [p]:
            ids += tokenizer.encode(f.read_text(encoding="utf-8")[skip_chars:skip_chars + max_tokens * 6])
    return ids


def load_init(fast, path: Path) -> None:
    """Loads a previous run's parameters at full read strength (a saved read scale is undone)."""
    with safe_open(str(path), "pt") as f:
        fast.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
        saved_scale = float((f.metadata() or {}).get("read_scale", 1.0))
    if saved_scale <= 0:
        raise ValueError(f"--init {path}: its read gates were saved at scale {saved_scale}, so the trained "
                         "strength cannot be recovered; start from a run's output saved at a positive --read-scale")
    fast.scale_read(1 / saved_scale)


class _Evaluation:
    """Held-out episodes (facts, controls; as prose and as chat) and held-out text windows."""

    def __init__(self, cfg: TrainerConfig, nsam: NsamModel, model, general: list[list[int]]):
        tok, chunk = nsam.tokenizer, nsam.fast_params.spec.period_tokens
        self.model = model
        self.eval_windows = (outer_loop.windows_of(text_ids(tok, [cfg.eval_text], 0, 8192)[:8192], cfg.window)
                             if cfg.eval_text else [])
        self.held_out = outer_loop.held_out_episodes(tok, cfg.facts, cfg.eval_episodes, chunk, general[-8:])
        prompts = outer_loop.control_prompts(tok)
        replies = outer_loop.reference_replies(model, [p for _, p in prompts], 24, set(tok.eos_token_ids))
        self.controls = [(a, p, r) for (a, p), r in zip(prompts, replies)]
        self.small_talk = outer_loop.small_talk_of(self.controls, tok)
        self.held_out_chat = outer_loop.held_out_episodes(tok, cfg.facts, cfg.eval_episodes, chunk,
                                                          small_talk=self.small_talk)
        rng = random.Random(20_000)
        self.held_out_controls = [outer_loop.make_control_episode(tok, rng, cfg.facts, chunk, general[-1], *c)
                                  for c in self.controls]
        self.held_out_chat_controls = [outer_loop.make_control_episode(tok, rng, cfg.facts, chunk, None, *c,
                                                                       small_talk=self.small_talk)
                                       for c in self.controls]

    def backbone(self) -> dict:
        return {"eval_ppl": outer_loop.general_ppl(self.model, None, self.eval_windows)} if self.eval_windows else {}

    def __call__(self, fast) -> dict:
        out = {"answer_loss": outer_loop.held_out_loss(self.model, fast, self.held_out),
               "control_loss": outer_loop.held_out_loss(self.model, fast, self.held_out_controls),
               "chat_answer_loss": outer_loop.held_out_loss(self.model, fast, self.held_out_chat),
               "chat_control_loss": outer_loop.held_out_loss(self.model, fast, self.held_out_chat_controls)}
        if self.eval_windows:
            out["eval_ppl"] = outer_loop.general_ppl(self.model, fast, self.eval_windows)
        return out


def train_fast_level(cfg: TrainerConfig, report: Callable[[dict | str], None]) -> dict:
    """Trains the fast level of `cfg.model` and writes it to `cfg.out`. `report` gets the
    figures before training (a dict), then progress lines; returns the figures after it."""
    scales = cfg.read_scales()
    torch.manual_seed(cfg.seed)
    nsam = NsamModel.load(cfg.model)
    if nsam.fast_params is None:
        raise ValueError(f"--model {cfg.model}: its levels have no fast level to train")
    tok, model, fast = nsam.tokenizer, nsam.model.to(cfg.device), nsam.fast_params
    if cfg.init:
        load_init(fast, cfg.init)
    fast = fast.to(cfg.device)
    train_ids = (text_ids(tok, list(cfg.train_text), cfg.train_skip_chars, 200_000) if cfg.train_text
                 else nsam.anchor_ids * max(1, 2 * cfg.window // max(len(nsam.anchor_ids), 1)))
    general = outer_loop.windows_of(train_ids, cfg.window)
    # The last windows are the held-out episodes' distractors, when there are enough to spare.
    spare = 8 if len(general) > 16 else 0
    evaluate = _Evaluation(cfg, nsam, model, general)
    backbone, before = evaluate.backbone(), evaluate(fast)
    report({"backbone": backbone, "before": before, "train_windows": len(general)})
    started = time.perf_counter()

    def progress(step: int, loss: float, gate: list[float]) -> None:
        if step % 50 == 0 or step == cfg.steps:
            report(f"step {step}/{cfg.steps} loss {loss:.3f} gate {[round(g, 3) for g in gate]} "
                   f"({time.perf_counter() - started:.0f} s)")

    def out_of_time() -> bool:
        return bool(cfg.time_limit) and time.perf_counter() - started > cfg.time_limit

    outer_loop.meta_train(model, fast, tok, general[:len(general) - spare], cfg.steps, cfg.lr, cfg.facts,
                          cfg.general_weight, cfg.seed, cfg.batch, progress, out_of_time, evaluate.controls,
                          cfg.control_weight, evaluate.small_talk, cfg.chat_share)
    after = evaluate(fast)
    fast.scale_read(scales["read_scale"])
    tensors = {k: v.detach().cpu().contiguous() for k, v in fast.state_dict().items()}
    save_file(tensors, str(cfg.out), metadata={"model": nsam.model.config.fingerprint(), "spec": fast.compat_key(),
                                           **{k: str(v) for k, v in scales.items()}})
    return {"backbone": backbone, "before": before, "after": after, "steps": cfg.steps,
            "seconds": time.perf_counter() - started, "out": str(cfg.out)}

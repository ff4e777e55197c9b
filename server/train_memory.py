"""`nsam train-memory`: the outer loop that meta-trains the fast level (backbone frozen).

Runs small on a CPU (`--steps 50`) and larger on a GPU (`--device cuda --steps 5000 --batch 16`).
Writes the learned parameters as safetensors; `--install` writes them where the default preset
loads them from (`model/presets/fast_memory.safetensors`). Before and after training it prints
the held-out answer loss and the perplexity of held-out general text with the memory on, next to
the backbone alone, so a run shows whether it helped and what it costs.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def _text_ids(tokenizer, paths: list[Path], skip_chars: int, max_tokens: int) -> list[int]:
    ids: list[int] = []
    for p in paths:
        for f in sorted(p.glob("*.txt")) if p.is_dir() else [p]:
            ids += tokenizer.encode(f.read_text(encoding="utf-8")[skip_chars:skip_chars + max_tokens * 6])
    return ids


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nsam train-memory", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1, help="episodes per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--facts", type=int, default=3, help="at most this many facts per teach segment")
    parser.add_argument("--general-weight", type=float, default=6.0)
    parser.add_argument("--control-weight", type=float, default=1.0,
                        help="weight of keeping the backbone's replies to questions the facts do not answer")
    parser.add_argument("--init", type=Path, help="start from these parameters (a previous run's output), "
                                                   "at full read strength (a saved --read-scale is undone)")
    parser.add_argument("--chat-share", type=float, default=0.5,
                        help="share of episodes taught as chat sessions (a turn per fact, acknowledged, with "
                             "unrelated exchanges between) rather than one message followed by prose")
    parser.add_argument("--train-text", type=Path, nargs="*", default=[],
                        help="ordinary text (files or folders of .txt) for the general loss and distractors; "
                             "default: the package's anchor text")
    parser.add_argument("--train-skip-chars", type=int, default=0, help="skip this many characters of each file")
    parser.add_argument("--eval-text", type=Path, help="held-out text for the perplexity check (default: none)")
    parser.add_argument("--window", type=int, default=256, help="tokens per general-text window")
    parser.add_argument("--eval-episodes", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--time-limit", type=float, default=0, help="stop training after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("fast_memory.safetensors"))
    parser.add_argument("--install", action="store_true", help="write into the package's presets")
    parser.add_argument("--read-scale", type=float, default=1.0,
                        help="scale the trained read gates before saving: the read in chat while what the memory "
                             "holds is still in the attention window, where a strong read garbles replies (the "
                             "default preset ships at 0.25)")
    parser.add_argument("--evicted-read-scale", type=float,
                        help="the read's scale once all the memory holds has left the attention window "
                             "(in between: linear in the share that has left); default: --read-scale")
    parser.add_argument("--document-read-scale", type=float,
                        help="the read's scale for a document's text still in view (a document read into a "
                             "session, chunk by chunk); default: --read-scale")
    args = parser.parse_args(argv)
    for name in ("evicted_read_scale", "document_read_scale"):
        if getattr(args, name) is None:
            setattr(args, name, args.read_scale)
    if min(args.read_scale, args.evicted_read_scale, args.document_read_scale) < 0:
        parser.error("--read-scale, --evicted-read-scale and --document-read-scale cannot be negative")

    import torch
    from safetensors.torch import save_file

    from nsam.model import meta
    from nsam.model.runtime import NsamModel

    torch.manual_seed(args.seed)
    nsam = NsamModel.load(args.model)
    tok = nsam.tokenizer
    model = nsam.model.to(args.device)
    fast = nsam.fast_params
    if args.init:
        from safetensors import safe_open

        with safe_open(str(args.init), "pt") as f:
            fast.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
            saved_scale = float((f.metadata() or {}).get("read_scale", 1.0))
        if saved_scale <= 0:
            parser.error(f"--init {args.init}: its read gates were saved at scale {saved_scale}, so the trained "
                         "strength cannot be recovered; start from a run's output saved at a positive --read-scale")
        fast.scale_read(1 / saved_scale)
    fast = fast.to(args.device)
    chunk = fast.spec.period_tokens
    train_ids = (_text_ids(tok, args.train_text, args.train_skip_chars, 200_000) if args.train_text
                 else nsam.anchor_ids * max(1, 2 * args.window // max(len(nsam.anchor_ids), 1)))
    general = meta.windows_of(train_ids, args.window)
    eval_windows = meta.windows_of(_text_ids(tok, [args.eval_text], 0, 8192)[:8192], args.window) if args.eval_text else []
    # The last windows are the held-out episodes' distractors, when there are enough to spare.
    spare = 8 if len(general) > 16 else 0
    train_windows = general[:len(general) - spare]
    held_out = meta.held_out_episodes(tok, args.facts, args.eval_episodes, chunk, general[-8:])

    prompts = meta.control_prompts(tok)
    replies = meta.reference_replies(model, [p for _, p in prompts], 24, set(tok.eos_token_ids))
    controls = [(a, p, r) for (a, p), r in zip(prompts, replies)]
    small_talk = meta.small_talk_of(controls, tok)
    held_out_chat = meta.held_out_episodes(tok, args.facts, args.eval_episodes, chunk, small_talk=small_talk)
    rng = random.Random(20_000)
    held_out_controls = [meta.make_control_episode(tok, rng, args.facts, chunk, general[-1], *c) for c in controls]
    held_out_chat_controls = [meta.make_control_episode(tok, rng, args.facts, chunk, None, *c, small_talk=small_talk)
                              for c in controls]

    def evaluate() -> dict:
        out = {"answer_loss": meta.held_out_loss(model, fast, held_out),
               "control_loss": meta.held_out_loss(model, fast, held_out_controls),
               "chat_answer_loss": meta.held_out_loss(model, fast, held_out_chat),
               "chat_control_loss": meta.held_out_loss(model, fast, held_out_chat_controls)}
        if eval_windows:
            out["eval_ppl"] = meta.general_ppl(model, fast, eval_windows)
        return out

    backbone = {"eval_ppl": meta.general_ppl(model, None, eval_windows)} if eval_windows else {}
    before = evaluate()
    print(json.dumps({"backbone": backbone, "before": before, "train_windows": len(general)}), flush=True)
    started = time.perf_counter()

    def progress(step: int, loss: float, gate: list[float]) -> None:
        if step % 50 == 0 or step == args.steps:
            print(f"step {step}/{args.steps} loss {loss:.3f} gate {[round(g, 3) for g in gate]} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)

    def out_of_time() -> bool:
        return bool(args.time_limit) and time.perf_counter() - started > args.time_limit

    meta.meta_train(model, fast, tok, train_windows, args.steps, args.lr, args.facts, args.general_weight,
                    args.seed, args.batch, progress, out_of_time, controls, args.control_weight, small_talk,
                    args.chat_share)
    after = evaluate()
    out = args.out
    if args.install:
        import nsam.model

        out = Path(nsam.model.__file__).parent / "presets" / "fast_memory.safetensors"
    fast.scale_read(args.read_scale)
    tensors = {k: v.detach().cpu().contiguous() for k, v in fast.state_dict().items()}
    save_file(tensors, str(out), metadata={"model": nsam.model.config.fingerprint(), "spec": fast.compat_key(),
                                                "read_scale": str(args.read_scale),
                                                "evicted_read_scale": str(args.evicted_read_scale),
                                                "document_read_scale": str(args.document_read_scale)})
    print(json.dumps({"backbone": backbone, "before": before, "after": after, "steps": args.steps,
                      "seconds": time.perf_counter() - started, "out": str(out)}), flush=True)
    return 0

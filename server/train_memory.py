"""`nsam train-memory`: the outer loop that meta-trains the fast level (backbone frozen).

Runs small on a CPU (`--steps 50`) and larger on a GPU (`--device cuda --steps 5000`). Writes
the learned parameters as safetensors; `--install` writes them where the default preset
loads them from (`model/presets/fast_memory.safetensors`). Prints held-out answer loss with
the trained memory next to the closed-gate baseline, so a run shows whether it helped.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nsam train-memory", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--facts", type=int, default=3, help="facts per teach segment")
    parser.add_argument("--general-weight", type=float, default=0.5)
    parser.add_argument("--eval-episodes", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("fast_memory.safetensors"))
    parser.add_argument("--install", action="store_true", help="write into the package's presets")
    args = parser.parse_args(argv)

    import torch
    from safetensors.torch import save_file

    from nsam.model import meta
    from nsam.model.runtime import NsamModel

    nsam = NsamModel.load(args.model)
    model = nsam.model.to(args.device)
    fast = nsam.fast_params.to(args.device).requires_grad_(True)
    chunk = fast.spec.period_tokens
    rng = random.Random(args.seed)
    held_out = [meta.make_episode(nsam.tokenizer, random.Random(10_000 + i), args.facts, chunk)
                for i in range(args.eval_episodes)]
    general = nsam.anchor_ids[:256]

    def evaluate() -> float:
        with torch.no_grad():
            return sum(float(meta.episode_loss(model, fast, ep)) for ep in held_out) / len(held_out)

    before = evaluate()
    opt = torch.optim.Adam(fast.parameters(), lr=args.lr)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        ep = meta.make_episode(nsam.tokenizer, rng, args.facts, chunk)
        loss = meta.episode_loss(model, fast, ep) + args.general_weight * meta.general_loss(model, fast, general)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(fast.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == args.steps:
            print(f"step {step}/{args.steps} loss {float(loss):.3f} gate "
                  f"{[round(float(g), 3) for g in torch.tanh(fast.gate)]} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    after = evaluate()
    out = args.out
    if args.install:
        import nsam.model

        out = Path(nsam.model.__file__).parent / "presets" / "fast_memory.safetensors"
    tensors = {k: v.detach().cpu().contiguous() for k, v in fast.state_dict().items()}
    save_file(tensors, str(out), metadata={"model": nsam.model.config.fingerprint(), "spec": repr(fast.spec)})
    print(json.dumps({"held_out_answer_loss_before": before, "held_out_answer_loss_after": after,
                      "steps": args.steps, "out": str(out)}))
    return 0

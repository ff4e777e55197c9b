"""`nsam train-memory`: the outer loop that meta-trains the fast level (backbone frozen).

Runs small on a CPU (`--steps 50`) and larger on a GPU (`--device cuda --steps 5000`). Writes
the learned parameters as safetensors; `--install` writes them where the default preset
loads them from (`model/presets/fast_memory.safetensors`). Prints held-out answer loss with
the trained memory next to the closed-gate baseline, so a run shows whether it helped.
"""

from __future__ import annotations

import argparse
import json
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

    from safetensors.torch import save_file

    from nsam.model import meta
    from nsam.model.runtime import NsamModel

    nsam = NsamModel.load(args.model)
    model = nsam.model.to(args.device)
    fast = nsam.fast_params.to(args.device)
    before = meta.held_out_loss(model, fast, nsam.tokenizer, args.facts, args.eval_episodes)
    started = time.perf_counter()

    def progress(step: int, loss: float, gate: list[float]) -> None:
        if step % 10 == 0 or step == args.steps:
            print(f"step {step}/{args.steps} loss {loss:.3f} gate {[round(g, 3) for g in gate]} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)

    meta.meta_train(model, fast, nsam.tokenizer, nsam.anchor_ids[:256], args.steps, args.lr, args.facts,
                    args.general_weight, args.seed, progress)
    after = meta.held_out_loss(model, fast, nsam.tokenizer, args.facts, args.eval_episodes)
    out = args.out
    if args.install:
        import nsam.model

        out = Path(nsam.model.__file__).parent / "presets" / "fast_memory.safetensors"
    tensors = {k: v.detach().cpu().contiguous() for k, v in fast.state_dict().items()}
    save_file(tensors, str(out), metadata={"model": nsam.model.config.fingerprint(), "spec": repr(fast.spec)})
    print(json.dumps({"held_out_answer_loss_before": before, "held_out_answer_loss_after": after,
                      "steps": args.steps, "out": str(out)}))
    return 0

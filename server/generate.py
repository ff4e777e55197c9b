"""`nsam generate "question"`: answer once from the terminal, streaming tokens as they come.

No server, no Redis: the frozen model (no memory levels) answers a single user message.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nsam generate", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", help="the user message")
    parser.add_argument("--model", default="default", help="default | tiny | path to a .gguf file or HF directory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--system", default=None, help="system prompt (default: the model's own)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    args = parser.parse_args(argv)

    from nsam.model.loading import ModelLoadError
    from nsam.model.device import load_on
    from nsam.model.runtime import SamplingParams

    params = SamplingParams(args.max_tokens, args.temperature, args.top_k, args.top_p,
                            args.repetition_penalty, args.seed, tuple(args.stop))
    try:
        params.validate()
        model = load_on(args.model, args.dtype, args.device)
    except (ValueError, ModelLoadError) as err:
        parser.error(str(err))
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    budget = model.context_window - args.max_tokens
    try:
        ids = model.encode_turn(messages, budget)[0]
    except ValueError as err:
        parser.error(str(err))
    generator = model.generator(1, learning=False)
    generator.add("cli", ids, model.new_session_state(None), params)
    while generator.has_work():
        for event in generator.step():
            sys.stdout.write(event.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0

"""`nsam`: the command line of the service.

    nsam serve          the gRPC server (defaults: default model, embedded Redis, in-process
                        consolidation, gRPC on 127.0.0.1:50051, metrics on :9464)
    nsam consolidate    a consolidation worker process (any number share one Redis)
    nsam chat           terminal chat client
    nsam generate       offline generation (nsam.server.generate)
    nsam train-memory   meta-train the fast level (nsam.model.training.trainer)
    nsam anchor-text    write the anchor text the levels are held to (nsam.model.training.anchor_text)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from nsam.server.auth import ApiKeys, KeysFileError
from nsam.server.errors import ServiceError
from nsam.server.settings import Settings, add_serve_flags, add_worker_flags, settings_from_args

log = logging.getLogger("nsam")


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(settings: Settings) -> None:
    from nsam.server.app import NsamServer, connect_hint, start_metrics

    from nsam.server import metrics

    start_metrics(settings)
    server = await NsamServer.start(settings, await asyncio.to_thread(decode_model, settings))
    metrics.engine_info.labels(settings.engine, settings.device.split(":")[0],
                               "off" if settings.engine == "vllm" else "on").set(1)
    print(connect_hint(settings, server.port, server.store), flush=True)
    if settings.engine == "vllm":
        from nsam.server.vllm_engine import STARTUP_NOTE
        print(f"  {STARTUP_NOTE}", flush=True)
    await _until_signal()
    print(f"draining turns in flight (up to {settings.shutdown_grace_s:.0f} s); a running consolidation "
          "is interrupted and redone later...", flush=True)
    await server.stop()


def decode_model(settings: Settings):
    """The decode thread's model: nsam's own engine on --device, or vLLM (--engine vllm)."""
    if settings.engine == "vllm":
        from nsam.server.vllm_engine import VllmModel
        return VllmModel.start(settings)
    from nsam.model.device import load_on
    return load_on(settings.model, settings.dtype, settings.device)


async def consolidate(settings: Settings) -> None:
    from nsam.server.app import load_model, start_metrics
    from nsam.server.engine import LevelBook, ModelThread
    from nsam.server.store import StateStore
    from nsam.server.worker import ConsolidationWorker, Consolidator

    start_metrics(settings)
    store = await StateStore.connect(settings.redis_url, settings.data_dir)
    thread = ModelThread(await asyncio.to_thread(load_model, settings), 1, generate=False)
    worker = ConsolidationWorker(store, Consolidator(store, thread, LevelBook()),
                                 settings.consumer_name, settings.claim_idle_ms)
    task = asyncio.create_task(worker.run())
    print(f"nsam consolidation worker {settings.consumer_name} on {store.location}", flush=True)
    await asyncio.wait([task, asyncio.create_task(_until_signal())],
                       return_when=asyncio.FIRST_COMPLETED)
    await worker.shutdown(task, settings.shutdown_grace_s)
    await asyncio.to_thread(thread.stop)
    await store.close()


def _train_memory_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nsam train-memory", description=(
        "Meta-train the fast level (backbone frozen): small on a CPU (--steps 50), larger on a GPU "
        "(--device cuda --steps 5000 --batch 16). Prints held-out figures before and after."))
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=1, help="episodes per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--facts", type=int, default=3, help="at most this many facts per teach segment")
    p.add_argument("--general-weight", type=float, default=6.0)
    p.add_argument("--control-weight", type=float, default=1.0,
                   help="weight of keeping the backbone's replies to questions the facts do not answer")
    p.add_argument("--init", type=Path, help="start from a previous run's output, at full read strength")
    p.add_argument("--chat-share", type=float, default=0.5,
                   help="share of episodes taught as chat sessions rather than one message and prose")
    p.add_argument("--train-text", type=Path, nargs="*", default=[],
                   help="ordinary text (files or folders of .txt); default: the package's anchor text")
    p.add_argument("--train-skip-chars", type=int, default=0, help="skip this many characters of each file")
    p.add_argument("--eval-text", type=Path, help="held-out text for the perplexity check")
    p.add_argument("--window", type=int, default=256, help="tokens per general-text window")
    p.add_argument("--eval-episodes", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--time-limit", type=float, default=0, help="stop training after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("fast_memory.safetensors"))
    p.add_argument("--install", action="store_true", help="write where the default model loads it from")
    p.add_argument("--read-scale", type=float, default=1.0,
                   help="scale of the read while what the memory holds is still in the attention window "
                        "(the default preset ships at 0.25)")
    p.add_argument("--evicted-read-scale", type=float,
                   help="the read's scale once all of it has left the window; default: --read-scale")
    p.add_argument("--document-read-scale", type=float,
                   help="the read's scale for a document's text still in view; default: --read-scale")
    return p


def train_memory(argv: list[str]) -> int:
    """`nsam train-memory`: flags to a TrainerConfig, figures as JSON lines."""
    import json

    parser = _train_memory_parser()
    args = vars(parser.parse_args(argv))
    install = args.pop("install")
    from nsam.model.training.trainer import PRESET, TrainerConfig, train_fast_level

    cfg = TrainerConfig(**{**args, "train_text": tuple(args["train_text"]),
                           "out": PRESET if install else args["out"]})

    def report(item: dict | str) -> None:
        print(json.dumps(item) if isinstance(item, dict) else item, flush=True)

    try:
        report(train_fast_level(cfg, report))
    except ValueError as exc:
        parser.error(str(exc))
    return 0


def anchor_text(argv: list[str]) -> int:
    """`nsam anchor-text`: write model/presets/anchor.txt (or, --plain, anchor_plain.txt)."""
    from nsam.model.training.anchor_text import PRESETS

    parser = argparse.ArgumentParser(prog="nsam anchor-text", description=(
        "Write the general text the memory levels are anchored to: the frozen model's own "
        "paragraphs on fixed topics, deterministic for a seed."))
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path, default=PRESETS, help="folder to write into")
    parser.add_argument("--tokens", type=int, default=160, help="tokens per paragraph")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--plain", action="store_true",
                        help="continue a bare title instead of answering a chat request "
                             "(consolidation's anchor, anchor_plain.txt)")
    args = parser.parse_args(argv)
    from nsam.model.runtime import NsamModel
    from nsam.model.training.anchor_text import write_anchor_text

    out, tokens = write_anchor_text(NsamModel.load(args.model), args.out, args.tokens, args.temperature,
                                    args.seed, args.batch, args.plain)
    print(f"{out}: {tokens} tokens")
    return 0


def _dispatch(module: str, argv: list[str]) -> int:
    import importlib
    return importlib.import_module(module).main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "generate":
        return _dispatch("nsam.server.generate", argv[1:])
    if argv and argv[0] == "train-memory":
        return train_memory(argv[1:])
    if argv and argv[0] == "anchor-text":
        return anchor_text(argv[1:])
    if argv and argv[0] == "chat":
        from nsam.client.chat import main as chat_main
        return chat_main(argv[1:])

    parser = argparse.ArgumentParser(prog="nsam", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_flags(sub.add_parser("serve", help="run the gRPC server"))
    add_worker_flags(sub.add_parser("consolidate", help="run a consolidation worker"))
    sub.add_parser("chat", help="terminal chat client (nsam chat --help)")
    sub.add_parser("generate", help="offline generation (nsam generate --help)")
    sub.add_parser("train-memory", help="meta-train the fast level (nsam train-memory --help)")
    sub.add_parser("anchor-text", help="write the anchor text the levels are held to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    run = serve if args.command == "serve" else consolidate
    try:
        if args.command == "serve":
            ApiKeys.from_file(settings.api_keys_file)  # a bad file fails before the model loads
        asyncio.run(run(settings))
    except KeyboardInterrupt:
        pass
    except (ServiceError, OSError, RuntimeError, KeysFileError) as exc:  # store down, port taken, ...
        print(f"nsam {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`nsam`: the command line of the service.

    nsam serve          the gRPC server (defaults: default model, embedded Redis, in-process
                        consolidation, gRPC on 127.0.0.1:50051, metrics on :9464)
    nsam consolidate    a consolidation worker process (any number share one Redis)
    nsam chat           terminal chat client
    nsam generate       offline generation (nsam.server.generate)
    nsam train-memory   meta-train the memory levels (nsam.server.train_memory)
    nsam anchor-text    write the slow levels' anchor and probe text (nsam.server.anchor_text)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from nsam.server.errors import ServiceError
from nsam.server.auth import ApiKeys, KeysFileError
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

    start_metrics(settings)
    server = await NsamServer.start(settings)
    print(connect_hint(settings, server.port, server.store), flush=True)
    await _until_signal()
    print(f"draining turns in flight (up to {settings.shutdown_grace_s:.0f} s); a running consolidation "
          "is interrupted and redone later...", flush=True)
    await server.stop()


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


def _dispatch(module: str, argv: list[str]) -> int:
    import importlib
    return importlib.import_module(module).main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "generate":
        return _dispatch("nsam.server.generate", argv[1:])
    if argv and argv[0] == "train-memory":
        return _dispatch("nsam.server.train_memory", argv[1:])
    if argv and argv[0] == "anchor-text":
        return _dispatch("nsam.server.anchor_text", argv[1:])
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
    sub.add_parser("train-memory", help="meta-train the memory levels")
    sub.add_parser("anchor-text", help="write the slow levels' anchor and probe text")
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

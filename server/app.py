"""Assembles a running server from Settings: store, model thread, engine, consolidation
worker, the gRPC server (services, health, reflection, the status interceptor) and /metrics.

`NsamServer.start` is what `nsam serve` runs and what tests start on a free port;
`NsamServer.stop` drains: health turns NOT_SERVING, new RPCs are refused, turns in flight
finish (up to the grace period; those still running then end with UNAVAILABLE saying whether
they were committed), then the worker, the model threads and the store close.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nsam.protos import nsam_pb2 as pb
from nsam.protos import nsam_pb2_grpc as pb_grpc
from nsam.server.auth import ApiKeys
from nsam.server.engine import Engine, LevelBook, ModelThread
from nsam.server.errors import InFlight, StatusInterceptor, Unavailable
from nsam.server.learner import LearnerQueue
from nsam.server.service import AdminService, ChatService, MemoryService
from nsam.server.settings import Settings
from nsam.server.store import StateStore
from nsam.server.worker import ConsolidationWorker, Consolidator

log = logging.getLogger(__name__)

SERVICES = [pb.DESCRIPTOR.services_by_name[n].full_name
            for n in ("ChatService", "MemoryService", "AdminService")]


def load_model(settings: Settings) -> Any:
    from nsam.model.runtime import NsamModel
    return NsamModel.load(settings.model, settings.dtype)


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    size = settings.limits.max_grpc_message_bytes
    # so_reuseport off: a second server on a taken port fails to start instead of silently
    # sharing the port's traffic with the first (two stores behind one address)
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 0)]


@dataclass
class NsamServer:
    settings: Settings
    port: int
    store: StateStore
    threads: list[ModelThread]            # decode, then learn and consolidate when learning
    engine: Engine
    grpc_server: grpc.aio.Server
    health: health.aio.HealthServicer
    worker: ConsolidationWorker | None = None
    worker_task: asyncio.Task | None = None
    health_task: asyncio.Task | None = None
    in_flight: InFlight | None = None
    stopped: bool = False

    @classmethod
    async def start(cls, settings: Settings, model: Any = None) -> "NsamServer":
        keys = ApiKeys.from_file(settings.api_keys_file)
        store = await StateStore.connect(settings.redis_url, settings.data_dir,
                                         session_ttl_s=settings.session_ttl_s,
                                         versions_kept=settings.user_versions_kept)
        inprocess = settings.consolidation == "inprocess" and settings.learning
        # Learning runs on copies of the model on threads of their own: a medium update
        # (seconds on CPU with the real model) or a consolidation (minutes) never stalls
        # decoding, and a consolidation never delays a turn's medium update.
        names = ["nsam-decode"] + (["nsam-learn"] if settings.learning else []) \
            + (["nsam-consolidate"] if inprocess else [])
        threads: list[ModelThread] = []
        try:
            for name in names:
                # one load at a time: loading seeds torch's global generator
                m = model if name == "nsam-decode" and model is not None \
                    else await asyncio.to_thread(load_model, settings)
                # decoding keeps priority over the background learning on shared cores
                threads.append(ModelThread(m, settings.max_batch, learning=settings.learning,
                                           generate=name == "nsam-decode", name=name,
                                           niceness=0 if name == "nsam-decode" else 10))
        except BaseException:
            for t in threads:
                t.stop()
            await store.close()
            raise
        levels = LevelBook()
        learner_queue = LearnerQueue(store, threads[1], levels, settings.learner_queue,
                                     settings.consolidate_every_turns) if settings.learning else None
        consolidator = Consolidator(store, threads[-1], levels,
                                    drain=learner_queue.drain if learner_queue else None)
        engine = Engine(settings, store, threads[0], levels, consolidator,
                        learner=threads[1] if settings.learning else None, learner_queue=learner_queue)
        in_flight = InFlight()
        try:
            server, health_servicer, port = await cls._grpc(settings, engine, keys, in_flight)
        except BaseException:
            await asyncio.gather(*(asyncio.to_thread(t.stop) for t in threads))
            await store.close()
            raise
        self = cls(settings, port, store, threads, engine, server, health_servicer, in_flight=in_flight)
        self.health_task = asyncio.create_task(self._follow_store(), name="nsam-health")
        if inprocess:
            self.worker = ConsolidationWorker(store, consolidator, settings.consumer_name,
                                              settings.claim_idle_ms)
            self.worker_task = asyncio.create_task(self.worker.run(), name="nsam-consolidation")
        return self

    @staticmethod
    async def _grpc(settings: Settings, engine: Engine, keys: ApiKeys,
                    in_flight: InFlight) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
        server = grpc.aio.server(interceptors=[StatusInterceptor(in_flight)], options=grpc_options(settings))
        pb_grpc.add_ChatServiceServicer_to_server(ChatService(engine, keys), server)
        pb_grpc.add_MemoryServiceServicer_to_server(MemoryService(engine, keys), server)
        pb_grpc.add_AdminServiceServicer_to_server(AdminService(engine, keys), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], server)
        address = f"{settings.host}:{settings.port}"
        try:
            if settings.tls:
                assert settings.tls_key is not None and settings.tls_cert is not None  # validate_settings
                creds = grpc.ssl_server_credentials(
                    [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())])
                port = server.add_secure_port(address, creds)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if not port:
            raise RuntimeError(f"cannot listen for gRPC on {address}: port {settings.port} is taken "
                               "(another nsam?) or the address is not this machine's; choose --port/--host")
        await server.start()
        # "liveness" stays SERVING through a store outage (a restart would not fix the store);
        # the others follow it (`_follow_store`). All turn NOT_SERVING when draining.
        for name in ["", *SERVICES, "liveness"]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        return server, health_servicer, port

    async def _follow_store(self) -> None:
        """Health says NOT_SERVING while the state store is unreachable (every RPC would fail
        with UNAVAILABLE), so load balancers and Kubernetes send traffic elsewhere."""
        serving = True
        while not self.stopped:
            await asyncio.sleep(self.settings.health_check_interval_s)
            try:
                await self.store.ping()
                ok = True
            except Unavailable:
                ok = False
            if ok != serving and not self.stopped:
                serving = ok
                status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ["", *SERVICES]:
                    await self.health.set(name, status)
                log.warning("state store %s: health %s", "reachable again" if ok else "unreachable",
                            "SERVING" if ok else "NOT_SERVING")

    async def stop(self, grace: float | None = None) -> None:
        if self.stopped:
            return
        self.stopped = True
        grace = self.settings.shutdown_grace_s if grace is None else grace
        if self.health_task is not None:
            self.health_task.cancel()
        await self.health.enter_graceful_shutdown()
        # New RPCs are refused at once; turns in flight get `grace` seconds to commit, then each
        # is ended with UNAVAILABLE saying whether it was committed (InFlight.drain); gRPC's own
        # cancellation is only the backstop after that.
        closing = asyncio.create_task(self.grpc_server.stop(grace + 10))
        given_up = await self.in_flight.drain(grace) if self.in_flight else 0
        if given_up:
            log.warning("shutdown: %d call(s) still running after %.0f s were ended "
                        "(their callers were told whether they committed)", given_up, grace)
        await closing
        # A consolidation takes minutes on a CPU: one still running is interrupted before its next
        # model call rather than awaited; its job stays queued and a worker redoes it.
        if self.worker is not None and self.worker_task is not None:
            await self.worker.shutdown(self.worker_task, 0)
        # Queued medium updates are not awaited: their turns stay unlearnt in the session
        # records, and the session's next job on any replica learns them (learner.py).
        if self.engine.learner_queue is not None:
            await self.engine.learner_queue.stop()
        await asyncio.gather(*(asyncio.to_thread(t.stop) for t in self.threads))
        await self.store.close()


def start_metrics(settings: Settings) -> None:
    if settings.metrics_port:
        from prometheus_client import start_http_server

        from nsam.server import metrics
        try:
            start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
        except OSError as exc:
            raise RuntimeError(f"cannot serve /metrics on {settings.host}:{settings.metrics_port}: "
                               f"{exc.strerror or exc} (choose --metrics-port; 0 turns it off)") from exc


def connect_hint(settings: Settings, port: int, store: StateStore) -> str:
    host = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0", "::") else settings.host
    lines = [
        f"nsam serving {settings.model!r} on {settings.host}:{port} "
        f"({'TLS' if settings.tls else 'plaintext'}), state in {store.location}",
        f"  learning {'on' if settings.learning else 'off'}, consolidation {settings.consolidation}, "
        f"max batch {settings.max_batch}",
    ]
    if settings.metrics_port:
        lines.append(f"  metrics: http://{host}:{settings.metrics_port}/metrics")
    if settings.open_mode:
        lines.append("  OPEN LOCAL MODE: no --api-keys-file, so every caller is trusted, may act "
                     "as any user and call admin RPCs. Bind to localhost only.")
    else:
        lines.append(f"  API keys from {settings.api_keys_file}")
    lines.append(f"  chat: nsam chat --target {host}:{port} --user alice")
    return "\n".join(lines)

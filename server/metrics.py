"""Every Prometheus metric nsam exports, declared in one place.

Names carry the `nsam_` prefix and base units (seconds, bytes). Labels are bounded sets
(RPC method, status code, level name, outcome): never a session or user id.
The Grafana dashboard and alert rules in `helm/nsam/` use exactly these names.
"""

import math

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram


def log_buckets(low: float, high: float, per_decade: int = 3) -> tuple[float, ...]:
    """Bucket bounds from low to high, `per_decade` to a power of ten, evenly in log space."""
    n = round(math.log10(high / low) * per_decade)
    return tuple(float(f"{low * 10 ** (i / per_decade):.3g}") for i in range(n + 1))


_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Learning work: a medium update takes tens of seconds and a consolidation minutes on a CPU.
_SLOW = _LATENCY + (60, 120, 300, 600, 1800, 3600)
_LOSS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 4, 6, 8, 12)
# A level's health spans decades, and differently per level (one histogram holds all levels):
# log-spaced buckets, 3 a decade, wide enough that the real default model's fast, medium and
# user levels all land inside (tests/server/test_operations.py checks a real turn does; the
# measured ranges are in benchmarks/README.md).
LEVEL_SURPRISE_RANGE = (1e-3, 1e8)
LEVEL_NORM_RANGE = (1e-4, 1e6)
_SURPRISE = log_buckets(*LEVEL_SURPRISE_RANGE)
_NORM = log_buckets(*LEVEL_NORM_RANGE)
_BYTES = tuple(2.0**k for k in range(10, 31, 2))
_BATCH = (1, 2, 4, 8, 16, 32, 64)

registry: CollectorRegistry = REGISTRY

# --- serving -----------------------------------------------------------------------------
requests_total = Counter(
    "nsam_requests_total", "RPCs handled, by method and gRPC status code.", ["method", "code"]
)
request_duration_seconds = Histogram(
    "nsam_request_duration_seconds", "Wall time of an RPC.", ["method"], buckets=_LATENCY
)
time_to_first_token_seconds = Histogram(
    "nsam_time_to_first_token_seconds", "From Chat request to its first streamed token.",
    buckets=_LATENCY,
)
inter_token_latency_seconds = Histogram(
    "nsam_inter_token_latency_seconds", "Time between consecutive streamed tokens.",
    buckets=_LATENCY,
)
prompt_tokens_total = Counter("nsam_prompt_tokens_total", "Prompt tokens prefilled.")
generated_tokens_total = Counter("nsam_generated_tokens_total", "Tokens generated.")
document_tokens_total = Counter("nsam_document_tokens_total", "Document tokens read into session memory (ReadDocument).")
active_sessions = Gauge("nsam_active_sessions", "Sessions with a turn in flight on this replica.")
queued_turns = Gauge("nsam_queued_turns", "Turns waiting for a slot in the decode batch.")
engine_info = Gauge("nsam_engine_info", "1 for what this replica decodes with: engine (native | vllm), device "
                    "(cpu | cuda) and fast_level (on | off: vLLM does not run the fast level).",
                    ["engine", "device", "fast_level"])
batch_size = Histogram(
    "nsam_batch_size", "Sequences in each decode step.", buckets=_BATCH
)

# --- memory health, per level (fast, medium, user) ---------------------------------------
level_surprise = Histogram(
    "nsam_level_surprise", "Inner loss seen by a level's update (its surprise).", ["level"],
    buckets=_SURPRISE,
)
level_update_norm = Histogram(
    "nsam_level_update_norm", "L2 norm of one accepted update to a level's weights.", ["level"],
    buckets=_NORM,
)
level_state_norm = Histogram(
    "nsam_level_state_norm", "L2 norm of a level's weights after a committed update.", ["level"],
    buckets=_NORM,
)
level_drift = Histogram(
    "nsam_level_drift", "L2 distance of a level's weights from its parent level.", ["level"],
    buckets=_NORM,
)
level_rejected_updates_total = Counter(
    "nsam_level_rejected_updates_total",
    "Updates rejected by the guards (non-finite values or norm past the bound).",
    ["level", "reason"],
)
level_update_duration_seconds = Histogram(
    "nsam_level_update_duration_seconds", "Wall time of one level update.", ["level"],
    buckets=_SLOW,
)
forgetting_probe_loss = Histogram(
    "nsam_forgetting_probe_loss",
    "Loss on the general-text forgetting probe of a candidate user level.", buckets=_LOSS,
)
forgetting_probe_baseline_loss = Gauge(
    "nsam_forgetting_probe_baseline_loss",
    "Loss of the frozen model on the same forgetting probe (the alert baseline).",
)

# --- state store -------------------------------------------------------------------------
store_operation_duration_seconds = Histogram(
    "nsam_store_operation_duration_seconds", "Latency of a state-store operation.",
    ["operation"], buckets=_LATENCY,
)
store_errors_total = Counter(
    "nsam_store_errors_total", "State-store operations that failed.", ["operation"]
)
state_bytes = Histogram(
    "nsam_state_bytes", "Size of a committed level state.", ["kind"], buckets=_BYTES
)
cas_conflicts_total = Counter(
    "nsam_cas_conflicts_total", "Compare-and-set commits refused by a newer version.", ["kind"]
)

# --- the learner (medium updates after turns) ----------------------------------------------
learner_queue_depth = Gauge(
    "nsam_learner_queue_depth", "Medium updates waiting for the learner (each covers one or more turns)."
)
learner_pending_turns = Gauge(
    "nsam_learner_pending_turns", "Chat turns committed whose medium update has not committed yet."
)
learner_coalesced_turns_total = Counter(
    "nsam_learner_coalesced_turns_total",
    "Turns folded into a session's waiting medium update because the learner queue was past its limit.",
)
learner_lag_seconds = Histogram(
    "nsam_learner_lag_seconds", "From a turn's commit to the commit of the medium update that learnt it.",
    buckets=_SLOW,
)

# --- consolidation -----------------------------------------------------------------------
consolidation_queue_depth = Gauge(
    "nsam_consolidation_queue_depth", "Consolidation jobs enqueued and not yet acknowledged."
)
consolidation_lag_seconds = Histogram(
    "nsam_consolidation_lag_seconds", "From enqueue of a consolidation job to its start.",
    buckets=_SLOW,
)
consolidation_duration_seconds = Histogram(
    "nsam_consolidation_duration_seconds", "Wall time of one consolidation job.",
    buckets=_SLOW,
)
consolidation_jobs_total = Counter(
    "nsam_consolidation_jobs_total",
    "Consolidation jobs by outcome (accepted, rejected, conflict, failed).", ["outcome"],
)
consolidation_steps = Histogram(
    "nsam_consolidation_steps",
    "Training steps of a finished consolidation: the planned ones, plus those it took on until the "
    "user's rehearsed answers were said word for word.",
    buckets=(6, 12, 18, 24, 30, 36, 48),
)
consolidation_answers_said_ratio = Histogram(
    "nsam_consolidation_answers_said_ratio",
    "Share of the user's rehearsed answers (this session's facts and the kept ones) that an accepted "
    "user level says word for word: below 1, some of what the user told us is not learnt.",
    buckets=(0.25, 0.5, 0.75, 0.9, 0.99, 1.0),
)
consolidation_trust_region_total = Counter(
    "nsam_consolidation_trust_region_total",
    "Accepted consolidations by what the drift budget kept: full (the whole update), fewer steps "
    "(the level after fewer training steps), interpolated (part of the way from the old level).", ["kept"],
)

"""Level health: feeds the nsam_level_* metrics from the model's LevelReports and keeps a
per-level summary of this process for GetMemoryHealth. No model calls, no tensors."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from typing import Any

from nsam.server import metrics

def observe_finite(histogram: Any, value: float) -> None:
    """Observes value unless it is NaN/inf, which would poison the histogram's sum forever."""
    if math.isfinite(value):
        histogram.observe(value)


@dataclass
class LevelHealth:
    updates: int = 0
    rejected: int = 0
    surprise_sum: float = 0.0
    update_norm_sum: float = 0.0
    last_state_norm: float = 0.0
    last_drift: float = 0.0


class LevelBook:
    """Feeds the nsam_level_* metrics from LevelReports and keeps a per-level summary
    (this process only) for GetMemoryHealth."""

    def __init__(self) -> None:
        self._health: dict[str, LevelHealth] = {}
        self._lock = threading.Lock()

    def record(self, reports: list[Any]) -> None:
        for r in reports:
            with self._lock:
                h = self._health.setdefault(r.level, LevelHealth())
                observe_finite(metrics.level_update_duration_seconds.labels(r.level), r.seconds)
                if math.isfinite(r.surprise):
                    metrics.level_surprise.labels(r.level).observe(r.surprise)
                    h.surprise_sum += r.surprise
                if not r.accepted:
                    h.rejected += 1
                    metrics.level_rejected_updates_total.labels(r.level, r.reason or "rejected").inc()
                    continue
                h.updates += 1
                h.update_norm_sum += r.update_norm
                h.last_state_norm, h.last_drift = r.state_norm, r.drift
                observe_finite(metrics.level_update_norm.labels(r.level), r.update_norm)
                observe_finite(metrics.level_state_norm.labels(r.level), r.state_norm)
                observe_finite(metrics.level_drift.labels(r.level), r.drift)

    def summary(self) -> dict[str, LevelHealth]:
        """Each level's health so far, by level name (a copy)."""
        with self._lock:
            return {name: replace(h) for name, h in self._health.items()}

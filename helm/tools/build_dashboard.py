"""Builds the nsam Grafana dashboard (helm/nsam/dashboards/nsam.json) from the panel list below.

    python helm/tools/build_dashboard.py          # rewrite the JSON
    python helm/tools/build_dashboard.py --check  # exit 1 if the committed JSON is stale

The panel list is data (`PANELS`), so the live scrape test and render_dashboard.py read the very
queries Grafana runs. Only metric names declared in nsam.server.metrics may appear here.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

DASHBOARD_PATH = Path(__file__).resolve().parents[1] / "nsam" / "dashboards" / "nsam.json"
UID = "nsam-overview"
RATE = "$__rate_interval"
NS = 'namespace=~"$namespace"'  # every selector carries the namespace variable
LEVEL = 'level=~"$level"'


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | heatmap | stat
    width: int = 8
    description: str = ""
    # Counters that stay at zero in a healthy system show 0 through `or vector(0)`; the
    # live test accepts the fallback only for these panels.
    zero_when_healthy: bool = False
    thresholds: tuple[float, ...] = ()


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def quantiles(metric: str, by: str = "", sel: str = NS, qs=(0.5, 0.99), legend: str = "") -> tuple[Target, ...]:
    """p-quantile targets of a histogram, grouped by `by` (plus le)."""
    group = f"{by}, le" if by else "le"
    out = []
    for q in qs:
        name = f"p{round(q * 100)}"
        lg = f"{{{{{by}}}}} {name}" if by else (f"{legend} {name}".strip())
        out.append(Target(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{sel}}}[{RATE}])))", lg))
    return tuple(out)


def heatmap(metric: str, sel: str = NS) -> tuple[Target, ...]:
    return (Target(f"sum by (le) (increase({metric}_bucket{{{sel}}}[{RATE}]))", "{{le}}"),)


def mean(metric: str, by: str = "", sel: str = NS, legend: str = "mean") -> Target:
    grp = f" by ({by})" if by else ""
    lg = f"{{{{{by}}}}} mean" if by else legend
    return Target(f"sum{grp} (rate({metric}_sum{{{sel}}}[{RATE}])) / sum{grp} (rate({metric}_count{{{sel}}}[{RATE}]))", lg)


SERVER_ERROR_CODES = "UNKNOWN|INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS|UNIMPLEMENTED"
L = f"{NS},{LEVEL}"

ROWS: tuple[Row, ...] = (
    Row("Serving", (
        Panel("Requests per second", (
            Target(f"sum by (method) (rate(nsam_requests_total{{{NS}}}[{RATE}]))", "{{method}}"),), unit="reqps",
            description="RPCs handled, by method."),
        Panel("Error ratio", (
            Target(f'(sum(rate(nsam_requests_total{{{NS},code!="OK"}}[{RATE}])) or vector(0)) / sum(rate(nsam_requests_total{{{NS}}}[{RATE}]))', "all non-OK"),
            Target(f'(sum(rate(nsam_requests_total{{{NS},code=~"{SERVER_ERROR_CODES}"}}[{RATE}])) or vector(0)) / sum(rate(nsam_requests_total{{{NS}}}[{RATE}]))', "server errors"),
        ), unit="percentunit", thresholds=(0.05,),
            description="Share of RPCs that did not end OK; the alert pages on server errors above 5%."),
        Panel("Tokens per second", (
            Target(f"sum(rate(nsam_generated_tokens_total{{{NS}}}[{RATE}]))", "generated"),
            Target(f"sum(rate(nsam_prompt_tokens_total{{{NS}}}[{RATE}]))", "prompt"),
            Target(f"sum(rate(nsam_document_tokens_total{{{NS}}}[{RATE}]))", "documents read"),
        ), unit="short", description="Generated, prefilled and read-into-memory (ReadDocument) tokens per "
                                     "second, all replicas."),
        Panel("Time to first token", quantiles("nsam_time_to_first_token_seconds", legend="TTFT"), unit="s",
              thresholds=(5.0,), description="p50/p99 from Chat request to its first streamed token."),
        Panel("Inter-token latency", quantiles("nsam_inter_token_latency_seconds", legend="ITL"), unit="s",
              description="p50/p99 time between consecutive streamed tokens."),
        Panel("Time to first token (heatmap)", heatmap("nsam_time_to_first_token_seconds"), unit="s",
              kind="heatmap"),
        Panel("Active sessions and queued turns", (
            Target(f"sum(nsam_active_sessions{{{NS}}})", "active sessions"),
            Target(f"sum(nsam_queued_turns{{{NS}}})", "queued turns"),
        ), description="Turns in flight and turns waiting for a decode slot, all replicas."),
        Panel("Decode batch size", quantiles("nsam_batch_size", legend="batch") + (mean("nsam_batch_size"),),
              description="Sequences per decode step."),
        Panel("RPC duration p99 by method", quantiles("nsam_request_duration_seconds", by="method", qs=(0.99,)),
              unit="s"),
        Panel("Decoding engine", (
            Target(f"sum by (engine, device, fast_level) (nsam_engine_info{{{NS}}})",
                   "{{engine}} on {{device}}, fast level {{fast_level}}"),), kind="stat",
              description="Replicas per engine; fast level off: the engine (vLLM) decodes without the fast level."),
    )),
    Row("Memory health (per level)", (
        Panel("Surprise (inner loss)", quantiles("nsam_level_surprise", by="level", sel=L, qs=(0.5,)) + (
            mean("nsam_level_surprise", by="level", sel=L),),
              description="What each level's update saw as surprise; a rising trend means the levels stop fitting."),
        Panel("Update norm", quantiles("nsam_level_update_norm", by="level", sel=L), unit="short",
              description="L2 norm of accepted updates, p50/p99."),
        Panel("State norm", (mean("nsam_level_state_norm", by="level", sel=L),),
              description="Mean L2 norm of a level's weights after commits."),
        Panel("Drift from parent level", (mean("nsam_level_drift", by="level", sel=L),) + quantiles(
            "nsam_level_drift", by="level", sel=L, qs=(0.99,)),
              description="L2 distance of each level from the level it starts from."),
        Panel("Rejected updates", (
            Target(f"sum by (level, reason) (rate(nsam_level_rejected_updates_total{{{L}}}[{RATE}])) or vector(0)",
                   "{{level}} {{reason}}"),), unit="ops", zero_when_healthy=True,
              description="Updates refused by the guards (non-finite or past the norm bound)."),
        Panel("Forgetting probe loss vs baseline", (
            mean("nsam_forgetting_probe_loss", legend="candidate mean"),
            *quantiles("nsam_forgetting_probe_loss", qs=(0.9,), legend="candidate"),
            Target(f"max(nsam_forgetting_probe_baseline_loss{{{NS}}})", "frozen baseline"),
        ), description="Probe loss of candidate user levels against the frozen model; the alert fires at 1.1x baseline."),
        Panel("Level update duration p99", quantiles("nsam_level_update_duration_seconds", by="level", sel=L, qs=(0.99,)),
              unit="s"),
        Panel("Surprise (heatmap)", heatmap("nsam_level_surprise", sel=L), kind="heatmap"),
        Panel("Update norm (heatmap)", heatmap("nsam_level_update_norm", sel=L), kind="heatmap"),
    )),
    Row("Learner (medium updates after turns)", (
        Panel("Learner queue", (
            Target(f"sum(nsam_learner_queue_depth{{{NS}}})", "updates waiting"),
            Target(f"sum(nsam_learner_pending_turns{{{NS}}})", "turns not learnt yet"),
        ), zero_when_healthy=True, description="A turn returns before its medium update; these wait for the learner thread. "
                       "Past --learner-queue a session's turns join its waiting update."),
        Panel("Coalesced turns", (
            Target(f"sum(rate(nsam_learner_coalesced_turns_total{{{NS}}}[{RATE}])) or vector(0)", "coalesced"),),
              unit="ops", zero_when_healthy=True,
              description="Turns folded into another turn's update because the learner queue was full."),
        Panel("Learning lag (turn to its update)", quantiles("nsam_learner_lag_seconds", legend="lag"), unit="s",
              description="From a turn's commit to the commit of the medium update that learnt it."),
    )),
    Row("State store", (
        Panel("Store latency", quantiles("nsam_store_operation_duration_seconds", by="operation", qs=(0.99,)),
              unit="s", description="p99 latency of state-store operations. `queue` includes the workers' "
                                    "blocking stream reads, so it sits near their block time when idle."),
        Panel("Committed state size", quantiles("nsam_state_bytes", by="kind", qs=(0.5, 0.99)), unit="bytes"),
        Panel("CAS conflicts", (
            Target(f"sum by (kind) (rate(nsam_cas_conflicts_total{{{NS}}}[{RATE}])) or vector(0)", "{{kind}}"),),
              unit="ops", zero_when_healthy=True, description="Commits refused because a newer version was there."),
        Panel("Store errors", (
            Target(f"sum by (operation) (rate(nsam_store_errors_total{{{NS}}}[{RATE}])) or vector(0)", "{{operation}}"),),
              unit="ops", zero_when_healthy=True),
        Panel("Store latency (heatmap)", heatmap("nsam_store_operation_duration_seconds"), unit="s", kind="heatmap"),
        Panel("Store operations per second", (
            Target(f"sum by (operation) (rate(nsam_store_operation_duration_seconds_count{{{NS}}}[{RATE}]))",
                   "{{operation}}"),), unit="ops"),
    )),
    Row("Consolidation", (
        Panel("Queue depth", (Target(f"max(nsam_consolidation_queue_depth{{{NS}}})", "jobs waiting"),),
              thresholds=(100.0,), description="Jobs enqueued and not yet acknowledged."),
        Panel("Lag (enqueue to start)", quantiles("nsam_consolidation_lag_seconds", legend="lag"), unit="s"),
        Panel("Job outcomes", (
            Target(f"sum by (outcome) (rate(nsam_consolidation_jobs_total{{{NS}}}[{RATE}]))", "{{outcome}}"),),
              unit="ops", description="accepted, rejected (failed the probe), conflict, failed."),
        Panel("Job duration", quantiles("nsam_consolidation_duration_seconds", legend="duration"), unit="s"),
        Panel("What the drift budget kept", (
            Target(f"sum by (kept) (rate(nsam_consolidation_trust_region_total{{{NS}}}[{RATE}]))", "{{kept}}"),),
              unit="ops", description="Accepted consolidations: the full update, the level after fewer steps, "
                                      "or an interpolation towards the old level (learns forms, not values). "
                                      "Anything but full means a user's history is near the general-text budget."),
        Panel("Users' facts learnt", quantiles("nsam_consolidation_answers_said_ratio", qs=(0.5, 0.1),
                                               legend="answers said"), unit="percentunit",
              description="Share of a user's rehearsed answers the accepted level says word for word "
                          "(median, and the worst tenth of consolidations). Below 100%: the level did not "
                          "learn all the user told it within its steps or its drift budget."),
        Panel("Training steps per consolidation", quantiles("nsam_consolidation_steps", legend="steps"),
              description="The planned steps plus those taken until the answers were said; at the cap, "
                          "facts are hard to learn (codes, long names)."),
    )),
)

PANELS: tuple[Panel, ...] = tuple(p for row in ROWS for p in row.panels)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict:
    targets = [
        {"datasource": DATASOURCE, "expr": t.expr, "legendFormat": t.legend or "__auto",
         "refId": chr(ord("A") + i), "range": True,
         **({"format": "heatmap"} if panel.kind == "heatmap" else {})}
        for i, t in enumerate(panel.targets)
    ]
    steps = [{"color": "green", "value": None}] + [{"color": "red", "value": v} for v in panel.thresholds]
    out = {
        "id": pid, "type": panel.kind, "title": panel.title, "description": panel.description,
        "datasource": DATASOURCE, "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": panel.unit,
                                     "thresholds": {"mode": "absolute", "steps": steps}},
                        "overrides": []},
    }
    if panel.kind == "timeseries":
        out["fieldConfig"]["defaults"]["custom"] = {
            "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
            "thresholdsStyle": {"mode": "dashed" if panel.thresholds else "off"}}
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "desc"}}
    elif panel.kind == "heatmap":
        out["options"] = {"calculate": False, "yAxis": {"unit": panel.unit},
                          "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                          "cellGap": 1, "tooltip": {"show": True, "yHistogram": True}}
    return out


def _variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
            "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1}


def build() -> dict:
    panels, pid, y = [], 1, 0
    for row in ROWS:
        panels.append({"id": pid, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y, x = pid + 1, y + 1, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(_panel_json(panel, pid, x, y))
            pid, x = pid + 1, x + panel.width
        y += 8
    return {
        "uid": UID, "title": "nsam", "description": "nsam serving, memory health per level, state store and consolidation.",
        "tags": ["nsam", "llm", "grpc"], "timezone": "browser", "editable": True,
        "schemaVersion": 39, "version": 1, "graphTooltip": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            _variable("namespace", "Namespace", "label_values(nsam_requests_total, namespace)"),
            _variable("level", "Level", "label_values(nsam_level_update_norm_count, level)"),
        ]},
        "panels": panels,
    }


def render_json() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON is stale")
    args = parser.parse_args()
    text = render_json()
    if args.check:
        if not DASHBOARD_PATH.exists() or DASHBOARD_PATH.read_text() != text:
            print(f"{DASHBOARD_PATH} is stale: run python helm/tools/build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    DASHBOARD_PATH.write_text(text)
    print(f"wrote {DASHBOARD_PATH} ({len(PANELS)} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

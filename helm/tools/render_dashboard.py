"""Draws the nsam dashboard's main panels from live data into docs/dashboard.png.

    python helm/tools/render_dashboard.py [--clients 3] [--sessions 6] [--out docs/dashboard.png]

Starts the same stack as tests/helm/test_dashboard_live.py (a Redis, nsam serve --model tiny and
an nsam consolidate worker, scraped every second by a real Prometheus), runs a concurrent chat
workload, then plots each panel's
own PromQL (from build_dashboard.PANELS) over the run with matplotlib. Needs `prometheus` on
PATH and matplotlib; takes about a minute.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_dashboard as board  # noqa: E402
import live_stack as live  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

MAIN_PANELS = (
    "Requests per second", "Error ratio", "Tokens per second", "Time to first token",
    "Inter-token latency", "Decode batch size", "Surprise (inner loss)", "Update norm",
    "Drift from parent level", "Forgetting probe loss vs baseline", "Store latency",
    "Committed state size", "Job outcomes", "Lag (enqueue to start)", "Job duration",
    "Rejected updates",
)


def legend_of(template: str, labels: dict) -> str:
    """Grafana's legend template filled from the series labels; missing labels drop out."""
    out = template if template and template != "__auto" else ""
    out = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), out)
    return " ".join(out.split()) or "value"


def drive(target: str, clients: int, sessions: int) -> None:
    errors: list[BaseException] = []

    def one() -> None:
        try:
            live.run_workload(target, sessions=sessions, turns=3, pause_s=0.8, max_tokens=32,
                              not_found_calls=False)
        except BaseException as exc:  # noqa: BLE001 - reported after join
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
        time.sleep(1.5)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def plot(prom: live.Prometheus, start: float, end: float, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, PercentFormatter

    panels = [p for p in board.PANELS if p.title in MAIN_PANELS]
    cols = 4
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 5.2, rows * 3.3), squeeze=False)
    fig.patch.set_facecolor("#111217")
    for ax, panel in zip(axes.flat, panels):
        ax.set_facecolor("#181b1f")
        for spine in ax.spines.values():
            spine.set_color("#444")
        ax.tick_params(colors="#ccc", labelsize=7)
        ax.set_title(panel.title, color="#eee", fontsize=10, loc="left")
        ax.grid(color="#2a2d33", linewidth=0.6)
        for target in panel.targets:
            for series in prom.query_range(live.expand(target.expr, "15s"), start, end, 1):
                xs = [datetime.fromtimestamp(float(t)) for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, linewidth=1.3, label=legend_of(target.legend, series["metric"]))
        for threshold in panel.thresholds:
            ax.axhline(threshold, color="#f2495c", linestyle="--", linewidth=0.8)
        if panel.unit == "percentunit":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        elif panel.unit in ("s", "bytes"):
            ax.yaxis.set_major_formatter(EngFormatter(unit="s" if panel.unit == "s" else "B"))
        ax.xaxis.set_major_formatter(matplotlib.dates.DateFormatter("%H:%M:%S"))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left", framealpha=0.3, labelcolor="#ddd")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("nsam — serving, memory health, state store, consolidation "
                 "(live: nsam serve --model tiny + nsam consolidate, Prometheus 1 s scrape)",
                 color="#eee", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, facecolor=fig.get_facecolor())
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3, help="concurrent chat clients")
    parser.add_argument("--sessions", type=int, default=6, help="sessions per client")
    parser.add_argument("--model", default="tiny", help="model for nsam serve")
    parser.add_argument("--consolidation", choices=("external", "inprocess"), default="external",
                        help="a separate worker (the chart's default) or inside the server")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    args = parser.parse_args()
    with live.stack(args.model, consolidation=args.consolidation) as (server, prom):
        start = time.time()
        drive(server.grpc_target, args.clients, args.sessions)
        time.sleep(8)  # let the last consolidations finish and the rates settle
        plot(prom, start - 5, time.time(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

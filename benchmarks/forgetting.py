"""learning.py's forgetting chain alone (one user, 20 sessions of 2 facts, each consolidated),
for A/B runs of the consolidation settings; minutes per session on a CPU:

    python benchmarks/forgetting.py --json out.json --sessions 10 \\
        --override '{"probe_ppl_budget": 0.02}' --probe my_probe.txt

Reports the general-English perplexity change after the last session and how many
consolidations were accepted. The sessions are the full run's (same episode generator and
seed), so its figure is the baseline at the shipped settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import learning  # noqa: E402

from nsam.model.runtime import NsamModel  # noqa: E402

GENERAL = HERE / "data" / "general_english.txt"  # a WikiText-2 slice (data/README.md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--override", default="{}", help="ConsolidationConfig fields as JSON")
    p.add_argument("--probe", type=Path, help="the accept/reject probe text (default: the shipped one)")
    p.add_argument("--general", type=Path, default=GENERAL, help="general English text (default: %(default)s)")
    p.add_argument("--general-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if not args.general.is_file():
        p.error(f"--general {args.general}: no such file; benchmarks/data/README.md says where the text comes from")
    torch.set_num_threads(args.threads)
    override = json.loads(args.override)
    torch.manual_seed(0)
    m = NsamModel.load("default")
    m.context_window = min(m.context_window, 1024)  # as learning.py runs it
    m.consolidation = dataclasses.replace(m.consolidation, **override)
    if args.probe:
        m.probe_ids = m.tokenizer.encode(args.probe.read_text(encoding="utf-8"))
    details = learning.forgetting(learning.Harness(m, args.window), args.general, args.general_tokens,
                                  args.sessions, args.seed)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"override": override, "probe": str(args.probe or "shipped"),
                                     "probe_tokens": len(m.probe_ids), **details}, indent=2))


if __name__ == "__main__":
    main()

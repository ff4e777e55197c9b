"""learning.py's forgetting chain alone, with ConsolidationConfig overrides (A/B):
    python forget.py '{"probe_ppl_budget": 0.02}' out.json [sessions]"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import torch  # noqa: E402
import learning  # noqa: E402
from nsam.model.runtime import NsamModel  # noqa: E402

over, out = json.loads(sys.argv[1]), Path(sys.argv[2])
sessions = int(sys.argv[3]) if len(sys.argv) > 3 else 20
torch.set_num_threads(1)
args = argparse.Namespace(general=learning.DEFAULT_GENERAL, general_tokens=4096, forgetting_sessions=sessions,
                          seed=1234, window=256, model="default")
torch.manual_seed(0)
m = NsamModel.load("default")
m.context_window = min(m.context_window, 1024)
m.consolidation = dataclasses.replace(m.consolidation, **over)
f, d = learning.forgetting_phase(m, args)
out.write_text(json.dumps({"override": over, "forgetting": f, **d}, indent=2))

"""Forgetting phase of learning.py alone, with ConsolidationConfig overrides (A/B)."""
import argparse, dataclasses, json, sys
from pathlib import Path
sys.path.insert(0, "/work/main/benchmarks")
import torch
import learning
from nsam.model.runtime import NsamModel

over = json.loads(sys.argv[1]); out = Path(sys.argv[2])
torch.set_num_threads(1)
args = argparse.Namespace(general=learning.DEFAULT_GENERAL, general_tokens=4096, forgetting_sessions=20,
                          seed=1234, window=256, model="default")
torch.manual_seed(0)
m = NsamModel.load("default")
m.context_window = min(m.context_window, 1024)
m.consolidation = dataclasses.replace(m.consolidation, **over)
f, d = learning.forgetting_phase(m, args)
out.write_text(json.dumps({"override": over, "forgetting": f, **d}, indent=2))

"""Before the evicted boost (commit b4c653a): the whole read (in view or not) scaled by FACTOR.
usage: python scale_read.py FACTOR[,FACTOR...]"""
import sys, json, torch
from pathlib import Path
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
torch.set_num_threads(1)
import learning
from nsam.model.runtime import NsamModel
factors = [float(x) for x in sys.argv[1].split(",")]
m = NsamModel.load("default")
docs = sorted(learning.DEFAULT_DOCS.glob("*.txt"))
out = {}
prev = 1.0
for f in factors:
    m.fast_params.scale_read(f / prev); prev = f
    r = learning.online_ppl(m, docs, 2048, 256, 1000)
    out[f] = r["reduction"]
    print("FACTOR", f, "reduction", r["reduction"], flush=True)
print(json.dumps(out))

"""learning.py's online-perplexity phase alone, at several document read boosts (the fast level's
read of in-view text while it reads a document; the evicted boost stays as shipped). The logs
were taken at 69ab332, where the same boost was `prompt_read_boost` and applied to every prefill.
usage: python online_prompt.py BOOST[,BOOST...] OFFSET   (the benchmark's offset is 1000)"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import learning  # noqa: E402
from nsam.model.runtime import NsamModel  # noqa: E402

torch.set_num_threads(1)
boosts, offset = [float(x) for x in sys.argv[1].split(",")], int(sys.argv[2])
m = NsamModel.load("default")
print("shipped: document", m.fast_params.document_read_boost, "evicted", m.fast_params.evicted_read_boost, flush=True)
docs = sorted(learning.DEFAULT_DOCS.glob("*.txt"))
for boost in boosts:
    m.fast_params.document_read_boost = boost
    r = learning.online_ppl(m, docs, 2048, 256, offset)
    print("PROMPT_BOOST", boost, "offset", offset, "reduction", round(r["reduction"], 4), "frozen",
          round(r["frozen_ppl"], 2), "online", round(r["online_ppl"], 2), flush=True)

"""learning.py's online-perplexity phase alone, with variants of the medium level's update.
usage: python online_medium.py VARIANT[,VARIANT...] OFFSET   (the benchmark's offset is 1000)
VARIANT: shipped | off (no medium update) | lr=X | steps=N | fastloop (the medium's gradient is
taken with the fast level applied, as the chunk was scored) | fastloop+lr=X"""
import dataclasses
import math
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(BENCH))
import learning  # noqa: E402
import nsam.model.updates as updates  # noqa: E402
from nsam.model.levels import FastLevelRunner  # noqa: E402
from nsam.model.runtime import NsamModel  # noqa: E402
from nsam.model.updates import TrainingExample, levels_loss, update_on_examples  # noqa: E402

torch.set_num_threads(1)
INJECT = None  # (fast params, fast state) the medium's training pass applies
_BatchLevels = updates.BatchLevels


def _batch_levels(lora_layers, a, b, fast_layers, fast, layout, scale):
    if INJECT is not None and not fast_layers:
        params, state = INJECT
        fast_layers = {layer: i for i, layer in enumerate(params.spec.layers)}
        fast = [FastLevelRunner(params, state, in_context=0) for _ in range(a.shape[0])]
    return _BatchLevels(lora_layers, a, b, fast_layers, fast, layout, scale)


updates.BatchLevels = _batch_levels


def online(m, docs, doc_tokens, chunk, offset, variant):
    global INJECT
    opts = dict(o.split("=") if "=" in o else (o, "1") for o in variant.split("+"))
    spec = m.levels.get("medium")
    if "lr" in opts:
        spec = dataclasses.replace(spec, lr=float(opts["lr"]))
    if "steps" in opts:
        spec = dataclasses.replace(spec, steps=int(opts["steps"]))
    fast = m.fast_params
    f_tot = o_tot = 0.0
    n = 0
    for path in docs:
        ids = m.tokenizer.encode(path.read_text(encoding="utf-8"))[offset:offset + doc_tokens]
        medium, fast_state = m._new_level("medium"), m._new_level("fast")
        f_sum = o_sum = 0.0
        k = 0
        for i in range(0, len(ids) - 1, chunk):
            piece = ids[i:i + chunk]
            if len(piece) < 16:
                break
            f, _ = levels_loss(m.model, spec, [], None, None, piece)
            before = fast_state
            o, runner = levels_loss(m.model, spec, [medium], fast, fast_state, piece)
            fast_state = runner.state()
            f_sum += f * (len(piece) - 1)
            o_sum += o * (len(piece) - 1)
            k += len(piece) - 1
            if "off" in opts:
                continue
            INJECT = (fast, before) if "fastloop" in opts else None
            medium, _ = update_on_examples(m.model, spec, medium, [], [TrainingExample(piece, [1.0] * (len(piece) - 1))])
            INJECT = None
        print(f"  {path.name}: frozen {math.exp(f_sum / k):.2f} online {math.exp(o_sum / k):.2f}", flush=True)
        f_tot, o_tot, n = f_tot + f_sum, o_tot + o_sum, n + k
    return 1 - math.exp(o_tot / n) / math.exp(f_tot / n), math.exp(f_tot / n), math.exp(o_tot / n)


m = NsamModel.load("default")
docs = sorted(learning.DEFAULT_DOCS.glob("*.txt"))
variants, offset = sys.argv[1].split(","), int(sys.argv[2])
for v in variants:
    r, fp, op = online(m, docs, 2048, 256, offset, v)
    print("VARIANT", v, "offset", offset, "reduction", round(r, 4), "frozen", round(fp, 2), "online", round(op, 2), flush=True)

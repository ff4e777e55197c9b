"""learning.py with fast-level read boosts overridden (A/B runs).
usage: python run_fast.py ATTR=VALUE[,ATTR=VALUE...] -- learning.py args
e.g. run_fast.py prompt_read_boost=2 -- --skip forgetting online decode"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
overrides = dict(kv.split("=") for kv in sys.argv[1].split(","))
sys.argv = ["learning.py"] + sys.argv[3:]
import nsam.model.runtime as rt  # noqa: E402

_load = rt.NsamModel.load.__func__


def load(cls, *a, **k):
    m = _load(cls, *a, **k)
    for attr, value in overrides.items():
        setattr(m.fast_params, attr, float(value))
    print("fast level:", {a: getattr(m.fast_params, a) for a in ("prompt_read_boost", "evicted_read_boost")}, flush=True)
    return m


rt.NsamModel.load = classmethod(load)
import learning  # noqa: E402

learning.main()

"""learning.py with the medium LevelSpec / ConsolidationConfig overridden (A/B runs).
usage: run_learning.py '{"medium": {...}, "consolidation": {...}, "read_scale": x}' -- learning.py args"""
import dataclasses, json, sys
sys.path.insert(0, "/work/main/benchmarks")
over = json.loads(sys.argv[1]); sys.argv = ["learning.py"] + sys.argv[3:]
import nsam.model.runtime as rt
orig_levels, orig_load = rt.default_levels, rt.NsamModel.load.__func__

def levels(n):
    cfg = orig_levels(n)
    from nsam.model.levels import LevelsConfig
    return LevelsConfig(tuple(dataclasses.replace(s, **over.get(s.name, {})) for s in cfg.levels))

def load(cls, *a, **k):
    m = orig_load(cls, *a, **k)
    m.consolidation = dataclasses.replace(m.consolidation, **over.get("consolidation", {}))
    if "read_scale" in over and m.fast_params is not None:
        m.fast_params.scale_read(over["read_scale"])
    return m

rt.default_levels = levels
rt.NsamModel.load = classmethod(load)
import learning
learning.main()

"""learning.py with the fast level's evicted read boost overridden (A/B runs).
usage: python run_boost.py BOOST -- learning.py args"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
boost = float(sys.argv[1])
sys.argv = ["learning.py"] + sys.argv[3:]
import nsam.model.runtime as rt  # noqa: E402

_load = rt.NsamModel.load.__func__


def load(cls, *a, **k):
    m = _load(cls, *a, **k)
    m.fast_params.evicted_read_boost = boost
    return m


rt.NsamModel.load = classmethod(load)
import learning  # noqa: E402

learning.main()

"""consolidation.py with untaught slots deduplicated (a stop-17 probe, not shipped)."""
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import nsam.model.consolidation as C
orig = C.untaught_slots
def dedup(*a, **k):
    return list({s.question: s for s in orig(*a, **k)}.values())
C.untaught_slots = dedup
import runpy
sys.argv = ["consolidation.py"] + sys.argv[1:]
runpy.run_path(sys.path[0] + "/consolidation.py", run_name="__main__")

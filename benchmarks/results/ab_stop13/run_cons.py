"""consolidation.py with the near-miss owners per taught name overridden (A/B runs).
usage: python run_cons.py OWNERS_PER_NAME -- consolidation.py args"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
owners = int(sys.argv[1])
sys.argv = ["consolidation.py"] + sys.argv[3:]
import nsam.model.consolidation as consolidation  # noqa: E402

consolidation.NEAR_OWNERS = owners
import consolidation as bench  # noqa: E402

bench.main()

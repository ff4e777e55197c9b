"""learning.py with a fact turn's extra rehearsal steps overridden (A/B runs).
usage: python run_turn.py EXTRA_STEPS EVERY -- learning.py args"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
extra, every = int(sys.argv[1]), int(sys.argv[2])
sys.argv = ["learning.py"] + sys.argv[4:]
import nsam.model.consolidation as consolidation  # noqa: E402

consolidation.TURN_EXTRA_STEPS, consolidation.TURN_LEARN_EVERY = extra, every
import learning  # noqa: E402

learning.main()

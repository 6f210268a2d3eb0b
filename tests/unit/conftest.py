"""Unit tests exercise the working tree's hpcrun, not a copy installed in the venv."""

import os
import sys

TREE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if sys.path[:1] != [TREE]:
    sys.path.insert(0, TREE)
for _name in [m for m in sys.modules if m == "hpcrun" or m.startswith("hpcrun.")]:
    del sys.modules[_name]  # an installed copy imported before us must not be used

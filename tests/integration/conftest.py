"""Fixtures for the integration tests live in hpcrun_testlib (shared with tests/batch)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hpcrun_testlib import bdir, images, no_leaks, utmp  # noqa: E402,F401

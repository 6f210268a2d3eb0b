"""Where Apptainer's own test SIFs are: $HPCRUN_TESTDATA, else shared/testdata/sif beside
the checkout (CI lays shared/ there). Required: the SIF tests fail without them."""

import os

SIF_DATA = os.environ.get("HPCRUN_TESTDATA") or os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "testdata", "sif")
)

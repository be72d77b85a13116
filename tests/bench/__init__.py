"""Benchmark tests. benchmarks/ is not part of the installed package: it is imported from the checkout, as `make
bench` runs it, so the checkout goes on the path before any test module here imports it."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

"""Benchmark-only hook: time kubetune's stage functions inside every process of a local pipeline run.

``benchmarks.pipeline_overhead`` puts this folder on ``PYTHONPATH`` and sets ``KUBETUNE_BENCH_STAGE_TIMES`` to a
file; Python imports ``sitecustomize`` at start-up in every process (the CLI and each KFP task subprocess). When one
of the modules below is imported, its stage function is wrapped so that each call appends one JSON line
``{"stage", "pid", "process_start", "start", "seconds"}`` to that file (``process_start``: when this module was
imported, just after the interpreter started). Without the variable this module does nothing.
"""

from __future__ import annotations

import functools
import importlib.abc
import json
import os
import sys
import time

_TARGETS = {
    "kubetune.prepare": "prepare",
    "kubetune.pack": "pack",
    "kubetune.train": "train",
    "kubetune.evaluation": "evaluate",
    "kubetune.register": "register",
    "components.runtime": "decide",
}
_LOG = os.environ.get("KUBETUNE_BENCH_STAGE_TIMES")

# When the interpreter reached site customisation (a few tens of ms after the process started): the start of the
# task's own start-up cost (imports, KFP executor) up to the stage call.
_LOADED = time.time()


def _wrap(module, attr: str) -> None:
    fn = getattr(module, attr, None)
    if fn is None or getattr(fn, "_bench_timed", False):
        return

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        start = time.time()
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            line = {
                "stage": f"{module.__name__}.{attr}",
                "pid": os.getpid(),
                "start": start,
                "process_start": _LOADED,
                "seconds": time.perf_counter() - t0,
            }
            with open(_LOG, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(line) + "\n")

    timed._bench_timed = True
    setattr(module, attr, timed)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, attr: str):
        self._inner = inner
        self._attr = attr

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _wrap(module, self._attr)

    def __getattr__(self, name):  # get_source, get_filename, ... as the real loader has them
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, _TARGETS[name])
                return spec
        return None


if _LOG:
    sys.meta_path.insert(0, _Finder())

"""Preemption of the train stage: SIGTERM (a node drained, a pod evicted) or Ctrl-C becomes a checkpoint and exit 3.

The first signal asks the Trainer to save at the end of the current step and stop (the stage then raises
:class:`kubetune.errors.Preempted`, exit code 3, "preempted at step N"). A signal that comes while the model is still
loading stops before training: nothing to save, the resume point is unchanged. If the step and the save cannot
finish within ``train.preempt_grace_s`` a watchdog exits 3 at once and the newest periodic checkpoint is the resume
point. A second signal exits at once. Under torchrun a signal to any rank stops every rank: the flag is all-reduced at
the end of every step (:func:`kubetune.distributed.any_rank`) and :meth:`Preemption.join` makes it this rank's too.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

from kubetune.errors import EXIT_PREEMPTED

log = logging.getLogger(__name__)

_MAX_WAIT_S = 7 * 24 * 3600.0  # threading's timeouts overflow on huge floats; nobody waits a week to be killed


class Preemption:
    """SIGTERM/SIGINT -> save at the end of this step and stop; a watchdog exits 3 if that takes too long.

    ``settled`` is set when the preemption checkpoint is written or the stage leaves the ``with`` block, whichever
    comes first; the watchdog stands down then (a stage run in-process must not be killed after it returned).
    """

    def __init__(self, grace_s: float, *, stay: bool = False):
        self.grace_s = grace_s
        # Under torchrun the agent sends SIGTERM to the ranks still running once one exits: a rank that was
        # preempted ignores it from the end of the stage on (``stay``) and exits 3, instead of dying of it on the way
        # out (a Python handler would not do: the interpreter drops those while it shuts down).
        self.stay = stay
        self.requested = False
        self.settled = threading.Event()
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested:  # a second signal: stop now
            os._exit(EXIT_PREEMPTED)
        self.requested = True
        log.warning(
            "received %s: saving a checkpoint at the end of this step (grace %.0f s)",
            signal.Signals(signum).name,
            self.grace_s,
        )
        self._start_watchdog()

    def join(self) -> None:
        """Another rank was signalled: stop here at the same step, within the same grace."""
        if not self.requested:
            self.requested = True
            log.warning("another rank was preempted: saving a checkpoint at the end of this step")
            self._start_watchdog()

    def _start_watchdog(self) -> None:
        threading.Thread(target=self._watchdog, name="kubetune-preempt-watchdog", daemon=True).start()

    def _watchdog(self):
        # Leave two seconds of the grace for the process to exit before the kubelet's SIGKILL.
        if not self.settled.wait(min(max(1.0, self.grace_s - 2.0), _MAX_WAIT_S)):
            sys.stderr.write(
                "kubetune: the current step did not finish within train.preempt_grace_s; exiting, the "
                "newest periodic checkpoint is the resume point\n"
            )
            sys.stderr.flush()
            os._exit(EXIT_PREEMPTED)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        self.settled.set()
        for sig, old in self._old.items():
            signal.signal(sig, signal.SIG_IGN if self.stay and self.requested else old)
        self._old.clear()

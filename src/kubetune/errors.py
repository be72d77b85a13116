"""Errors meant for people, and the process exit codes that go with them.

Exit codes (a stable contract that KFP retries and scripts rely on):
    0  done
    2  bad input: config, data, model path (``UserError``); the message names the place and what to do
    3  preempted: a checkpoint was saved, run the same command again to resume (``Preempted``)
    1  any other failure
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 3


class UserError(Exception):
    """Bad input from the user. ``str(err)`` is one line naming the file/row/key and what to do."""

    exit_code = EXIT_BAD_INPUT


class Preempted(Exception):
    """Training was stopped by SIGTERM and a checkpoint was saved; rerunning resumes from it."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, step: int, checkpoint: str | None):
        self.step = step
        self.checkpoint = checkpoint
        where = f", checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"preempted at step {step}{where}; run the same command again to resume")


class PeerLost(Exception):
    """Under torchrun, a collective failed: another rank died (``kill -9``, OOM) or its node was lost, or it did not
    answer within ``distributed.timeout_s``. Nothing was sealed after the last complete checkpoint."""

    exit_code = EXIT_FAILURE

    def __init__(self, rank: int, world_size: int, cause: str):
        super().__init__(
            f"rank {rank} of {world_size} lost contact with another rank ({cause}): a rank died, its node was lost or "
            "it did not answer within distributed.timeout_s (torchrun's report names the rank that failed first); "
            "run the same command again to resume from the newest sealed checkpoint"
        )

"""Checkpoints of the train stage: sealing, verification, the resume choice, one trainer per folder.

Checkpoints go to ``train.checkpoint_dir`` (default ``<adapter>/../checkpoints``): ``checkpoint-<step>/`` folders
written by the Trainer. Once the Trainer has written one, every file in it is fsynced and ``kubetune-complete.json``
is written last, atomically, listing each file's size and sha256 (:func:`mark_complete`). ``resume: auto`` takes the
newest checkpoint whose marker and files check out: a checkpoint cut off while being written (no marker), or damaged
afterwards (a file missing, truncated or changed), is removed and never loaded; an older intact one is used instead.
The folder records the run's fingerprint (``kubetune-run.json``) and refuses checkpoints of another run. One process
trains into a checkpoint folder at a time (:func:`folder_lock`: an ``flock`` next to it, released when the process
dies, even by ``kill -9``). Under torchrun only the writer (rank 0) takes the lock, chooses the resume point and
seals, after every rank has written its part of the checkpoint (its ``rng_state_<rank>.pth``).

A run stopped by SIGTERM leaves ``kubetune-preempted.json`` in the folder (:func:`write_preempted`: step, checkpoint,
world size, time), written atomically once its checkpoint is sealed: a supervisor that sees only an exit code (torchrun
exits 1 whenever a worker exits non-zero, 3 included) reads it to tell a preemption from a failure. The next run that
takes the folder removes it (:func:`clear_preempted`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from kubetune import artifacts
from kubetune.errors import UserError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "kubetune-complete.json"
FINGERPRINT_FILE = "kubetune-run.json"
PREEMPTED_FILE = "kubetune-preempted.json"


def _step_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _read_marker(ckpt: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((ckpt / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def mark_complete(ckpt: Path, *, step: int, run_fp: str, tokens_seen: int, world_size: int = 1) -> None:
    """Seal a checkpoint the Trainer has finished writing: fsync its files, then write the marker atomically.

    The marker lists every file with its size and sha256, so that a checkpoint damaged after it was sealed (a
    truncated copy, a half-finished rotation) is caught by :func:`checkpoint_problem` before it is loaded, and the
    number of ranks that wrote it (a resume on another number restores no per-rank RNG state).
    """
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(ckpt.rglob("*")):
        if not p.is_file() or p.name in (COMPLETE_MARKER, COMPLETE_MARKER + ".part"):
            continue
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
        files[p.relative_to(ckpt).as_posix()] = {"bytes": p.stat().st_size, "sha256": artifacts.file_digest(p)}
    marker = {"step": step, "fingerprint": run_fp, "tokens_seen": tokens_seen, "world_size": world_size, "files": files}
    artifacts.write_json_atomic(ckpt / COMPLETE_MARKER, marker)


def checkpoint_problem(ckpt: Path, run_fp: str | None = None) -> str | None:
    """Why ``ckpt`` must not be loaded (None: it is complete and intact, and belongs to run ``run_fp`` if given)."""
    if not (ckpt / COMPLETE_MARKER).is_file():
        return f"no {COMPLETE_MARKER} (cut off while being written, or not written by kubetune)"
    marker = _read_marker(ckpt)
    if marker is None:
        return f"{COMPLETE_MARKER} is unreadable"
    if _step_of(ckpt) >= 0 and marker.get("step") != _step_of(ckpt):
        return f"{COMPLETE_MARKER} is for step {marker.get('step')}, not {_step_of(ckpt)}"
    if run_fp is not None and marker.get("fingerprint") != run_fp:
        return "it belongs to another run (other data or settings)"
    files = marker.get("files")
    if not isinstance(files, dict) or "trainer_state.json" not in files:
        return f"{COMPLETE_MARKER} lists no files"
    for rel, meta in files.items():
        p = ckpt / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != meta.get("bytes"):
            return f"{rel} has {p.stat().st_size} bytes, {meta.get('bytes')} were written"
        if artifacts.file_digest(p) != meta.get("sha256"):
            return f"{rel} changed after it was written (sha256 mismatch)"
    return None


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints that carry a readable completion marker, oldest first (their files are checked at resume)."""
    if not ckpt_dir.is_dir():
        return []
    found = [
        p
        for p in ckpt_dir.glob("checkpoint-*")
        if p.is_dir() and _step_of(p) >= 0 and _read_marker(p) is not None and (p / "trainer_state.json").is_file()
    ]
    return sorted(found, key=_step_of)


def remove_incomplete_checkpoints(ckpt_dir: Path) -> list[str]:
    """Remove checkpoint folders without a readable completion marker (a writer was killed mid-save)."""
    removed = []
    for p in ckpt_dir.glob("checkpoint-*"):
        if p.is_dir() and _read_marker(p) is None:
            log.warning("checkpoint %s is incomplete (cut off while being written); removing it", p)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def _other_run(ckpt_dir: Path) -> UserError:
    return UserError(
        f"{ckpt_dir}: holds checkpoints of a different run (other data or settings); set "
        "train.checkpoint_dir to a new folder, or train.resume=never to discard them"
    )


def check_resume(mode: str, ckpt_dir: Path, run_fp: str) -> None:
    """Raise :class:`UserError` where ``train.resume`` cannot be honoured (a path that is no complete checkpoint of
    this run; ``auto`` over a folder holding another run's checkpoints). Reads only: the stage calls it before it
    creates anything, and :func:`choose_resume` again when it takes the folder."""
    if mode not in ("auto", "never"):
        p = Path(mode).expanduser()
        if not (p / "trainer_state.json").is_file():
            raise UserError(
                f"config key `train.resume`: {p} is not a checkpoint folder (no trainer_state.json); "
                "use `auto`, `never` or a checkpoint-<step> folder"
            )
        problem = checkpoint_problem(p, run_fp)
        if problem:
            raise UserError(
                f"config key `train.resume`: {p} cannot be resumed from: {problem}; use `auto`, `never` or a "
                "complete checkpoint-<step> folder of this run"
            )
        return
    if mode == "never" or not ckpt_dir.is_dir():
        return
    owner_file = ckpt_dir / FINGERPRINT_FILE
    try:
        owner = json.loads(owner_file.read_text()).get("fingerprint") if owner_file.is_file() else None
    except (OSError, ValueError, AttributeError):
        owner = None  # unreadable: the markers in each checkpoint still say whose it is
    existing = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir()]
    foreign = (owner is not None and owner != run_fp) or any(
        (m := _read_marker(p)) is not None and m.get("fingerprint") != run_fp for p in existing
    )
    if foreign and existing:
        raise _other_run(ckpt_dir)


def choose_resume(mode: str, ckpt_dir: Path, run_fp: str) -> Path | None:
    """Take ``ckpt_dir`` for run ``run_fp`` and say which checkpoint to resume from (None: start fresh).

    ``mode`` is ``train.resume``. ``auto``: the newest complete, intact checkpoint; incomplete and damaged ones are
    removed (never loaded). ``never``: every checkpoint in the folder is removed. A path: that checkpoint, which must
    be complete, intact and of this run. Checkpoints of another run are refused (:func:`check_resume`), never removed.
    """
    check_resume(mode, ckpt_dir, run_fp)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if mode not in ("auto", "never"):
        return Path(mode).expanduser()
    if mode == "never":
        for p in ckpt_dir.glob("checkpoint-*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
    artifacts.write_json_atomic(ckpt_dir / FINGERPRINT_FILE, {"fingerprint": run_fp})
    if mode == "never":
        return None
    remove_incomplete_checkpoints(ckpt_dir)
    for ckpt in reversed(complete_checkpoints(ckpt_dir)):
        problem = checkpoint_problem(ckpt, run_fp)
        if problem is None:
            return ckpt
        log.warning("checkpoint %s is damaged (%s); removing it and trying an older one", ckpt, problem)
        shutil.rmtree(ckpt, ignore_errors=True)
    return None


@contextlib.contextmanager
def folder_lock(ckpt_dir: Path):
    """One trainer per checkpoint folder: two runs whose adapters differ may still share the default one."""
    try:
        lock = artifacts.output_lock(ckpt_dir)
        lock.__enter__()
    except UserError:
        holder = artifacts.lock_holder(ckpt_dir)
        raise UserError(
            f"config key `train.checkpoint_dir`: {ckpt_dir} is in use by another kubetune run ({holder}); wait "
            "for it to finish, or set train.checkpoint_dir to another folder"
        ) from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def write_preempted(ckpt_dir: Path, *, step: int, checkpoint: Path, world_size: int) -> Path:
    """Record, atomically, that the run stopped for a preemption with ``checkpoint`` sealed (see the module doc)."""
    import time

    path = ckpt_dir / PREEMPTED_FILE
    artifacts.write_json_atomic(
        path,
        {
            "step": step,
            "checkpoint": str(checkpoint),
            "world_size": world_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return path


def clear_preempted(ckpt_dir: Path) -> None:
    """A new run took the folder: the record of the last one's preemption no longer describes it."""
    with contextlib.suppress(FileNotFoundError):
        (ckpt_dir / PREEMPTED_FILE).unlink()


def written_by(ckpt: Path) -> int | None:
    """How many ranks wrote ``ckpt`` (None: a marker from before kubetune recorded it; one process wrote those)."""
    value = (_read_marker(ckpt) or {}).get("world_size")
    return value if isinstance(value, int) else None


def take(held: contextlib.ExitStack, mode: str, ckpt_dir: Path, run_fp: str) -> Path | None:
    """The writer's part: lock ``ckpt_dir`` for the rest of the stage (``held``), choose the resume point
    (:func:`choose_resume`) and clear the last run's preemption record, as this run is the folder's now."""
    held.enter_context(folder_lock(ckpt_dir))
    resume_from = choose_resume(mode, ckpt_dir, run_fp)
    clear_preempted(ckpt_dir)
    return resume_from


def resume_point(resume_from: Path | None) -> tuple[int | None, int]:
    """(step, tokens seen) recorded by the checkpoint we resume from; read now, as rotation may delete it later."""
    if resume_from is None:
        return None, 0
    marker = _read_marker(resume_from) or {}
    step = marker.get("step")
    if not isinstance(step, int):
        step = int(artifacts.read_json(resume_from / "trainer_state.json").get("global_step", 0))
    return step, int(marker.get("tokens_seen") or 0)


def finished(ckpt: Path) -> bool:
    """Whether ``ckpt`` is the last checkpoint of a run that reached its step budget."""
    state = artifacts.read_json(ckpt / "trainer_state.json")
    return 0 < int(state.get("max_steps") or 0) <= int(state.get("global_step") or 0)


def load_finished(trainer, ckpt: Path):
    """Take the adapter of a finished run from its last checkpoint instead of training; returns its TrainerState.

    transformers (5.24) resumed from the checkpoint of the last step trains one step more than ``max_steps`` when the
    steps do not end on an epoch boundary, so the process killed while writing the adapter folder must not hand
    the finished run back to ``trainer.train``.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    result = set_peft_model_state_dict(trainer.model, load_file(str(ckpt / "adapter_model.safetensors")))
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{ckpt}: adapter weights do not fit the model ({result.unexpected_keys[:3]})")
    state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
    trainer.state = state
    log.info("%s is the last checkpoint of a finished run (step %d): writing its adapter", ckpt.name, state.global_step)
    return state

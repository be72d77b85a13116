"""Stage outputs: atomic directories with a manifest, fingerprints, and a one-writer lock.

Every stage writes into ``<out>.tmp-<pid>-<random>`` and renames it to ``<out>`` only when everything is written,
with ``manifest.json`` last inside it. A directory without a complete manifest is never accepted as input.

manifest.json::

    {"stage": "prepare", "artifact": "prepared_dataset", "kubetune_version": "0.1.0",
     "fingerprint": "<sha256 of inputs + config>", "inputs": {...}, "config": {...}, "counts": {...},
     "created_at": "2026-11-28T01:02:03Z", "complete": true}

Re-running a stage whose output exists with the same fingerprint is a no-op that says so; a different fingerprint
refuses unless ``overwrite=True``. Two writers on the same output: the second gets a clear error. The lock is an
``flock`` on a file next to the output, so a dead process never holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"

ARTIFACT_OF_STAGE = {
    "prepare": "prepared_dataset",
    "pack": "packed_dataset",
    "train": "adapter",
    "evaluate": "eval_report",
    "register": "registered_model",
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    try:
        return _v("kubetune")
    except PackageNotFoundError:
        return "0+unknown"


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(*parts: Any) -> str:
    """sha256 over a canonical JSON of ``parts`` (config sections, input fingerprints, file digests)."""
    return hashlib.sha256(_canonical(list(parts)).encode()).hexdigest()


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_digest(path: str | Path, patterns: tuple[str, ...] = ("*",)) -> str:
    """Digest of the files under ``path`` (names and contents), stable across machines."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted({p for pat in patterns for p in root.rglob(pat) if p.is_file()})
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        h.update(file_digest(p).encode())
    return h.hexdigest()


def read_manifest(path: str | Path, stage: str | None = None) -> dict[str, Any]:
    """The manifest of a complete stage output, or a UserError saying what to run."""
    d = Path(path)
    expected = ARTIFACT_OF_STAGE.get(stage or "", "stage output")
    mf = d / MANIFEST
    if not d.is_dir():
        raise UserError(
            f"{d}: not found; expected a {expected} directory" + (f" (run `kubetune {stage}` first)" if stage else "")
        )
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or not manifest.get("complete"):
        raise UserError(
            f"{d}: incomplete or not a kubetune output (no complete {MANIFEST}); "
            f"re-run the stage that writes it" + (f" (`kubetune {stage}`)" if stage else "")
        )
    if stage and manifest.get("stage") != stage:
        raise UserError(f"{d}: is a `{manifest.get('stage')}` output, expected a {expected} from `kubetune {stage}`")
    return manifest


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def lock_holder(out: str | Path) -> str:
    """Who holds the one-writer lock of ``out``: ``pid N on HOST``, for messages."""
    try:
        return _lock_path(Path(out)).read_text(errors="replace").strip() or "another process"
    except OSError:
        return "another process"


def _missing_parents(path: Path) -> list[Path]:
    """The folders above ``path`` that do not exist yet, innermost first."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _open_locked(lock_path: Path, out: Path) -> int:
    """An fd holding the exclusive flock of ``lock_path`` (the file at that path now, not an unlinked one)."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            try:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                try:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                except OSError:
                    holder = "another process"
                raise UserError(
                    f"{out}: another kubetune run is writing here ({holder}); wait for it to finish or "
                    "choose another output folder"
                ) from None
            finally:
                os.close(fd)
        # A holder removes the file before it lets go of the lock: if we locked a file that is no longer at the
        # path, a newer writer may hold the one that is; try again on that one.
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[Path]:
    """Hold an exclusive, non-blocking flock next to ``out`` for the duration; refuse a second writer.

    The lock file (``.<name>.lock`` beside ``out``) and any folders created to hold it are removed on release,
    whether the body succeeded or failed, so a run that stopped on bad input leaves nothing behind. A holder killed
    with SIGKILL leaves the file, but not the lock: the next writer takes it over.
    """
    out = Path(out)
    created = _missing_parents(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = _lock_path(out)
    try:
        fd = _open_locked(lock_path, out)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        yield lock_path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # while still holding the lock: see _open_locked
        os.close(fd)  # closing releases the flock
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this process created, innermost first, where they are still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


@dataclass
class StageWriter:
    """Handle given to a stage body: write files under ``tmp``; fill ``counts`` and ``extra``."""

    out: Path
    tmp: Path
    stage: str
    fingerprint: str
    inputs: dict[str, Any]
    config: dict[str, Any]
    up_to_date: bool = False
    counts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with contextlib.suppress(OSError), open(p, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a crash of the node must not undo it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sweep_stale_tmp(out: Path) -> None:
    """Remove what a killed writer of ``out`` left behind (we hold the lock): its temporary folder, or the old
    output it was about to delete when it replaced it (``--overwrite``)."""
    for pattern in (f"{out.name}.tmp-*", f"{out.name}.old-*"):
        for p in out.parent.glob(pattern):
            log.info("removing %s, left by a writer that did not finish", p)
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def stage_output(
    out: str | Path,
    stage: str,
    fp: str,
    *,
    inputs: dict[str, Any],
    config: dict[str, Any],
    overwrite: bool = False,
    lock: bool = True,
) -> Iterator[StageWriter]:
    """Write a stage's output atomically.

    Yields a :class:`StageWriter`. If ``up_to_date`` is True the output already exists with this fingerprint:
    the body should return at once (nothing is rewritten). Otherwise the body writes into ``writer.tmp``; on a
    clean exit the manifest is written and the folder renamed into place; on an exception the temp folder is
    removed and nothing at ``out`` changes.
    """
    out = Path(out)
    guard = output_lock(out) if lock else contextlib.nullcontext()
    with guard:
        if out.exists():
            try:
                existing = read_manifest(out)
            except UserError:
                existing = None
            if existing and existing.get("fingerprint") == fp and existing.get("stage") == stage:
                log.info("%s: up to date (same inputs and config, fingerprint %s); nothing to do", out, fp[:12])
                yield StageWriter(
                    out, out, stage, fp, inputs, config, up_to_date=True, counts=existing.get("counts", {})
                )
                return
            if existing and not overwrite:
                raise UserError(
                    f"{out}: holds a different `{existing.get('stage')}` output (fingerprint "
                    f"{str(existing.get('fingerprint'))[:12]} != {fp[:12]}); pass --overwrite to replace "
                    "it or choose another output folder"
                )
            if not existing and any(out.iterdir()) and not overwrite:
                raise UserError(
                    f"{out}: exists and is not a complete kubetune output; remove it, pass "
                    "--overwrite, or choose another output folder"
                )
        sweep_stale_tmp(out)
        tmp = out.parent / f"{out.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
        tmp.mkdir(parents=True)
        writer = StageWriter(out, tmp, stage, fp, inputs, config)
        try:
            yield writer
            manifest = {
                "stage": stage,
                "artifact": ARTIFACT_OF_STAGE.get(stage, stage),
                "kubetune_version": version(),
                "fingerprint": fp,
                "inputs": inputs,
                "config": config,
                "counts": writer.counts,
                **writer.extra,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "complete": True,
            }
            _fsync_tree(tmp)
            mf_tmp = tmp / (MANIFEST + ".part")
            mf_tmp.write_text(json.dumps(manifest, indent=2, default=str))
            with open(mf_tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(mf_tmp, tmp / MANIFEST)
            if out.exists():
                old = out.parent / f"{out.name}.old-{secrets.token_hex(3)}"
                os.replace(out, old)
                try:
                    os.replace(tmp, out)
                except BaseException:
                    os.replace(old, out)  # put the previous output back rather than leave none
                    raise
                _fsync_dir(out.parent)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
                _fsync_dir(out.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` so that a reader sees the old file or the whole new one, never a part, even after ``kill -9``
    or a crash of the node: temp file, fsync, rename, fsync of the folder."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    with open(part, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """:func:`write_text_atomic` of ``obj`` as JSON."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))

"""The train stage: packed_dataset -> adapter, with PEFT LoRA / QLoRA through TRL's SFTTrainer.

SFTTrainer owns the loop and computes the loss through a fused LM head; on CPUs this stage swaps in kubetune's
token-chunked head for the run (``kubetune.lmhead``, ``train.lm_head``). This module decides the hardware-aware
settings, wires checkpoints, resume and preemption, and writes the adapter folder (see docs/architecture.md):

    adapter_model.safetensors  adapter_config.json  tokenizer files  base_model.json
    training_summary.json      config.yaml          merged/ (train.merge)   manifest.json

Checkpoints go to ``train.checkpoint_dir`` (default ``<adapter>/../checkpoints``): ``checkpoint-<step>/`` folders
written by the Trainer. Once the Trainer has written one, every file in it is fsynced and ``kubetune-complete.json``
is written last, atomically, listing each file's size and sha256. ``resume: auto`` takes the newest checkpoint whose
marker and files check out: a checkpoint cut off while being written (no marker), or damaged afterwards (a file
missing, truncated or changed), is removed and never loaded; an older intact one is used instead. The folder records
the run's fingerprint (``kubetune-run.json``) and refuses checkpoints of another run. One process trains into a
checkpoint folder at a time (an ``flock`` next to it, released when the process dies, even by ``kill -9``).

Resuming restores the adapter, optimizer, scheduler, RNG states and the position in the data, so a run that was
interrupted and resumed ends with the same adapter as one that was not (bit-identical on the same machine and
thread count). ``training_summary.json`` then records ``resumed_from_step``, the whole loss curve and the tokens
seen over all the runs.

Preemption: SIGTERM (or Ctrl-C) asks the Trainer to save at the end of the current step and stop; the stage then
raises :class:`kubetune.errors.Preempted` (exit code 3, "preempted at step N"). A signal that comes while the
model is still loading stops before training (nothing to save: the resume point is unchanged). If the step and
the save cannot finish within ``train.preempt_grace_s`` the process exits 3 at once and the newest periodic
checkpoint is the resume point. A second signal exits at once.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune import artifacts, hardware, models
from kubetune.config import Config, dump
from kubetune.errors import EXIT_PREEMPTED, Preempted, UserError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "kubetune-complete.json"
FINGERPRINT_FILE = "kubetune-run.json"

# Train config keys that do not change the result: they stay out of the fingerprint so that a retry with, say,
# another checkpoint folder or thread count still resumes and is recognised as the same run.
_RUNTIME_ONLY = {
    "threads",
    "logging_steps",
    "checkpoint_dir",
    "resume",
    "preempt_grace_s",
    "save_steps",
    "save_total_limit",
}


# ------------------------------------------------------------------------------------------------------------------
# Data: packed rows -> batches


@dataclass
class TokenCounter:
    """Real (non-padding) tokens the model trained on.

    The collator records each batch's count in ``pending`` as it builds it; the trainer moves one batch's count to
    ``tokens`` as it trains on it (:meth:`consume`). Counting at collation alone would be wrong twice over: the data
    loader builds one batch ahead, and a batch built before a preemption is built again after the resume.
    """

    tokens: int = 0
    collated: int = 0
    pending: collections.deque = field(default_factory=collections.deque)

    def add_batch(self, real_tokens: int) -> None:
        self.collated += real_tokens
        self.pending.append(real_tokens)

    def consume(self) -> None:
        if self.pending:
            self.tokens += self.pending.popleft()


@dataclass
class PackedRowsCollator:
    """Batches packed rows as ``[batch, longest row]`` with per-row position ids restarting at every example.

    With position ids that restart, and no attention mask, transformers builds a block-diagonal causal mask, so
    examples packed in one row never attend to each other. Keeping rows apart (rather than flattening the batch into
    one sequence) keeps attention cost at ``batch x row_len^2`` instead of ``(batch x row_len)^2``. Labels at each
    example's first token are masked so that no example is trained to predict the start of the next. Padding (only
    to the longest row) is a block of its own and carries no loss.
    """

    pad_token_id: int
    counter: TokenCounter = field(default_factory=TokenCounter)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        real = 0
        for i, r in enumerate(rows):
            length = len(r["input_ids"])
            real += length
            input_ids[i, :length] = torch.as_tensor(r["input_ids"])
            labels[i, :length] = torch.as_tensor(r["labels"])
            seq_lengths = r.get("seq_lengths") or [length]
            start = 0
            for sl in seq_lengths:
                position_ids[i, start : start + sl] = torch.arange(sl)
                labels[i, start] = -100
                start += sl
            if length < width:
                position_ids[i, length:] = torch.arange(width - length)
        self.counter.add_batch(real)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints


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


def mark_complete(ckpt: Path, *, step: int, run_fp: str, tokens_seen: int) -> None:
    """Seal a checkpoint the Trainer has finished writing: fsync its files, then write the marker atomically.

    The marker lists every file with its size and sha256, so that a checkpoint damaged after it was sealed (a
    truncated copy, a half-finished rotation) is caught by :func:`checkpoint_problem` before it is loaded.
    """
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(ckpt.rglob("*")):
        if not p.is_file() or p.name in (COMPLETE_MARKER, COMPLETE_MARKER + ".part"):
            continue
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
        files[p.relative_to(ckpt).as_posix()] = {"bytes": p.stat().st_size, "sha256": artifacts.file_digest(p)}
    marker = {"step": step, "fingerprint": run_fp, "tokens_seen": tokens_seen, "files": files}
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


def choose_resume(cfg: Config, ckpt_dir: Path, run_fp: str) -> Path | None:
    """Which checkpoint to resume from (None: start fresh), after checking the checkpoints belong to this run.

    ``auto``: the newest complete, intact checkpoint; incomplete and damaged ones are removed (never loaded).
    ``never``: every checkpoint in the folder is removed. A path: that checkpoint, which must be complete, intact
    and of this run.
    """
    mode = cfg.train.resume
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
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        return p
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    owner_file = ckpt_dir / FINGERPRINT_FILE
    try:
        owner = json.loads(owner_file.read_text()).get("fingerprint") if owner_file.is_file() else None
    except (OSError, ValueError, AttributeError):
        owner = None  # unreadable: the markers in each checkpoint still say whose it is
    existing = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir()]
    if mode == "auto":
        foreign = (owner is not None and owner != run_fp) or any(
            (m := _read_marker(p)) is not None and m.get("fingerprint") != run_fp for p in existing
        )
        if foreign and existing:
            raise _other_run(ckpt_dir)
    else:
        for p in existing:
            shutil.rmtree(p, ignore_errors=True)
    artifacts.write_json_atomic(owner_file, {"fingerprint": run_fp})
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


# ------------------------------------------------------------------------------------------------------------------
# Callbacks: progress, checkpoint markers, preemption


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_MAX_WAIT_S = 7 * 24 * 3600.0  # threading's timeouts overflow on huge floats; nobody waits a week to be killed


class _Preemption:
    """SIGTERM/SIGINT -> save at the end of this step and stop; a watchdog exits 3 if that takes too long.

    ``settled`` is set when the preemption checkpoint is written or the stage leaves the ``with`` block, whichever
    comes first; the watchdog stands down then (a stage run in-process must not be killed after it returned).
    """

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
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
            signal.signal(sig, old)
        self._old.clear()


def _make_callbacks(
    run_fp: str, preemption: _Preemption, counter: TokenCounter, summary: dict[str, Any], tokens_before: int
):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One log line per logging step: step, loss, tokens/s, ETA. Seals checkpoints; stops on preemption."""

        def __init__(self):
            self.t0 = None
            self.tokens0 = 0
            self.step0 = 0

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            self.tokens0 = counter.tokens
            self.step0 = state.global_step

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            elapsed = time.perf_counter() - self.t0
            done = state.global_step - self.step0
            tokens = counter.tokens - self.tokens0
            tps = tokens / elapsed if elapsed > 0 else 0.0
            left = (state.max_steps - state.global_step) * (elapsed / done) if done else float("nan")
            eta = f"{left / 60:.1f} min" if math.isfinite(left) else "?"
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  %.0f tokens/s  %.2f s/step  ETA %s",
                state.global_step,
                state.max_steps,
                logs["loss"],
                logs.get("learning_rate", 0.0),
                tps,
                elapsed / done if done else 0.0,
                eta,
            )

        def on_train_end(self, args, state, control, **kw):
            _record_end(summary, state, time.perf_counter() - self.t0, counter.tokens - self.tokens0, self.step0)

        def on_step_end(self, args, state, control, **kw):
            if preemption.requested:
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args, state, control, **kw):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                mark_complete(ckpt, step=state.global_step, run_fp=run_fp, tokens_seen=tokens_before + counter.tokens)
                if preemption.requested:
                    summary["preempted_checkpoint"] = str(ckpt)
                    preemption.settled.set()

    return [Progress()]


def _record_end(summary: dict[str, Any], state, seconds: float, tokens: int, step0: int) -> None:
    summary["train_seconds"] = seconds
    summary["tokens_this_run"] = tokens
    summary["steps_this_run"] = state.global_step - step0
    summary["global_step"] = state.global_step
    summary["max_steps"] = state.max_steps
    # The Trainer restores its log history from the checkpoint, so this is the curve of the whole run, across
    # preemptions, not only of this process.
    summary["loss_curve"] = [
        [int(e["step"]), float(e["loss"])] for e in state.log_history if "loss" in e and "step" in e
    ]


def _finished(ckpt: Path) -> bool:
    """Whether ``ckpt`` is the last checkpoint of a run that reached its step budget."""
    state = artifacts.read_json(ckpt / "trainer_state.json")
    return 0 < int(state.get("max_steps") or 0) <= int(state.get("global_step") or 0)


def _load_finished(trainer, ckpt: Path, summary: dict[str, Any]) -> None:
    """Take the adapter of a finished run from its last checkpoint instead of training.

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
    _record_end(summary, state, 0.0, 0, state.global_step)
    log.info("%s is the last checkpoint of a finished run (step %d): writing its adapter", ckpt.name, state.global_step)


def _trainer_class():
    """SFTTrainer that credits each batch's real tokens to the counter as it trains on it."""
    from trl import SFTTrainer

    class _Trainer(SFTTrainer):
        token_counter: TokenCounter | None = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.token_counter is not None:
                self.token_counter.consume()
            return super().training_step(model, inputs, num_items_in_batch)

    return _Trainer


# ------------------------------------------------------------------------------------------------------------------
# Settings


def _activation_bytes(model_config, batch_size: int, row_len: int, bytes_per: int) -> int:
    """Activation memory estimate (Korthikanti et al.): s*b*h*(34 + 5*a*s/h) bytes/2 per layer, scaled to dtype."""
    h = getattr(model_config, "hidden_size", 0) or getattr(model_config, "d_model", 0) or 1024
    layers = getattr(model_config, "num_hidden_layers", 0) or getattr(model_config, "num_layers", 0) or 24
    heads = getattr(model_config, "num_attention_heads", 0) or 16
    s, b = row_len, batch_size
    per_layer = s * b * h * (34 + 5 * heads * s / h) * bytes_per / 2
    return int(per_layer * layers)


def _optim(cfg: Config, device: str) -> tuple[str, str]:
    if cfg.train.optim != "auto":
        return cfg.train.optim, "set in config (train.optim)"
    return "adamw_torch_fused", "fused AdamW: one kernel per parameter group instead of a loop over tensors"


def _settings(cfg: Config, hw: hardware.Hardware, model_config, row_len: int) -> dict[str, hardware.Decision]:
    precision = hardware.choose_precision(hw, cfg.train.precision)
    if cfg.method == "qlora" and hw.device == "cpu" and precision.value == "fp16":
        raise UserError("config key `train.precision`: fp16 training needs a GPU; use fp32 or bf16 on CPU")
    threads = hardware.choose_threads(hw, cfg.train.threads)
    bytes_per = 4 if precision.value == "fp32" else 2
    n_params = getattr(model_config, "num_parameters", None)
    h = getattr(model_config, "hidden_size", 1024)
    layers = getattr(model_config, "num_hidden_layers", 24)
    vocab = getattr(model_config, "vocab_size", 32000)
    est_params = n_params or (12 * layers * h * h + vocab * h)
    weight_bytes = int(est_params * (0.55 if cfg.method == "qlora" else bytes_per))
    per_row = _activation_bytes(model_config, 1, row_len, bytes_per)  # linear in the rows per pass
    micro = choose_micro_batch(cfg, hw, activation_bytes_per_row=per_row, weight_bytes=weight_bytes)
    ac = hardware.choose_activation_checkpointing(
        hw,
        cfg.train.activation_checkpointing,
        activation_bytes=micro.value * per_row,
        weight_bytes=weight_bytes,
    )
    optim, why = _optim(cfg, hw.device)
    return {
        "precision": precision,
        "threads": threads,
        "micro_batch_size": micro,
        "activation_checkpointing": ac,
        "optim": hardware.Decision(optim, why),
        "lm_head": choose_lm_head(cfg, hw),
        "dropout_sampler": choose_dropout_sampler(cfg, hw),
        "lean_layers": choose_lean_layers(cfg, hw),
        "split_gemms": choose_split_gemms(cfg, hw),
    }


def _by_device(
    hw: hardware.Hardware, key: str, requested: str, *, cpu: tuple[str, str], gpu: tuple[str, str]
) -> hardware.Decision:
    """The config's value for ``key`` unless it is ``auto``; else the (value, reason) for this device."""
    if requested != "auto":
        return hardware.Decision(requested, f"set in config ({key})")
    return hardware.Decision(*(cpu if hw.device == "cpu" else gpu))


def choose_lm_head(cfg: Config, hw: hardware.Hardware) -> hardware.Decision:
    """TRL's fused LM head, or kubetune's token-chunked one (``kubetune.lmhead``)."""
    return _by_device(
        hw,
        "train.lm_head",
        cfg.train.lm_head,
        cpu=(
            "chunked",
            "CPU: one GEMM and one logsumexp per chunk of tokens, on loss-carrying positions only; TRL's "
            "head runs a dozen element-wise ops per vocabulary tile on CPUs",
        ),
        gpu=("trl", "GPU: TRL's Triton head scores only loss-carrying positions already"),
    )


def choose_dropout_sampler(cfg: Config, hw: hardware.Hardware) -> hardware.Decision:
    """PEFT's nn.Dropout for the LoRA inputs, or kubetune's bulk sampler (``kubetune.dropout``)."""
    if cfg.train.dropout_sampler == "auto" and cfg.lora.dropout == 0:
        return hardware.Decision("torch", "lora.dropout is 0: no masks to draw")
    return _by_device(
        hw,
        "train.dropout_sampler",
        cfg.train.dropout_sampler,
        cpu=(
            "bulk",
            "CPU: one 64-bit random draw per three elements instead of one per element (torch's masks were 8% of "
            "a bf16 step); drop probability rounded to a multiple of 1/65536",
        ),
        gpu=("torch", "GPU: torch's dropout costs little there"),
    )


def _cpu_layer_rewrite(
    cfg: Config, hw: hardware.Hardware, key: str, *, cpu: str, gpu: str, ipex: str
) -> hardware.Decision:
    """``on`` for CPU and ``off`` for GPU (with these reasons) unless ``train.<key>`` says otherwise; ``off`` under
    ``train.ipex``, which replaces these layers with its own."""
    requested = getattr(cfg.train, key)
    if requested == "auto" and cfg.train.ipex:
        return hardware.Decision("off", f"train.ipex: {ipex}")
    return _by_device(hw, f"train.{key}", requested, cpu=("on", cpu), gpu=("off", gpu))


def choose_lean_layers(cfg: Config, hw: hardware.Hardware) -> hardware.Decision:
    """transformers' RMSNorm and SiLU-gated MLP, or kubetune's leaner versions of them (``kubetune.layers``)."""
    return _cpu_layer_rewrite(
        cfg,
        hw,
        "lean_layers",
        cpu="CPU: RMSNorm keeping only its bf16 input for backward (not two fp32 copies of the hidden state), the "
        "MLP's SiLU product formed in place, 4-bit weights dequantised into one reused buffer; same outputs, "
        "less activation memory",
        gpu="GPU: memory bandwidth makes element-wise work cheap there",
        ipex="IPEX replaces these layers with its own",
    )


def choose_split_gemms(cfg: Config, hw: hardware.Hardware) -> hardware.Decision:
    """The frozen base layers' GEMMs as they are, or split in column blocks where timing says so (``kubetune.gemm``)."""
    return _cpu_layer_rewrite(
        cfg,
        hw,
        "split_gemms",
        cpu="CPU: each frozen layer shape timed as one GEMM and as 2-4 column blocks at the pass's token count; a "
        "split kept where it is 1.15x faster (some shapes get a poor blocking from the GEMM library)",
        gpu="GPU: cuBLAS picks its kernels per shape",
        ipex="IPEX replaces the linear layers with its own",
    )


CPU_ROWS_PER_PASS = 2


def choose_micro_batch(
    cfg: Config, hw: hardware.Hardware, *, activation_bytes_per_row: int, weight_bytes: int
) -> hardware.Decision:
    """Rows per forward/backward pass. Gradient accumulation keeps the optimizer step over ``batch_size`` rows."""
    if cfg.train.micro_batch_size:
        return hardware.Decision(cfg.train.micro_batch_size, "set in config (train.micro_batch_size)")
    if hw.device != "cpu":
        return hardware.Decision(cfg.train.batch_size, "GPU: the whole batch in one pass keeps the device busy")
    rows = CPU_ROWS_PER_PASS
    if cfg.train.batch_size % rows:
        return hardware.Decision(1, f"CPU: one packed row per pass (train.batch_size {cfg.train.batch_size} is odd)")
    need = weight_bytes + rows * activation_bytes_per_row
    fits, available = hardware.fits_in_memory(hw, need)
    gib = 1 << 30
    if not fits:
        return hardware.Decision(
            1,
            f"CPU: one packed row per pass: {rows} would need an estimated {need / gib:.1f} GiB of weights + "
            f"activations, more than 80% of the {available / gib:.1f} GiB available",
        )
    return hardware.Decision(
        rows,
        f"CPU: {rows} packed rows per pass: larger GEMMs than one row's (1.09-1.12x the tokens/s of one row on "
        "SmolLM2-135M) with a fraction of the whole batch's activations; gradient accumulation keeps the optimizer "
        "step at train.batch_size rows",
    )


def run_fingerprint(cfg: Config, packed_manifest: dict[str, Any]) -> str:
    train_cfg = {k: v for k, v in cfg.to_dict()["train"].items() if k not in _RUNTIME_ONLY}
    return artifacts.fingerprint(
        "train",
        packed_manifest["fingerprint"],
        cfg.to_dict()["model"],
        cfg.to_dict()["lora"],
        cfg.to_dict()["quant"] if cfg.method == "qlora" else None,
        train_cfg,
        cfg.method,
    )


def _peft_config(cfg: Config):
    from peft import LoraConfig

    lora = cfg.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules),
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )


def _apply_ipex(model, precision: str):
    try:
        import intel_extension_for_pytorch as ipex
    except Exception as err:  # IPEX aborts on import with any torch but 2.8.x
        raise UserError(
            "config key `train.ipex`: intel-extension-for-pytorch cannot be imported here "
            f"({type(err).__name__}); it is end-of-life and only works with torch 2.8.x in the "
            "cpu-ipex image; set train.ipex=false (stock PyTorch uses AMX through oneDNN)"
        ) from None
    import torch

    return ipex.optimize(model, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)


# ------------------------------------------------------------------------------------------------------------------
# The stage


def train(cfg: Config, packed: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Fine-tune ``cfg.model`` on a packed_dataset; write the adapter folder ``out``. See the module docstring.

    Raises :class:`~kubetune.errors.UserError` for bad input (and for a second writer of ``out`` or of the
    checkpoint folder), :class:`~kubetune.errors.Preempted` after SIGTERM/SIGINT once the resume point is on disk.
    """
    packed = Path(packed)
    out = Path(out)
    packed_manifest = artifacts.read_manifest(packed, "pack")
    run_fp = run_fingerprint(cfg, packed_manifest)
    ckpt_dir = Path(cfg.train.checkpoint_dir).expanduser() if cfg.train.checkpoint_dir else out.parent / "checkpoints"
    inputs = {
        "packed": {"path": str(packed), "fingerprint": packed_manifest["fingerprint"]},
        "model": cfg.model.name_or_path,
    }
    # The signal handler covers writing the output too: a SIGTERM that comes after the last step lets the adapter
    # folder be finished (within the grace) instead of killing the process half-way through it.
    with (
        _Preemption(cfg.train.preempt_grace_s) as preemption,
        artifacts.stage_output(
            out, "train", run_fp, inputs=inputs, config=cfg.to_dict(), overwrite=overwrite
        ) as writer,
    ):
        if writer.up_to_date:
            return out
        with _checkpoint_dir_lock(ckpt_dir):
            summary = _train_into(cfg, packed, writer.tmp, ckpt_dir, run_fp, preemption)
        writer.counts.update({k: summary[k] for k in ("global_step", "tokens_seen", "train_tokens_per_second")})
    _log_summary(out, summary)
    return out


@contextlib.contextmanager
def _checkpoint_dir_lock(ckpt_dir: Path):
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


def _resume_point(resume_from: Path | None) -> tuple[int | None, int]:
    """(step, tokens seen) recorded by the checkpoint we resume from; read now, as rotation may delete it later."""
    if resume_from is None:
        return None, 0
    marker = _read_marker(resume_from) or {}
    step = marker.get("step")
    if not isinstance(step, int):
        step = int(artifacts.read_json(resume_from / "trainer_state.json").get("global_step", 0))
    return step, int(marker.get("tokens_seen") or 0)


def _check_rank(cfg: Config, model_config) -> None:
    width = getattr(model_config, "hidden_size", None) or getattr(model_config, "d_model", None)
    if isinstance(width, int) and cfg.lora.r > width:
        raise UserError(
            f"config key `lora.r`: {cfg.lora.r} exceeds the model's hidden size {width}; a rank above the layer "
            "width adds parameters but no capacity (typical ranks: 8-64)"
        )


def _check_target_modules(cfg: Config, model) -> None:
    """Every module named in ``lora.target_modules`` exists (PEFT matches a name against the end of a module's path;
    a name that matches nothing would only fail deep inside PEFT, or be silently ignored beside one that does)."""
    targets = cfg.lora.target_modules
    if isinstance(targets, str):
        return
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        import torch

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(
            f"config key `lora.target_modules`: {', '.join(missing)} not found in {cfg.model.name_or_path}; its "
            f"linear layers are {', '.join(linear[:20]) or 'none'} (or use `all-linear`)"
        )


def _train_into(
    cfg: Config, packed: Path, dest: Path, ckpt_dir: Path, run_fp: str, preemption: _Preemption
) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import AutoConfig, AutoTokenizer
    from trl import SFTConfig

    hw = hardware.detect()
    train_rows = datasets.load_from_disk(str(packed / "train"))
    if len(train_rows) == 0:
        raise UserError(f"{packed}/train: no packed rows; the prepared data produced no trainable examples")
    row_len = max(len(r) for r in train_rows["input_ids"][:1000])
    resume_from = choose_resume(cfg, ckpt_dir, run_fp)
    resumed_step, tokens_before = _resume_point(resume_from)

    def stop_if_preempted() -> None:
        # Nothing was trained in this process yet: the resume point on disk is unchanged.
        if preemption.requested:
            raise Preempted(resumed_step or 0, str(resume_from) if resume_from else None)

    stop_if_preempted()
    resolved = models.resolve(cfg.model)
    try:
        model_config = AutoConfig.from_pretrained(
            resolved.path, revision=resolved.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UserError(
            f"model {resolved.source!r}: cannot read its config ({str(err).splitlines()[0][:160]}); "
            "check model.name_or_path"
        ) from None
    _check_rank(cfg, model_config)
    settings = _settings(cfg, hw, model_config, row_len)
    settings["allocator"] = hardware.apply_allocator_setting(hw)  # before loading: the weights' buffers too
    precision = settings["precision"].value
    torch.set_num_threads(settings["threads"].value)
    for name, d in settings.items():
        log.info("auto setting %s = %s (%s)", name, d.value, d.reason)

    tokenizer = AutoTokenizer.from_pretrained(str(packed / "tokenizer"))
    quant = cfg.quant if cfg.method == "qlora" else None
    load_dtype = precision  # QLoRA's non-quantised parts too: prepare_kbit_model keeps bf16 ones in bf16
    t_load = time.perf_counter()
    ac = bool(settings["activation_checkpointing"].value)
    with hardware.trimming_heap(settings["allocator"]):  # glibc keeps what quantising frees, unless told
        model = models.load_model(cfg.model, dtype=load_dtype, quant=quant, device=hw.device, resolved=resolved)
        log.info(
            "loaded %s in %.1f s (%s, %s)",
            resolved.source,
            time.perf_counter() - t_load,
            cfg.method,
            "4-bit NF4" if quant and quant.bits == 4 else load_dtype,
        )
        if quant is not None:
            model = models.prepare_kbit_model(model, precision=precision, activation_checkpointing=ac)
    model.config.use_cache = False  # packed rows stay isolated only without the KV cache (STACK.md)
    _check_target_modules(cfg, model)
    if cfg.train.ipex:
        model = _apply_ipex(model, precision)

    counter = TokenCounter()
    collator = PackedRowsCollator(pad_token_id=tokenizer.pad_token_id, counter=counter)
    summary: dict[str, Any] = {"loss_curve": [], "method": cfg.method, "resumed_from_step": resumed_step}
    on_cuda = hw.device == "cuda"
    args = SFTConfig(
        output_dir=str(ckpt_dir),
        max_steps=cfg.train.max_steps,
        num_train_epochs=cfg.train.epochs,
        per_device_train_batch_size=settings["micro_batch_size"].value,
        gradient_accumulation_steps=cfg.train.grad_accum * (cfg.train.batch_size // settings["micro_batch_size"].value),
        learning_rate=cfg.train.learning_rate,
        lr_scheduler_type=cfg.train.lr_scheduler,
        warmup_steps=cfg.train.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        seed=cfg.train.seed,
        data_seed=cfg.train.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not on_cuda,
        activation_checkpointing=ac,
        optim=settings["optim"].value,
        torch_compile=cfg.train.compile,
        logging_steps=cfg.train.logging_steps,
        save_strategy="steps",
        save_steps=cfg.train.save_steps,
        save_total_limit=cfg.train.save_total_limit,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        packing=False,
        max_length=None,
    )
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_rows,
        data_collator=collator,
        processing_class=tokenizer,
        peft_config=_peft_config(cfg),
        callbacks=_make_callbacks(run_fp, preemption, counter, summary, tokens_before),
    )
    trainer.token_counter = counter
    if settings["dropout_sampler"].value == "bulk":
        from kubetune import dropout

        log.info("LoRA dropout: bulk sampler on %d layers", dropout.install(trainer.model))
    if settings["lean_layers"].value == "on":
        from kubetune import layers

        lean = summary["lean_layers"] = layers.install(trainer.model)
        log.info(
            "lean layers: %d RMSNorm, %d SiLU-gated MLP and %d 4-bit linear modules",
            lean["norms"],
            lean["mlps"],
            lean["linear4bit"],
        )
    if settings["split_gemms"].value == "on":
        from kubetune import gemm

        tokens_per_pass = settings["micro_batch_size"].value * row_len
        split = summary["split_gemms"] = gemm.install(trainer.model, tokens_per_pass)
        log.info(
            "split GEMMs: %d frozen linear layers routed (%s)",
            split["layers"],
            "; ".join(
                f"{shape}: forward {p['forward_blocks']}, input gradient {p['backward_blocks']} blocks"
                for shape, p in split["plans"].items()
            )
            or "no frozen linear layers",
        )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our Progress callback logs one readable line per step instead
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    log.info(
        "training %s trainable of %s parameters (%.2f%%); checkpoints in %s%s",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
        ckpt_dir,
        f"; resuming from {resume_from.name} (step {resumed_step})" if resume_from else "",
    )
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    stop_if_preempted()
    if resume_from is not None and _finished(resume_from):
        _load_finished(trainer, resume_from, summary)
    else:
        from peft.helpers import disable_input_dtype_casting

        from kubetune import layers, lmhead

        head = lmhead.token_chunked_head() if settings["lm_head"].value == "chunked" else contextlib.nullcontext()
        # Under autocast (bf16/fp16) the LoRA linears cast their inputs themselves; PEFT's own cast to the adapter's
        # fp32 would add a copy of every LoRA input, and dropout over it, only for autocast to cast it back.
        with head, disable_input_dtype_casting(trainer.model, active=precision != "fp32"):
            try:
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            finally:
                layers.release_workspace()  # the 4-bit layers' buffers (nothing is held unless they ran)
    if preemption.requested and trainer.state.global_step < trainer.state.max_steps:
        raise Preempted(trainer.state.global_step, summary.get("preempted_checkpoint"))
    # (A signal after the last step: the work is done, so the output is finished within the grace.)

    trainer.model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    artifacts.write_json(dest / "base_model.json", models.base_reference(resolved, cfg.model))
    (dest / "config.yaml").write_text(dump(cfg), encoding="utf-8")
    secs = summary.get("train_seconds") or float("nan")
    summary.update(
        {
            "tokens_seen": tokens_before + summary.get("tokens_this_run", 0),
            "train_tokens_per_second": summary.get("tokens_this_run", 0) / secs if secs and secs > 0 else 0.0,
            "final_loss": summary["loss_curve"][-1][1] if summary["loss_curve"] else None,
            "peak_rss_bytes": _peak_rss_bytes(),
            "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if on_cuda else None,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "settings": {k: {"value": d.value, "reason": d.reason} for k, d in settings.items()},
            "hardware": hw.describe(),
            "checkpoint_dir": str(ckpt_dir),
            "resumed_from": str(resume_from) if resume_from else None,
        }
    )
    if cfg.train.merge:
        # Relative to the adapter folder: ``dest`` is the temporary folder that is renamed into place.
        summary["merged"] = _merge(cfg, resolved, dest, precision, hw.device).relative_to(dest).as_posix()
    artifacts.write_json(dest / "training_summary.json", summary)
    return summary


def _merge(cfg: Config, resolved: models.ResolvedModel, adapter_dir: Path, precision: str, device: str) -> Path:
    """Base (reloaded unquantised) + adapter merged into one model, saved under ``merged/``."""
    from peft import PeftModel

    dtype = "fp32" if device == "cpu" and precision != "bf16" else precision
    base = models.load_model(cfg.model, dtype=dtype, device=device, resolved=resolved)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    target = adapter_dir / "merged"
    merged.save_pretrained(str(target))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(target))
    log.info("merged base + adapter into %s", target)
    return target


def _log_summary(out: Path, s: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):
        log.info(
            "trained %d steps, %s tokens, %.0f tokens/s, final loss %s; adapter in %s",
            s["global_step"],
            f"{s['tokens_seen']:,}",
            s["train_tokens_per_second"],
            f"{s['final_loss']:.4f}" if s.get("final_loss") is not None else "n/a",
            out,
        )

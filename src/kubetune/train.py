"""The train stage: packed_dataset -> adapter, with PEFT LoRA / QLoRA through TRL's SFTTrainer.

SFTTrainer owns the loop (and, since TRL 1.x, computes the LM head and loss only on tokens that carry loss, in
tiles). This module decides the hardware-aware settings, wires checkpoints, resume and preemption, and writes the
adapter folder (see docs/architecture.md):

    adapter_model.safetensors  adapter_config.json  tokenizer files  base_model.json
    training_summary.json      config.yaml          merged/ (train.merge)   manifest.json

Checkpoints go to ``train.checkpoint_dir`` (default ``<adapter>/../checkpoints``): ``checkpoint-<step>/`` folders
written by the Trainer, each marked complete by ``kubetune-complete.json`` once fully written. ``resume: auto`` takes
the newest complete one; a checkpoint cut off while being written has no marker and is removed, never loaded.

Preemption: SIGTERM (or Ctrl-C) asks the Trainer to save at the end of the current step and stop; the stage then
raises :class:`kubetune.errors.Preempted` (exit code 3). If the step cannot finish within ``train.preempt_grace_s``
the process exits 3 at once and the newest periodic checkpoint is the resume point.
"""

from __future__ import annotations

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
    """Real (non-padding) tokens handed to the model, counted by the collator."""

    tokens: int = 0


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
        self.counter.tokens += real
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints


def _step_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [
        p
        for p in ckpt_dir.glob("checkpoint-*")
        if p.is_dir() and (p / COMPLETE_MARKER).is_file() and (p / "trainer_state.json").is_file() and _step_of(p) >= 0
    ]
    return sorted(found, key=_step_of)


def remove_incomplete_checkpoints(ckpt_dir: Path) -> list[str]:
    removed = []
    for p in ckpt_dir.glob("checkpoint-*"):
        if p.is_dir() and not (p / COMPLETE_MARKER).is_file():
            log.warning("checkpoint %s is incomplete (cut off while being written); removing it", p)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def choose_resume(cfg: Config, ckpt_dir: Path, run_fp: str) -> Path | None:
    """Which checkpoint to resume from (None: start fresh), after checking the checkpoints belong to this run."""
    mode = cfg.train.resume
    if mode not in ("auto", "never"):
        p = Path(mode).expanduser()
        if not (p / "trainer_state.json").is_file():
            raise UserError(
                f"config key `train.resume`: {p} is not a checkpoint folder (no trainer_state.json); "
                "use `auto`, `never` or a checkpoint-<step> folder"
            )
        return p
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    marker = ckpt_dir / FINGERPRINT_FILE
    owner = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
    existing = list(ckpt_dir.glob("checkpoint-*"))
    if mode == "never" or (owner is not None and owner != run_fp):
        if existing and mode == "auto":
            raise UserError(
                f"{ckpt_dir}: holds checkpoints of a different run (other data or settings); set "
                "train.checkpoint_dir to a new folder, or train.resume=never to discard them"
            )
        for p in existing:
            shutil.rmtree(p, ignore_errors=True)
    marker.write_text(json.dumps({"fingerprint": run_fp}))
    if mode == "never":
        return None
    remove_incomplete_checkpoints(ckpt_dir)
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


# ------------------------------------------------------------------------------------------------------------------
# Callbacks: progress, checkpoint markers, preemption


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Preemption:
    """SIGTERM/SIGINT -> save at the end of this step and stop; a watchdog exits if that takes too long."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.requested = False
        self.saved = threading.Event()
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
        threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self):
        if not self.saved.wait(max(1.0, self.grace_s - 2.0)):
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
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _make_callbacks(run_fp: str, preemption: _Preemption, counter: TokenCounter, summary: dict[str, Any]):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One log line per logging step: step, loss, tokens/s, ETA. Collects the loss curve and throughput."""

        def __init__(self):
            self.t0 = None
            self.tokens0 = 0
            self.step0 = 0

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            self.tokens0 = counter.tokens
            self.step0 = state.global_step
            summary["resumed_from_step"] = state.global_step or None

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            elapsed = time.perf_counter() - self.t0
            done = state.global_step - self.step0
            tokens = counter.tokens - self.tokens0
            tps = tokens / elapsed if elapsed > 0 else 0.0
            left = (state.max_steps - state.global_step) * (elapsed / done) if done else float("nan")
            summary["loss_curve"].append([state.global_step, float(logs["loss"])])
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
            elapsed = time.perf_counter() - self.t0
            summary["train_seconds"] = elapsed
            summary["tokens_this_run"] = counter.tokens - self.tokens0
            summary["steps_this_run"] = state.global_step - self.step0
            summary["global_step"] = state.global_step
            summary["max_steps"] = state.max_steps

        def on_step_end(self, args, state, control, **kw):
            if preemption.requested:
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args, state, control, **kw):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                artifacts.write_json(
                    ckpt / COMPLETE_MARKER,
                    {"step": state.global_step, "fingerprint": run_fp, "tokens_seen": counter.tokens},
                )
                if preemption.requested:
                    summary["preempted_checkpoint"] = str(ckpt)
                    preemption.saved.set()

    return [Progress()]


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
    ac = hardware.choose_activation_checkpointing(
        hw,
        cfg.train.activation_checkpointing,
        activation_bytes=_activation_bytes(model_config, cfg.train.batch_size, row_len, bytes_per),
        weight_bytes=weight_bytes,
    )
    optim, why = _optim(cfg, hw.device)
    return {
        "precision": precision,
        "threads": threads,
        "activation_checkpointing": ac,
        "optim": hardware.Decision(optim, why),
    }


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
    """Fine-tune ``cfg.model`` on a packed_dataset; write the adapter folder ``out``. See the module docstring."""
    packed = Path(packed)
    out = Path(out)
    packed_manifest = artifacts.read_manifest(packed, "pack")
    run_fp = run_fingerprint(cfg, packed_manifest)
    ckpt_dir = Path(cfg.train.checkpoint_dir).expanduser() if cfg.train.checkpoint_dir else out.parent / "checkpoints"
    inputs = {
        "packed": {"path": str(packed), "fingerprint": packed_manifest["fingerprint"]},
        "model": cfg.model.name_or_path,
    }
    with artifacts.stage_output(
        out, "train", run_fp, inputs=inputs, config=cfg.to_dict(), overwrite=overwrite
    ) as writer:
        if writer.up_to_date:
            return out
        summary = _train_into(cfg, packed, writer.tmp, ckpt_dir, run_fp)
        writer.counts.update({k: summary[k] for k in ("global_step", "tokens_seen", "train_tokens_per_second")})
    _log_summary(out, summary)
    return out


def _train_into(cfg: Config, packed: Path, dest: Path, ckpt_dir: Path, run_fp: str) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import AutoConfig, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    hw = hardware.detect()
    train_rows = datasets.load_from_disk(str(packed / "train"))
    if len(train_rows) == 0:
        raise UserError(f"{packed}/train: no packed rows; the prepared data produced no trainable examples")
    row_len = max(len(r) for r in train_rows["input_ids"][:1000])
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
    settings = _settings(cfg, hw, model_config, row_len)
    precision = settings["precision"].value
    torch.set_num_threads(settings["threads"].value)
    for name, d in settings.items():
        log.info("auto setting %s = %s (%s)", name, d.value, d.reason)

    tokenizer = AutoTokenizer.from_pretrained(str(packed / "tokenizer"))
    quant = cfg.quant if cfg.method == "qlora" else None
    load_dtype = precision if quant is None else ("fp32" if hw.device == "cpu" else precision)
    t_load = time.perf_counter()
    model = models.load_model(cfg.model, dtype=load_dtype, quant=quant, device=hw.device, resolved=resolved)
    log.info(
        "loaded %s in %.1f s (%s, %s)",
        resolved.source,
        time.perf_counter() - t_load,
        cfg.method,
        "4-bit NF4" if quant and quant.bits == 4 else load_dtype,
    )
    ac = bool(settings["activation_checkpointing"].value)
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ac)
    model.config.use_cache = False  # packed rows stay isolated only without the KV cache (STACK.md)
    if cfg.train.ipex:
        model = _apply_ipex(model, precision)

    resume_from = choose_resume(cfg, ckpt_dir, run_fp)
    counter = TokenCounter()
    collator = PackedRowsCollator(pad_token_id=tokenizer.pad_token_id, counter=counter)
    summary: dict[str, Any] = {"loss_curve": [], "method": cfg.method, "resumed_from_step": None}
    preemption = _Preemption(cfg.train.preempt_grace_s)
    on_cuda = hw.device == "cuda"
    args = SFTConfig(
        output_dir=str(ckpt_dir),
        max_steps=cfg.train.max_steps,
        num_train_epochs=cfg.train.epochs,
        per_device_train_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
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
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        data_collator=collator,
        processing_class=tokenizer,
        peft_config=_peft_config(cfg),
        callbacks=_make_callbacks(run_fp, preemption, counter, summary),
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
        f"; resuming from {resume_from.name}" if resume_from else "",
    )
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    with preemption:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if preemption.requested:
        raise Preempted(trainer.state.global_step, summary.get("preempted_checkpoint"))

    # Tokens seen over the whole run, across resumes: the checkpoint we resumed from recorded its count.
    tokens_before = 0
    if resume_from is not None and (resume_from / COMPLETE_MARKER).is_file():
        tokens_before = int(json.loads((resume_from / COMPLETE_MARKER).read_text()).get("tokens_seen", 0))
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
        summary["merged"] = str(_merge(cfg, resolved, dest, precision, hw.device))
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

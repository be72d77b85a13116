"""The train stage: packed_dataset -> adapter, with PEFT LoRA / QLoRA through TRL's SFTTrainer.

Read top to bottom: check the inputs (packed rows, base model, resume point) before anything is written; make the
plan (:mod:`kubetune.plan`: every automatic setting with its reason); load the model; ``SFTConfig`` from the config
and the plan; ``trainer.train()`` with the CPU kernels the plan turns on (:mod:`kubetune.cpu`); save. Checkpoints,
their sealing and the resume choice are :mod:`kubetune.checkpoints`; SIGTERM handling is :mod:`kubetune.preemption`;
the collator and callbacks handed to the Trainer are :mod:`kubetune.sft`. The adapter folder:

    adapter_model.safetensors  adapter_config.json  tokenizer files  base_model.json
    training_summary.json      config.yaml          merged/ (train.merge)   manifest.json

Resuming restores the adapter, optimizer, scheduler, RNG states and the position in the data, so a run that was
interrupted and resumed ends with the same adapter as one that was not (bit-identical on the same machine and
thread count). ``training_summary.json`` records ``resumed_from_step``, the whole loss curve, the tokens seen over
all the runs, the plan (``settings``) and what the CPU kernels installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import resource
import time
from pathlib import Path
from typing import Any

from kubetune import adapters, artifacts, checkpoints, cpu, distributed, hardware, models, plan, sft
from kubetune.config import Config, dump
from kubetune.distributed import World
from kubetune.errors import Preempted, UserError
from kubetune.preemption import Preemption

log = logging.getLogger(__name__)

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


def train(
    cfg: Config,
    packed: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    hw: hardware.Hardware | None = None,
    world: World | None = None,
) -> Path:
    """Fine-tune ``cfg.model`` on a packed_dataset; write the adapter folder ``out``. See the module docstring.

    ``hw``: the machine's facts the plan is made from (default: :func:`kubetune.hardware.detect`). ``world``: this
    process's rank under torchrun (default: one process); only global rank 0 writes. Raises
    :class:`~kubetune.errors.UserError` for bad input (before anything is written) and for a second writer of ``out``
    or of the checkpoint folder; :class:`~kubetune.errors.Preempted` after SIGTERM/SIGINT (to any rank) once the
    resume point is on disk.
    """
    packed, out, world = Path(packed), Path(out), world or World()
    packed_manifest = artifacts.read_manifest(packed, "pack")
    run_fp = run_fingerprint(cfg, packed_manifest)
    ckpt_dir = Path(cfg.train.checkpoint_dir).expanduser() if cfg.train.checkpoint_dir else out.parent / "checkpoints"
    inputs = {
        "packed": {"path": str(packed), "fingerprint": packed_manifest["fingerprint"]},
        "model": cfg.model.name_or_path,
    }
    hw = hw or hardware.detect()
    plan.check_world(cfg, hw, world)
    # The signal handler covers writing the output too: a SIGTERM that comes after the last step lets the adapter
    # folder be finished (within the grace) instead of killing the process half-way through it.
    with (
        Preemption(cfg.train.preempt_grace_s, stay=world.distributed) as preemption,
        distributed.session(world, plan.choose_backend(cfg, hw, world).value, cfg.distributed.timeout_s),
        contextlib.ExitStack() as held,
    ):
        output = functools.partial(
            artifacts.stage_output, out, "train", run_fp, inputs=inputs, config=cfg.to_dict(), overwrite=overwrite
        )
        writer = distributed.take_output(world, held, output)
        if writer.up_to_date:
            return out
        rows = _train_rows(packed)
        resolved, model_config = _base_model(cfg)
        checkpoints.check_resume(cfg.train.resume, ckpt_dir, run_fp)
        the_plan = plan.make(cfg, hw, model_config, _row_len(rows), world)
        run = _Run(the_plan, packed, rows, resolved, ckpt_dir, run_fp, hw)
        take_checkpoints = functools.partial(checkpoints.take, held, cfg.train.resume, ckpt_dir, run_fp)
        summary = _train_into(cfg, run, writer.tmp, preemption, take_checkpoints)
        writer.counts.update({k: summary[k] for k in ("global_step", "tokens_seen", "train_tokens_per_second")})
    if world.is_writer:
        _log_summary(out, summary)
    return out


@dataclasses.dataclass(frozen=True)
class _Run:
    """The checked inputs of one training run."""

    plan: plan.Plan
    packed: Path
    rows: Any  # the packed train split (datasets.Dataset)
    resolved: models.ResolvedModel
    ckpt_dir: Path
    fingerprint: str
    hw: hardware.Hardware


def _train_into(cfg: Config, run: _Run, dest: Path | None, preemption: Preemption, take_checkpoints) -> dict[str, Any]:
    import torch

    for line in str(run.plan).splitlines():
        log.info("auto setting %s", line)
    world = run.plan.world
    with cpu.kernels(run.plan) as kernels:
        _stop_if_preempted(world, preemption, None)
        with kernels.loading():
            model, tokenizer = _load(cfg, run.plan, run.packed, run.resolved)
        sharded = distributed.shard_base(model, world, run.plan.device) if run.plan.strategy.value == "fsdp" else None
        # The model fits the config (inputs checked): the writer takes the checkpoint folder and says where to resume.
        resume_from = distributed.on_writer(world, take_checkpoints)
        resumed_step, tokens_before = checkpoints.resume_point(resume_from)
        counter = sft.TokenCounter()
        summary: dict[str, Any] = {"loss_curve": [], "method": cfg.method, "resumed_from_step": resumed_step}
        if sharded is not None:
            summary["fsdp"] = sharded
        args = sft.sft_config(cfg, run.plan, run.ckpt_dir)
        torch.set_num_threads(run.plan.threads.value)  # after accelerate, which sets its own for CPU ranks
        trainer = sft.trainer_class()(
            model=model,
            args=args,
            train_dataset=run.rows,
            data_collator=sft.PackedRowsCollator(pad_token_id=tokenizer.pad_token_id, counter=counter),
            processing_class=tokenizer,
            peft_config=adapters.lora_config(cfg),
            callbacks=sft.callbacks(run.fingerprint, preemption, counter, summary, tokens_before, world),
        )
        trainer.token_counter = counter
        trainer.comm_meter = distributed.prepare(trainer.model, world)
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # sft's Progress callback logs one readable line per step instead
        summary.update(kernels.install(trainer.model, run.plan.micro_batch_size.value * _row_len(run.rows)))
        _log_start(trainer, run.ckpt_dir, resume_from, resumed_step)
        _stop_if_preempted(world, preemption, resume_from, resumed_step)
        _fit(trainer, resume_from, summary, run.plan.precision.value)
    if summary.get("preempted_checkpoint") and trainer.state.global_step < trainer.state.max_steps:
        raise Preempted(trainer.state.global_step, summary["preempted_checkpoint"])
    # (A signal after the last step: the work is done, so the output is finished within the grace.)
    summary.update(distributed.summary(world, run.plan, summary, trainer.comm_meter))
    summary["tokens_seen"] = tokens_before + summary.get("tokens_this_run", 0)
    if dest is None:  # not the writer: nothing to write
        return summary
    run = dataclasses.replace(run, plan=dataclasses.replace(run.plan, allocator=kernels.allocator))
    summary["resumed_from"] = str(resume_from) if resume_from else None
    return _write_adapter(cfg, run, trainer, tokenizer, dest, summary)


def _train_rows(packed: Path):
    import datasets

    rows = datasets.load_from_disk(str(packed / "train"))
    if len(rows) == 0:
        raise UserError(f"{packed}/train: no packed rows; the prepared data produced no trainable examples")
    return rows


def _row_len(rows) -> int:
    return max(len(r) for r in rows["input_ids"][:1000])


def _base_model(cfg: Config) -> tuple[models.ResolvedModel, Any]:
    """The base model, found, with a config that can be read and a width the LoRA rank fits."""
    from transformers import AutoConfig

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
    adapters.check_rank(cfg, model_config)
    return resolved, model_config


def _stop_if_preempted(world: World, preemption: Preemption, resume_from: Path | None, step: int | None = None):
    """Nothing was trained in this process yet: the resume point on disk is unchanged. Every rank stops, or none."""
    if distributed.any_rank(world, preemption.requested):
        raise Preempted(step or 0, str(resume_from) if resume_from else None)


def _load(cfg: Config, the_plan: plan.Plan, packed: Path, resolved: models.ResolvedModel):
    """The base model (4-bit for QLoRA) on the plan's device and precision, and the packed data's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(packed / "tokenizer"))
    quant = cfg.quant if cfg.method == "qlora" else None
    precision = the_plan.precision.value  # QLoRA's non-quantised parts too: prepare_kbit_model keeps bf16 in bf16
    t_load = time.perf_counter()
    # Under FSDP the base is read into host memory and each unit moved to the device as it is sharded, so a GPU
    # never holds the whole base.
    device = "cpu" if the_plan.strategy.value == "fsdp" else the_plan.device
    model = models.load_model(cfg.model, dtype=precision, quant=quant, device=device, resolved=resolved)
    log.info(
        "loaded %s in %.1f s (%s, %s)",
        resolved.source,
        time.perf_counter() - t_load,
        cfg.method,
        "4-bit NF4" if quant and quant.bits == 4 else precision,
    )
    if quant is not None:
        ac = bool(the_plan.activation_checkpointing.value)
        model = models.prepare_kbit_model(model, precision=precision, activation_checkpointing=ac)
    model.config.use_cache = False  # packed rows stay isolated only without the KV cache
    adapters.check_target_modules(cfg, model)
    return model, tokenizer


def _log_start(trainer, ckpt_dir: Path, resume_from: Path | None, resumed_step: int | None) -> None:
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


def _fit(trainer, resume_from: Path | None, summary: dict[str, Any], precision: str) -> None:
    """``trainer.train()``, or the finished run's adapter from its last checkpoint."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if resume_from is not None and checkpoints.finished(resume_from):
        state = checkpoints.load_finished(trainer, resume_from)
        sft.record_end(summary, state, 0.0, 0, state.global_step)
        return
    from peft.helpers import disable_input_dtype_casting

    # Under autocast (bf16/fp16) the LoRA linears cast their inputs themselves; PEFT's own cast to the adapter's
    # fp32 would add a copy of every LoRA input, and dropout over it, only for autocast to cast it back.
    with disable_input_dtype_casting(trainer.model, active=precision != "fp32"):
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)


def _write_adapter(cfg: Config, run: _Run, trainer, tokenizer, dest: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """The adapter folder's files (into ``dest``, the temporary folder renamed into place); returns the summary."""
    import torch

    trainer.model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    artifacts.write_json(dest / "base_model.json", models.base_reference(run.resolved, cfg.model))
    (dest / "config.yaml").write_text(dump(cfg), encoding="utf-8")
    on_cuda = run.plan.device == "cuda"
    summary.update(
        {
            "final_loss": summary["loss_curve"][-1][1] if summary["loss_curve"] else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if on_cuda else None,
            "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "total_parameters": sum(p.numel() for p in trainer.model.parameters()),
            "settings": run.plan.to_dict(),
            "hardware": run.hw.describe(),
            "checkpoint_dir": str(run.ckpt_dir),
        }
    )
    if cfg.train.merge:
        # Relative to the adapter folder: ``dest`` is the temporary folder that is renamed into place.
        summary["merged"] = _merge(cfg, run.resolved, dest, run.plan).relative_to(dest).as_posix()
    artifacts.write_json(dest / "training_summary.json", summary)
    return summary


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


def _merge(cfg: Config, resolved: models.ResolvedModel, adapter_dir: Path, the_plan: plan.Plan) -> Path:
    """Base (reloaded unquantised) + adapter merged into one model, saved under ``merged/``."""
    from peft import PeftModel

    precision, device = the_plan.precision.value, the_plan.device

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

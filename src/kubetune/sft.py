"""What the train stage hands SFTTrainer: the collator of packed rows, the token counter, the callbacks (progress,
checkpoint sealing, the preemption stop, agreed between the ranks under torchrun) and the trainer class that credits
each batch's tokens, times DDP's gradient all-reduce and restores per-rank RNG states only where they fit; and the
SFTConfig built from the config and the plan."""

from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune import checkpoints, distributed
from kubetune.distributed import World
from kubetune.preemption import Preemption

log = logging.getLogger(__name__)


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


def callbacks(
    run_fp: str,
    preemption: Preemption,
    counter: TokenCounter,
    summary: dict[str, Any],
    tokens_before: int,
    world: World | None = None,
):
    from transformers import TrainerCallback

    world = world or World()

    class Progress(TrainerCallback):
        """One log line per logging step (the writer's): step, loss, tokens/s, ETA. Seals checkpoints (the writer,
        once every rank has written its part); stops every rank at the same step when any rank is preempted."""

        def __init__(self):
            self.t0 = None
            self.tokens0 = 0
            self.step0 = 0
            self.stopping = False  # agreed by every rank: this step's checkpoint is the preemption's

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            self.tokens0 = counter.tokens
            self.step0 = state.global_step

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs or not world.is_writer:
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
            record_end(summary, state, time.perf_counter() - self.t0, counter.tokens - self.tokens0, self.step0)

        def on_step_end(self, args, state, control, **kw):
            # Every rank takes part in this all-reduce at every step, so all of them stop after the same step.
            if distributed.any_rank(world, preemption.requested):
                preemption.join()
                self.stopping = True
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args, state, control, **kw):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            # The sum is also the barrier: every rank has written its part of the checkpoint when it returns.
            tokens = tokens_before + distributed.total(world, counter.tokens)
            if world.is_writer and ckpt.is_dir():
                checkpoints.mark_complete(
                    ckpt, step=state.global_step, run_fp=run_fp, tokens_seen=tokens, world_size=world.world_size
                )
                if self.stopping:
                    checkpoints.write_preempted(
                        Path(args.output_dir), step=state.global_step, checkpoint=ckpt, world_size=world.world_size
                    )
            distributed.barrier(world)  # no rank goes on, or exits for the preemption, before the seal
            if self.stopping:
                summary["preempted_checkpoint"] = str(ckpt)
                preemption.settled.set()

    return [Progress()]


def record_end(summary: dict[str, Any], state, seconds: float, tokens: int, step0: int) -> None:
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


def trainer_class():
    """SFTTrainer that credits each batch's real tokens to the counter as it trains on it; under DDP, times the
    gradient all-reduce (``comm_meter``) and restores RNG states only from a checkpoint written by as many ranks."""
    from trl import SFTTrainer

    class _Trainer(SFTTrainer):
        token_counter: TokenCounter | None = None
        comm_meter: distributed.CommMeter | None = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.token_counter is not None:
                self.token_counter.consume()
            return super().training_step(model, inputs, num_items_in_batch)

        def _prepare_for_training(self, *args, **kwargs):
            model, dataloader = super()._prepare_for_training(*args, **kwargs)
            from torch.nn.parallel import DistributedDataParallel

            if self.comm_meter is not None and isinstance(model, DistributedDataParallel):
                self.comm_meter.install(model)
            return model, dataloader

        def _load_rng_state(self, checkpoint):
            # Each rank's RNG state (dropout masks) belongs to that rank of that world: a checkpoint written by
            # another number of ranks has none that fits, and the data order does not depend on it.
            written = checkpoints.written_by(Path(checkpoint)) if checkpoint else None
            if checkpoint and (written or 1) != self.args.world_size:
                log.info(
                    "%s was written by %d rank(s), this run has %d: RNG states not restored (the data order does "
                    "not depend on them; dropout masks do)",
                    Path(checkpoint).name,
                    written or 1,
                    self.args.world_size,
                )
                return
            super()._load_rng_state(checkpoint)

    return _Trainer


def sft_config(cfg, the_plan, ckpt_dir: Path):
    """TRL's SFTConfig: the optimisation from the config, the execution from the plan."""
    from trl import SFTConfig

    t, precision, micro = cfg.train, the_plan.precision.value, the_plan.micro_batch_size.value
    return SFTConfig(
        output_dir=str(ckpt_dir),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        # The data loader yields the global pass (micro rows x ranks) in the one-process order and each rank takes
        # its slice (accelerate's split_batches): N ranks train on the same rows per step as one process.
        per_device_train_batch_size=micro * the_plan.world.world_size,
        accelerator_config={"split_batches": True},
        gradient_accumulation_steps=the_plan.grad_accum_steps,
        ddp_backend=distributed.accelerate_backend(the_plan),
        ddp_timeout=int(cfg.distributed.timeout_s),
        ddp_find_unused_parameters=False,  # every LoRA parameter gets a gradient each pass
        ddp_broadcast_buffers=False,  # buffers (rotary tables) are computed alike on every rank
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=the_plan.device != "cuda",
        activation_checkpointing=bool(the_plan.activation_checkpointing.value),
        optim=the_plan.optim.value,
        torch_compile=t.compile,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        # Every rank keeps the verbosity the command line set; transformers would raise the other ranks' to WARNING.
        log_level_replica="passive",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        packing=False,
        max_length=None,
    )

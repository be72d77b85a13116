"""The train stage under torch.distributed: which rank this process is, and the few collectives kubetune adds.

``torchrun`` (and Kubeflow Trainer, which starts ``torchrun`` with ``PET_NNODES``, ``PET_NPROC_PER_NODE``,
``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``) gives every worker ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`World.from_env` reads them once, at
the command line's edge, into a frozen :class:`World` that is handed to the stage and the plan (the library reads no
environment of its own). Without those variables the world is one process and nothing here talks to anyone.

What the stage does with it, in order: :func:`session` starts the process group (the plan's backend, the config's
``distributed.timeout_s`` for every collective, so a dead peer fails the job instead of hanging it);
:func:`on_writer` runs what only the writer (global rank 0) may do (take the output folder, choose the resume point)
and hands its outcome, or its one-line error, to every rank; :func:`any_rank` turns one rank's SIGTERM into every
rank's; :func:`shard_base` shards the frozen base over the ranks (``distributed.strategy: fsdp``);
:class:`CommMeter` times the gradient all-reduce of DDP (only the trainable, adapter, parameters are reduced) and,
under fsdp, FSDP's all-gathers of the sharded base;
:func:`gather` collects per-rank figures for ``training_summary.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from kubetune.errors import PeerLost, UserError

log = logging.getLogger(__name__)

T = TypeVar("T")

CCL_MODULE = "oneccl_bindings_for_pytorch"


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: the defaults)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    node_rank: int = 0  # torchrun's GROUP_RANK: which node (agent) this is
    # Whether Intel's oneCCL binding for torch can be imported here (the ``ccl`` backend needs it).
    ccl_available: bool = False

    @property
    def is_writer(self) -> bool:
        """Global rank 0 writes the stage output, seals checkpoints and writes the summary; the others write none."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> World:
        """The world torchrun describes in ``environ`` (one process where it describes none). Raises UserError for
        values that contradict each other, naming the variable."""

        def number(name: str, default: int) -> int:
            raw = environ.get(name)
            if raw is None or raw == "":
                return default
            try:
                return int(raw)
            except ValueError:
                raise UserError(f"environment variable {name}={raw!r}: expected an integer (set by torchrun)") from None

        world_size = number("WORLD_SIZE", 1)
        rank = number("RANK", 0)
        local_rank = number("LOCAL_RANK", 0)
        local_world_size = number("LOCAL_WORLD_SIZE", local_rank + 1)
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"environment: RANK={rank} is not in [0, WORLD_SIZE={world_size}); start with torchrun")
        if not 1 <= local_world_size <= world_size or not 0 <= local_rank < local_world_size:
            raise UserError(
                f"environment: LOCAL_RANK={local_rank} / LOCAL_WORLD_SIZE={local_world_size} do not fit "
                f"WORLD_SIZE={world_size}; start with torchrun"
            )
        port = number("MASTER_PORT", 0) or None
        return cls(
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            local_world_size=local_world_size,
            master_addr=environ.get("MASTER_ADDR") or None,
            master_port=port,
            node_rank=number("GROUP_RANK", 0),
            ccl_available=world_size > 1 and importlib.util.find_spec(CCL_MODULE) is not None,
        )


@contextlib.contextmanager
def session(world: World, backend: str | None, timeout_s: float) -> Iterator[None]:
    """The process group for the block (nothing for one process). accelerate, which the Trainer runs on, finds it
    started and uses it, so the backend and the collective timeout are kubetune's, not its defaults."""
    if not world.distributed:
        yield
        return
    from datetime import timedelta

    import torch.distributed as dist

    if backend == "ccl":
        importlib.import_module(CCL_MODULE)  # registers the backend with torch
    started = not dist.is_initialized()
    if started:
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            import torch

            torch.cuda.set_device(world.local_rank)
            kwargs["device_id"] = torch.device("cuda", world.local_rank)
        dist.init_process_group(
            backend=backend,
            rank=world.rank,
            world_size=world.world_size,
            timeout=timedelta(seconds=timeout_s),
            **kwargs,
        )
        log.info(
            "rank %d of %d (local %d of %d): %s process group, collectives time out after %.0f s",
            world.rank,
            world.world_size,
            world.local_rank,
            world.local_world_size,
            backend,
            timeout_s,
        )
    try:
        yield
    except RuntimeError as err:
        if not _collective_failure(err):
            raise
        raise PeerLost(world.rank, world.world_size, _cause(err)) from err
    finally:
        if started and dist.is_initialized():
            with contextlib.suppress(Exception):  # a group whose peer died may refuse to be torn down cleanly
                dist.destroy_process_group()


def _cause(err: RuntimeError) -> str:
    """The backend's own words, first sentence, without the wrappers and the source location around them."""
    import re

    text = " ".join(str(err).split()).split("RuntimeError: ")[-1]
    text = re.sub(r"^\[[^\]]*\] ", "", text)
    return text.split(". ")[0][:160]


def _collective_failure(err: RuntimeError) -> bool:
    """Whether ``err`` comes from a collective whose peer is gone (torch's DistError, or gloo's and NCCL's own)."""
    import torch.distributed as dist

    text = str(err)
    return isinstance(err, dist.DistError) or any(
        s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out")
    )


def _broadcast(world: World, obj: Any) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_writer(world: World, fn: Callable[[], T]) -> T:
    """``fn()`` on the writer; its result (which must pickle), or its UserError, on every rank.

    The other ranks wait for the writer here, so a second run holding the output folder, or an output already up
    to date, stops every rank with the same answer instead of leaving them to train alone."""
    if not world.distributed:
        return fn()
    if world.is_writer:
        try:
            value = fn()
        except UserError as err:
            _broadcast(world, ("error", str(err)))
            raise
        except BaseException:
            _broadcast(world, ("error", "the writer (rank 0) failed before training; see its log"))
            raise
        _broadcast(world, ("ok", value))
        return value
    status, value = _broadcast(world, None)
    if status == "error":
        raise UserError(value)
    return value


def any_rank(world: World, flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (one all-reduce of one number: every rank must call it)."""
    if not world.distributed:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def total(world: World, value: int) -> int:
    """The sum of ``value`` over the ranks (every rank must call it)."""
    if not world.distributed:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def gather(world: World, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def ignore_frozen_parameters(model) -> int:
    """Keep DDP from broadcasting the frozen base weights at start (every rank loaded them from the same files):
    only the trainable (adapter) parameters are synchronised and all-reduced. Returns how many were left out."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return len(frozen)


def shard_base(model, world: World, device: str) -> dict[str, Any]:
    """``distributed.strategy: fsdp``: shard the frozen base ``model`` over the ranks with FSDP2 (torch's
    ``fully_shard``), before PEFT adds the adapter. One FSDP unit per decoder layer (the classes the model names in
    ``_no_split_modules``) and the root unit for the rest (embeddings, final norm, LM head): each rank keeps 1/N of
    every weight and gathers one unit's whole weights for its forward, and again for its backward.

    The adapter added afterwards stays outside FSDP: whole on every rank, its gradients all-reduced by DDP as under
    ``ddp``. So its optimizer state, the checkpoints and the adapter folder are exactly those of DDP (and of one
    process): any world size resumes them. Returns what was sharded, for ``training_summary.json``. Every rank must
    call it; one process (nothing to shard over) must not."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    names = sorted(set(getattr(model, "_no_split_modules", None) or []))
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(
            f"config key `distributed.strategy`: fsdp shards a model by its decoder layers, and "
            f"{type(model).__name__} names none (`_no_split_modules`: {names or 'empty'}); use ddp"
        )
    for p in model.parameters():  # the base is frozen (PEFT would do it later): FSDP reduces no gradient of it
        p.requires_grad_(False)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    mesh = init_device_mesh(device, (world.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh)  # the root: whatever no layer holds
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters())
    log.info(
        "FSDP: frozen base sharded over %d ranks in %d %s units + the root (embeddings, final norm, LM head): "
        "%.1f of %.1f MiB of weights held by this rank",
        world.world_size,
        len(layers),
        "/".join(names),
        local / 2**20,
        total / 2**20,
    )
    return {"units": len(layers) + 1, "layer_classes": names, "base_bytes": total, "base_bytes_this_rank": local}


@dataclass
class CommMeter:
    """Wall time and bytes of the run's collectives, summed over the run: DDP's gradient all-reduce (:meth:`install`
    on the DDP model) and, under fsdp, FSDP's all-gathers of the base's weights (:meth:`install_gathers`).

    Each collective's time runs from launching it to its completion: it overlaps the computation running meanwhile
    (the rest of backward; the current layer while the next is prefetched) and includes the wait for the slowest rank,
    so it is an upper bound on what communication costs a step. Completions are counted on the backend's thread."""

    seconds: float = 0.0  # DDP's all-reduce
    bytes: int = 0
    gather_seconds: float = 0.0  # FSDP's all-gathers
    gather_bytes: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def _done(self, t0: float, nbytes: int, *, gather: bool) -> None:
        """One collective launched at ``t0`` (``time.perf_counter``) completed, moving ``nbytes``."""
        seconds = time.perf_counter() - t0
        with self._lock:
            if gather:
                self.gather_seconds += seconds
                self.gather_bytes += nbytes
            else:
                self.seconds += seconds
                self.bytes += nbytes

    def install_gathers(self, model) -> None:
        """Time every all-gather of the FSDP units in ``model`` (FSDP2's public ``set_custom_all_gather``, with
        torch's default all-gather inside); nothing to do when nothing is sharded."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        if not units:
            return
        # The class set_custom_all_gather documents (AllGather), in torch's default form; not re-exported publicly.
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

        meter = self

        class TimedAllGather(DefaultAllGather):
            def __call__(self, output_tensor, input_tensor, group, async_op=False):
                t0 = time.perf_counter()
                nbytes = output_tensor.numel() * output_tensor.element_size()
                work = super().__call__(output_tensor, input_tensor, group, async_op)
                if work is None:  # synchronous: done on return
                    meter._done(t0, nbytes, gather=True)
                else:
                    work.get_future().add_done_callback(lambda _: meter._done(t0, nbytes, gather=True))
                return work

        for unit in units:
            unit.set_custom_all_gather(TimedAllGather())

    def install(self, ddp_model) -> None:
        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        meter = self

        def timed_allreduce(process_group, bucket):
            t0 = time.perf_counter()
            buffer = bucket.buffer()
            nbytes = buffer.numel() * buffer.element_size()
            fut = default_hooks.allreduce_hook(process_group, bucket)

            def done(f):
                meter._done(t0, nbytes, gather=False)
                return f.value()

            return fut.then(done)

        ddp_model.register_comm_hook(dist.group.WORLD, timed_allreduce)


def prepare(model, world: World) -> CommMeter | None:
    """Before the Trainer wraps ``model`` in DDP: leave the frozen base out of DDP's start-up broadcast and return
    the meter the Trainer installs on the DDP model (None for one process)."""
    if not world.distributed:
        return None
    left_out = ignore_frozen_parameters(model)
    log.info("DDP: %d frozen parameters left out of the broadcast and the all-reduce", left_out)
    meter = CommMeter()
    meter.install_gathers(model)
    return meter


def accelerate_backend(plan) -> str | None:
    """The backend name accelerate is told (it finds the process group :func:`session` started). accelerate 1.15
    knows only gloo and mpi for CPU ranks, so a ccl group is handed over unnamed."""
    backend = plan.backend.value
    return None if backend == "ccl" else backend


def summary(world: World, plan, local: dict[str, Any], meter: CommMeter | None) -> dict[str, Any]:
    """The run's figures over every rank (every rank must call it): the plan's backend and strategy, the tokens of
    all ranks, each rank's tokens/s, and per optimizer step (mean over the ranks) the time in collectives (DDP's
    all-reduce and, under fsdp, FSDP's all-gathers) and the bytes of each."""
    mine = {
        "tokens": int(local.get("tokens_this_run", 0)),
        "seconds": float(local.get("train_seconds") or 0.0),
        "comm_seconds": (meter.seconds + meter.gather_seconds) if meter else 0.0,
        "comm_bytes": meter.bytes if meter else 0,
        "gather_bytes": meter.gather_bytes if meter else 0,
    }
    every = gather(world, mine)
    steps = max(int(local.get("steps_this_run") or 0), 1)
    seconds = max(r["seconds"] for r in every)
    tokens = sum(r["tokens"] for r in every)
    return {
        "world_size": world.world_size,
        "backend": plan.backend.value,
        "strategy": plan.strategy.value,
        "tokens_this_run": tokens,
        "train_seconds": seconds,
        "train_tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "tokens_per_second_per_rank": [r["tokens"] / r["seconds"] if r["seconds"] > 0 else 0.0 for r in every],
        "collective_seconds_per_step": sum(r["comm_seconds"] for r in every) / len(every) / steps,
        "allreduce_bytes_per_step": sum(r["comm_bytes"] for r in every) // len(every) // steps,
        "allgather_bytes_per_step": sum(r["gather_bytes"] for r in every) // len(every) // steps,
    }


@dataclass
class OutputView:
    """What every rank knows of the stage's output folder; ``tmp`` (where it is written) only on the writer."""

    up_to_date: bool
    tmp: Any = None
    counts: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __getstate__(self):  # what the writer hands the other ranks: not its folder
        return {"up_to_date": self.up_to_date, "tmp": None, "counts": {}}


def take_output(world: World, held: contextlib.ExitStack, output: Callable[[], Any]) -> OutputView:
    """The writer enters ``output()`` (:func:`kubetune.artifacts.stage_output`: the folder's lock and temporary
    folder) for the rest of the stage (``held``); every rank learns whether it is up to date, or the refusal."""

    def take() -> OutputView:
        w = held.enter_context(output())
        return OutputView(w.up_to_date, None if w.up_to_date else w.tmp, w.counts)

    return on_writer(world, take)

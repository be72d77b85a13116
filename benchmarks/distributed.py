"""Scaling out: the all-reduce of LoRA adapter gradients, 2 ranks against 1 process, and the projection to C3 nodes.

    python -m benchmarks.distributed [--quick] [--parts allreduce,train,projection] [--repeats 2] [--out FILE]

Three parts, each its own records (``bench`` = ``allreduce``, ``dist-train``, ``projection``):

(a) **allreduce**: 2 processes on this machine (``torch.multiprocessing``, gloo over loopback, 1 intra-op thread
    each) all-reduce fp32 tensors. First a size sweep (4 KiB ... 64 MiB) from which the ring model
    ``t = 2 (N - 1) alpha + 2 (N - 1) / N x bytes / bw`` gives the latency ``alpha`` and the bandwidth ``bw`` the
    projection uses; then, per model (:data:`benchmarks.scaling.ARCHITECTURES`), one optimizer step's gradient
    traffic as DDP sends it: the LoRA r=16 adapter of kubetune's default targets (``lora.target_modules`` from
    ``kubetune.config.LoraConfig``, derived from the model's shapes, in fp32 as PEFT keeps the adapter) cut into
    DDP's buckets (first 1 MiB, then 25 MiB: torch's defaults), one all-reduce per bucket, back to back. Each
    figure is the median over ``--allreduce-repeats`` timed rounds after ``--allreduce-warmup`` untimed ones; a
    round's time is the slowest rank's. Reported: bytes per step, seconds per step, algorithm bandwidth
    (bytes / time) and bus bandwidth (algorithm bandwidth x 2 (N - 1) / N, as nccl-tests defines it).
(b) **train**: the same training work as ``torchrun --nproc-per-node 2 --no-python kubetune train ... --set
    train.threads=1`` and as one ``kubetune train ... --set train.threads=2`` process (same config, packed rows,
    global batch, steps and seed), tokens/s of each from its ``training_summary.json`` and their ratio, with the
    collective seconds and bytes per step the distributed run records. With ``--strategies ddp,fsdp`` (the
    default of a full run) two more 2-rank arms: ``distributed.strategy=fsdp`` (the frozen base sharded over the
    ranks), and DDP with the CPU layer rewrites off (``cpu.lean_layers`` and ``cpu.split_gemms``), which is what an
    fsdp run turns off, so that fsdp / ddp-without-rewrites is the cost of the sharding alone. It needs a kubetune
    whose train stage runs under torchrun: when the one-process run's summary has no ``world_size``, the part is
    skipped with one line.
(c) **projection**: :mod:`benchmarks.scaling` for 2, 4, 8 and 16 C3 nodes on SmolLM2-135M, Llama-3.2-1B and
    Llama-3.1-8B, from this VM's measured tokens/s (part b's one-process run, or ``--vm-tokens-per-second``), the
    fitted ``alpha`` (part a, or ``--alpha-us``) and the published C3 egress bandwidths (``--machines``).

Two ranks on this 2-core VM share its cores, caches and memory bandwidth, and loopback is not a network: part (a)
measures gloo's software cost, part (b) what splitting the same cores across ranks costs; neither is a C3 cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common, scaling
from benchmarks.common import BenchError, Recorder, progress

PARTS = ("allreduce", "train", "projection")
STRATEGIES = ("ddp", "fsdp")
REWRITES_OFF = ["--set", "cpu.lean_layers=off", "--set", "cpu.split_gemms=off"]
SWEEP_BYTES = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
QUICK_SWEEP_BYTES = [4 << 10, 256 << 10, 1 << 20]
# What the dist branch's training_summary.json carries (the contract part b reads)
SUMMARY_KEYS = (
    "world_size",
    "backend",
    "tokens_per_second_per_rank",
    "train_tokens_per_second",
    "collective_seconds_per_step",
    "allreduce_bytes_per_step",
)


# ==============================================================================================================
# (a) the all-reduce microbenchmark


def default_targets() -> tuple[int, str | list[str]]:
    """kubetune's default LoRA rank and target modules (``kubetune.config.LoraConfig``)."""
    from kubetune.config import LoraConfig

    cfg = LoraConfig()
    return cfg.r, cfg.target_modules


def model_arch(model: str | None) -> scaling.Arch:
    """SmolLM2-135M's architecture from the model folder kubetune resolves (the converted GGUF), checked against the
    table; without the model package, the table's entry."""
    table = scaling.ARCHITECTURES["SmolLM2-135M"]
    if not model or model == "table":
        return table
    from transformers import AutoConfig

    from kubetune import models
    from kubetune.config import ModelConfig

    path = models.resolve(ModelConfig(name_or_path=model)).path
    arch = scaling.arch_from_config(AutoConfig.from_pretrained(path), name=table.name, source=table.source)
    if arch != table:
        raise BenchError(f"{path}: its config differs from benchmarks.scaling.ARCHITECTURES['SmolLM2-135M']: {arch}")
    return arch


def step_buckets(arch: scaling.Arch, r: int, targets) -> list[int]:
    """The element counts of the fp32 buckets DDP all-reduces per step for this adapter."""
    sizes = [n * scaling.FP32_BYTES for n in scaling.adapter_tensor_numels(arch, r, targets)]
    return [b // scaling.FP32_BYTES for b in scaling.ddp_buckets(sizes)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, jobs: list[dict[str, Any]], out: str) -> None:
    """One rank: join the gloo group, time every job's rounds, rank 0 writes every rank's times."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        times: list[list[float]] = []
        for job in jobs:
            tensors = [torch.ones(n, dtype=torch.float32) for n in job["numels"]]
            per_round = []
            for i in range(job["warmup"] + job["repeats"]):
                dist.barrier()
                t0 = time.perf_counter()
                for t in tensors:
                    dist.all_reduce(t)
                elapsed = time.perf_counter() - t0
                if i >= job["warmup"]:
                    per_round.append(elapsed)
            # the sum over ranks of ones: every element must equal the world size
            if any(float(t[0]) != world ** (job["warmup"] + job["repeats"]) for t in tensors[:1]):
                raise RuntimeError(f"all_reduce gave {float(tensors[0][0])}, not a power of {world}")
            times.append(per_round)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, times)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def run_allreduce_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker: spawn ``spec['world']`` ranks, run the jobs, return per-job medians (the slowest rank per round)."""
    import torch.multiprocessing as mp

    out = Path(spec["workdir"]) / "allreduce-times.json"
    out.unlink(missing_ok=True)
    mp.spawn(_rank_main, args=(spec["world"], _free_port(), spec["jobs"], str(out)), nprocs=spec["world"], join=True)
    per_rank = json.loads(out.read_text())
    return {"jobs": [summarise_rounds([r[j] for r in per_rank]) for j in range(len(spec["jobs"]))]}


def summarise_rounds(per_rank: list[list[float]]) -> dict[str, float]:
    """A collective's time per round is its slowest rank's; median, min and max over rounds."""
    rounds = [max(ts) for ts in zip(*per_rank, strict=True)]
    return {
        "median_s": statistics.median(rounds),
        "min_s": min(rounds),
        "max_s": max(rounds),
        "rounds": len(rounds),
    }


def fit_alpha_bandwidth(points: list[tuple[int, float]], world: int) -> tuple[float, float]:
    """The ring model's latency ``alpha`` (seconds per message) and bandwidth ``bw`` (bytes/s) from (bytes, seconds)
    of single-tensor all-reduces: ``bw`` from the least-squares slope over the larger half of the sizes
    (``t = a + 2 (N - 1) / N x bytes / bw``), ``alpha`` from the smallest size, whose time is almost all latency
    (``t = 2 (N - 1) alpha`` + its small bandwidth term). A line through every size would let the noise of the
    large transfers decide the intercept."""
    points = sorted(points)
    if len(points) < 3 or world < 2:
        raise BenchError("the all-reduce fit needs at least three sizes on at least two ranks")
    big = points[len(points) // 2 :]
    xs, ys = [float(x) for x, _ in big], [y for _, y in big]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    bw = (2 * (world - 1) / world) / slope if slope > 0 else float("inf")
    size, t = points[0]
    alpha = max(t - 2 * (world - 1) / world * size / bw, 0.0) / (2 * (world - 1))
    return alpha, bw


def bandwidths(nbytes: int, seconds: float, world: int) -> dict[str, float]:
    """Algorithm bandwidth (bytes / time) and bus bandwidth (x 2 (N - 1) / N: what each link carries), GB/s."""
    alg = nbytes / seconds / 1e9
    return {"algbw_gb_s": float(f"{alg:.4g}"), "busbw_gb_s": float(f"{alg * 2 * (world - 1) / world:.4g}")}


def allreduce_part(args: argparse.Namespace, rec: Recorder, work: Path) -> list[dict[str, Any]]:
    r, targets = default_targets()
    archs = [model_arch(args.model), scaling.ARCHITECTURES["Llama-3.2-1B"], scaling.ARCHITECTURES["Llama-3.1-8B"]]
    sweep = QUICK_SWEEP_BYTES if args.quick else SWEEP_BYTES
    jobs: list[dict[str, Any]] = []
    meta: list[dict[str, Any]] = []
    for nbytes in sweep:
        jobs.append({"numels": [nbytes // 4], "warmup": args.allreduce_warmup, "repeats": args.allreduce_repeats})
        meta.append({"name": f"one tensor, {nbytes // 1024:,} KiB", "kind": "sweep", "bytes": nbytes, "buckets": 1})
    for arch in archs[: 1 if args.quick else None]:
        numels = step_buckets(arch, r, targets)
        repeats = max(3, args.allreduce_repeats // (4 if sum(numels) * 4 > 64 << 20 else 1))
        jobs.append({"numels": numels, "warmup": args.allreduce_warmup, "repeats": repeats})
        meta.append(
            {
                "name": f"{arch.name} LoRA r={r} ({targets if isinstance(targets, str) else ','.join(targets)})",
                "kind": "adapter",
                "model": arch.name,
                "bytes": sum(numels) * 4,
                "adapter_params": scaling.adapter_params(arch, r, targets),
                "buckets": len(numels),
                "bucket_mib": [round(n * 4 / scaling.MIB, 2) for n in numels],
            }
        )
    records: list[dict[str, Any]] = []
    for attempt in range(args.repeats):
        quiet = common.wait_for_quiet(args.quiet_wait) if args.quiet_wait else {}
        progress(f"allreduce: round {attempt + 1}: {len(jobs)} jobs on {args.world} ranks (busy before: {quiet})")
        res = common.run_worker(
            "distributed",
            {"part": "allreduce", "world": args.world, "jobs": jobs, "workdir": str(work)},
            workdir=work,
            name=f"allreduce-{attempt + 1}",
            timeout_s=args.timeout,
            verbose=args.verbose,
        )
        got = res.result["jobs"]
        points = [(m["bytes"], g["median_s"]) for m, g in zip(meta, got, strict=True) if m["kind"] == "sweep"]
        alpha, bw = fit_alpha_bandwidth(points, args.world)
        for m, g in zip(meta, got, strict=True):
            row = {
                "bench": "allreduce",
                **m,
                "run": attempt + 1,
                "world_size": args.world,
                "backend": "gloo",
                "threads_per_rank": 1,
                "seconds": float(f"{g['median_s']:.4g}"),
                "ms": round(g["median_s"] * 1e3, 3),
                "min_ms": round(g["min_s"] * 1e3, 3),
                "max_ms": round(g["max_s"] * 1e3, 3),
                "rounds": g["rounds"],
                **bandwidths(m["bytes"], g["median_s"], args.world),
                **quiet,
            }
            records.append(rec.emit(row))
        records.append(
            rec.emit(
                {
                    "bench": "allreduce-fit",
                    "name": f"ring fit, run {attempt + 1}",
                    "run": attempt + 1,
                    "world_size": args.world,
                    "alpha_us": round(alpha * 1e6, 2),
                    "bandwidth_gb_s": round(bw / 1e9, 3),
                    "sizes": [m["bytes"] for m in meta if m["kind"] == "sweep"],
                    "model": "t = 2(N-1) alpha + 2(N-1)/N x bytes / bw (bw: the larger sizes; alpha: the smallest)",
                }
            )
        )
    return records


# ==============================================================================================================
# (b) 2 ranks x 1 thread against 1 process x 2 threads


def kubetune_command() -> str:
    """The ``kubetune`` executable beside this interpreter (the one torchrun's ``--no-python`` starts)."""
    exe = Path(sys.executable).with_name("kubetune")
    found = str(exe) if exe.is_file() else shutil.which("kubetune")
    if not found:
        raise BenchError("no `kubetune` command beside this Python or on PATH (install kubetune into this venv)")
    return found


def train_commands(
    config: Path, packed: Path, out: Path, *, ranks: int, threads: int, kubetune: str, extra: list[str] | None = None
) -> list[str]:
    """The command line of one arm: plain ``kubetune train`` for one rank, torchrun's ``--no-python`` launch of the
    same command for several (``--standalone``: a local rendezvous on a free port)."""
    train = ["train", "--config", str(config), "--packed", str(packed), "--out", str(out)]
    train += ["--set", f"train.threads={threads}", *(extra or [])]
    if ranks == 1:
        return [kubetune, *train]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return [*torchrun, "--no-python", kubetune, *train]


def unsupported_message(summary: dict[str, Any], kubetune: str) -> str | None:
    """One line when this kubetune's train stage does not run under torchrun (its summary has no ``world_size``,
    which every distributed-capable version writes, 1 for one process); None when it does."""
    if "world_size" in summary:
        return None
    return (
        "dist-train: skipped: this kubetune's training_summary.json has no world_size, so its train stage does not "
        f"run under torchrun ({kubetune}); install a kubetune that does"
    )


def arm_record(name: str, ranks: int, threads: int, summary: dict[str, Any], wall: float) -> dict[str, Any]:
    """One arm's figures, from its training_summary.json (keys missing from an older summary stay None)."""
    steps = summary.get("steps_this_run") or summary.get("global_step")
    per_rank = summary.get("tokens_per_second_per_rank")
    fsdp = summary.get("fsdp") or {}
    return {
        "bench": "dist-train",
        "name": name,
        "ranks": ranks,
        "threads_per_rank": threads,
        "world_size": summary.get("world_size"),
        "backend": summary.get("backend"),
        "strategy": summary.get("strategy"),
        "base_mib_rank_0": _round(fsdp["base_bytes_this_rank"] / scaling.MIB, 1) if fsdp else None,
        "steps": steps,
        "tokens": summary.get("tokens_this_run"),
        "train_seconds": _round(summary.get("train_seconds"), 2),
        "tokens_per_second": _round(summary.get("train_tokens_per_second"), 1),
        "tokens_per_second_per_rank": [_round(x, 1) for x in per_rank] if isinstance(per_rank, list) else per_rank,
        "collective_seconds_per_step": _round(summary.get("collective_seconds_per_step"), 4),
        "allreduce_bytes_per_step": summary.get("allreduce_bytes_per_step"),
        "allreduce_mib_per_step": _round((summary.get("allreduce_bytes_per_step") or 0) / scaling.MIB, 2) or None,
        "allgather_mib_per_step": _round((summary.get("allgather_bytes_per_step") or 0) / scaling.MIB, 2) or None,
        "final_loss": _round(summary.get("final_loss"), 4),
        "loss_curve": summary.get("loss_curve"),
        "trainable_parameters": summary.get("trainable_parameters"),
        "wall_seconds": round(wall, 1),
    }  # fmt: skip


def pair_record(
    one: dict[str, Any],
    two: dict[str, Any],
    index: int | None,
    name: str = "2 ranks x 1 thread / 1 process x 2 threads",
) -> dict[str, Any]:
    """Arm ``two`` against arm ``one`` (by default 2 ranks against 1 process): tokens/s ratio, loss curves side by
    side, and the share of ``two``'s step spent in collectives (DDP's all-reduce, and under fsdp the all-gathers)."""
    ratio = two["tokens_per_second"] / one["tokens_per_second"] if one.get("tokens_per_second") else None
    curve_a = dict(one.get("loss_curve") or [])
    curve_b = dict(two.get("loss_curve") or [])
    common_steps = sorted(set(curve_a) & set(curve_b))
    diff = max((abs(curve_a[s] - curve_b[s]) for s in common_steps), default=None)
    step_s = two["train_seconds"] / two["steps"] if two.get("train_seconds") and two.get("steps") else None
    coll = two.get("collective_seconds_per_step")
    return {
        "bench": "dist-train-ratio",
        "name": name + (f" #{index}" if index else ""),
        "tokens_per_second_ratio": round(ratio, 3) if ratio else None,
        "max_loss_difference": round(diff, 5) if diff is not None else None,
        "loss_steps_compared": len(common_steps),
        "collective_share_of_step": round(coll / step_s, 4) if coll is not None and step_s else None,
        "adapter_trainable_parameters": one.get("trainable_parameters"),
    }


def _round(x: Any, digits: int) -> Any:
    return round(x, digits) if isinstance(x, int | float) else x


def write_train_config(path: Path, *, model: str, data: str, max_length: int, batch: int, steps: int, seed: int,
                       work: Path) -> Path:  # fmt: skip
    """The YAML both arms train from (kubetune's defaults otherwise: LoRA r=16 on all linear layers)."""
    import yaml

    raw = {
        "model": {"name_or_path": model},
        "data": {"path": data},
        "pack": {"max_length": max_length},
        "train": {
            "max_steps": steps,
            "batch_size": batch,
            "seed": seed,
            "lr_scheduler": "linear",
            "warmup_ratio": 0.0,
            "save_steps": max(steps, 1),
            "resume": "never",
        },
        "tracking": {"enabled": False},
        "output_dir": str(work / "runs"),
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _run_arm(cmd: list[str], log: Path, timeout_s: float, env: dict[str, str]) -> tuple[int, float]:
    """Run one arm in its own session (stopped as a group on timeout or interrupt); (exit code, wall seconds)."""
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=common.ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            status, _ = common._wait(proc, timeout_s)
        except BaseException:
            common._kill_group(proc.pid, grace_s=5)
            raise
    if status is None:
        raise BenchError(f"{cmd[0]}: timed out after {timeout_s:.0f} s (log: {log}){common._tail(log)}")
    return os.waitstatus_to_exitcode(status), time.perf_counter() - t0


def train_part(args: argparse.Namespace, rec: Recorder, work: Path) -> list[dict[str, Any]]:
    from benchmarks.train_throughput import _prepare_data
    from kubetune import models
    from kubetune.config import ModelConfig

    if not Path(args.data).is_file():
        raise BenchError(f"{args.data}: data file not found (the LIMA rows live in ../shared/data/lima)")
    model_dir = models.resolve(ModelConfig(name_or_path=args.train_model)).path
    progress(f"dist-train: model {model_dir}; preparing and packing {args.data}")
    prep_args = argparse.Namespace(data=args.data, rows=args.rows, max_length=args.max_length, eval_rows=8)
    _, packed = _prepare_data(prep_args, work, model_dir)
    config = write_train_config(
        work / "train.yaml", model=model_dir, data=str(args.data), max_length=args.max_length,
        batch=args.batch, steps=args.steps, seed=42, work=work,
    )  # fmt: skip
    kubetune = kubetune_command()
    env = {**os.environ, "PYTHONPATH": common._pythonpath(), "OMP_NUM_THREADS": "1"}
    arms = train_arms(args.strategies)
    records: list[dict[str, Any]] = []
    for i in range(args.repeats):
        got: dict[str, dict[str, Any]] = {}
        for arm in arms if i % 2 == 0 else arms[::-1]:
            key, name, ranks, threads, sets = arm
            label = name if args.repeats == 1 else f"{name} #{i + 1}"
            out = work / f"adapter-{key}-{i + 1}"
            shutil.rmtree(out, ignore_errors=True)
            ckpt = work / f"checkpoints-{key}-{i + 1}"
            shutil.rmtree(ckpt, ignore_errors=True)
            extra = ["--set", f"train.checkpoint_dir={ckpt}", *sets]
            cmd = train_commands(config, packed, out, ranks=ranks, threads=threads, kubetune=kubetune, extra=extra)
            quiet = common.wait_for_quiet(args.quiet_wait) if args.quiet_wait else {}
            progress(f"dist-train: {label}: {' '.join(cmd[-12:])} (CPUs busy before: {quiet.get('busy_before')})")
            log = work / f"train-{key}-{i + 1}.log"
            code, wall = _run_arm(cmd, log, args.timeout, env)
            if code != 0 or not (out / "training_summary.json").is_file():
                raise BenchError(f"{label}: exited with {code} (log: {log}){common._tail(log)}")
            summary = json.loads((out / "training_summary.json").read_text())
            msg = unsupported_message(summary, kubetune)
            if msg:
                progress(msg)
                return [rec.emit({"bench": "dist-train", "name": "skipped", "error": msg})]
            row = arm_record(label, ranks, threads, summary, wall)
            row.update(quiet)
            got[key] = rec.emit(row)
            progress(f"dist-train: {label}: {row['tokens_per_second']} tokens/s, {row['train_seconds']} s")
            records.append(got[key])
        index = i + 1 if args.repeats > 1 else None
        for one, two, name in TRAIN_PAIRS:
            if one in got and two in got:
                records.append(rec.emit(pair_record(got[one], got[two], index, name)))
    return records


# (key, name, ranks, threads per rank, extra --set arguments) of part b's arms, for the strategies asked for.
ONE_PROCESS = ("one", "1 process x 2 threads", 1, 2, [])
DDP = ("ddp", "2 ranks x 1 thread (torchrun)", 2, 1, [])
DDP_PLAIN = ("ddp-plain", "2 ranks x 1 thread, ddp, CPU rewrites off", 2, 1, REWRITES_OFF)
FSDP = ("fsdp", "2 ranks x 1 thread, fsdp", 2, 1, ["--set", "distributed.strategy=fsdp"])
# (arm, the arm set against it, the ratio's name)
TRAIN_PAIRS = (
    ("one", "ddp", "2 ranks x 1 thread / 1 process x 2 threads"),
    ("ddp-plain", "fsdp", "fsdp / ddp, both with the CPU rewrites off"),
    ("ddp", "fsdp", "fsdp / ddp as each runs by default"),
)


def train_arms(strategies: list[str]) -> list[tuple[str, str, int, int, list[str]]]:
    """Part b's arms: one process and DDP always; with fsdp, fsdp and the DDP arm it is compared against."""
    return [ONE_PROCESS, DDP, *((DDP_PLAIN, FSDP) if "fsdp" in strategies else ())]


# ==============================================================================================================
# (c) the projection


def projection_part(args: argparse.Namespace, rec: Recorder, measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    r, targets = default_targets()
    fits = [m for m in measured if m.get("bench") == "allreduce-fit"]
    ones = [
        m for m in measured if m.get("bench") == "dist-train" and m.get("ranks") == 1 and m.get("tokens_per_second")
    ]
    if args.alpha_us is not None:
        alpha, alpha_src = args.alpha_us * 1e-6, "--alpha-us"
    elif fits:
        alpha = statistics.median(f["alpha_us"] for f in fits) * 1e-6
        alpha_src = f"median of {len(fits)} all-reduce fit(s) on this machine (gloo, loopback)"
    else:
        alpha, alpha_src = 50e-6, "no measurement in this invocation: 50 us assumed"
    if args.vm_tokens_per_second is not None:
        vm_tps, tps_src = args.vm_tokens_per_second, "--vm-tokens-per-second"
    elif ones:
        vm_tps = statistics.median(o["tokens_per_second"] for o in ones)
        tps_src = f"median of {len(ones)} one-process run(s) of part b"
    else:
        vm_tps, tps_src = 700.0, "no measurement in this invocation: 700 tokens/s (docs/performance.md, kubetune)"
    if ones and all(o.get("tokens") and o.get("steps") for o in ones):
        row_tokens = statistics.median(o["tokens"] / (o["steps"] * args.batch) for o in ones)
        row_src = "real tokens per packed row in part b's runs"
    else:
        row_tokens, row_src = float(args.max_length), "--max-length (packed rows taken as full)"
    records = [
        rec.emit(
            {
                "bench": "projection-inputs",
                "name": "inputs",
                "lora_r": r,
                "target_modules": targets,
                "alpha_us": round(alpha * 1e6, 2),
                "alpha_source": alpha_src,
                "vm_tokens_per_second": vm_tps,
                "vm_tokens_per_second_source": tps_src,
                "vm_cores": common.threads_of(0),
                "tokens_per_row": round(row_tokens, 1),
                "tokens_per_row_source": row_src,
                "rows_per_rank_weak": args.batch,
                "global_batches": args.global_batches,
                "node_speedup_rule": "C3 physical cores (vCPUs / 2) / this VM's cores x --per-core-factor",
                "per_core_factor": args.per_core_factor,
            }
        )
    ]
    vm_cores = common.threads_of(0)
    for mname in args.machines.split(","):
        machine = scaling.C3_MACHINES[mname]
        speedup = machine.physical_cores / vm_cores * args.per_core_factor
        for tier, gbps in (("default", machine.default_gbps), ("Tier_1", machine.tier1_gbps)):
            if gbps is None:
                continue
            for g in args.global_batches:
                rows = scaling.projection_table(
                    scaling.ARCHITECTURES.values(),
                    args.nodes,
                    r=r,
                    target_modules=targets if isinstance(targets, str) else tuple(targets),
                    vm_tokens_per_second=vm_tps,
                    node_speedup=speedup,
                    tokens_per_row=row_tokens,
                    rows_per_rank_weak=args.batch,
                    global_batch=g,
                    bandwidth_gbps=gbps,
                    alpha_s=alpha,
                )
                for row in rows:
                    row.update(bench="projection", machine=mname, network=tier, name=f"{row['model']} x {row['nodes']}")
                    records.append(rec.emit(row))
    return records


# ==============================================================================================================
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n\n")[0])
    common.common_args(p)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of: {', '.join(PARTS)}")
    p.add_argument("--repeats", type=int, default=2, help="runs of parts a and b (a shared machine: report the spread)")
    p.add_argument("--world", type=int, default=2, help="ranks of the all-reduce microbenchmark")
    p.add_argument("--allreduce-warmup", type=int, default=5)
    p.add_argument("--allreduce-repeats", type=int, default=30)
    p.add_argument(
        "--model",
        default=common.SMOLLM2,
        help="the 135M model whose config part a derives from ('table': benchmarks.scaling's entry)",
    )
    p.add_argument("--train-model", default=common.SMOLLM2, help="the model part b trains")
    p.add_argument("--data", type=Path, default=common.LIMA)
    p.add_argument("--rows", type=int, default=None, help="read at most this many rows")
    p.add_argument("--max-length", type=int, default=512, help="packed row length (also the projection's)")
    p.add_argument("--batch", type=int, default=4, help="global batch of part b; rows per rank of weak scaling")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per arm of part b")
    p.add_argument(
        "--strategies",
        default=None,
        help=f"comma list of {', '.join(STRATEGIES)}: the 2-rank arms of part b (default: both; with --quick: ddp)",
    )
    p.add_argument("--nodes", default="1,2,4,8,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--global-batches", default="4,64", type=lambda s: [int(x) for x in s.split(",")],
                   help="global batches (rows per step) of the strong-scaling projection")  # fmt: skip
    p.add_argument("--machines", default="c3-standard-22,c3-standard-176", help=f"of: {', '.join(scaling.C3_MACHINES)}")
    p.add_argument(
        "--per-core-factor",
        type=float,
        default=1.0,
        help="a C3 physical core's tokens/s over one of this VM's cores (1: the same Sapphire Rapids core)",
    )
    p.add_argument("--alpha-us", type=float, default=None, help="all-reduce latency per message (default: measured)")
    p.add_argument("--vm-tokens-per-second", type=float, default=None, help="this VM's tokens/s (default: part b)")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    bad = [m for m in args.machines.split(",") if m not in scaling.C3_MACHINES]
    if bad:
        p.error(f"--machines: unknown {bad}; choose from {list(scaling.C3_MACHINES)}")
    args.parts = parts
    strategies = [x.strip() for x in (args.strategies or "").split(",") if x.strip()]
    if [x for x in strategies if x not in STRATEGIES] or (args.strategies is not None and "ddp" not in strategies):
        p.error(f"--strategies: {args.strategies!r}; a comma list of {list(STRATEGIES)} that includes ddp")
    args.strategies = strategies or (["ddp"] if args.quick else list(STRATEGIES))
    if args.quick:
        args.repeats = min(args.repeats, 1)
        args.allreduce_warmup, args.allreduce_repeats = 1, 3
        args.rows = args.rows or 64
        args.max_length = min(args.max_length, 256)
        args.steps = min(args.steps, 2)
        args.quiet_wait = min(args.quiet_wait, 15.0)
    return args


def run(args: argparse.Namespace, rec: Recorder) -> list[dict[str, Any]]:
    work = common.make_workdir(args.workdir, "dist")
    records: list[dict[str, Any]] = []
    try:
        if "allreduce" in args.parts:
            records += allreduce_part(args, rec, work)
        if "train" in args.parts:
            records += train_part(args, rec, work)
        if "projection" in args.parts:
            records += projection_part(args, rec, records)
    finally:
        progress(f"distributed: scratch folder {work}" + ("" if args.keep else " (removed)"))
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return records


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("part") != "allreduce":
        raise ValueError(f"unknown worker part {spec.get('part')!r}")
    return run_allreduce_worker(spec)


ALLREDUCE_COLUMNS = [
    ("run", "run"),
    ("what", "name"),
    ("buckets", "buckets"),
    ("bytes", "bytes"),
    ("median ms", "ms"),
    ("min ms", "min_ms"),
    ("max ms", "max_ms"),
    ("algbw GB/s", "algbw_gb_s"),
    ("busbw GB/s", "busbw_gb_s"),
    ("rounds", "rounds"),
    ("load avg", "load_avg"),
]
FIT_COLUMNS = [("fit", "name"), ("alpha us", "alpha_us"), ("bandwidth GB/s", "bandwidth_gb_s")]
TRAIN_COLUMNS = [
    ("arm", "name"),
    ("world size", "world_size"),
    ("backend", "backend"),
    ("strategy", "strategy"),
    ("base MiB on rank 0", "base_mib_rank_0"),
    ("steps", "steps"),
    ("tokens/s", "tokens_per_second"),
    ("per rank", "tokens_per_second_per_rank"),
    ("train s", "train_seconds"),
    ("collective s/step", "collective_seconds_per_step"),
    ("all-reduce MiB/step", "allreduce_mib_per_step"),
    ("all-gather MiB/step", "allgather_mib_per_step"),
    ("final loss", "final_loss"),
    ("load avg", "load_avg"),
    ("note", "error"),
]
RATIO_COLUMNS = [
    ("comparison", "name"),
    ("tokens/s ratio", "tokens_per_second_ratio"),
    ("collective share", "collective_share_of_step"),
    ("max loss diff", "max_loss_difference"),
]
PROJECTION_COLUMNS = [
    ("machine", "machine"),
    ("network", "network"),
    ("Gbps", "bandwidth_gbps"),
    ("model", "model"),
    ("nodes", "nodes"),
    ("adapter MiB", "adapter_mib"),
    ("buckets", "buckets"),
    ("node tokens/s", "node_tokens_per_second"),
    ("all-reduce ms", "allreduce_ms"),
    ("weak eff (no overlap)", "weak_eff_none"),
    ("global batch", "global_batch"),
    ("rows/rank", "rows_per_rank"),
    ("strong speed-up (none / full overlap)", "strong_speedups"),
    ("strong eff (no overlap)", "strong_eff_none"),
    ("limited by", "limited_by"),
]


def tables(records: list[dict[str, Any]]) -> str:
    rows = []
    for r in records:
        if r.get("bench") == "projection":
            none, full = r.get("strong_speedup_none"), r.get("strong_speedup_full")
            r = {**r, "strong_speedups": f"{none} / {full}" if none is not None else "-"}
        rows.append(r)
    return common.tables(
        rows,
        [
            ("All-reduce, gloo, 2 ranks on this machine (loopback)", ALLREDUCE_COLUMNS, "allreduce"),
            ("Ring fit of the one-tensor sizes", FIT_COLUMNS, "allreduce-fit"),
            ("Training: 2 ranks x 1 thread against 1 process x 2 threads", TRAIN_COLUMNS, "dist-train"),
            ("Ratios of the training arms", RATIO_COLUMNS, "dist-train-ratio"),
            ("Projected scaling on C3 nodes (LoRA r=16, one rank per node)", PROJECTION_COLUMNS, "projection"),
        ],
    )


def main(argv=None) -> int:
    return common.bench_main(
        argv, section="distributed", parse_args=parse_args, run=run, tables=tables, run_worker=run_worker
    )


if __name__ == "__main__":
    raise SystemExit(main())

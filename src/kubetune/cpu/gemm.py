"""Frozen linear layers whose GEMMs run faster as a few narrower GEMMs: chosen per machine and shape, by timing.

A CPU's GEMM library picks its blocking and thread split from the shape, and not every shape gets a good one. On a
2-core Sapphire Rapids VM (oneDNN's AMX matmul, bf16, 2 threads), a 1024-token pass through SmolLM2-135M's
``down_proj`` (``[1024, 1536] @ [1536, 576]``) ran at 1.2 TFLOP/s while ``gate_proj`` (``[1024, 576] @ [576, 1536]``)
ran at 2.5; the same 576 output columns computed as two GEMMs of 288 columns each, written into one output, took
0.84 ms instead of 1.44 (docs/performance.md, fourth round). Which shapes gain, and from how many blocks, depends on
the library, the CPU and the thread count, so nothing is assumed: :func:`install` times each distinct shape of the
model's frozen linear layers (forward ``x @ W.T`` and the input gradient ``dy @ W``) on this machine, at the
pass's token count, as one GEMM and as 2-4 column blocks, and keeps a split only where it is clearly faster
(:data:`MIN_GAIN`). A layer with no such shape is left as it is.

Only frozen ``nn.Linear`` layers (a LoRA model's base layers) are routed: their weight needs no gradient, so
:class:`SplitLinearFunction` computes the output and the input gradient and nothing else, keeping only a reference
to the weight for backward, as ``F.linear`` keeps. The result is the same product (each output element is the same
dot product; only which GEMM call computes it changes). The train stage installs it on CPU (``cpu.split_gemms``).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

BLOCKS = (1, 2, 3, 4)  # output column blocks tried for each GEMM
MIN_GAIN = 1.15  # a split is kept only when it times at least this much faster than one GEMM (noise margin)
MIN_BLOCK_COLUMNS = 64  # narrower blocks are not tried: tile units work in 16-32 column steps
_WARMUP, _REPEATS = 3, 9  # timed calls per candidate (the median counts)
_SLOW_CALL_S, _SLOW_REPEATS = 0.02, 3  # a GEMM slower than this (a 7B layer) is timed fewer times: its noise is smaller
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class Plan:
    """Column blocks for the layer's forward product (``x @ W.T``, split along ``W``'s rows) and for its input
    gradient (``dy @ W``, split along ``W``'s columns); 1 = one GEMM."""

    forward: int = 1
    backward: int = 1

    @property
    def splits(self) -> bool:
        return self.forward > 1 or self.backward > 1


def matmul_blocks(a: torch.Tensor, b: torch.Tensor, blocks: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (2-D) computed as ``blocks`` GEMMs over equal column blocks of ``b``, each written into its columns
    of one output."""
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    if blocks == 1:
        return torch.mm(a, b, out=out)
    width = b.shape[1] // blocks
    for i in range(blocks):
        cols = slice(i * width, b.shape[1] if i == blocks - 1 else (i + 1) * width)
        torch.mm(a, b[:, cols], out=out[:, cols])
    return out


def _median_seconds(fn, blocks: int) -> float:
    """Median seconds of ``fn()`` (the ``blocks`` it runs are for timers that stand in for this one in tests)."""
    fn()  # the first call also builds the library's kernel for the shape
    t0 = time.perf_counter()
    fn()
    slow = time.perf_counter() - t0 > _SLOW_CALL_S
    for _ in range(0 if slow else _WARMUP - 2):
        fn()
    times = []
    for _ in range(_SLOW_REPEATS if slow else _REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _candidates(columns: int) -> list[int]:
    return [n for n in BLOCKS if n == 1 or (columns % n == 0 and columns // n >= MIN_BLOCK_COLUMNS)]


@torch.no_grad()
def best_blocks(rows: int, b: torch.Tensor, timer=_median_seconds) -> tuple[int, dict[int, float]]:
    """The column blocks that compute ``a @ b`` fastest for an ``a`` of ``rows`` rows (random, in ``b``'s dtype),
    with ``b`` in its real layout (a transposed weight stays a transposed view, as in training), and the timings.
    One GEMM unless a split is at least :data:`MIN_GAIN` times faster."""
    a = torch.randn(rows, b.shape[0], dtype=torch.float32).to(b.dtype)
    out = torch.empty(rows, b.shape[1], dtype=b.dtype)
    seconds = {n: timer(lambda n=n: matmul_blocks(a, b, n, out), n) for n in _candidates(b.shape[1])}
    best = min(seconds, key=seconds.get)
    return (best if seconds[1] >= MIN_GAIN * seconds[best] else 1), seconds


class SplitLinearFunction(torch.autograd.Function):
    """``x @ W.T + bias`` for a frozen ``W`` (and a frozen or absent bias), in ``W``'s dtype, each product computed in
    the column blocks of ``plan``. Gradients flow to ``x`` only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: Plan):
        with torch.autocast(x.device.type, enabled=False):  # explicit dtypes; an out= op under autocast misbehaves
            x2 = x.reshape(-1, x.shape[-1]).to(weight.dtype)
            y = matmul_blocks(x2, weight.t(), plan.forward)
            if bias is not None:
                y.add_(bias.to(weight.dtype))
        ctx.weight, ctx.plan, ctx.x_dtype = weight, plan, x.dtype  # a parameter: nothing new is held
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        dx = None
        if ctx.needs_input_grad[0]:
            weight = ctx.weight
            with torch.autocast(dy.device.type, enabled=False):
                dy2 = dy.reshape(-1, dy.shape[-1]).to(weight.dtype)
                dx = matmul_blocks(dy2, weight, ctx.plan.backward).view(*dy.shape[:-1], weight.shape[1])
                dx = dx.to(ctx.x_dtype)
        return dx, None, None, None


def _split_forward(module: torch.nn.Linear, plan: Plan):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        w = module.weight
        on_cpu = x.device.type == "cpu"
        autocast = on_cpu and torch.is_autocast_enabled("cpu")
        if (
            not on_cpu
            or w.requires_grad
            or (module.bias is not None and module.bias.requires_grad)
            or (autocast and torch.get_autocast_dtype("cpu") != w.dtype)
            or (not autocast and x.dtype != w.dtype)
            or x.dim() < 2
            or args
            or kwargs
            or torch.compiler.is_compiling()  # under torch.compile (train.compile) inductor plans the GEMMs itself
        ):
            return type(module).forward(module, x, *args, **kwargs)  # a call the plan was not made for: torch's own
        return SplitLinearFunction.apply(x, w, module.bias, plan)

    return forward


def _is_candidate(module: torch.nn.Module, skip: set[int]) -> bool:
    w = getattr(module, "weight", None)
    return (
        type(module) is torch.nn.Linear
        and id(module) not in skip
        and "forward" not in vars(module)  # already replaced per instance: keep it
        and w is not None
        and not w.requires_grad
        and (module.bias is None or not module.bias.requires_grad)
        and w.device.type == "cpu"
        and w.dtype in _DTYPES
    )


def install(model: torch.nn.Module, rows: int, timer=_median_seconds) -> dict[str, Any]:
    """Time the GEMM shapes of ``model``'s frozen CPU ``nn.Linear`` layers (not the output embedding, which the LM
    head computes itself) for passes of ``rows`` tokens, and route the layers whose shapes gain from a split through
    :class:`SplitLinearFunction`. Idempotent. Returns ``{"layers": routed, "plans": {shape: {...}}}``, a shape being
    ``"in x out dtype"``, each with its forward and backward blocks and the timings behind them (ms per block count).
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(output)} if output is not None else set()
    plans: dict[tuple[int, int, torch.dtype], Plan] = {}
    report: dict[str, dict[str, Any]] = {}
    routed = 0
    for module in model.modules():
        if getattr(module, "_kubetune_split_plan", None) is not None:
            routed += 1
            continue
        if not _is_candidate(module, skip):
            continue
        w = module.weight
        key = (w.shape[1], w.shape[0], w.dtype)
        if key not in plans:
            fwd, fwd_s = best_blocks(rows, w.t(), timer)
            bwd, bwd_s = best_blocks(rows, w, timer)
            plans[key] = Plan(fwd, bwd)
            report[f"{w.shape[1]} x {w.shape[0]} {str(w.dtype).removeprefix('torch.')}"] = {
                "forward_blocks": fwd,
                "backward_blocks": bwd,
                "forward_ms": {str(n): round(s * 1e3, 3) for n, s in fwd_s.items()},  # by blocks, as JSON keys
                "backward_ms": {str(n): round(s * 1e3, 3) for n, s in bwd_s.items()},
            }
        plan = plans[key]
        if not plan.splits:
            continue
        module.forward = _split_forward(module, plan)
        module._kubetune_split_plan = plan
        routed += 1
    for shape, r in report.items():
        log.debug("split GEMMs: %s: forward %s, backward %s", shape, r["forward_ms"], r["backward_ms"])
    return {"layers": routed, "plans": report}

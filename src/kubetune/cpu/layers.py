"""Leaner forward/backward passes for a decoder's element-wise layers (RMSNorm, the SiLU-gated MLP) and, for QLoRA
on a CPU, its 4-bit linear layers.

On a CPU a LoRA step on a small model spends a third of its time in element-wise work, and each op there costs an
allocation and a pass over memory. transformers' Llama-family ``RMSNorm`` (`weight * (x.float() * rsqrt(mean(x^2) +
eps)).to(x.dtype)`) runs seven ops forward and about a dozen backward, and autograd keeps two fp32 copies of the
hidden state per norm for backward (0.13 GiB per 512-token row of SmolLM2-135M). :class:`RMSNormFunction` computes
the same output in five passes over the hidden state, every op on operands of one dtype (a mixed-dtype op copies
its bf16 operand to fp32 inside), and keeps only its bf16 input and one fp32 number per token; its backward is
written out by hand. The SiLU-gated MLP (`down(silu(gate(x)) * up(x))`) keeps three
intermediate-width tensors for backward; :class:`SiluMulFunction` keeps two (the product is formed in place and
``silu(gate)`` is recomputed in backward).

A bitsandbytes 4-bit linear layer dequantises its whole weight on every call, forward and backward, into a fresh
tensor: 32 MiB for one MLP projection of a 1B Llama, a fresh memory map each time (the train stage's allocator
serves tensors over 8 MiB from the kernel), so each call also faults in and zeroes every page of it.
:class:`Linear4bitFunction` computes the same product with the weight dequantised by the same bitsandbytes CPU
routine into one reused buffer (:func:`dequantize_4bit`); nothing is kept for backward but a reference to the
quantised weight, as bitsandbytes keeps.

:func:`install` swaps these in per module, after checking on a probe input that the module computes what the lean
version computes (so a variant such as Gemma's ``(1 + weight)`` norm, or an MLP with another activation, is left
as it is). The train stage installs them on CPU (``cpu.lean_layers``); the measured effect is in
docs/performance.md.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from typing import Any

import torch
import torch.nn.functional as F

from kubetune.cpu.workspace import Workspace

log = logging.getLogger(__name__)


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, computed in fp32, as transformers' Llama norm.

    Keeps ``x`` and the per-token reciprocal RMS for backward. The weight's gradient is computed only when the
    weight requires one (in LoRA training it is frozen).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Every op has operands of one dtype: a mixed bf16 x fp32 op would make torch copy the bf16 operand to fp32
        # first, hidden inside the op.
        with torch.autocast(x.device.type, enabled=False):
            xf = x.to(torch.float32, copy=True)  # a copy even of an fp32 x: it is scaled in place
            rstd = _rstd(xf, eps)
            y = xf.mul_(rstd).to(x.dtype).mul_(weight)  # rounded to x's dtype before the weight, as the original
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            g = (dy * weight).float()  # the gradient reaching the normalised activations, in x's dtype first
            xf = x.float()  # read only (it is x itself when x is fp32)
            # d/dx [x * r(x)] . g = r * g - x * r^3 * <g, x> / d
            coeff = torch.linalg.vecdot(g, xf, dim=-1).unsqueeze(-1).mul_(rstd.pow(3)).div_(-x.shape[-1])
            dx = g.mul_(rstd).addcmul_(xf, coeff).to(x.dtype)
            dw = None
            if ctx.needs_input_grad[1]:
                normed = torch.mul(xf, rstd).to(x.dtype)
                dw = (dy * normed).sum(dim=tuple(range(dy.dim() - 1)), dtype=torch.float32).to(weight.dtype)
        return dx, dw, None


def _rstd(xf: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dimension of an fp32 tensor."""
    return torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(xf.shape[-1]).add_(eps).rsqrt_()


class SiluMulFunction(torch.autograd.Function):
    """``silu(gate) * up``, keeping ``gate`` and ``up`` for backward (not ``silu(gate)``)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        with torch.autocast(gate.device.type, enabled=False):
            out = F.silu(gate)
            out.mul_(up)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx: Any, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        with torch.autocast(gate.device.type, enabled=False):
            d_up = F.silu(gate).mul_(dh) if ctx.needs_input_grad[1] else None
            d_gate = None
            if ctx.needs_input_grad[0]:
                d_act = dh * up
                d_gate = torch.ops.aten.silu_backward(d_act, gate)
        return d_gate, d_up


# The dequantised weight (one 4-bit layer's at a time) and its dequantised block scales; kept between calls while the
# layers are installed (kubetune.cpu.workspace says why), freed by release_workspace().
_WORKSPACE = Workspace()
_NATIVE_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def release_workspace() -> None:
    """Free the 4-bit layers' dequantisation buffers (they are allocated again on the next call)."""
    _WORKSPACE.clear()


def _native_routines(quant_state, dtype: torch.dtype):
    """bitsandbytes' CPU routines that dequantise a 4-bit weight of ``quant_state`` to ``dtype`` into a given buffer
    (the ones its own CPU kernels call into fresh tensors): the weight's, and the 8-bit block scales' where they are
    double-quantised (else None); or None where bitsandbytes' kernel would not use them either."""
    from bitsandbytes.cextension import lib

    shape = tuple(quant_state.shape)
    if (
        len(shape) != 2
        or shape[-1] % 2
        or quant_state.blocksize >= 2048  # bitsandbytes' own kernel falls back to torch ops here
        or quant_state.quant_type not in ("nf4", "fp4")
        or dtype not in _NATIVE_DTYPES
    ):
        return None
    try:
        weight = getattr(lib, f"cdequantize_blockwise_cpu_{quant_state.quant_type}_{_NATIVE_DTYPES[dtype]}")
        scales = lib.cdequantize_blockwise_cpu_fp32 if quant_state.nested else None
    except (AttributeError, RuntimeError):  # a library built without the CPU routines
        return None
    return weight, scales


def dequantize_4bit(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` (a bitsandbytes ``Params4bit`` on CPU) dequantised to ``dtype``: the values bitsandbytes'
    ``dequantize_4bit`` gives, in a buffer reused from call to call. The result is valid until the next call."""
    import bitsandbytes.functional as bnbf

    qs = weight.quant_state
    routines = _native_routines(qs, dtype)
    if routines is None:
        return bnbf.dequantize_4bit(weight, qs).to(dtype)
    dequantize_weight, dequantize_scales = routines
    ptr, i64 = bnbf.get_ptr, ctypes.c_longlong
    # every tensor handed to C is bound to a name first, so that it outlives the call
    absmax = qs.absmax.contiguous()
    if dequantize_scales is not None:  # double quantisation: the block scales are 8-bit, in blocks of state2's size
        s2 = qs.state2
        code, scales_absmax = s2.code.contiguous(), s2.absmax.contiguous()
        scales = _WORKSPACE.get("scales", tuple(absmax.shape), torch.float32, absmax.device)
        dequantize_scales(
            ptr(code), ptr(absmax), ptr(scales_absmax), ptr(scales), i64(s2.blocksize), i64(absmax.numel())
        )
        absmax = scales.add_(qs.offset)
    elif absmax.dtype != torch.float32:
        absmax = absmax.float()
    rows, cols = qs.shape
    out = _WORKSPACE.get("weight", (rows, cols), dtype, weight.device)
    packed = weight.data.contiguous().view(torch.uint8)
    dequantize_weight(ptr(packed), ptr(absmax), ptr(out), i64(qs.blocksize), i64(rows), i64(cols))
    return out


class Linear4bitFunction(torch.autograd.Function):
    """``x @ W.T + bias`` for a bitsandbytes 4-bit weight ``W``, in ``dtype``: ``W`` is dequantised by
    :func:`dequantize_4bit` in forward and again in backward. Gradients flow to ``x`` and the bias (the 4-bit weight
    is frozen, as in bitsandbytes)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):
            w = dequantize_4bit(weight, dtype)
            y = F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))
        ctx.weight = weight  # the quantised weight itself, as bitsandbytes keeps it (a parameter: nothing new held)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        dx = db = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dx = torch.matmul(dy, dequantize_4bit(ctx.weight, dy.dtype)).to(ctx.x_dtype)
            if ctx.needs_input_grad[2]:
                db = dy.reshape(-1, dy.shape[-1]).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, None, db, None


def _lean_linear4bit_forward(module: torch.nn.Module):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        weight = module.weight
        qs = getattr(weight, "quant_state", None)
        if (
            args
            or kwargs
            or not module.training  # inference: bitsandbytes' own path (it may repack the weight for a CPU kernel)
            or x.device.type != "cpu"
            or qs is None
            or getattr(qs, "packing_format_for_cpu", False)
        ):
            return type(module).forward(module, x, *args, **kwargs)
        return _linear4bit_product(module, x)

    return forward


@torch.compiler.disable  # calls into C through ctypes: run eagerly inside a model compiled with torch.compile
def _linear4bit_product(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a bitsandbytes 4-bit layer computes in training, through :class:`Linear4bitFunction`: in autocast's dtype
    under autocast, else in the layer's compute dtype, returned in the input's dtype (as bitsandbytes does)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    else:
        dtype = getattr(module, "compute_dtype", None) or x.dtype
    return Linear4bitFunction.apply(x, module.weight, module.bias, dtype).to(x.dtype)


def _is_linear4bit_candidate(module: torch.nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")  # no 4-bit layer exists unless bitsandbytes was imported
    if bnb is None or not isinstance(module, bnb.nn.Linear4bit):
        return False
    weight = module.weight
    return weight.device.type == "cpu" and getattr(weight, "quant_state", None) is not None


def _compute_dtype(module: torch.nn.Module) -> torch.dtype:
    dtype = getattr(module, "compute_dtype", None)
    return dtype if dtype in _NATIVE_DTYPES else torch.bfloat16


def _lean_norm_forward(module: torch.nn.Module):
    eps = _norm_eps(module)

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(hidden_states, module.weight, eps)

    return forward


def _lean_mlp_forward(module: torch.nn.Module):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:  # a call the probe did not check: the module's own forward
            return type(module).forward(module, x, *args, **kwargs)
        return module.down_proj(SiluMulFunction.apply(module.gate_proj(x), module.up_proj(x)))

    return forward


def _norm_eps(module: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        eps = getattr(module, name, None)
        if isinstance(eps, float):
            return eps
    return None


def _is_norm_candidate(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, torch.nn.Parameter)
        and weight.dim() == 1
        and _norm_eps(module) is not None
        and not list(module.children())
    )


def _is_mlp_candidate(module: torch.nn.Module) -> bool:
    return all(
        isinstance(getattr(module, n, None), torch.nn.Module) for n in ("gate_proj", "up_proj", "down_proj")
    ) and isinstance(
        getattr(module, "act_fn", None), torch.nn.Module
    )  # the probe in _same_output tells SiLU from other activations


@torch.no_grad()
def _same_output(module: torch.nn.Module, lean, width: int, dtype: torch.dtype | None = None) -> bool:
    """Whether ``lean`` computes what ``module`` computes, on a probe of 3 tokens in ``dtype`` (by default the first
    floating-point parameter's), with a few ulps of slack."""
    params = list(module.parameters())
    dtype = dtype or next((p.dtype for p in params if p.dtype in _NATIVE_DTYPES), None)
    if not params or params[0].device.type == "meta" or dtype is None:
        return False
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = (torch.randn(1, 3, width, generator=gen) * 2).to(device=params[0].device, dtype=dtype)
    modes = {m: m.training for m in module.modules()}
    for m in module.modules():  # eval mode: no dropout in the comparison; but a 4-bit layer in training mode, as it
        m.training = _is_linear4bit_candidate(m)  # trains (in eval mode bitsandbytes repacks its weight)
    try:
        want, got = module(probe), lean(probe)
    except Exception:  # a module this code does not understand stays as it is
        return False
    finally:
        for m, training in modes.items():
            m.training = training
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return want.shape == got.shape and torch.allclose(want.float(), got.float(), rtol=tol, atol=tol)


def install(
    model: torch.nn.Module, *, norms: bool = True, mlps: bool = True, linear4bit: bool = True
) -> dict[str, int]:
    """Route matching RMSNorm, SiLU-gated MLP and (on CPU) bitsandbytes 4-bit linear modules of ``model`` through
    the lean functions.

    Idempotent. Returns how many modules of each kind now use them.
    """
    counts = {"norms": 0, "mlps": 0, "linear4bit": 0}
    for module in model.modules():
        if getattr(module, "_kubetune_lean", None):
            counts[module._kubetune_lean] += 1
            continue
        if "forward" in vars(module):  # already replaced per instance (e.g. accelerate's offload hooks): keep it
            continue
        dtype = probe_lean = None
        if norms and _is_norm_candidate(module):
            kind, lean, width = "norms", _lean_norm_forward(module), module.weight.shape[0]
        elif linear4bit and _is_linear4bit_candidate(module):
            kind, lean, width = "linear4bit", _lean_linear4bit_forward(module), module.in_features
            dtype = _compute_dtype(module)
            probe_lean = functools.partial(_linear4bit_product, module)  # the lean path whatever the module's mode
        elif mlps and _is_mlp_candidate(module):
            lean = _lean_mlp_forward(module)
            kind, width = "mlps", _in_features(module.gate_proj)
            if width is None:
                continue
        else:
            continue
        if not _same_output(module, probe_lean or lean, width, dtype):
            log.debug("lean layers: %s computes something else; left as it is", type(module).__name__)
            continue
        module.forward = lean
        module._kubetune_lean = kind
        counts[kind] += 1
    return counts


def _in_features(linear: torch.nn.Module) -> int | None:
    n = getattr(linear, "in_features", None)
    if n is None:  # a PEFT wrapper
        n = getattr(getattr(linear, "base_layer", None), "in_features", None)
    return n if isinstance(n, int) else None

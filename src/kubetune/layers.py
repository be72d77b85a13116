"""Leaner forward/backward passes for a decoder's element-wise layers: RMSNorm and the SiLU-gated MLP.

On a CPU a LoRA step on a small model spends a third of its time in element-wise work, and each op there costs an
allocation and a pass over memory. transformers' Llama-family ``RMSNorm`` (`weight * (x.float() * rsqrt(mean(x^2) +
eps)).to(x.dtype)`) runs seven ops forward and about a dozen backward, and autograd keeps two fp32 copies of the
hidden state per norm for backward (0.13 GiB per 512-token row of SmolLM2-135M). :class:`RMSNormFunction` computes
the same output in five passes over the hidden state, every op on operands of one dtype (a mixed-dtype op copies
its bf16 operand to fp32 inside), and keeps only its bf16 input and one fp32 number per token; its backward is
written out by hand. The SiLU-gated MLP (`down(silu(gate(x)) * up(x))`) keeps three
intermediate-width tensors for backward; :class:`SiluMulFunction` keeps two (the product is formed in place and
``silu(gate)`` is recomputed in backward).

:func:`install` swaps these in per module, after checking on a probe input that the module computes what the lean
version computes (so a variant such as Gemma's ``(1 + weight)`` norm, or an MLP with another activation, is left
as it is). The train stage installs them on CPU (``train.lean_layers``); the measured effect is in
docs/performance.md.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

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
def _same_output(module: torch.nn.Module, lean, width: int) -> bool:
    """Whether ``lean`` computes what ``module`` computes, on a probe of 3 tokens (a few ulps of slack)."""
    param = next(module.parameters())
    if param.dtype not in (torch.float32, torch.bfloat16, torch.float16) or param.device.type == "meta":
        return False
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = (torch.randn(1, 3, width, generator=gen) * 2).to(device=param.device, dtype=param.dtype)
    modes = {m: m.training for m in module.modules()}
    module.eval()  # no dropout in the comparison
    try:
        want, got = module(probe), lean(probe)
    except Exception:  # a module this code does not understand stays as it is
        return False
    finally:
        for m, training in modes.items():
            m.training = training
    tol = 1e-5 if param.dtype == torch.float32 else 2e-2
    return want.shape == got.shape and torch.allclose(want.float(), got.float(), rtol=tol, atol=tol)


def install(model: torch.nn.Module, *, norms: bool = True, mlps: bool = True) -> dict[str, int]:
    """Route matching RMSNorm and SiLU-gated MLP modules of ``model`` through the lean functions.

    Idempotent. Returns how many modules of each kind now use them.
    """
    counts = {"norms": 0, "mlps": 0}
    for module in model.modules():
        if getattr(module, "_kubetune_lean", None):
            counts[module._kubetune_lean] += 1
            continue
        if "forward" in vars(module):  # already replaced per instance (e.g. accelerate's offload hooks): keep it
            continue
        if norms and _is_norm_candidate(module):
            kind, lean, width = "norms", _lean_norm_forward(module), module.weight.shape[0]
        elif mlps and _is_mlp_candidate(module):
            lean = _lean_mlp_forward(module)
            kind, width = "mlps", _in_features(module.gate_proj)
            if width is None:
                continue
        else:
            continue
        if not _same_output(module, lean, width):
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

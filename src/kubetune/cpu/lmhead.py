"""A leaner LM head and loss for CPU training.

TRL's SFTTrainer computes the loss through a fused LM head (``add_fused_lm_head``) that never materialises the full
``[tokens, vocab]`` logits. Its kernel is built for GPUs: with Triton it scores only the positions that carry loss and
folds each vocabulary tile in one kernel; on a CPU it scores every position and runs a dozen element-wise torch ops per
``[tokens, 4096]`` vocabulary tile, accumulating the backward matmuls in fp32. Measured on a 2-core CPU
(``python -m benchmarks.profile_step``, SmolLM2-135M, one 512-token row in bf16): that head was half of the step.

:class:`TokenChunkedLogProb` computes the same outputs tiled over *tokens* instead: per chunk of tokens one LM-head
GEMM in the compute dtype and one ``logsumexp`` over the whole vocabulary; the probabilities are kept (in the compute
dtype, up to ``SAVE_PROBS_BYTES``) so that backward is one scaled copy and one gradient GEMM, without recomputing
the logits. :func:`token_chunked_head` installs it in TRL for the duration of a training run, together with
TRL's own "score only the loss-carrying positions" path that it otherwise keeps for GPUs. Nothing else changes: TRL
still builds the loss, the token accuracy and the entropy metrics from its outputs.

Differences from TRL's kernel, both deliberate: the entropy is returned for logging only (no gradient flows through it;
SFT never differentiates it), and the logits live in fp32 one token chunk at a time (at most ``CHUNK_ELEMENTS``
floats), not in vocabulary tiles.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from kubetune.cpu.workspace import Workspace

log = logging.getLogger(__name__)

# Floats of fp32 logits per chunk (64 MiB): 512 tokens of a 32k vocabulary, 130 of Llama 3's 128k.
CHUNK_ELEMENTS = 1 << 24
MAX_CHUNK_TOKENS = 512
# Probabilities kept from forward for backward, at most (bytes): 512 tokens x 49k vocabulary in bf16 is 48 MiB.
SAVE_PROBS_BYTES = 256 << 20


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk for a vocabulary: as many as fit ``CHUNK_ELEMENTS`` logits, between 16 and 512."""
    return max(16, min(MAX_CHUNK_TOKENS, CHUNK_ELEMENTS // max(1, vocab)))


def _in_dtype(weight, bias, dtype):
    """The head's weight and bias in the compute dtype, cast once per call (no copy when they are in it already)."""
    return weight.to(dtype), None if bias is None else bias.to(dtype)


# the chunk's logits in the compute dtype (also backward's gradient of the logits) and two fp32 buffers, each
# chunk_tokens(vocab) x vocab, and the probabilities kept for backward (lent to one forward until its backward), all
# kept while token_chunked_head() is active (kubetune.cpu.workspace says why)
_WORKSPACE = Workspace()


def release_workspace() -> None:
    """Free the head's scratch buffers (they are allocated again on the next call)."""
    _WORKSPACE.clear()


def _logits_into(h, w, b, scale: float, softcap: float | None, *, rows: int, tanh_out=None):
    """fp32 logits of one chunk in the workspace's ``"z"`` buffer, from the head's weight ``w`` and bias ``b`` already
    in the compute dtype: one GEMM in the compute dtype, then in place. With a softcap, its tanh is written to
    ``tanh_out`` (backward needs it)."""
    k, vocab = h.shape[0], w.shape[0]
    z = _WORKSPACE.get("z", (rows, vocab), torch.float32, h.device)[:k]
    if w.dtype == torch.float32:
        torch.mm(h.to(w.dtype), w.t(), out=z)
        if b is not None:
            z.add_(b)
    else:
        zc = _WORKSPACE.get("zc", (rows, vocab), w.dtype, h.device)[:k]
        torch.mm(h.to(w.dtype), w.t(), out=zc)
        if b is not None:
            zc.add_(b)
        z.copy_(zc)
    if scale != 1.0:
        z.mul_(scale)
    if softcap:
        z.div_(softcap).tanh_()
        if tanh_out is not None:
            tanh_out.copy_(z)
        z.mul_(softcap)
    return z


class TokenChunkedLogProb(torch.autograd.Function):
    """Drop-in for TRL's ``ChunkedLogProbFunction``: same ``apply`` arguments, same five outputs
    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` (``None`` for fields not in ``outputs``)."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # [N, H]
        weight: torch.Tensor,  # [V, H]
        bias: torch.Tensor | None,
        targets: torch.Tensor,  # [N]
        temperature: float,
        chunk_size: int,  # TRL's vocabulary tile; unused (this function tiles tokens)
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = ("log_probs",),
    ):
        del chunk_size
        device = hidden.device
        autocast = torch.is_autocast_enabled(device.type)
        compute_dtype = torch.get_autocast_dtype(device.type) if autocast else hidden.dtype
        scale = logit_scale / temperature
        n, vocab = hidden.shape[0], weight.shape[0]
        step = chunk_tokens(vocab)
        rows = min(step, n)
        want = {name: name in outputs for name in ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")}
        logprobs = torch.empty(n, dtype=torch.float32, device=device)
        log_z = torch.empty(n, dtype=torch.float32, device=device)
        extra = {name: torch.empty(n, dtype=torch.float32, device=device) for name, on in want.items() if on}
        if want["is_top1"]:
            extra["is_top1"] = torch.empty(n, dtype=torch.bool, device=device)
        # Keeping the probabilities for backward spares it a second LM-head GEMM and the softmax; it costs
        # tokens x vocab values in the compute dtype, so only within SAVE_PROBS_BYTES (and without a softcap), and
        # only when there will be a backward.
        needs_grad = any(ctx.needs_input_grad[:3])
        keep = needs_grad and not final_logit_softcapping and n * vocab * compute_dtype.itemsize <= SAVE_PROBS_BYTES
        # kept in a reused buffer too (a fresh one page-faulted: 28 ms per 341-token chunk), handed back by backward
        probs, leased = _WORKSPACE.lease("probs", (n, vocab), compute_dtype, device) if keep else (None, False)
        w, b = _in_dtype(weight, bias, compute_dtype)
        # Everything below runs in explicit dtypes. Under autocast, an op with out= would compute into a fresh tensor
        # and copy it into the reused buffer (measured: 29 ms per 341-token chunk), so autocast is off here.
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for s in range(0, n, step):
                e = min(s + step, n)
                t = targets[s:e].unsqueeze(-1)
                z = _logits_into(hidden[s:e], w, b, scale, final_logit_softcapping, rows=rows)
                # the row maximum and its first index (as argmax gives it, at a fraction of argmax's cost on a CPU)
                m, top = z.max(-1)
                zt = z.gather(-1, t).squeeze(-1)
                if want["is_top1"]:
                    extra["is_top1"][s:e] = top == targets[s:e]
                y = z.sub_(m.unsqueeze(-1))  # shifted logits, in place
                ex = torch.exp(y, out=_WORKSPACE.get("p", (rows, vocab), torch.float32, device)[: e - s])
                log_sum = ex.sum(-1).log_()
                log_z[s:e] = m + log_sum
                logprobs[s:e] = zt - m - log_sum
                if want["mean_logits"]:
                    extra["mean_logits"][s:e] = y.mean(-1) + m
                if want["log_sum_sq_probs"]:
                    extra["log_sum_sq_probs"][s:e] = torch.logsumexp(2 * y, dim=-1) - 2 * log_sum
                if keep or want["entropy"]:
                    p = ex.mul_(torch.exp(-log_sum).unsqueeze(-1))  # probabilities, in place
                    if keep:
                        probs[s:e] = p
                    if want["entropy"]:
                        # -sum p log p = log_sum - sum p y, with y the shifted logits
                        extra["entropy"][s:e] = log_sum - p.mul_(y).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, logprobs, probs)
        ctx.compute_dtype = compute_dtype
        ctx.scale = scale
        ctx.softcap = final_logit_softcapping
        ctx.leased = leased
        ctx.mark_non_differentiable(*extra.values())
        ctx.set_materialize_grads(False)
        return (
            logprobs,
            extra.get("entropy"),
            extra.get("log_sum_sq_probs"),
            extra.get("mean_logits"),
            extra.get("is_top1"),
        )

    @staticmethod
    def backward(ctx, grad_logprobs, *_):  # type: ignore[override]
        hidden, weight, bias, targets, log_z, logprobs, probs = ctx.saved_tensors
        if grad_logprobs is None:
            if ctx.leased:
                _WORKSPACE.give_back("probs")
            return (None,) * 9
        compute_dtype, scale, softcap = ctx.compute_dtype, ctx.scale, ctx.softcap
        n, vocab = hidden.shape[0], weight.shape[0]
        step = chunk_tokens(vocab)
        rows = min(step, n)
        device = hidden.device
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        want_w = ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if want_w else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if want_b else None
        w, b = _in_dtype(weight, bias, compute_dtype)
        with torch.autocast(device.type, enabled=False):  # explicit dtypes, reused buffers
            for s in range(0, n, step):
                e = min(s + step, n)
                g = grad_logprobs[s:e].float() * scale
                # (row, target) of each token: index_put_ writes these k entries (scatter_ along the vocabulary
                # dimension took 20 ms for 341 tokens of a 49k vocabulary on a CPU, index_put_ 0.01 ms)
                at = (torch.arange(e - s, device=device), targets[s:e])
                # d log p_t / d z_j = [j == t] - p_j
                if probs is not None:
                    gz = _WORKSPACE.get("zc", (rows, vocab), compute_dtype, device)[: e - s]
                    torch.mul(probs[s:e], (-g).to(compute_dtype).unsqueeze(-1), out=gz)
                    # the target's entry from the fp32 log-probability, not from the rounded probability
                    gz.index_put_(at, (g * -torch.expm1(logprobs[s:e])).to(compute_dtype))
                else:
                    tanh = _WORKSPACE.get("p", (rows, vocab), torch.float32, device)[: e - s] if softcap else None
                    z = _logits_into(hidden[s:e], w, b, scale, softcap, rows=rows, tanh_out=tanh)
                    grad_z = z.sub_(log_z[s:e].unsqueeze(-1)).exp_().mul_(-g.unsqueeze(-1))
                    grad_z.index_put_(at, g, accumulate=True)
                    if tanh is not None:
                        grad_z.mul_(tanh.mul_(tanh).neg_().add_(1))
                    if compute_dtype == torch.float32:
                        gz = grad_z
                    else:
                        gz = _WORKSPACE.get("zc", (rows, vocab), compute_dtype, device)[: e - s]
                        gz.copy_(grad_z)
                if grad_hidden is not None:
                    grad_hidden[s:e] = (gz @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.add_((gz.t() @ hidden[s:e].to(compute_dtype)).float())
                if grad_bias is not None:
                    grad_bias.add_(gz.float().sum(0))
        if ctx.leased:  # the probabilities are read: the next forward may have their buffer
            _WORKSPACE.give_back("probs")
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            *(None,) * 6,
        )


class _EagerHead:
    """What the hook puts in TRL's place: :class:`TokenChunkedLogProb`, run eagerly even inside a model compiled with
    torch.compile (a graph break; its reused buffers and ``out=`` GEMMs are not for a traced graph)."""

    @staticmethod
    @torch.compiler.disable
    def apply(*args):
        return TokenChunkedLogProb.apply(*args)


@contextlib.contextmanager
def token_chunked_head() -> Iterator[bool]:
    """Route TRL's fused LM head through :class:`TokenChunkedLogProb`, scoring only loss-carrying positions, while the
    block runs; yields False (and changes nothing) when this TRL version lacks the two hooks it replaces."""
    import trl.trainer.utils as trl_utils

    names = ("_ChunkedLogProbFunction", "_use_triton")
    if not all(hasattr(trl_utils, n) for n in names):
        log.warning("this TRL version has no LM-head hook (%s): using TRL's own head", ", ".join(names))
        yield False
        return
    saved = {n: getattr(trl_utils, n) for n in names}
    trl_utils._ChunkedLogProbFunction = _EagerHead
    # In trl.trainer.utils this name only decides whether to score just the loss-carrying positions ("compact").
    trl_utils._use_triton = lambda device: True
    try:
        yield True
    finally:
        for n, v in saved.items():
            setattr(trl_utils, n, v)
        release_workspace()

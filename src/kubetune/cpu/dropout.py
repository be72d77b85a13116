"""LoRA dropout with masks drawn three 16-bit numbers at a time, for CPU training.

PEFT applies ``nn.Dropout`` to the input of every LoRA layer. On a CPU, torch draws one random number per element from
one generator (``bernoulli_``, about 2.5 ns each): measured with ``python -m benchmarks.profile_step`` on SmolLM2-135M
(LoRA on q/v, one 512-token row), the 60 dropout masks of a step were 8% of it. :class:`BulkDropout` draws one 64-bit
number per three elements and compares each 16-bit lane with a threshold, so it makes a third of the draws.

The distribution is the same up to the drop probability, which is rounded to a multiple of 1/65536 (0.05 becomes
0.0500031; :func:`effective_p`); kept elements are scaled by ``1 / (1 - effective_p)``, so the expectation is kept
exactly. The numbers come from torch's default generator, so seeding, and the RNG state the Trainer saves in each
checkpoint and restores on resume, work as with ``nn.Dropout``.
"""

from __future__ import annotations

import math

import torch

LANES = 65536  # values of a 16-bit lane


def threshold(p: float) -> int:
    """Lanes below this value (of 65536) drop their element."""
    return min(LANES, max(0, round(p * LANES)))


def effective_p(p: float) -> float:
    """The drop probability :class:`BulkDropout` applies for ``p``."""
    return threshold(p) / LANES


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A boolean mask, True with probability ``1 - effective_p(p)`` independently per element."""
    n = math.prod(shape)
    words = -(-n // 3)
    # 48 uniform bits per draw (randint over a power of two takes one 64-bit number and keeps its low bits)
    bits = torch.randint(0, 1 << 48, (words,), dtype=torch.int64, device=device)
    # little-endian: int16 lanes 0-2 of each int64 are its low 48 bits; lane 3 is always 0 and is skipped. An int16
    # lane is uniform over [-32768, 32767]: it drops when lane + 32768 < threshold. Compared in place (the strided
    # lanes are never copied); the boolean result is contiguous.
    keep = bits.view(torch.int16).view(words, 4)[:, :3] >= threshold(p) - LANES // 2
    return keep.reshape(-1)[:n].view(shape)


class _BulkDropoutFunction(torch.autograd.Function):
    # The boolean mask is kept for backward (1 byte per element). Kept elements are scaled by a Python float, so
    # that a bf16 input is scaled in fp32 and rounded once: a bf16 copy of the scale (1/0.95 -> 1.0547, as torch's
    # own dropout makes for a bf16 input) would bias every kept element by 0.2%.
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float):
        keep = keep_mask(x.shape, p, x.device)
        ctx.scale = LANES / (LANES - threshold(p))
        ctx.save_for_backward(keep)
        return torch.where(keep, x, 0.0).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None


class BulkDropout(torch.nn.Module):
    """``nn.Dropout(p)`` with masks from :func:`keep_mask` (in training; the identity in eval mode)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or threshold(self.p) == 0:
            return x
        if torch.compiler.is_compiling():
            # Under torch.compile (train.compile), inductor generates its own dropout; its graphs cannot hold the
            # 16-bit views of the 64-bit draws ("Node ... was invalid, but is output").
            return torch.nn.functional.dropout(x, self.p, training=True)
        if threshold(self.p) == LANES:
            return x * 0.0
        return _BulkDropoutFunction.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p} (applied: {effective_p(self.p):.7f})"


def install(model: torch.nn.Module) -> int:
    """Replace the ``nn.Dropout`` of every PEFT LoRA layer in ``model`` by :class:`BulkDropout` with the same ``p``.
    Returns how many were replaced. The adapter's config (and so what is saved) is unchanged."""
    replaced = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if type(drop) is torch.nn.Dropout and drop.p > 0:
                bulk = BulkDropout(drop.p)
                bulk.train(drop.training)
                drops[name] = bulk
                replaced += 1
    return replaced

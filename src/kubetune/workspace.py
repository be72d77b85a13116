"""Scratch tensors reused from one call to the next, for CPU kernels written in torch ops.

A tensor of more than 8 MiB (glibc's mmap threshold as the train stage sets it) comes from a fresh memory map each
time it is allocated, and the kernel must fault in and zero every page before the first write: measured on a 2-core
CPU, a pass over 64 MiB of fresh memory took 3-10x as long as the same pass over memory already in use (``exp`` 27 ms
against 8 ms). The LM head (:mod:`kubetune.lmhead`) and the attention (:mod:`kubetune.attention`) keep their large
temporaries in a :class:`Workspace` for the duration of a training run.
"""

from __future__ import annotations

import torch


class Workspace:
    """Named flat buffers, grown on demand and handed out as views of the requested shape. A view stays valid until
    the next :meth:`get` of the same name; callers use each name for one temporary at a time."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < n:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def clear(self) -> None:
        self._buffers.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

"""Scratch tensors reused from one call to the next, for CPU kernels written in torch ops.

A tensor of more than 8 MiB (glibc's mmap threshold as the train stage sets it) comes from a fresh memory map each
time it is allocated, and the kernel must fault in and zero every page before the first write: measured on a 2-core
CPU, a pass over 64 MiB of fresh memory took 3-10x as long as the same pass over memory already in use (``exp`` 27 ms
against 8 ms). The LM head (:mod:`kubetune.cpu.lmhead`) keeps its large temporaries in a :class:`Workspace` for the
duration of a training run.
"""

from __future__ import annotations

import math

import torch


class Workspace:
    """Named flat buffers, grown on demand and handed out as views of the requested shape. A view stays valid until
    the next :meth:`get` of the same name; callers use each name for one temporary at a time."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._leased: set[str] = set()

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < n:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def lease(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, bool]:
        """A buffer that must outlive the call that takes it (saved for backward): the named one, marked taken
        until :meth:`give_back`, or, while it is taken, a fresh tensor. Returns (tensor, whether it is the lease)."""
        if name in self._leased:
            return torch.empty(shape, dtype=dtype, device=device), False
        self._leased.add(name)
        return self.get(name, shape, dtype, device), True

    def give_back(self, name: str) -> None:
        self._leased.discard(name)

    def clear(self) -> None:
        self._buffers.clear()
        self._leased.clear()

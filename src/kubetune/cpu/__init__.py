"""kubetune's CPU kernels for training, behind one seam.

The modules: :mod:`~kubetune.cpu.lmhead` (token-chunked LM head and loss), :mod:`~kubetune.cpu.dropout` (bulk LoRA
dropout masks), :mod:`~kubetune.cpu.layers` (lean RMSNorm, SiLU-gated MLP and 4-bit linear layers),
:mod:`~kubetune.cpu.gemm` (frozen GEMMs split in column blocks where timing says so),
:mod:`~kubetune.cpu.workspace` (reused buffers) and :mod:`~kubetune.cpu.allocator` (malloc control). Which of them
run is the plan's choice (:mod:`kubetune.plan`, config section ``cpu:``); :func:`kernels` installs them, runs them
and tears them down around training:

    with cpu.kernels(plan) as k:        # the allocator setting in force from here
        with k.loading():                # freed heap handed back while the weights load
            model = load(...)
        k.install(trainer.model, tokens_per_pass)   # module rewrites and the LM head, until the block ends
        trainer.train()
    summary.update(k.report)             # what was installed, for training_summary.json

On a GPU the plan turns them all off and the block does nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


class Kernels:
    """What :func:`kernels` yields: see the module docstring."""

    def __init__(self, plan, stack: contextlib.ExitStack):
        self.plan = plan
        self.allocator = plan.allocator
        self.report: dict[str, Any] = {}
        self._stack = stack

    def loading(self):
        """While the block runs, hand freed heap pages back (quantising frees a full-precision copy per weight)."""
        from kubetune.cpu import allocator

        return allocator.trimming_heap(self.allocator)

    def install(self, model, tokens_per_pass: int) -> dict[str, Any]:
        """Install the module rewrites the plan turns on into ``model`` and, for the rest of the block, the LM head;
        returns (and keeps in :attr:`report`) what was installed."""
        plan = self.plan
        if plan.dropout_sampler.value == "bulk":
            from kubetune.cpu import dropout

            self.report["dropout_layers"] = dropout.install(model)
            log.info("LoRA dropout: bulk sampler on %d layers", self.report["dropout_layers"])
        if plan.lean_layers.value == "on":
            from kubetune.cpu import layers

            lean = self.report["lean_layers"] = layers.install(model)
            self._stack.callback(layers.release_workspace)  # the 4-bit layers' buffers
            log.info(
                "lean layers: %d RMSNorm, %d SiLU-gated MLP and %d 4-bit linear modules",
                lean["norms"],
                lean["mlps"],
                lean["linear4bit"],
            )
        if plan.split_gemms.value == "on":
            from kubetune.cpu import gemm

            split = self.report["split_gemms"] = gemm.install(model, tokens_per_pass)
            log.info(
                "split GEMMs: %d frozen linear layers routed (%s)",
                split["layers"],
                "; ".join(
                    f"{shape}: forward {p['forward_blocks']}, input gradient {p['backward_blocks']} blocks"
                    for shape, p in split["plans"].items()
                )
                or "no frozen linear layers",
            )
        if plan.lm_head.value == "chunked":
            from kubetune.cpu import lmhead

            self._stack.enter_context(lmhead.token_chunked_head())
        return self.report


@contextlib.contextmanager
def kernels(plan) -> Iterator[Kernels]:
    """Put ``plan``'s CPU settings into effect for the block (see the module docstring); the allocator decision in
    force (``plan.allocator``, or glibc's default where ``mallopt`` refused) is :attr:`Kernels.allocator`."""
    from kubetune.cpu import allocator

    with contextlib.ExitStack() as stack:
        k = Kernels(plan, stack)
        k.allocator = allocator.apply(plan.allocator)
        yield k

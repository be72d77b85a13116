"""The train stage's plan: every automatic choice, made in one place from the config and the machine's facts.

:func:`make` returns a frozen :class:`Plan` with one :class:`~kubetune.hardware.Decision` (value and reason) per
setting: precision, threads, rows per pass, activation checkpointing, optimizer, LM head, LoRA dropout sampler, lean
layers, split GEMMs, allocator, the collective backend and the distributed strategy. It reads its arguments: a
:class:`~kubetune.hardware.Hardware` (:func:`kubetune.hardware.detect` on the machine, or written by hand for any
other), the config, the model's config, the packed row length and the :class:`~kubetune.distributed.World` (this
process's rank among the torchrun workers; one process by default); and, for the allocator, which malloc this
process runs on. So a plan can be checked
without a model or a Trainer. The stage logs it, records it in
``training_summary.json`` (``settings``) and builds ``SFTConfig`` from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kubetune.config import Config
from kubetune.cpu import allocator
from kubetune.distributed import CCL_MODULE, World
from kubetune.errors import UserError
from kubetune.hardware import Decision, Hardware

# bf16 is chosen over fp32 on a CPU without AMX only when its matmuls are at least this much faster.
BF16_MIN_SPEEDUP = 1.3


@dataclass(frozen=True)
class Plan:
    """One decision per setting, for training on ``device``; ``str(plan)`` is one line per setting, as logged."""

    device: str  # "cpu" or "cuda": the machine's, not a choice
    world: World  # the ranks, from torchrun's environment: not a choice either
    precision: Decision
    threads: Decision
    micro_batch_size: Decision
    activation_checkpointing: Decision
    optim: Decision
    lm_head: Decision
    dropout_sampler: Decision
    lean_layers: Decision
    split_gemms: Decision
    allocator: Decision
    backend: Decision
    strategy: Decision
    batch_size: int = 1  # train.batch_size: the global batch
    grad_accum: int = 1  # train.grad_accum

    def settings(self) -> dict[str, Decision]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.type == "Decision"}

    @property
    def rows_per_rank(self) -> int:
        """Rows of each step's global batch (``train.batch_size``) that this rank trains on."""
        return self.batch_size // self.world.world_size

    @property
    def grad_accum_steps(self) -> int:
        """Passes per optimizer step on each rank: ``train.grad_accum`` x rows per rank / rows per pass."""
        return self.grad_accum * (self.rows_per_rank // self.micro_batch_size.value)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{setting: {"value", "reason"}}``, as ``training_summary.json`` records it."""
        return {k: {"value": d.value, "reason": d.reason} for k, d in self.settings().items()}

    def __str__(self) -> str:
        return "\n".join(f"{k} = {d.value} ({d.reason})" for k, d in self.settings().items())


def make(cfg: Config, hw: Hardware, model_config: Any, row_len: int, world: World | None = None) -> Plan:
    """The plan for training ``cfg`` on ``hw`` as one rank of ``world`` (default: a single process):
    ``model_config`` is the base model's (transformers) config, used for the memory estimates; ``row_len`` the
    longest packed row. Raises UserError for a config that cannot run on this world (see :func:`check_world`)."""
    world = world or World()
    check_world(cfg, hw, world)
    precision = choose_precision(hw, cfg.train.precision)
    if cfg.method == "qlora" and hw.device == "cpu" and precision.value == "fp16":
        raise UserError("config key `train.precision`: fp16 training needs a GPU; use fp32 or bf16 on CPU")
    bytes_per = 4 if precision.value == "fp32" else 2
    n_params = getattr(model_config, "num_parameters", None)
    h = getattr(model_config, "hidden_size", 1024)
    layers = getattr(model_config, "num_hidden_layers", 24)
    vocab = getattr(model_config, "vocab_size", 32000)
    est_params = n_params or (12 * layers * h * h + vocab * h)
    weight_bytes = int(est_params * (0.55 if cfg.method == "qlora" else bytes_per))
    per_row = _activation_bytes(model_config, 1, row_len, bytes_per)  # linear in the rows per pass
    micro = choose_micro_batch(cfg, hw, activation_bytes_per_row=per_row, weight_bytes=weight_bytes, world=world)
    ac = choose_activation_checkpointing(
        hw, cfg.train.activation_checkpointing, activation_bytes=micro.value * per_row, weight_bytes=weight_bytes
    )
    return Plan(
        device=hw.device,
        world=world,
        precision=precision,
        threads=choose_threads(hw, cfg.train.threads, world),
        micro_batch_size=micro,
        activation_checkpointing=ac,
        optim=choose_optim(cfg),
        lm_head=choose_lm_head(cfg, hw),
        dropout_sampler=choose_dropout_sampler(cfg, hw),
        lean_layers=choose_lean_layers(cfg, hw),
        split_gemms=choose_split_gemms(cfg, hw),
        allocator=allocator.decide(hw),
        backend=choose_backend(cfg, hw, world),
        strategy=choose_strategy(cfg, world, model_config),
        batch_size=cfg.train.batch_size,
        grad_accum=cfg.train.grad_accum,
    )


# Tried on this stack (torch 2.13 CPU, gloo): under FSDP the split GEMMs, which time each frozen weight when they are
# installed, met a shard ("aten.mm.out got mixed torch.Tensor and DTensor") and the lean layers found no module to
# rewrite. They are off on one process too: a run resumed on another number of ranks then does the same arithmetic.
FSDP_REWRITES = (
    "the frozen weights are shards (DTensors) that FSDP gathers only inside each layer's forward and backward, "
    "which kubetune's CPU layer rewrites do not read (off on one process too, so that any number of ranks does "
    "the same arithmetic)"
)
# Tried on this stack (bitsandbytes 0.50.2): fully_shard splits the packed uint8 4-bit weights apart from their
# quantisation state, and the first forward fails in bitsandbytes ("N must be divisible by block_n").
FSDP_QLORA_REFUSED = (
    "config key `distributed.strategy`: fsdp does not shard a 4-bit (QLoRA) base (bitsandbytes' packed weights "
    "and their quantisation state cannot be split over ranks); use ddp (every rank holds the 4-bit base, about a "
    "quarter of bf16) or method: lora with fsdp"
)


def check_world(cfg: Config, hw: Hardware, world: World) -> None:
    """The combinations that cannot run, refused with one line naming the key: a global batch that does not split
    over the ranks, FSDP of a 4-bit base (on any number of ranks, so that a config that one process accepts does
    not fail on two), a backend that does not fit the device or is not installed."""
    if cfg.distributed.strategy == "fsdp":
        if cfg.method == "qlora":
            raise UserError(FSDP_QLORA_REFUSED)
        for key in ("lean_layers", "split_gemms"):
            if getattr(cfg.cpu, key) == "on":
                raise UserError(
                    f"config key `cpu.{key}`: on does not work under distributed.strategy fsdp ({FSDP_REWRITES}); "
                    "use auto or off"
                )
    n, b = world.world_size, cfg.train.batch_size
    if b % n:
        lower, upper = (b // n) * n, (b // n + 1) * n
        valid = f"{lower} or {upper}" if lower else f"{upper}"
        raise UserError(
            f"config key `train.batch_size`: {b} rows (the global batch) do not split over {n} ranks; use a "
            f"multiple of {n}, e.g. {valid}"
        )
    micro = cfg.train.micro_batch_size
    if micro and (b // n) % micro:
        raise UserError(
            f"config key `train.micro_batch_size`: {micro} does not divide the {b // n} rows each of {n} ranks "
            f"trains on per step (train.batch_size {b} / {n}); use a divisor of {b // n}, or 0 to choose"
        )
    requested = cfg.distributed.backend
    if not world.distributed:
        return
    if requested == "nccl" and hw.device != "cuda":
        raise UserError("config key `distributed.backend`: nccl needs CUDA devices; use gloo (or auto) on CPU")
    if requested == "ccl" and not world.ccl_available:
        raise UserError(
            f"config key `distributed.backend`: ccl needs the `{CCL_MODULE}` package, which is not installed (PyPI "
            "has no release of it for the pinned torch 2.13); use gloo (or auto)"
        )


def choose_backend(cfg: Config, hw: Hardware, world: World) -> Decision:
    """The torch.distributed backend: none for one process, else the config's or gloo on CPU, nccl on CUDA."""
    if not world.distributed:
        return Decision(None, "one process (no WORLD_SIZE from torchrun): no collectives")
    if cfg.distributed.backend != "auto":
        return Decision(cfg.distributed.backend, f"set in config (distributed.backend), {world.world_size} ranks")
    if hw.device == "cuda":
        return Decision("nccl", f"{world.world_size} ranks on CUDA devices: NCCL")
    return Decision(
        "gloo",
        f"{world.world_size} ranks on CPU: gloo (oneCCL only when asked for, with {CCL_MODULE} installed)",
    )


def choose_strategy(cfg: Config, world: World, model_config: Any = None) -> Decision:
    """How the ranks share the model: ``ddp`` (every rank holds the whole base) or ``fsdp`` (the frozen base sharded,
    :func:`kubetune.distributed.shard_base`); nothing to share for one process, whichever the config asks for."""
    asked = cfg.distributed.strategy
    if not world.distributed:
        if asked == "fsdp":
            return Decision(None, "one process: distributed.strategy fsdp has no ranks to shard over; trains as plain")
        return Decision(None, "one process (no WORLD_SIZE from torchrun): no data parallelism")
    n = world.world_size
    if asked == "fsdp":
        layers = _decoder_layers(model_config)
        return Decision(
            "fsdp",
            f"set in config (distributed.strategy), {n} ranks: the frozen base sharded over them with FSDP2 "
            f"(fully_shard), one unit per decoder layer ({layers}) and one for the rest (embeddings, final norm, LM "
            f"head), each rank holding 1/{n} of every weight; the LoRA adapter whole on every rank, only its "
            "gradients all-reduced (DDP), so checkpoints are DDP's",
        )
    return Decision(
        "ddp",
        f"{n} ranks: every rank holds the whole base model, only the adapter's gradients are all-reduced (DDP)",
    )


def _decoder_layers(model_config: Any) -> str:
    """The decoder layer classes the model's transformers class names in ``_no_split_modules`` (what FSDP wraps)."""
    import transformers

    names: list[str] = []
    for arch in getattr(model_config, "architectures", None) or []:
        try:
            names += list(getattr(getattr(transformers, arch, None), "_no_split_modules", None) or [])
        except Exception:  # a remote-code or unknown class: the sharding step names them when it runs
            continue
    return "/".join(sorted(set(names))) or "the model's _no_split_modules"


def choose_precision(hw: Hardware, requested: str = "auto") -> Decision:
    """fp32 | bf16 | fp16 for training, with the reason.

    CPUs without AMX are not all alike: with AVX512-BF16 bf16 matmuls ran at half the fp32 rate on one machine
    (Intel, oneDNN's bf16 path against MKL's AVX-512 fp32) and at 4.3x on another (AMD Zen 5, where MKL's fp32 path
    stops at AVX2). So there the choice is measured, not inferred from the flags."""
    if requested != "auto":
        return Decision(requested, "set in config (train.precision)")
    if hw.device == "cuda":
        if hw.cuda_bf16:
            return Decision("bf16", f"CUDA device {hw.cuda_name} supports bf16")
        return Decision("fp16", f"CUDA device {hw.cuda_name} lacks bf16")
    if hw.amx:
        return Decision("bf16", "CPU has AMX (amx_bf16): bf16 matmuls run on the tile units")
    if not hw.avx512_bf16:
        return Decision("fp32", "CPU has neither AMX nor AVX512-BF16: bf16 matmuls would be emulated, slower than fp32")
    rates = hw.matmul_gflops
    if rates is None:
        return Decision("fp32", "CPU has AVX512-BF16, no AMX; its bf16 matmul rate was not measured")
    measured = f"bf16 {rates['bf16']:g} vs fp32 {rates['fp32']:g} GFLOP/s on {hw.cores} threads"
    if rates["bf16"] >= BF16_MIN_SPEEDUP * rates["fp32"]:
        return Decision("bf16", f"CPU has AVX512-BF16, no AMX; bf16 matmuls measured faster ({measured})")
    return Decision("fp32", f"CPU has AVX512-BF16, no AMX; bf16 matmuls measured no faster ({measured})")


def choose_threads(hw: Hardware, requested: int = 0, world: World | None = None) -> Decision:
    if requested:
        return Decision(requested, "set in config (train.threads)")
    ranks = (world or World()).local_world_size
    if ranks > 1:
        share = max(1, hw.cores // ranks)
        return Decision(
            share,
            f"cores this process may use (affinity and cgroup quota: {hw.cores}) shared by the {ranks} ranks on "
            "this node",
        )
    return Decision(hw.cores, "cores this process may use (affinity and cgroup quota)")


MEMORY_SHARE = 0.8  # of the memory available, what weights + activations may take before kubetune holds back


def fits_in_memory(hw: Hardware, need_bytes: int) -> tuple[bool, int]:
    """Whether ``need_bytes`` fits in :data:`MEMORY_SHARE` of the memory available, and the bytes available (where
    that is not known, it fits)."""
    available = hw.cuda_memory_bytes if hw.device == "cuda" and hw.cuda_memory_bytes else hw.memory_bytes
    if available is None:
        return True, 0
    return need_bytes <= MEMORY_SHARE * available, available


def choose_activation_checkpointing(
    hw: Hardware, requested: str, *, activation_bytes: int, weight_bytes: int
) -> Decision:
    """On when asked, or when weights + activations would use more than 80% of the memory there is."""
    if requested == "on":
        return Decision(True, "set in config (train.activation_checkpointing: on)")
    if requested == "off":
        return Decision(False, "set in config (train.activation_checkpointing: off)")
    need = activation_bytes + weight_bytes
    fits, available = fits_in_memory(hw, need)
    gib = 1 << 30
    if not fits:
        return Decision(
            True,
            f"estimated {need / gib:.1f} GiB of weights + activations exceeds 80% of the "
            f"{available / gib:.1f} GiB available",
        )
    return Decision(
        False,
        f"estimated {need / gib:.1f} GiB fits in the {available / gib:.1f} GiB available; "
        "recomputation would only cost time",
    )


def _activation_bytes(model_config, batch_size: int, row_len: int, bytes_per: int) -> int:
    """Activation memory estimate (Korthikanti et al.): s*b*h*(34 + 5*a*s/h) bytes/2 per layer, scaled to dtype."""
    h = getattr(model_config, "hidden_size", 0) or getattr(model_config, "d_model", 0) or 1024
    layers = getattr(model_config, "num_hidden_layers", 0) or getattr(model_config, "num_layers", 0) or 24
    heads = getattr(model_config, "num_attention_heads", 0) or 16
    s, b = row_len, batch_size
    per_layer = s * b * h * (34 + 5 * heads * s / h) * bytes_per / 2
    return int(per_layer * layers)


def choose_optim(cfg: Config) -> Decision:
    if cfg.train.optim != "auto":
        return Decision(cfg.train.optim, "set in config (train.optim)")
    return Decision("adamw_torch_fused", "fused AdamW: one kernel per parameter group instead of a loop over tensors")


def _by_device(hw: Hardware, key: str, requested: str, *, cpu: tuple[str, str], gpu: tuple[str, str]) -> Decision:
    """The config's value for ``key`` unless it is ``auto``; else the (value, reason) for this device."""
    if requested != "auto":
        return Decision(requested, f"set in config ({key})")
    return Decision(*(cpu if hw.device == "cpu" else gpu))


def choose_lm_head(cfg: Config, hw: Hardware) -> Decision:
    """TRL's fused LM head, or kubetune's token-chunked one (``kubetune.cpu.lmhead``)."""
    return _by_device(
        hw,
        "cpu.lm_head",
        cfg.cpu.lm_head,
        cpu=(
            "chunked",
            "CPU: one GEMM and one logsumexp per chunk of tokens, on loss-carrying positions only; TRL's "
            "head runs a dozen element-wise ops per vocabulary tile on CPUs",
        ),
        gpu=("trl", "GPU: TRL's Triton head scores only loss-carrying positions already"),
    )


def choose_dropout_sampler(cfg: Config, hw: Hardware) -> Decision:
    """PEFT's nn.Dropout for the LoRA inputs, or kubetune's bulk sampler (``kubetune.cpu.dropout``)."""
    if cfg.cpu.dropout_sampler == "auto" and cfg.lora.dropout == 0:
        return Decision("torch", "lora.dropout is 0: no masks to draw")
    return _by_device(
        hw,
        "cpu.dropout_sampler",
        cfg.cpu.dropout_sampler,
        cpu=(
            "bulk",
            "CPU: one 64-bit random draw per three elements instead of one per element (torch's masks were 8% of "
            "a bf16 step); drop probability rounded to a multiple of 1/65536",
        ),
        gpu=("torch", "GPU: torch's dropout costs little there"),
    )


def _cpu_layer_rewrite(cfg: Config, hw: Hardware, key: str, *, cpu: str, gpu: str) -> Decision:
    """``on`` for CPU and ``off`` for GPU (with these reasons) unless ``cpu.<key>`` says otherwise; ``off`` with
    ``distributed.strategy: fsdp`` (:func:`check_world` refuses ``on`` there)."""
    if cfg.distributed.strategy == "fsdp" and getattr(cfg.cpu, key) == "auto":
        return Decision("off", f"distributed.strategy fsdp: {FSDP_REWRITES}")
    return _by_device(hw, f"cpu.{key}", getattr(cfg.cpu, key), cpu=("on", cpu), gpu=("off", gpu))


def choose_lean_layers(cfg: Config, hw: Hardware) -> Decision:
    """transformers' RMSNorm and SiLU-gated MLP, or kubetune's leaner versions of them (``kubetune.cpu.layers``)."""
    return _cpu_layer_rewrite(
        cfg,
        hw,
        "lean_layers",
        cpu="CPU: RMSNorm keeping only its bf16 input for backward (not two fp32 copies of the hidden state), the "
        "MLP's SiLU product formed in place, 4-bit weights dequantised into one reused buffer; same outputs, "
        "less activation memory",
        gpu="GPU: memory bandwidth makes element-wise work cheap there",
    )


def choose_split_gemms(cfg: Config, hw: Hardware) -> Decision:
    """The frozen base layers' GEMMs as they are, or split in column blocks where timing says so
    (``kubetune.cpu.gemm``)."""
    return _cpu_layer_rewrite(
        cfg,
        hw,
        "split_gemms",
        cpu="CPU: each frozen layer shape timed as one GEMM and as 2-4 column blocks at the pass's token count; a "
        "split kept where it is 1.15x faster (some shapes get a poor blocking from the GEMM library)",
        gpu="GPU: cuBLAS picks its kernels per shape",
    )


CPU_ROWS_PER_PASS = 2


def choose_micro_batch(
    cfg: Config, hw: Hardware, *, activation_bytes_per_row: int, weight_bytes: int, world: World | None = None
) -> Decision:
    """Rows per forward/backward pass on each rank. Gradient accumulation keeps the optimizer step over
    ``batch_size`` rows (over all ranks)."""
    world = world or World()
    if cfg.train.micro_batch_size:
        return Decision(cfg.train.micro_batch_size, "set in config (train.micro_batch_size)")
    share = cfg.train.batch_size // world.world_size
    of = f"this rank's {share} of train.batch_size {cfg.train.batch_size}" if world.distributed else ""
    if hw.device != "cpu":
        return Decision(share, f"GPU: the whole batch{' (' + of + ')' if of else ''} in one pass keeps the device busy")
    rows = CPU_ROWS_PER_PASS
    if share % rows:
        what = of if of else f"train.batch_size {cfg.train.batch_size}"
        return Decision(1, f"CPU: one packed row per pass ({what} is odd)")
    need = weight_bytes + rows * activation_bytes_per_row
    fits, available = fits_in_memory(hw, need)
    gib = 1 << 30
    if not fits:
        return Decision(
            1,
            f"CPU: one packed row per pass: {rows} would need an estimated {need / gib:.1f} GiB of weights + "
            f"activations, more than 80% of the {available / gib:.1f} GiB available",
        )
    return Decision(
        rows,
        f"CPU: {rows} packed rows per pass: larger GEMMs than one row's (1.09-1.12x the tokens/s of one row on "
        "SmolLM2-135M) with a fraction of the whole batch's activations; gradient accumulation keeps the optimizer "
        "step at train.batch_size rows",
    )

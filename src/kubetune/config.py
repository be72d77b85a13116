"""Typed, frozen configuration loaded from YAML, validated on load.

A config file is a YAML mapping whose sections mirror the dataclasses below (``model``, ``data``, ``pack``,
``lora``, ``quant``, ``train``, ``cpu``, ``distributed``, ``eval``, ``tracking``) plus the top-level keys ``method``
and ``output_dir``.
Every key has a default, so an empty file is a valid config (it still needs ``model.name_or_path`` and
``data.path`` before a stage can run). Overrides use dotted keys: ``--set lora.r=8 --set method=qlora``; the value
is parsed as YAML (``lora.target_modules=[q_proj,v_proj]``).

Unknown keys and bad values raise :class:`ConfigError` naming the key (and the nearest valid key for typos).
``kubetune config --explain`` prints every field with its documentation.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetune.errors import UserError

log = logging.getLogger(__name__)


class ConfigError(UserError):
    """A config key or value is wrong; the message names the key."""


def _f(
    default: Any,
    doc: str,
    *,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_min: bool = False,
):
    """A dataclass field with its documentation and value constraints."""
    meta = {
        "doc": doc,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_min": exclusive_min,
    }
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    """The base model."""

    name_or_path: str = _f(
        "",
        "Hugging Face hub id (e.g. `facebook/opt-1.3b`), a local HF folder, or a `.gguf` "
        "file (converted once and cached as an HF folder next to it or under the cache dir).",
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) to pin; ignored for local paths.")
    chat_template: str | None = _f(None, "A Jinja chat template that overrides the tokenizer's own.")
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the hub (off: only trust what you read).")
    cache_dir: str | None = _f(None, "Where hub downloads and GGUF conversions are cached (default: HF's cache).")


@dataclass(frozen=True)
class DataConfig:
    """The raw dataset and how it becomes chat messages."""

    path: str = _f("", "Local file (.jsonl/.json/.parquet/.csv), a folder of such files, or a hub dataset id.")
    format: str = _f(
        "auto",
        "Row format; `auto` detects it from the columns.",
        choices=("auto", "lima", "instruction", "alpaca", "prompt_completion", "question_answer", "messages"),
    )
    split: str = _f("train", "Split to read from a hub dataset.")
    revision: str | None = _f(None, "Hub dataset revision to pin.")
    eval_path: str | None = _f(None, "An explicit held-out file; when set, `eval_size` is not used.")
    eval_size: float = _f(0.1, "Held-out share: a fraction in (0, 1) or a row count >= 1.", minimum=0.0)
    seed: int = _f(42, "Seed of the deterministic train/eval split.")
    on_bad_rows: str = _f(
        "error",
        "`error`: stop and list the bad rows; `skip`: drop them and list them in the data report.",
        choices=("error", "skip"),
    )
    dedupe: bool = _f(True, "Remove exact duplicate conversations.")
    system_prompt: str | None = _f(None, "A system message prepended to every conversation that has none.")
    max_rows: int | None = _f(None, "Read at most this many rows (after validation), for quick trials.", minimum=1)


@dataclass(frozen=True)
class PackConfig:
    """Chat template, loss masks and packing."""

    max_length: int = _f(1024, "Tokens per packed row (and the longest example kept).", minimum=8, maximum=1 << 20)
    loss_on: str = _f(
        "assistant",
        "`assistant`: loss on assistant tokens only; `all`: every token.",
        choices=("assistant", "all"),
    )
    truncation: str = _f(
        "truncate",
        "Examples longer than `max_length`: `truncate` (keep the start), `drop` (count them in the report) or `error`.",
        choices=("truncate", "drop", "error"),
    )
    fallback_template: str = _f(
        "qa",
        "Template for tokenizers without a chat template: `qa` is the classic "
        "`Question: ...\\n\\nAnswer: ...`; `chatml` uses <|im_start|> markers.",
        choices=("qa", "chatml"),
    )
    packing: bool = _f(True, "Best-fit-decreasing packing of several examples per row (isolated by position ids).")
    num_proc: int = _f(0, "Tokenisation processes; 0 picks from the available cores.", minimum=0, maximum=1024)


@dataclass(frozen=True)
class LoraConfig:
    """PEFT LoRA adapter settings (also used by QLoRA)."""

    r: int = _f(16, "LoRA rank.", minimum=1, maximum=65536)
    alpha: float = _f(
        32,
        "LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with rsLoRA).",
        minimum=0.0,
        exclusive_min=True,
    )
    dropout: float = _f(
        0.05, "Dropout on the LoRA input; 0 enables PEFT's faster no-dropout path.", minimum=0.0, maximum=1.0
    )
    target_modules: list[str] | str = _f("all-linear", "`all-linear` or a list of module names, e.g. [q_proj, v_proj].")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    bias: str = _f("none", "Which biases to train.", choices=("none", "all", "lora_only"))


@dataclass(frozen=True)
class QuantConfig:
    """bitsandbytes quantisation of the frozen base (method: qlora)."""

    bits: int = _f(4, "4 (QLoRA) or 8.", choices=(4, 8))
    quant_type: str = _f("nf4", "4-bit data type.", choices=("nf4", "fp4"))
    double_quant: bool = _f(True, "Quantise the quantisation constants too (saves ~0.4 bit/param).")
    compute_dtype: str = _f("bfloat16", "Dtype of the dequantised matmuls.", choices=("bfloat16", "float16", "float32"))


@dataclass(frozen=True)
class TrainConfig:
    """The SFT run (TRL SFTTrainer)."""

    max_steps: int = _f(-1, "Optimizer steps; -1 trains for `epochs`.", minimum=-1)
    epochs: float = _f(1.0, "Epochs over the packed rows when `max_steps` is -1.", minimum=0.0, exclusive_min=True)
    batch_size: int = _f(
        4,
        "Packed rows per step over all processes (the global batch): under torchrun each of N ranks takes "
        "batch_size / N of them, so it must be a multiple of the world size. The optimizer steps once per "
        "`batch_size` x `grad_accum` rows, whatever the number of ranks.",
        minimum=1,
        maximum=1 << 20,
    )
    micro_batch_size: int = _f(
        0,
        "Rows per forward/backward pass; `batch_size` must be a multiple. 0 picks: 1 on CPU (activations stay "
        "1/batch_size the size, for a small loss of speed in bf16), the whole batch on GPU. The optimizer "
        "still steps once per `batch_size` x `grad_accum` rows, with the same token-weighted loss.",
        minimum=0,
        maximum=1 << 20,
    )
    grad_accum: int = _f(1, "Gradient accumulation steps.", minimum=1, maximum=1 << 20)
    learning_rate: float = _f(1e-4, "Peak learning rate.", minimum=0.0, exclusive_min=True, maximum=1.0)
    lr_scheduler: str = _f(
        "cosine", "Learning-rate schedule.", choices=("cosine", "linear", "constant", "constant_with_warmup")
    )
    warmup_ratio: float = _f(0.03, "Share of steps spent warming up.", minimum=0.0, maximum=1.0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", minimum=0.0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).", minimum=0.0)
    seed: int = _f(42, "Seed for initialisation, data order and dropout.")
    precision: str = _f(
        "auto",
        "`auto` picks from the hardware: CUDA -> bf16 (fp16 without bf16); CPU with AMX -> bf16; CPU with "
        "AVX512-BF16 but no AMX -> bf16 if a 0.3 s matmul probe finds it at least 1.3x faster than fp32, else "
        "fp32; other CPUs -> fp32.",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    activation_checkpointing: str = _f(
        "auto", "`auto` turns it on only when memory requires it.", choices=("auto", "on", "off")
    )
    threads: int = _f(0, "Torch intra-op threads; 0 uses the cores this process may run on.", minimum=0, maximum=4096)
    optim: str = _f(
        "auto",
        "Optimizer: `auto` picks fused AdamW where torch supports it, else AdamW.",
        choices=("auto", "adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit"),
    )
    compile: bool = _f(False, "torch.compile the model (pays off only on long runs).")
    logging_steps: int = _f(1, "Log loss and throughput every N steps.", minimum=1)
    save_steps: int = _f(50, "Checkpoint every N steps (and always at the end).", minimum=1)
    save_total_limit: int = _f(2, "Checkpoints kept.", minimum=1)
    checkpoint_dir: str | None = _f(
        None,
        "Where checkpoints go (default: `<output_dir>/checkpoints`); point it at storage that outlives the pod.",
    )
    resume: str = _f(
        "auto",
        "`auto`: continue from the newest valid checkpoint; `never`: start fresh; or a checkpoint path.",
    )
    preempt_grace_s: float = _f(25.0, "Seconds allowed to save a checkpoint after SIGTERM.", minimum=1.0)
    merge: bool = _f(False, "Also save base + adapter merged into one model.")


@dataclass(frozen=True)
class CpuConfig:
    """kubetune's CPU kernels for training (`kubetune.cpu`): each `auto` is on for a CPU and off on a GPU."""

    lm_head: str = _f(
        "auto",
        "How the LM head and loss are computed. `trl`: TRL's fused head (vocabulary tiles; on GPUs a Triton kernel "
        "that scores only loss-carrying positions). `chunked`: kubetune's token-chunked head that scores only "
        "loss-carrying positions with one GEMM and one logsumexp per chunk of tokens (faster on CPUs, same "
        "loss). `auto`: `chunked` on CPU, `trl` on GPU.",
        choices=("auto", "chunked", "trl"),
    )
    dropout_sampler: str = _f(
        "auto",
        "How LoRA dropout draws its masks. `torch`: PEFT's nn.Dropout, one random number per element. `bulk`: "
        "kubetune's sampler, one 64-bit draw per three elements (about 2x faster on CPUs; the drop probability is "
        "rounded to a multiple of 1/65536, 0.05 -> 0.0500031). `auto`: `bulk` on CPU, `torch` on GPU (where dropout "
        "costs little).",
        choices=("auto", "bulk", "torch"),
    )
    lean_layers: str = _f(
        "auto",
        "Whether the decoder's RMSNorm and SiLU-gated MLP run through kubetune's leaner forward/backward "
        "(`kubetune.cpu.layers`: same outputs, fewer passes over memory, 0.1 GiB less activation memory per "
        "512-token row of a 135M model). `auto`: `on` on CPU, `off` on GPU (fused kernels there).",
        choices=("auto", "on", "off"),
    )
    split_gemms: str = _f(
        "auto",
        "Whether the frozen base layers' GEMMs may run as a few narrower GEMMs where that is faster on this machine "
        "(`kubetune.cpu.gemm`: each distinct layer shape timed at start, about a second; a split kept only where it is "
        "1.15x faster; same products). `auto`: `on` on CPU, `off` on GPU.",
        choices=("auto", "on", "off"),
    )


@dataclass(frozen=True)
class DistributedConfig:
    """`kubetune train` under torchrun (torch.distributed); ignored by a single process."""

    backend: str = _f(
        "auto",
        "Collective backend. `auto`: `gloo` on CPU, `nccl` on CUDA. `ccl` (Intel oneCCL) needs the "
        "`oneccl_bindings_for_pytorch` package, which has no release for the pinned torch on PyPI; asking for it "
        "without the package is an error.",
        choices=("auto", "gloo", "nccl", "ccl"),
    )
    timeout_s: float = _f(
        600.0,
        "Seconds any collective (gradient all-reduce, barrier, the start-up handshake) may wait for the other "
        "ranks before the job fails: a rank that died or a lost node ends the job within this time instead of "
        "hanging it. Keep it above the longest the writer works alone (sealing a checkpoint).",
        minimum=10.0,
    )
    strategy: str = _f(
        "ddp",
        "`ddp`: every rank holds the whole model and only the adapter's gradients are all-reduced. `fsdp`: the "
        "frozen base is sharded over the ranks (FSDP2, one unit per decoder layer), for a LoRA base that does not "
        "fit one device; the adapter stays whole on every rank and checkpoints are those of `ddp`, so a run resumes "
        "on any number of ranks. One process trains as plain. Refused for QLoRA (4-bit bases do not shard) and with "
        "`cpu.lean_layers`/`cpu.split_gemms` set to on (they are off under fsdp). See the README's multi-process "
        "section.",
        choices=("ddp", "fsdp"),
    )


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation of base vs adapter."""

    max_rows: int = _f(64, "Held-out rows scored for loss/perplexity.", minimum=1)
    num_samples: int = _f(4, "Generation samples shown side by side (base vs adapter).", minimum=0)
    prompts: list[str] = _f([], "Extra fixed prompts to generate for in every report.")
    max_new_tokens: int = _f(64, "Tokens generated per sample.", minimum=1)
    batch_size: int = _f(8, "Rows per forward pass when scoring.", minimum=1)


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking and the model registry."""

    uri: str | None = _f(
        None,
        "Tracking URI; default `MLFLOW_TRACKING_URI`, else a local sqlite store `sqlite:///<output_dir>/mlflow.db`.",
    )
    experiment: str = _f("kubetune", "MLflow experiment name.")
    run_name: str | None = _f(None, "MLflow run name (default: generated).")
    registered_model: str | None = _f(None, "Registered model name (default: `kubetune-<model basename>`).")
    min_improvement: float = _f(
        0.0,
        "Promote to `champion` only if eval loss beats the champion's (or the base model's) by at least this much.",
        minimum=0.0,
    )
    enabled: bool = _f(True, "Set false to skip MLflow entirely.")


@dataclass(frozen=True)
class Config:
    """A whole fine-tune."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "The base model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "The dataset."})
    pack: PackConfig = field(default_factory=PackConfig, metadata={"doc": "Tokenisation and packing."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"doc": "LoRA adapter."})
    quant: QuantConfig = field(default_factory=QuantConfig, metadata={"doc": "QLoRA quantisation."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "Training."})
    cpu: CpuConfig = field(default_factory=CpuConfig, metadata={"doc": "CPU kernels for training."})
    distributed: DistributedConfig = field(
        default_factory=DistributedConfig, metadata={"doc": "Training on several processes (torchrun)."}
    )
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"doc": "Evaluation."})
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"doc": "MLflow."})
    method: str = _f(
        "lora",
        "`lora` (full-precision base) or `qlora` (bitsandbytes-quantised base).",
        choices=("lora", "qlora"),
    )
    output_dir: str = _f("runs/default", "Folder for every stage's output (prepared, packed, adapter, eval, ...).")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys to values, e.g. {'lora.r': 16, ...}: MLflow params and fingerprints use it."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                key = f"{prefix}{f.name}"
                if dataclasses.is_dataclass(value):
                    walk(key + ".", value)
                else:
                    out[key] = value

        walk("", self)
        return out

    def replace(self, **overrides: Any) -> Config:
        """A copy with dotted-key overrides applied and validated: ``cfg.replace(**{'lora.r': 8})``."""
        return from_dict(merge(self.to_dict(), _dotted_to_nested(overrides, source="override")))


# --------------------------------------------------------------------------------------------------------------
# Loading and validation


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise (
            errors[0]
            if len(errors) == 1
            else ConfigError(f"config key `{key}`: {value!r} has the wrong type; expected {_type_name(tp)}")
        )
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key `{key}`: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key `{key}`: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key `{key}`: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"config key `{key}`: expected a finite number, got {value!r}")
            return value
        raise ConfigError(f"config key `{key}`: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key `{key}`: expected a string, got {value!r}")
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a programming error, not user input


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_bounds(value: Any, f: dataclasses.Field, key: str) -> None:
    meta = f.metadata
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean `{near[0]}`?)" if near else ""
        raise ConfigError(f"config key `{key}`: {value!r} is not one of {', '.join(map(str, choices))}{hint}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        lo, hi = meta.get("minimum"), meta.get("maximum")
        if lo is not None and (value < lo or (meta.get("exclusive_min") and value == lo)):
            op = ">" if meta.get("exclusive_min") else ">="
            raise ConfigError(f"config key `{key}`: {value!r} must be {op} {lo}")
        if hi is not None and value > hi:
            raise ConfigError(f"config key `{key}`: {value!r} must be <= {hi}")


# Messages quote keys between backticks; a backtick in a key from the input is shown escaped so the quote still ends
# where the key does.
_ESCAPED = {"`": "\\x60"}


def _printable(key: Any) -> str:
    """A key from the input as it can be shown on one line between backticks (line breaks, control characters and
    backticks escaped)."""
    return "".join(_ESCAPED.get(c) or (c if c.isprintable() else repr(c)[1:-1]) for c in str(key))


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key `{prefix.rstrip('.') or '<root>'}`: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = _printable(unknown[0])
        near = difflib.get_close_matches(key, list(fields), n=1)
        hint = f"; did you mean `{prefix}{near[0]}`?" if near else f"; valid keys: {', '.join(fields)}"
        raise ConfigError(f"unknown config key `{prefix}{key}`{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key = f"{prefix}{name}"
        tp = hints[name]
        if _is_section(tp):
            kwargs[name] = _build(tp, data[name], key + ".")
        else:
            value = data[name]
            if isinstance(value, bool) and tp is str and {"on", "off"} <= set(f.metadata.get("choices") or ()):
                value = "on" if value else "off"  # YAML reads a bare on/off as a boolean
            value = _coerce(value, tp, key)
            _check_bounds(value, f, key)
            kwargs[name] = value
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    """Cross-field rules; each names the keys in conflict."""
    lora = cfg.lora
    if isinstance(lora.target_modules, str) and lora.target_modules != "all-linear":
        raise ConfigError(
            "config key `lora.target_modules`: use `all-linear` or a list such as [q_proj, v_proj], "
            f"got {lora.target_modules!r}"
        )
    if isinstance(lora.target_modules, list) and not lora.target_modules:
        raise ConfigError("config key `lora.target_modules`: the list is empty; name at least one module")
    if cfg.train.micro_batch_size and cfg.train.batch_size % cfg.train.micro_batch_size:
        raise ConfigError(
            f"config key `train.micro_batch_size`: {cfg.train.micro_batch_size} does not divide "
            f"`train.batch_size` {cfg.train.batch_size}; use a divisor, or 0 to choose automatically"
        )
    if cfg.data.eval_size >= 1 and not float(cfg.data.eval_size).is_integer():
        raise ConfigError(
            f"config key `data.eval_size`: {cfg.data.eval_size} is neither a fraction in (0, 1) nor a whole row count"
        )
    if cfg.method == "qlora" and cfg.quant.bits == 8 and cfg.lora.use_dora:
        raise ConfigError(
            "config keys `method: qlora` with `quant.bits: 8` and `lora.use_dora: true` do not "
            "combine; drop DoRA or use 4 bits"
        )
    if cfg.train.precision == "fp16" and cfg.method == "qlora" and cfg.quant.compute_dtype == "bfloat16":
        raise ConfigError(
            "config keys `train.precision: fp16` and `quant.compute_dtype: bfloat16` disagree; "
            "set `quant.compute_dtype: float16`"
        )


# Keys that moved, old -> new: still read, with a one-line warning naming the new key.
MOVED_KEYS = {f"train.{k}": f"cpu.{k}" for k in ("lm_head", "dropout_sampler", "lean_layers", "split_gemms")}
# train.ipex: intel-extension-for-pytorch 2.8 (its last release, end-of-life upstream) aborts on import beside the
# pinned torch ("needs to work with PyTorch 2.8.*"), so kubetune dropped it; stock PyTorch uses AMX through oneDNN.
_REMOVED_KEYS = {
    "train.ipex": "intel-extension-for-pytorch is end-of-life and does not import beside the pinned torch; stock "
    "PyTorch uses AMX through oneDNN",
}


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with moved keys under their new names (with a warning) and removed keys dropped where they
    asked for nothing (set to a false value), else a ConfigError naming the key."""
    train = data.get("train")
    if not isinstance(train, dict):
        return data
    train = dict(train)
    data = {**data, "train": train}
    for old, why in _REMOVED_KEYS.items():
        name = old.split(".", 1)[1]
        if name in train:
            if train.pop(name):
                raise ConfigError(f"config key `{old}`: removed ({why}); delete the key")
            log.warning("config key `%s` is no longer used (%s); delete the key", old, why)
    for old, new in MOVED_KEYS.items():
        name = old.split(".", 1)[1]
        if name not in train:
            continue
        section, key = new.split(".")
        moved = data.get(section)
        moved = dict(moved) if isinstance(moved, dict) else {}
        if key in moved:
            raise ConfigError(f"config keys `{old}` and `{new}` are both set; keep `{new}` only")
        moved[key] = train.pop(name)
        data[section] = moved
        log.warning("config key `%s` is deprecated; write `%s` instead", old, new)
    return data


def from_dict(data: dict[str, Any] | None, source: str = "config") -> Config:
    """Build and validate a Config from a nested mapping."""
    cfg = _build(Config, _upgrade(data or {}), "")
    _validate(cfg)
    return cfg


def _dotted_to_nested(pairs: dict[str, Any], source: str) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in pairs.items():
        parts = dotted.split(".")
        if not all(parts):
            raise ConfigError(f"{source} `{_printable(dotted)}`: empty key segment; write KEY=VALUE like `lora.r=8`")
        cur = nested
        for p in parts[:-1]:
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{source} `{_printable(dotted)}`: `{_printable(p)}` is a value, not a section")
            cur = nxt
        cur[parts[-1]] = value
    return nested


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, section by section (neither is modified)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["lora.r=8", "lora.target_modules=[q_proj,v_proj]"]`` -> nested dict; values are parsed as YAML."""
    pairs: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set `{_printable(item)}`: expected KEY=VALUE, e.g. `lora.r=8`")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        pairs[key.strip()] = value
    return _dotted_to_nested(pairs, source="--set")


def layer(
    data: Mapping[str, Any] | None,
    named: Mapping[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """The one config layering, lowest first: ``data`` (a config file's or ``config_yaml``'s mapping) < ``named``
    (dotted key -> value: the pipeline's named parameters) < ``overrides`` (``--set KEY=VALUE`` items).

    Returns the merged mapping, not yet validated (``from_dict`` does that, so each caller can say which layer a
    bad value came from). A malformed override raises ConfigError naming it.
    """
    merged = dict(data or {})
    if named:
        merged = merge(merged, _dotted_to_nested(dict(named), source="config key"))
    if overrides:
        merged = merge(merged, parse_overrides(overrides))
    return merged


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (optional), apply ``--set`` overrides, validate, return a frozen Config."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p}: not found; pass an existing YAML file (see configs/ for presets)")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {p}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {p}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    if path is not None:
        try:
            data = _upgrade(data)  # once, so that a moved key is warned about once
            from_dict(data)  # errors in the file itself are reported against the file
        except ConfigError as err:
            raise ConfigError(f"config file {path}: {err}") from None
    try:
        return from_dict(layer(data, overrides=overrides))
    except ConfigError as err:
        if overrides and not str(err).startswith("--set"):
            raise ConfigError(f"--set: {err}") from None
        raise


def dump(cfg: Config) -> str:
    """The fully resolved config as YAML (what a run records next to its outputs)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def explain() -> str:
    """Every key, its default and its documentation, for `kubetune config --explain`."""
    lines: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if _is_section(tp):
                lines.append(f"\n[{prefix}{f.name}]  {tp.__doc__.strip()}")
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  {prefix}{f.name} = {default!r}\n      {f.metadata.get('doc', '')}")

    walk(Config, "")
    return "\n".join(lines).lstrip()

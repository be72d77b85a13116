"""Answering prompts with a base model plus a LoRA adapter, or with a merged model.

``generate`` is what ``kubetune generate`` calls; ``evaluate`` uses the same pieces (``load``, ``render_prompt``,
``generate_texts``) so that samples in the eval report are produced exactly as a user would produce them.

What a model folder may be:
- an adapter folder from ``kubetune train`` (it has ``adapter_config.json``): the base is loaded from the adapter's
  ``base_model.json`` (the base it was trained on wins over ``model.name_or_path``), then the adapter on top;
- a merged model (``<adapter>/merged`` or any Hugging Face model folder, detected by the absence of
  ``adapter_config.json``): loaded as is.

Prompts are formatted with the chat template of the tokenizer that packed the training data (pass ``tokenizer_dir`` =
``<packed>/tokenizer``; otherwise the tokenizer saved beside the adapter or merged model, then the base model's), with
the generation prompt appended, so the model sees prompts exactly as in training. Decoding is greedy, batched, with
left padding; generation stops at the end-of-sequence token or the template's end-of-turn token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.config import ModelConfig, QuantConfig
from kubetune.errors import UserError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
BASE_MODEL_JSON = "base_model.json"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
_SENTINEL = "kubetune-end-of-turn-probe"


def is_adapter(path: str | Path) -> bool:
    """True for a PEFT adapter folder, False for a full (e.g. merged) model folder."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_base_reference(adapter_dir: str | Path) -> dict[str, Any]:
    """``base_model.json`` of an adapter folder: ``{"name_or_path", "revision", "resolved_path", ...}``."""
    p = Path(adapter_dir) / BASE_MODEL_JSON
    try:
        ref = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{p}: not found; the adapter folder must come from `kubetune train` (it records the base "
            "model it was trained on)"
        ) from None
    except (OSError, ValueError) as err:
        raise UserError(f"{p}: unreadable ({err}); re-run `kubetune train` to rewrite the adapter") from None
    if not isinstance(ref, dict) or not (ref.get("resolved_path") or ref.get("name_or_path")):
        raise UserError(f"{p}: names no base model (needs `name_or_path` or `resolved_path`); re-run `kubetune train`")
    return ref


def base_model_config(cfg_model: ModelConfig, adapter_dir: str | Path) -> ModelConfig:
    """The ModelConfig that loads the base ``adapter_dir`` was trained on.

    The recorded ``resolved_path`` is used when it exists here (a local folder or a converted GGUF); a hub base is
    loaded by id at the recorded revision; otherwise the original ``name_or_path`` is resolved again (a ``.gguf``
    file is converted once more). ``cfg_model`` supplies the other settings (cache dir, trust_remote_code, chat
    template override).
    """
    ref = read_base_reference(adapter_dir)
    source = str(ref.get("name_or_path") or ref.get("resolved_path"))
    resolved = str(ref.get("resolved_path") or source)
    if ref.get("local", True):
        if Path(resolved).exists():
            name, revision = resolved, None
        elif source.startswith("pkg://") or Path(source).expanduser().exists():
            name, revision = source, None  # resolved again when loaded (a .gguf is converted once more)
        else:
            raise UserError(
                f"{Path(adapter_dir) / BASE_MODEL_JSON}: the base model this adapter was trained on "
                f"({source}, resolved to {resolved}) is not on this machine; copy it there or run where "
                "it is"
            )
    else:
        name, revision = resolved, ref.get("revision")
    wanted = cfg_model.name_or_path.strip()
    if wanted and wanted not in (source, resolved, name):
        log.warning(
            "config names model %s but adapter %s was trained on %s; using the adapter's base",
            wanted,
            adapter_dir,
            source,
        )
    return dataclasses.replace(cfg_model, name_or_path=name, revision=revision)


def inference_settings(dtype: str | None = None, device: str | None = None) -> tuple[str, str]:
    """(device, dtype) for scoring and generation: CUDA when present with its best half precision, else CPU in
    fp32 (exact, and on CPUs without AMX also the fastest). Explicit values win."""
    from kubetune.hardware import detect
    from kubetune.plan import choose_precision

    if device is None or (dtype is None and device == "cuda"):
        hw = detect(measure=False)
        device = device or hw.device
        if dtype is None and device == "cuda":
            dtype = choose_precision(hw, "auto").value
    return device, dtype or "fp32"


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(cfg_model: ModelConfig, model_dir: str | Path, tokenizer_dir: str | Path | None = None):
    """The tokenizer for prompts: ``tokenizer_dir``, else the one saved in ``model_dir`` (or its parent, for
    ``<adapter>/merged``), else the base model's. A pad token is guaranteed; padding is on the left."""
    from transformers import AutoTokenizer

    from kubetune import models

    model_dir = Path(model_dir)
    candidates = [Path(tokenizer_dir)] if tokenizer_dir else [model_dir]
    if not tokenizer_dir and is_adapter(model_dir.parent):  # <adapter>/merged: the adapter keeps the tokenizer
        candidates.append(model_dir.parent)
    tok = None
    for d in candidates:
        if _has_tokenizer(d):
            try:
                tok = AutoTokenizer.from_pretrained(str(d), trust_remote_code=cfg_model.trust_remote_code)
            except (OSError, ValueError) as err:
                raise UserError(
                    f"tokenizer folder {d}: cannot be loaded ({err}); re-run the stage that wrote it"
                ) from None
            if cfg_model.chat_template:
                tok.chat_template = cfg_model.chat_template
            break
        if tokenizer_dir:
            raise UserError(f"tokenizer folder {d}: no tokenizer files; pass the packed dataset's `tokenizer/` folder")
    if tok is None:
        base_cfg = (
            base_model_config(cfg_model, model_dir)
            if is_adapter(model_dir)
            else dataclasses.replace(cfg_model, name_or_path=str(model_dir))
        )
        tok = models.load_tokenizer(base_cfg)
    if tok.pad_token_id is None:
        # Pads are masked out; any existing token will do.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "left"
    return tok


@dataclass
class Loaded:
    """A model ready for inference. For an adapter, ``model`` is a ``PeftModel``: use ``model.disable_adapter()``
    to get the base model's outputs from the same weights."""

    model: Any
    tokenizer: Any
    is_adapter: bool
    device: str
    dtype: str
    base: ModelConfig


def load(
    cfg_model: ModelConfig,
    model_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    dtype: str | None = None,
    quant: QuantConfig | None = None,
    device: str | None = None,
    threads: int = 0,
) -> Loaded:
    """Load an adapter on its base (or a merged model) in eval mode. ``quant`` loads the base quantised (QLoRA).

    On CPU, torch runs ``threads`` intra-op threads (0: the cores this process may use, as training does; torch's
    own default is the host's core count, far too many in a CPU-limited pod).
    """
    import torch

    from kubetune import models
    from kubetune.hardware import usable_cores

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(
            f"model folder {model_dir}: not found; pass an adapter folder from `kubetune train` or a "
            "merged model folder"
        )
    device, dtype = inference_settings(dtype, device)
    if device == "cpu":
        torch.set_num_threads(threads or usable_cores())
    adapter = is_adapter(model_dir)
    base_cfg = (
        base_model_config(cfg_model, model_dir)
        if adapter
        else dataclasses.replace(cfg_model, name_or_path=str(model_dir), revision=None)
    )
    tokenizer = load_tokenizer(cfg_model, model_dir, tokenizer_dir)
    started = time.monotonic()
    model = models.load_model(base_cfg, dtype=dtype, quant=quant, device=device)
    if adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(model_dir), is_trainable=False)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise UserError(
                f"adapter folder {model_dir}: cannot be applied to base {base_cfg.name_or_path} "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); was it trained on "
                "another base?"
            ) from None
    model.eval()
    log.info(
        "loaded %s%s on %s in %s (%.1f s)",
        base_cfg.name_or_path,
        f" + adapter {model_dir}" if adapter else "",
        device,
        dtype + (f", {quant.bits}-bit base" if quant else ""),
        time.monotonic() - started,
    )
    return Loaded(model, tokenizer, adapter, device, dtype, base_cfg)


def render_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> str:
    """The chat-formatted prompt text for ``messages`` (ending before the answer), generation prompt appended."""
    if not tokenizer.chat_template:
        raise UserError(
            "the tokenizer has no chat template; pass the packed dataset's `tokenizer/` folder (it "
            "holds the template used in training) or set `model.chat_template`"
        )
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an answer: end-of-sequence (tokenizer and model generation config) and the special token
    the chat template puts right after an assistant message (e.g. ``<|im_end|>``)."""
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, list | tuple) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)

    add(tokenizer.eos_token_id)
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        add(gen_cfg.eos_token_id)
    if tokenizer.chat_template:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
            )
        except Exception:  # a template may reject this probe (strict role checks); the eos tokens still stop it
            text = ""
        if _SENTINEL in text:
            tail = text.split(_SENTINEL, 1)[1]
            tail_ids = tokenizer(tail, add_special_tokens=False).input_ids if tail else []
            if tail_ids and tail_ids[0] in tokenizer.all_special_ids:
                add(tail_ids[0])
    return ids


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    stop_ids: Sequence[int] | None = None,
    max_prompt_tokens: int | None = None,
    add_special_tokens: bool = False,
    desc: str = "generating",
) -> list[str]:
    """Greedy answers to already formatted ``prompts``, in order.

    Prompts are batched longest first with left padding (few pads, one compiled shape per batch); a prompt longer
    than ``max_prompt_tokens`` keeps its last tokens (logged). Each answer is decoded up to its first stop token,
    without special tokens, stripped.
    """
    import torch
    from transformers import GenerationConfig

    if not prompts:
        return []
    stop = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens).input_ids for p in prompts]
    if max_prompt_tokens:
        cut = [i for i, ids in enumerate(encoded) if len(ids) > max_prompt_tokens]
        if cut:
            log.warning(
                "%d prompt(s) longer than %d tokens keep only their last %d tokens",
                len(cut),
                max_prompt_tokens,
                max_prompt_tokens,
            )
            for i in cut:
                encoded[i] = encoded[i][-max_prompt_tokens:]
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stop or None, pad_token_id=pad_id
    )
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    answers: list[str] = [""] * len(encoded)
    started = time.monotonic()
    done = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = encoded[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=gen_cfg
            )
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            end = next((k for k, t in enumerate(new) if t in stop), len(new))
            answers[i] = tokenizer.decode(new[:end], skip_special_tokens=True).strip()
        done += len(idx)
        log.info("%s: %d/%d prompts (%.1f s)", desc, done, len(encoded), time.monotonic() - started)
    return answers


@dataclass(frozen=True)
class Answer:
    """One prompt's answers: ``base`` is the base model's (None for a merged model, or when not asked for),
    ``tuned`` the adapter's on that base, or the merged model's."""

    prompt: str
    tuned: str
    base: str | None = None


def generate(
    cfg_model: ModelConfig,
    adapter_or_merged_dir: str | Path,
    prompts: list[str],
    **kwargs: Any,
) -> list[str]:
    """Answer each prompt (a user message) with the adapter on its base, or with a merged model.

    Takes the keyword arguments of :func:`answer`, but ``with_base``; returns the answers in order.
    """
    return [a.tuned for a in answer(cfg_model, adapter_or_merged_dir, prompts, with_base=False, **kwargs)]


def answer(
    cfg_model: ModelConfig,
    adapter_or_merged_dir: str | Path,
    prompts: list[str],
    *,
    with_base: bool = True,
    max_new_tokens: int = 64,
    system_prompt: str | None = None,
    raw: bool = False,
    tokenizer_dir: str | Path | None = None,
    batch_size: int = 8,
    dtype: str | None = None,
    quant: QuantConfig | None = None,
    device: str | None = None,
    threads: int = 0,
) -> list[Answer]:
    """Answer each prompt (a user message) with the adapter on its base, or with a merged model, and (``with_base``,
    for an adapter folder) with the base model alone, from the same loaded weights (the adapter disabled).

    ``system_prompt`` is prepended as a system message (use the one the training data had, ``data.system_prompt``).
    ``raw=True`` feeds the prompts as plain text, without the chat template. ``quant`` loads the base quantised, as
    a QLoRA adapter was trained; by default the base loads in full precision (``dtype``, fp32 on CPU).
    """
    if not prompts:
        return []
    loaded = load(
        cfg_model,
        adapter_or_merged_dir,
        tokenizer_dir=tokenizer_dir,
        dtype=dtype,
        quant=quant,
        device=device,
        threads=threads,
    )
    if raw:
        texts = list(prompts)
    else:
        prefix = [{"role": "system", "content": system_prompt}] if system_prompt else []
        texts = [render_prompt(loaded.tokenizer, [*prefix, {"role": "user", "content": p}]) for p in prompts]

    def run(model, desc: str) -> list[str]:
        return generate_texts(
            model,
            loaded.tokenizer,
            texts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            add_special_tokens=raw,
            desc=desc,
        )

    model = loaded.model
    base: list[str | None] = [None] * len(prompts)
    if with_base and loaded.is_adapter:
        with model.disable_adapter():
            base = list(run(model, "base model"))
    if loaded.is_adapter and quant is None:
        model = model.merge_and_unload()  # the same function, one matmul per layer instead of three
    tuned = run(model, "adapter" if loaded.is_adapter else "merged model")
    return [Answer(p, t, b) for p, t, b in zip(prompts, tuned, base, strict=True)]

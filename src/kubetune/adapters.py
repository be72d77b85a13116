"""The LoRA adapter: PEFT's config from ``lora:``, and the checks of that config against the base model."""

from __future__ import annotations

from kubetune.config import Config
from kubetune.errors import UserError


def lora_config(cfg: Config):
    from peft import LoraConfig

    lora = cfg.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules),
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )


def check_rank(cfg: Config, model_config) -> None:
    width = getattr(model_config, "hidden_size", None) or getattr(model_config, "d_model", None)
    if isinstance(width, int) and cfg.lora.r > width:
        raise UserError(
            f"config key `lora.r`: {cfg.lora.r} exceeds the model's hidden size {width}; a rank above the layer "
            "width adds parameters but no capacity (typical ranks: 8-64)"
        )


def check_target_modules(cfg: Config, model) -> None:
    """Every module named in ``lora.target_modules`` exists (PEFT matches a name against the end of a module's path;
    a name that matches nothing would only fail deep inside PEFT, or be silently ignored beside one that does)."""
    targets = cfg.lora.target_modules
    if isinstance(targets, str):
        return
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        import torch

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(
            f"config key `lora.target_modules`: {', '.join(missing)} not found in {cfg.model.name_or_path}; its "
            f"linear layers are {', '.join(linear[:20]) or 'none'} (or use `all-linear`)"
        )

"""Chat templates: the fallbacks for tokenizers that have none, and which template a run applies.

The fallbacks live in ``chat_templates/<name>.jinja`` (shipped as package data). Both wrap assistant content
in ``{% generation %}...{% endgeneration %}``, so
``tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)`` yields exactly the loss mask that
the pack stage computes.

- ``qa``: ``Question: {user}\\n\\nAnswer: {assistant}{eos}``, the classic recipe for base models (OPT,
  Llama base).
- ``chatml``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` turns (plus eos after assistant turns when
  eos is not ``<|im_end|>``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from kubetune.errors import UserError

FALLBACKS = ("qa", "chatml")

# The same test transformers applies before it tracks generation blocks.
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


def fallback_template(name: str) -> str:
    """The Jinja text of a fallback template (``qa`` or ``chatml``)."""
    if name not in FALLBACKS:
        raise UserError(f"config key `pack.fallback_template`: {name!r} is not one of {', '.join(FALLBACKS)}")
    return resources.files("kubetune").joinpath("chat_templates", f"{name}.jinja").read_text(encoding="utf-8")


def has_generation_markers(template: str) -> bool:
    """True when the template marks assistant output with ``{% generation %}`` blocks."""
    return bool(_GENERATION_RE.search(template))


@dataclass(frozen=True)
class ChatTemplate:
    """The template a run applies, and where it came from.

    ``source`` is ``model`` (the tokenizer's own), ``config`` (``model.chat_template``) or ``fallback``
    (``pack.fallback_template``, named in ``name``).
    """

    text: str
    source: str
    name: str

    @property
    def has_generation_markers(self) -> bool:
        return has_generation_markers(self.text)

    def describe(self) -> str:
        return {"model": "the model's own", "config": "model.chat_template from the config"}.get(
            self.source, f"fallback `{self.name}`"
        )


def choose(tokenizer, chat_template_override: str | None, fallback: str) -> ChatTemplate:
    """The template to apply: the config's override, else the tokenizer's own, else the named fallback.

    ``tokenizer`` is one returned by :func:`kubetune.models.load_tokenizer`, which has already installed the
    override as ``tokenizer.chat_template``.
    """
    own = tokenizer.chat_template
    if isinstance(own, dict):  # several named templates: the conversation one is `default`
        own = own.get("default")
    if chat_template_override:
        return ChatTemplate(chat_template_override, "config", "config")
    if own:
        return ChatTemplate(own, "model", "model")
    return ChatTemplate(fallback_template(fallback), "fallback", fallback)

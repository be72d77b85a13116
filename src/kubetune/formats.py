"""Row formats: detection from the columns and normalisation of one row to chat messages.

Every supported row format becomes the same thing: a list of ``{"role", "content"}`` dicts in which
roles alternate ``user``/``assistant`` after an optional leading ``system`` message, and the last message
is an assistant reply. Content is kept verbatim (no stripping: the model learns exactly what the data says).

Formats (required fields; extra fields are ignored):

=====================  ===============================================================================
``messages``           ``messages``: list of ``{"role", "content"}`` (roles system/user/assistant); the
                       ShareGPT spelling ``{"from", "value"}`` with ``human``/``gpt`` also works, under
                       ``messages`` or ``conversations``. Content may be a string or a list of text parts.
``lima``               ``conversations``: list of strings, alternating user/assistant, multi-turn.
``alpaca``             ``instruction``, ``output``; optional ``input`` (appended to the instruction after a
                       blank line), ``system`` and ``history`` (list of ``[user, assistant]`` pairs).
``instruction``        ``instruction``, ``response``; optional ``system``.
``prompt_completion``  ``prompt``, ``completion`` (strings, or lists of messages as in TRL's conversational
                       prompt-completion format); optional ``system``.
``question_answer``    ``question``, ``answer``; optional ``system``.
=====================  ===============================================================================

A row that cannot be normalised raises :class:`RowError` with a short ``code`` (the report groups by it) and a
one-line ``reason`` naming the field.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

FORMATS = ("messages", "lima", "alpaca", "instruction", "prompt_completion", "question_answer")

# Detection order matters where columns overlap: `instruction`+`output` is Alpaca even when a `response`
# column is also present; chat columns win over everything.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "lima": ("conversations",),
    "alpaca": ("instruction", "output"),
    "instruction": ("instruction", "response"),
    "prompt_completion": ("prompt", "completion"),
    "question_answer": ("question", "answer"),
}

FORMAT_HINT = (
    "expected `messages`, `conversations` (LIMA), `instruction`+`output` (Alpaca), "
    "`instruction`+`response`, `prompt`+`completion` or `question`+`answer`"
)

# Human-readable headings of the reason codes, for reports.
REASONS = {
    "invalid_json": "not valid JSON",
    "not_utf8": "not UTF-8 text",
    "not_object": "not an object",
    "missing_field": "missing field",
    "empty_field": "empty field",
    "wrong_type": "wrong type",
    "invalid_text": "invalid Unicode text",
    "bad_role": "unknown role",
    "roles_out_of_order": "roles out of order",
    "no_assistant": "no assistant turn",
    "ends_with_user": "ends with a user turn",
    "empty_content": "empty content",
    "csv_fields": "wrong number of CSV fields",
}

_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}


class RowError(Exception):
    """One row cannot be used. ``code`` is a key of :data:`REASONS`; ``reason`` is one line for people."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def short(value: Any, limit: int = 40) -> str:
    """A one-line, bounded repr of a user value for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 160) -> str:
    """Plain text cut to one bounded line (for messages quoting exceptions)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def type_name(value: Any) -> str:
    return {
        dict: "object",
        list: "list",
        str: "string",
        bool: "boolean",
        type(None): "null",
        int: "number",
        float: "number",
    }.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------------------------------------
# Detection


def matching_format(obj: dict) -> str | None:
    """The first format whose required fields are all present in ``obj`` (``None`` if none)."""
    for name in FORMATS:
        if all(k in obj for k in _REQUIRED[name]):
            if name == "lima" and _looks_like_sharegpt(obj["conversations"]):
                return "messages"
            return name
    return None


def detect(sample: Iterable[dict]) -> str | None:
    """The format most rows of ``sample`` match (ties: order of :data:`FORMATS`); ``None`` if none match."""
    votes = Counter(f for f in map(matching_format, sample) if f is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(f for f in FORMATS if votes.get(f) == best)


def _looks_like_sharegpt(value: Any) -> bool:
    value = _maybe_json_list(value)
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


# ----------------------------------------------------------------------------------------------------------
# Field access


def _maybe_json_list(value: Any) -> Any:
    """CSV cells (and some Parquet exports) hold list columns as JSON text; decode those, leave the rest."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            decoded = json.loads(value)
        except (ValueError, RecursionError):
            return value
        return decoded if isinstance(decoded, list) else value
    return value


def _check_text(text: str, where: str, code: str) -> str:
    if not text.strip():
        raise RowError(code, f"{where} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RowError(
            "invalid_text",
            f"{where} holds an unpaired surrogate ({short(text[err.start])}), which is not valid Unicode text",
        ) from None
    return text


def _text(obj: dict, key: str) -> str:
    if key not in obj or obj[key] is None:
        raise RowError("missing_field", f"missing field `{key}`")
    value = obj[key]
    if not isinstance(value, str):
        raise RowError("wrong_type", f"field `{key}` must be a string, got {type_name(value)} {short(value, 30)}")
    return _check_text(value, f"field `{key}`", "empty_field")


def _optional_text(obj: dict, key: str) -> str | None:
    """A text field that may be absent, null or empty (then ``None``); any other non-string is an error."""
    value = obj.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise RowError("wrong_type", f"field `{key}` must be a string, got {type_name(value)} {short(value, 30)}")
    return _check_text(value, f"field `{key}`", "empty_field")


def _list(obj: dict, key: str) -> list:
    if key not in obj or obj[key] is None:
        raise RowError("missing_field", f"missing field `{key}`")
    value = _maybe_json_list(obj[key])
    if not isinstance(value, list):
        raise RowError("wrong_type", f"field `{key}` must be a list, got {type_name(value)} {short(value, 30)}")
    if not value:
        raise RowError("empty_field", f"field `{key}` is an empty list")
    return value


def _content(value: Any, where: str) -> str:
    """Message content: a string, or a list of ``{"type": "text", "text": ...}`` parts (joined)."""
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RowError(
                    "wrong_type",
                    f'{where}[{i}] must be a text part {{"type": "text", "text": ...}}, got {short(part, 30)}',
                )
            parts.append(part["text"])
        value = "".join(parts)
    if value is None:
        raise RowError("empty_content", f"{where} is empty")
    if not isinstance(value, str):
        raise RowError("wrong_type", f"{where} must be a string, got {type_name(value)} {short(value, 30)}")
    return _check_text(value, where, "empty_content")


# ----------------------------------------------------------------------------------------------------------
# Order checks


def check_order(messages: list[dict], where: str = "messages") -> list[dict]:
    """Raise :class:`RowError` unless roles alternate user/assistant after an optional first system message
    and the conversation ends with an assistant reply."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise RowError("no_assistant", "no user or assistant turn, only a system message")
    offset = len(messages) - len(body)
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            pos = i + offset
            if m["role"] == "system":
                raise RowError(
                    "roles_out_of_order",
                    f"`{where}[{pos}]` is a system message; only the first message may be one",
                )
            after = f"after `{body[i - 1]['role']}`" if i else "at the start"
            raise RowError(
                "roles_out_of_order",
                f"roles out of order: `{where}[{pos}]` is `{m['role']}` {after}, expected `{expected}`",
            )
    if len(body) == 1:
        raise RowError("no_assistant", "no assistant turn (only a user message)")
    if body[-1]["role"] != "assistant":
        raise RowError(
            "ends_with_user",
            f"conversation ends with a user turn ({len(body)} turns); it must end with an assistant reply",
        )
    return messages


# ----------------------------------------------------------------------------------------------------------
# Normalisers


def _from_messages(items: list, key: str) -> list[dict]:
    out = []
    for i, m in enumerate(items):
        where = f"`{key}[{i}]`"
        if not isinstance(m, dict):
            raise RowError(
                "wrong_type",
                f"{where} must be an object with `role` and `content`, got {type_name(m)} {short(m, 30)}",
            )
        role_key, content_key = ("role", "content") if "role" in m or "from" not in m else ("from", "value")
        if role_key not in m:
            raise RowError("missing_field", f"{where} has no `role`")
        raw_role = m[role_key]
        role = _ROLE_ALIASES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise RowError(
                "bad_role",
                f"{where}.{role_key} is {short(raw_role, 30)}; expected system, user or "
                "assistant (or ShareGPT's human/gpt)",
            )
        out.append({"role": role, "content": _content(m.get(content_key), f"{where}.{content_key}")})
    return check_order(out, key)


def _messages(obj: dict) -> list[dict]:
    key = "conversations" if "conversations" in obj and "messages" not in obj else "messages"
    return _from_messages(_list(obj, key), key)


def _lima(obj: dict) -> list[dict]:
    turns = _list(obj, "conversations")
    if isinstance(turns[0], dict):  # ShareGPT rows under `conversations`, with `data.format: lima` forced
        return _from_messages(turns, "conversations")
    out = []
    for i, t in enumerate(turns):
        where = f"`conversations[{i}]`"
        if not isinstance(t, str):
            raise RowError("wrong_type", f"{where} must be a string, got {type_name(t)} {short(t, 30)}")
        out.append({"role": "user" if i % 2 == 0 else "assistant", "content": _check_text(t, where, "empty_content")})
    if len(out) == 1:
        raise RowError("no_assistant", "no assistant turn: `conversations` holds only the user's message")
    if len(out) % 2:
        raise RowError(
            "ends_with_user",
            f"conversation ends with a user turn ({len(out)} turns); it must end with an assistant reply",
        )
    return out


def _with_system(obj: dict, messages: list[dict]) -> list[dict]:
    system = _optional_text(obj, "system")
    return [{"role": "system", "content": system}, *messages] if system else messages


def _history(obj: dict) -> list[dict]:
    value = _maybe_json_list(obj.get("history"))
    if value is None:
        return []
    if not isinstance(value, list):
        raise RowError(
            "wrong_type",
            f"field `history` must be a list of [user, assistant] pairs, got {type_name(value)} {short(value, 30)}",
        )
    out = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RowError(
                "wrong_type",
                f"`history[{i}]` must be a [user, assistant] pair of strings, got {short(pair, 30)}",
            )
        out.append({"role": "user", "content": _check_text(pair[0], f"`history[{i}][0]`", "empty_content")})
        out.append({"role": "assistant", "content": _check_text(pair[1], f"`history[{i}][1]`", "empty_content")})
    return out


def _alpaca(obj: dict) -> list[dict]:
    instruction = _text(obj, "instruction")
    extra = _optional_text(obj, "input")
    output = _text(obj, "output")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return _with_system(
        obj, [*_history(obj), {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    )


def _pair(prompt_key: str, answer_key: str):
    def normalise(obj: dict) -> list[dict]:
        return _with_system(
            obj,
            [
                {"role": "user", "content": _text(obj, prompt_key)},
                {"role": "assistant", "content": _text(obj, answer_key)},
            ],
        )

    return normalise


def _prompt_completion(obj: dict) -> list[dict]:
    prompt, completion = _maybe_json_list(obj.get("prompt")), _maybe_json_list(obj.get("completion"))
    if isinstance(prompt, list) or isinstance(completion, list):
        # TRL's conversational prompt-completion rows: both sides are lists of messages.
        return _from_messages(_list(obj, "prompt") + _list(obj, "completion"), "prompt+completion")
    return _pair("prompt", "completion")(obj)


_NORMALISERS = {
    "messages": _messages,
    "lima": _lima,
    "alpaca": _alpaca,
    "instruction": _pair("instruction", "response"),
    "prompt_completion": _prompt_completion,
    "question_answer": _pair("question", "answer"),
}


def normalise(fmt: str, obj: Any, system_prompt: str | None = None) -> list[dict]:
    """Chat messages for one row in format ``fmt``; ``system_prompt`` is prepended when there is no system
    message.

    Raises :class:`RowError` when the row does not fit the format.
    """
    if not isinstance(obj, dict):
        raise RowError("not_object", f"not an object (got {type_name(obj)} {short(obj, 30)})")
    messages = _NORMALISERS[fmt](obj)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def canonical(messages: list[dict]) -> str:
    """The canonical JSON text of a conversation: ids and exact-duplicate detection hash it."""
    return json.dumps(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        ensure_ascii=False,
        separators=(",", ":"),
    )

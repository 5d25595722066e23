"""What every chat template shares: rendered pieces, special-token strings, JSON helpers.

A template turns a :class:`~raysft.normalize.Conversation` into pieces ``(text,
message_index, is_answer)``; ``is_answer`` pieces are an assistant turn's output (its content,
reasoning and tool calls, and the end-of-turn marker that closes it), which the loss policy
then picks from (``raysft.templates.Template``).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field

from ..normalize import Message, RecordError  # noqa: F401 - RecordError is the templates' failure

Piece = tuple[str, int, bool]  # text, message index (-1: template scaffolding), is_answer


@dataclass(frozen=True)
class Builtin:
    """A built-in template: its renderer and the special tokens it writes."""

    render: object  # (Conversation, Specials) -> list[Piece]
    markers: tuple[str, ...] = ()


class TemplateError(ValueError):
    """A template that cannot be used (unknown name, tokenizer without chat template...)."""


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # [start, end) character ranges that carry loss


@dataclass
class Specials:
    """What templates need to know of the tokenizer: BOS/EOS strings, and whether it is a
    SentencePiece tokenizer that encodes each text with a leading "▁" (Mistral's v3
    tokenizer; Tekken and other byte-level tokenizers do not)."""

    bos: str | None = None
    eos: str | None = None
    prefix_space: bool = False
    kwargs: dict = field(default_factory=dict)  # --template-kwargs
    date: datetime.date | None = None  # --template-date


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


PRETTY: dict[str, str] = {}


def pretty(obj) -> str:
    """``json.dumps(obj, indent=4, ensure_ascii=False)``, remembered by the object's compact JSON
    (which the C encoder writes ~10x faster than Python writes the indented form): datasets
    repeat the same tool definitions across many records. Equal compact JSON means equal
    keys, order and values, so the indented text is the same."""
    key = dumps(obj)
    text = PRETTY.get(key)
    if text is None:
        if len(PRETTY) >= 4096:
            PRETTY.clear()
        text = PRETTY[key] = json.dumps(obj, indent=4, ensure_ascii=False)
    return text


def call_json(call: dict, args_key: str = "arguments") -> str:
    return dumps({"name": call["name"], args_key: call["arguments"]})


# --------------------------------------------------------------------------- built-ins


def with_reasoning(m: Message, content: str) -> str:
    """Reasoning for families without a format of their own: a <think> block before the answer."""
    return f"<think>\n{m.reasoning.strip()}\n</think>\n\n{content}" if m.reasoning else content

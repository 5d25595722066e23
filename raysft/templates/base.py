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

from ..errors import BAD_INPUT
from ..normalize import ASSISTANT, Conversation, Message, RecordError  # noqa: F401 - RecordError: the templates' failure

Piece = tuple[str, int, bool]  # text, message index (-1: template scaffolding), is_answer


@dataclass(frozen=True)
class Builtin:
    """A built-in template: its renderer and the special tokens it writes."""

    render: object  # (Conversation, Specials) -> list[Piece]
    markers: tuple[str, ...] = ()
    kwargs: tuple[str, ...] = ()  # the --template-kwargs it reads (any other is an error, not ignored)


class TemplateError(ValueError):
    """A template that cannot be used (unknown name, tokenizer without chat template...)."""

    exit_code = BAD_INPUT


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


ABSENT = object()  # a tool-call-only turn handed to its template without a content key


def to_hf_messages(conv: Conversation, call_content=None) -> list[dict]:
    """Messages in the shape Hugging Face chat templates expect (``apply_chat_template``):
    content as given, ``reasoning_content``, ``tool_calls`` in OpenAI form with their ids, and a
    tool result's ``tool_call_id`` and ``name``. A tool-call-only assistant turn (content None)
    gets ``call_content`` as its content: the form its template renders the call under
    (``""``, ``None``, or ``ABSENT``: no content key)."""
    out = []
    for m in conv.messages:
        content = m.content
        if content is None and m.tool_calls and m.role == ASSISTANT:
            content = call_content
        d: dict = {"role": m.role} if content is ABSENT else {"role": m.role, "content": content}
        if m.reasoning:
            d["reasoning_content"] = m.reasoning
        if m.tool_calls:
            d["tool_calls"] = [
                {**({"id": c["id"]} if "id" in c else {}), "type": "function",
                 "function": {"name": c["name"], "arguments": c["arguments"]}} for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


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

"""Mistral instruct format, as mistral-common's v3 instruct tokenizer encodes it (Mistral 7B
v0.3 with the SentencePiece v3 tokenizer, Mistral Nemo with Tekken).

``<s>`` then, per message:

* user: ``[INST]`` text ``[/INST]``; the last user message carries the system prompt (``system
  + "\\n\\n" + text``) and, before its ``[INST]``, the tools as ``[AVAILABLE_TOOLS]`` JSON
  ``[/AVAILABLE_TOOLS]`` (OpenAI form: ``{"type": "function", "function": {name, description,
  parameters}}``);
* assistant: its text (trailing spaces dropped) and ``</s>``, or ``[TOOL_CALLS]`` and a JSON
  list of ``{"name", "arguments", "id"}`` and ``</s>``; one or the other, not both;
* tool: ``[TOOL_RESULTS]`` ``{"content": ..., "call_id": ...}`` ``[/TOOL_RESULTS]``, the content
  parsed as JSON when it is JSON.

mistral-common encodes each text on its own; with SentencePiece that writes a leading "▁" (a
space) before every text, which Tekken does not: the render carries that space where the
tokenizer is SentencePiece-style, so one pass over the whole text gives the same tokens. The
space before an answer is the answer's (mistral-common trains it; on text that starts with
CJK or a digit it is a token of its own). Tool results name the call they answer: a record
without call ids cannot be written in this format and is rejected (``template_unsupported``),
as mistral-common refuses it.
"""

from __future__ import annotations

import json

from ..normalize import ASSISTANT, SYSTEM, USER, Conversation
from .base import Builtin, Piece, RecordError, Specials, with_reasoning


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _json_or_text(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _tool(t: dict) -> dict:
    """A tool definition as mistral-common dumps it: type, then function's name, description
    and parameters (their defaults when missing)."""
    fn = t.get("function", t)
    return {"type": "function", "function": {"name": fn["name"], "description": fn.get("description", ""),
                                             "parameters": fn.get("parameters", {})}}


def _mistral(conv: Conversation, sp: Specials) -> list[Piece]:
    bos, eos = sp.bos or "<s>", sp.eos or "</s>"
    pre = " " if sp.prefix_space else ""  # SentencePiece's leading "▁" before each encoded text
    msgs = conv.messages
    start = 1 if msgs[0].role == SYSTEM else 0
    system = msgs[0].text if start else None
    last_user = max((i for i, m in enumerate(msgs) if m.role == USER), default=-1)
    if last_user < 0:  # (a conversation that opens on a tool result)
        raise RecordError("template_unsupported", "the mistral format needs a user turn")
    out: list[Piece] = [(bos, -1, False)]
    for i in range(start, len(msgs)):
        m = msgs[i]
        if m.role == USER:
            text = ""
            if conv.tools and i == last_user:
                text += "[AVAILABLE_TOOLS]" + pre + _dumps([_tool(t) for t in conv.tools]) + "[/AVAILABLE_TOOLS]"
            content = f"{system}\n\n{m.text}" if system is not None and i == last_user else m.text
            out.append((text + "[INST]" + pre + content + "[/INST]", i, False))
        elif m.role == ASSISTANT:
            if m.tool_calls and (m.text or m.reasoning):
                raise RecordError("template_unsupported", "the mistral format has an assistant turn carry text or "
                                  "tool calls, not both")
            if m.tool_calls:
                calls = [{"name": c["name"], "arguments": _json_or_text(c["arguments"]),
                          **({"id": c["id"]} if c.get("id") else {})} for c in m.tool_calls]
                out.append(("[TOOL_CALLS]" + pre + _dumps(calls) + eos, i, True))
            else:
                out.append((pre + with_reasoning(m, m.text).rstrip(" ") + eos, i, True))
        else:
            if m.tool_call_id is None:
                raise RecordError("template_unsupported", "the mistral format has each tool result name the call it "
                                  "answers (tool_call_id); this record has none")
            result = {"content": _json_or_text(m.text), "call_id": m.tool_call_id}
            out.append(("[TOOL_RESULTS]" + pre + _dumps(result) + "[/TOOL_RESULTS]", i, False))
    return out


# name -> (render, the special tokens it writes: --add-special-tokens adds those a tokenizer lacks)
FAMILY = {
    "mistral": Builtin(_mistral, ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                                  "[TOOL_RESULTS]", "[/TOOL_RESULTS]")),
}

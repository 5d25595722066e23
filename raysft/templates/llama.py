"""Llama 2 and Llama 3 chat formats."""

from __future__ import annotations

import json

from ..normalize import ASSISTANT, SYSTEM, TOOL, USER, Conversation
from .base import Builtin, Piece, RecordError, Specials, dumps, pretty, with_reasoning

TOOLS_INTRO = (
    "Given the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of '
    "argument name and its value}.Do not use variables.\n\n"
)


def _tools_preamble(conv: Conversation) -> str:
    """Meta's JSON tool calling: the definitions, before the first user message's text."""
    return TOOLS_INTRO + "".join(pretty(t) + "\n\n" for t in conv.tools)


def _llama3(conv: Conversation, sp: Specials) -> list[Piece]:
    """Llama 3, as llama-models' ``ChatFormat`` encodes a dialog: ``<|begin_of_text|>``, then per
    message ``<|start_header_id|>{role}<|end_header_id|>\n\n`` + content (as given) + its tool
    calls (``{"type": "function", "name", "parameters"}`` JSON, one after the other) +
    ``<|eot_id|>``; tool results are ``ipython`` turns. Tool definitions follow Meta's JSON tool
    calling (in the first user message, as the Llama 3.1 template writes them); reasoning,
    which Llama 3 has no format for, is a ``<think>`` block before the answer."""
    out: list[Piece] = [("<|begin_of_text|>", -1, False)]
    pending = bool(conv.tools)
    for i, m in enumerate(conv.messages):
        role = "ipython" if m.role == TOOL else m.role
        head = f"<|start_header_id|>{role}<|end_header_id|>\n\n"
        content = m.text
        if m.role == USER and pending:
            content = _tools_preamble(conv) + content
            pending = False
        if m.role == ASSISTANT:
            calls = "".join(json.dumps({"type": "function", "name": c["name"], "parameters": c["arguments"]})
                            for c in m.tool_calls) if m.tool_calls else ""
            body = with_reasoning(m, content) if m.reasoning else content
            out += [(head, i, False), (body + calls + "<|eot_id|>", i, True)]
        else:
            out.append((head + content + "<|eot_id|>", i, False))
    return out


def _llama31(conv: Conversation, sp: Specials) -> list[Piece]:
    """Llama 3.1 / 3.3, as Meta's Hugging Face chat template writes it: a system block with the
    knowledge and today's date (``date_string`` in --template-kwargs, else --template-date),
    ``Environment: ipython`` when there are tools, which go into the first user message; text
    trimmed; one tool call per assistant turn, as ``{"name": ..., "parameters": ...}`` (the turn's
    text is not written beside it); tool results as JSON in ``ipython`` turns; no reasoning
    (the template writes none)."""
    msgs = conv.messages
    date = sp.kwargs.get("date_string") or (sp.date.strftime("%d %b %Y") if sp.date else "26 Jul 2024")
    start = 1 if msgs[0].role == SYSTEM else 0
    system = msgs[0].text.strip() if start else ""
    head = "<|start_header_id|>system<|end_header_id|>\n\n" + ("Environment: ipython\n" if conv.tools else "")
    head += f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n{system}<|eot_id|>"
    out: list[Piece] = [("<|begin_of_text|>", -1, False), (head, 0 if start else -1, False)]
    pending = bool(conv.tools)
    for i in range(start, len(msgs)):
        m = msgs[i]
        if m.role == ASSISTANT:
            if m.tool_calls:
                if len(m.tool_calls) != 1:
                    raise RecordError("template_unsupported", "Llama 3.1 takes one tool call per assistant turn")
                c = m.tool_calls[0]
                body = '{"name": "' + c["name"] + '", "parameters": ' + dumps(c["arguments"]) + "}"
            else:
                body = m.text.strip()
            out += [("<|start_header_id|>assistant<|end_header_id|>\n\n", i, False), (body + "<|eot_id|>", i, True)]
        elif m.role == TOOL:
            out.append(("<|start_header_id|>ipython<|end_header_id|>\n\n" + dumps(m.text) + "<|eot_id|>", i, False))
        else:
            content = m.text.strip()
            if pending:
                content = _tools_preamble(conv) + content
                pending = False
            out.append((f"<|start_header_id|>{m.role}<|end_header_id|>\n\n{content}<|eot_id|>", i, False))
    return out


def _llama2(conv: Conversation, sp: Specials) -> list[Piece]:
    """Llama 2 chat: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>``."""
    bos, eos = sp.bos or "<s>", sp.eos or "</s>"
    msgs = conv.messages
    if conv.tools or any(m.role == TOOL or m.tool_calls for m in msgs):
        raise RecordError("template_unsupported", "the llama2 template has no tool-call format")
    system = msgs[0].text if msgs[0].role == SYSTEM else None
    out: list[Piece] = []
    body = msgs[1:] if system is not None else msgs
    offset = len(msgs) - len(body)
    for j, m in enumerate(body):
        i = j + offset
        content = m.text
        if j == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m.role == USER:
            out.append((f"{bos}[INST] {content.strip()} [/INST]", i, False))
        else:
            out += [(" ", i, False), (f"{with_reasoning(m, content.strip())} {eos}", i, True)]
    return out


# name -> (render, the special tokens it writes: --add-special-tokens adds those a tokenizer lacks)
FAMILY = {
    "llama3": Builtin(_llama3, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "llama3.1": Builtin(_llama31, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                        ("date_string",)),
    "llama2": Builtin(_llama2, ()),
}

"""Llama 2 and Llama 3 chat formats."""

from __future__ import annotations

from ..normalize import ASSISTANT, SYSTEM, TOOL, USER, Conversation
from .base import Builtin, Piece, RecordError, Specials, call_json, pretty, with_reasoning


def _llama3(conv: Conversation, sp: Specials) -> list[Piece]:
    """Meta Llama 3 / 3.1 format (content is trimmed, as the official template does).

    Tools follow Llama 3.1's JSON tool calling as its Hugging Face template renders it: the
    definitions go into the first user turn, a call is ``{"name": ..., "parameters": ...}`` and a
    tool result is an ``ipython`` turn.
    """
    out: list[Piece] = [("<|begin_of_text|>", -1, False)]
    tools_pending = conv.functions
    for i, m in enumerate(conv.messages):
        role = "ipython" if m.role == TOOL else m.role
        head = f"<|start_header_id|>{role}<|end_header_id|>\n\n"
        content = m.text.strip()
        if m.role == USER and tools_pending:
            intro = (
                "Given the following functions, please respond with a JSON for a function call "
                "with its proper arguments that best answers the given prompt.\n\n"
                'Respond in the format {"name": function name, "parameters": dictionary of '
                "argument name and its value}.Do not use variables.\n\n"
            )
            defs = "".join(pretty(t) + "\n\n" for t in tools_pending)
            content = intro + defs + content
            tools_pending = None
        if m.role == ASSISTANT:
            body = with_reasoning(m, content)
            if m.tool_calls:
                calls = "".join(call_json(c, "parameters") for c in m.tool_calls)
                body = (content + "\n" if content else "") + calls
            out += [(head, i, False), (body + "<|eot_id|>", i, True)]
        else:
            out.append((head + content + "<|eot_id|>", i, False))
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
    "llama2": Builtin(_llama2, ()),
}

"""Mistral instruct formats."""

from __future__ import annotations

from ..normalize import ASSISTANT, SYSTEM, USER, Conversation
from .base import Builtin, Piece, Specials, dumps, with_reasoning


def _mistral(conv: Conversation, sp: Specials) -> list[Piece]:
    """Mistral instruct (v3 tokenizer, e.g. Mistral-7B-Instruct-v0.3):
    ``<s>[INST] {user}[/INST] {answer}</s>``; the system prompt goes before the last user
    message; tools as ``[AVAILABLE_TOOLS] [...][/AVAILABLE_TOOLS]`` before the last user
    message, calls as ``[TOOL_CALLS] [...]</s>``, results as ``[TOOL_RESULTS] {...}[/TOOL_RESULTS]``."""
    bos, eos = sp.bos or "<s>", sp.eos or "</s>"
    msgs = conv.messages
    start = 1 if msgs[0].role == SYSTEM else 0
    system = msgs[0].text if start else None
    last_user = max(i for i, m in enumerate(msgs) if m.role == USER)
    out: list[Piece] = [(bos, -1, False)]
    for i in range(start, len(msgs)):
        m = msgs[i]
        if m.role == USER:
            text = ""
            if conv.tools and i == last_user:
                tools = conv.tools
                text += "[AVAILABLE_TOOLS] " + dumps(tools) + "[/AVAILABLE_TOOLS]"
            content = f"{system}\n\n{m.text}" if system is not None and i == last_user else m.text
            out.append((text + f"[INST] {content}[/INST]", i, False))
        elif m.role == ASSISTANT:
            if m.tool_calls:
                calls = [{"name": c["name"], "arguments": c["arguments"]} for c in m.tool_calls]
                out += [(" " if m.text else "", i, False),
                        ((m.text + " " if m.text else "") + "[TOOL_CALLS] " + dumps(calls) + eos, i, True)]
            else:
                out += [(" ", i, False), (with_reasoning(m, m.text) + eos, i, True)]
        else:
            out.append(("[TOOL_RESULTS] " + dumps({"content": m.text}) + "[/TOOL_RESULTS]", i, False))
    return out


# name -> (render, the special tokens it writes: --add-special-tokens adds those a tokenizer lacks)
FAMILY = {
    "mistral": Builtin(_mistral, ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                             "[/TOOL_RESULTS]")),
}

"""DeepSeek-V3 chat."""

from __future__ import annotations

from ..normalize import SYSTEM, TOOL, USER, Conversation
from .base import Builtin, Piece, Specials, dumps, with_reasoning


def _deepseek_v3(conv: Conversation, sp: Specials) -> list[Piece]:
    """DeepSeek-V3: ``<｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{answer}<｜end▁of▁sentence｜>``;
    tool definitions are appended to the system prompt in V3.1's "## Tools" form;
    tool calls in ``<｜tool▁calls▁begin｜>...<｜tool▁calls▁end｜>`` (arguments as a json code block),
    results in ``<｜tool▁outputs▁begin｜>...<｜tool▁outputs▁end｜>``, after which the answer follows
    without a new assistant marker; reasoning as a ``<think>`` block (R1 style)."""
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    msgs = conv.messages
    start = 1 if msgs[0].role == SYSTEM else 0
    system = msgs[0].text if start else ""
    if conv.tools:  # DeepSeek-V3.1's documented tool description, appended to the system prompt
        system += "## Tools\nYou have access to the following tools:\n" + "".join(
            f"\n### {t.get('name', 'tool')}\nDescription: {t.get('description', '')}\n\n"
            f"Parameters: {dumps(t.get('parameters', {}))}\n" for t in conv.functions)
    out: list[Piece] = [(bos + system, 0 if start else -1, False)]
    for i in range(start, len(msgs)):
        m = msgs[i]
        if m.role == USER:
            out.append(("<｜User｜>" + m.text, i, False))
        elif m.role == TOOL:
            first = msgs[i - 1].role != TOOL
            last = i == len(msgs) - 1 or msgs[i + 1].role != TOOL
            text = ("<｜tool▁outputs▁begin｜>" if first else "") + f"<｜tool▁output▁begin｜>{m.text}<｜tool▁output▁end｜>"
            out.append((text + ("<｜tool▁outputs▁end｜>" if last else ""), i, False))
        else:
            after_tool = msgs[i - 1].role == TOOL
            body = with_reasoning(m, m.text)
            if m.tool_calls:
                body += "<｜tool▁calls▁begin｜>" + "".join(
                    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>" + c["name"] + "\n```json\n"
                    + (c["arguments"] if isinstance(c["arguments"], str) else dumps(c["arguments"]))
                    + "\n```<｜tool▁call▁end｜>" for c in m.tool_calls) + "<｜tool▁calls▁end｜>"
            out += [("" if after_tool else "<｜Assistant｜>", i, False), (body + eos, i, True)]
    return out


# name -> (render, the special tokens it writes: --add-special-tokens adds those a tokenizer lacks)
FAMILY = {
    "deepseek-v3": Builtin(_deepseek_v3, ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                                 "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
                                 "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
                                 "<｜tool▁output▁end｜>")),
}

"""DeepSeek chat formats.

* ``deepseek-v3``: DeepSeek-V3's chat template: ``<｜begin▁of▁sentence｜>{system}``, then
  ``<｜User｜>{user}`` and ``<｜Assistant｜>{answer}<｜end▁of▁sentence｜>``; tool calls in
  ``<｜tool▁calls▁begin｜>`` with the call's type, name and arguments as a json code block;
  results in ``<｜tool▁outputs▁begin｜>...<｜tool▁outputs▁end｜>``, after which the answer follows
  without a new assistant marker; reasoning as a ``<think>`` block (R1 style).
* ``deepseek-v3.1``: DeepSeek-V3.1's chat template: in non-thinking mode (the default) every
  assistant turn that answers a user opens with ``<｜Assistant｜><think></think>``; with
  ``--template-kwargs '{"thinking": true}'`` (or ``enable_thinking``, as the vendor template
  reads it) with ``<｜Assistant｜><think>``, the prompt of thinking mode, and the turn's output
  is its reasoning (empty where the record has none), ``</think>`` and the answer, trained; calls are
  ``<｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{arguments json}<｜tool▁call▁end｜>``; each result is a
  ``<｜tool▁output▁begin｜>...<｜tool▁output▁end｜>``; an inline ``</think>`` in an answer that
  follows a user keeps only the text after it. Two things the vendor template does not do,
  so that nothing in a record is lost: a turn with reasoning is written in thinking mode
  (``<think>{reasoning}</think>``, the reasoning trained), and tool definitions, which the
  template never writes, go after the system prompt in DeepSeek's documented "## Tools" form.

All system messages, wherever they stand, are joined with a blank line into the system prompt
at the start, as both vendor templates do.
"""

from __future__ import annotations

from ..normalize import SYSTEM, TOOL, USER, Conversation
from .base import Builtin, Piece, Specials, dumps, with_reasoning

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def _system(conv: Conversation) -> tuple[str, int]:
    """The joined system prompt with the tools description, and the index of the message it
    is attributed to (-1 when there is no system message)."""
    systems = [i for i, m in enumerate(conv.messages) if m.role == SYSTEM]
    text = "\n\n".join(conv.messages[i].text for i in systems)
    if conv.tools:
        text += ("\n\n" if text else "") + "## Tools\nYou have access to the following tools:\n" + "".join(
            f"\n### {f.get('name', 'tool')}\nDescription: {f.get('description', '')}\n\n"
            f"Parameters: {dumps(f.get('parameters', {}))}\n" for f in conv.functions)
    return text, (systems[0] if systems else -1)


def _args(c: dict) -> str:
    return c["arguments"] if isinstance(c["arguments"], str) else dumps(c["arguments"])


def _deepseek_v3(conv: Conversation, sp: Specials) -> list[Piece]:
    msgs = conv.messages
    system, at = _system(conv)
    out: list[Piece] = [(BOS + system, at, False)]
    for i, m in enumerate(msgs):
        if m.role == SYSTEM:
            continue
        if m.role == USER:
            out.append(("<｜User｜>" + m.text, i, False))
        elif m.role == TOOL:
            first = i == 0 or msgs[i - 1].role != TOOL
            last = i == len(msgs) - 1 or msgs[i + 1].role != TOOL
            text = ("<｜tool▁outputs▁begin｜>" if first else "") + f"<｜tool▁output▁begin｜>{m.text}<｜tool▁output▁end｜>"
            out.append((text + ("<｜tool▁outputs▁end｜>" if last else ""), i, False))
        else:
            after_tool = i > 0 and msgs[i - 1].role == TOOL
            body = with_reasoning(m, m.text)
            if m.tool_calls:
                body += "<｜tool▁calls▁begin｜>" + "".join(
                    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>" + c["name"] + "\n```json\n" + _args(c)
                    + "\n```<｜tool▁call▁end｜>" for c in m.tool_calls) + "<｜tool▁calls▁end｜>"
            out += [("" if after_tool else "<｜Assistant｜>", i, False), (body + EOS, i, True)]
    return out


def _deepseek_v31(conv: Conversation, sp: Specials) -> list[Piece]:
    msgs = conv.messages
    thinking = bool(sp.kwargs.get("thinking", sp.kwargs.get("enable_thinking", False)))
    system, at = _system(conv)
    out: list[Piece] = [(BOS + system, at, False)]
    last_user = is_tool = False
    for i, m in enumerate(msgs):
        if m.role == SYSTEM:
            continue
        if m.role == USER:
            last_user, is_tool = True, False
            out.append(("<｜User｜>" + m.text, i, False))
        elif m.role == TOOL:
            last_user, is_tool = False, True
            out.append((f"<｜tool▁output▁begin｜>{m.text}<｜tool▁output▁end｜>", i, False))
        else:
            content = m.text
            if last_user and (m.reasoning or thinking):
                # thinking mode: the generation prompt ends at <think>; the reasoning (empty if the
                # record has none), </think> and the answer are the model's output
                head, think = "<｜Assistant｜><think>", (m.reasoning or "") + "</think>"
            elif last_user:
                head, think = "<｜Assistant｜><think></think>", ""
            else:
                head, think = "", f"<think>{m.reasoning}</think>" if m.reasoning else ""
            if m.tool_calls:
                body = content + "<｜tool▁calls▁begin｜>" + "".join(
                    f"<｜tool▁call▁begin｜>{c['name']}<｜tool▁sep｜>{dumps(c['arguments'])}<｜tool▁call▁end｜>"
                    for c in m.tool_calls) + "<｜tool▁calls▁end｜>"
                is_tool = False
            elif is_tool:
                body, is_tool = content, False
            else:
                body = content.split("</think>", 1)[1] if "</think>" in content else content
            last_user = False
            out += [(head, i, False), (think + body + EOS, i, True)]
    return out


_MARKERS = (BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
            "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁output▁begin｜>",
            "<｜tool▁output▁end｜>")

# name -> (render, the special tokens it writes: --add-special-tokens adds those a tokenizer lacks)
FAMILY = {
    "deepseek-v3": Builtin(_deepseek_v3, (*_MARKERS, "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>")),
    "deepseek-v3.1": Builtin(_deepseek_v31, (*_MARKERS, "<think>", "</think>"), ("thinking", "enable_thinking")),
}

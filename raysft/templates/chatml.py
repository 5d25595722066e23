"""ChatML and the Qwen2.5 / Qwen3 formats built on it."""

from __future__ import annotations

from collections.abc import Callable

from ..normalize import ASSISTANT, SYSTEM, TOOL, USER, Conversation
from .base import Builtin, Piece, Specials, call_json, dumps, with_reasoning

QWEN_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{defs}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def _chatml(default_system: str | None, think: bool = False) -> Callable[[Conversation, Specials], list[Piece]]:
    """ChatML (``<|im_start|>role\n...<|im_end|>\n``) with Qwen2.5/Qwen3 tool calling:
    definitions in ``<tools>`` in the system turn, calls in ``<tool_call>``, results as a user
    turn of ``<tool_response>`` blocks.

    ``think`` (Qwen3): reasoning is kept only for assistant turns after the last user query, in
    a ``<think>`` block, and the final assistant turn always carries one (possibly empty)."""

    def render(conv: Conversation, sp: Specials) -> list[Piece]:
        msgs = conv.messages
        system = msgs[0].text if msgs and msgs[0].role == SYSTEM else default_system
        start = 1 if msgs and msgs[0].role == SYSTEM else 0
        out: list[Piece] = []
        if conv.tools:
            defs = "".join("\n" + dumps(t) for t in conv.functions)
            system = (system + "\n\n" if system else "") + QWEN_TOOLS.format(defs=defs)
        if system is not None:
            out.append((f"<|im_start|>system\n{system}<|im_end|>\n", 0 if start else -1, False))
        last_query = max((i for i, m in enumerate(msgs) if m.role == USER), default=-1)
        for i in range(start, len(msgs)):
            m = msgs[i]
            if m.role == ASSISTANT:
                if not think:
                    body = with_reasoning(m, m.text)
                elif i > last_query and (i == len(msgs) - 1 or m.reasoning):
                    body = f"<think>\n{(m.reasoning or '').strip()}\n</think>\n\n{m.text.lstrip()}"
                else:
                    body = m.text
                for c in m.tool_calls or ():
                    body += ("\n" if body else "") + "<tool_call>\n" + call_json(c) + "\n</tool_call>"
                out += [("<|im_start|>assistant\n", i, False), (body + "<|im_end|>", i, True), ("\n", i, False)]
            elif m.role == TOOL:
                first = i == 0 or msgs[i - 1].role != TOOL
                last = i == len(msgs) - 1 or msgs[i + 1].role != TOOL
                text = ("<|im_start|>user" if first else "") + f"\n<tool_response>\n{m.text}\n</tool_response>"
                out.append((text + ("<|im_end|>\n" if last else ""), i, False))
            else:
                out.append((f"<|im_start|>{m.role}\n{m.text}<|im_end|>\n", i, False))
        return out

    return render


# name -> (render, the special tokens it writes: --add-special-tokens adds those a tokenizer lacks)
FAMILY = {
    "chatml": Builtin(_chatml(None), ("<|im_start|>", "<|im_end|>")),
    "qwen2": Builtin(_chatml("You are a helpful assistant."), ("<|im_start|>", "<|im_end|>")),
    "qwen3": Builtin(_chatml(None, think=True), ("<|im_start|>", "<|im_end|>")),
}

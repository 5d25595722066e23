"""ChatML and the Qwen2.5 / Qwen3 formats built on it.

* ``qwen2``: Qwen2.5-Instruct's chat template, character for character: its default system
  prompt, tools in ``<tools>`` in the system turn, calls in ``<tool_call>`` blocks (a newline
  before each; the turn's text, when it has some, first), results as a user turn of
  ``<tool_response>`` blocks. Reasoning, which Qwen2.5 has no place for, is a ``<think>`` block
  before the answer.
* ``qwen3``: Qwen3's chat template: no default system prompt; reasoning (``reasoning_content``,
  else a ``<think>...</think>`` written inline in the content) is kept only for assistant turns
  after the last real user query (a user turn that is not only a ``<tool_response>``), in a
  ``<think>`` block, and the last turn always carries one, empty if need be; earlier turns
  keep only the text after their inline ``</think>``.
* ``chatml``: plain ChatML with Qwen's tool calling, no default system prompt, reasoning as a
  ``<think>`` block on every assistant turn that has one.

The answer is what follows ``<|im_start|>assistant\\n`` (the generation prompt) through
``<|im_end|>``; the newline after ``<|im_end|>`` is the next turn's.
"""

from __future__ import annotations

from collections.abc import Callable

from ..normalize import ASSISTANT, SYSTEM, TOOL, USER, Conversation, Message
from .base import Builtin, Piece, Specials, dumps, with_reasoning

QWEN_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{defs}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def _calls(m: Message, content: str, raw_strings: bool) -> str:
    """Qwen's ``<tool_call>`` blocks: a newline before each, except before the first when the
    turn has no text. ``raw_strings`` (Qwen3): arguments given as text are written as they are,
    not as a JSON string."""
    out = []
    for k, c in enumerate(m.tool_calls or ()):
        args = c["arguments"]
        args = args if raw_strings and isinstance(args, str) else dumps(args)
        out.append(("\n" if k or content else "") + '<tool_call>\n{"name": "' + c["name"] + '", "arguments": '
                   + args + "}\n</tool_call>")
    return "".join(out)


def _split_think(m: Message) -> tuple[str, str]:
    """Qwen3's reading of an assistant turn: (reasoning, content). Reasoning given apart wins;
    else a ``</think>`` in the content splits it (the reasoning is what follows the last
    ``<think>`` before it)."""
    content = m.text
    if m.reasoning:
        return m.reasoning, content
    if "</think>" in content:
        head = content.split("</think>")[0]
        return head.rstrip("\n").split("<think>")[-1].lstrip("\n"), content.split("</think>")[-1].lstrip("\n")
    return "", content


def _is_query(m: Message) -> bool:
    t = m.text
    return m.role == USER and not (t.startswith("<tool_response>") and t.endswith("</tool_response>"))


def _chatml(default_system: str | None, style: str) -> Callable[[Conversation, Specials], list[Piece]]:
    def render(conv: Conversation, sp: Specials) -> list[Piece]:
        msgs = conv.messages
        start = 1 if msgs and msgs[0].role == SYSTEM else 0
        system = msgs[0].text if start else default_system
        out: list[Piece] = []
        if conv.tools:
            defs = "".join("\n" + dumps(t) for t in conv.tools)
            system = (system + "\n\n" if system else "") + QWEN_TOOLS.format(defs=defs)
        if system is not None:
            out.append((f"<|im_start|>system\n{system}<|im_end|>\n", 0 if start else -1, False))
        last_query = max((i for i, m in enumerate(msgs) if _is_query(m)), default=len(msgs) - 1)
        for i in range(start, len(msgs)):
            m = msgs[i]
            if m.role == ASSISTANT:
                header = "<|im_start|>assistant\n"
                if style == "qwen3":
                    reasoning, content = _split_think(m)
                    if i > last_query and (i == len(msgs) - 1 or reasoning):
                        block = f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n"
                        if not reasoning and sp.kwargs.get("enable_thinking") is False:
                            header += block  # written by the generation prompt, as Qwen3's template does
                            block = ""
                        body = block + content.lstrip(chr(10))
                    else:
                        body = content
                    body += _calls(m, content, raw_strings=True)
                else:
                    body = with_reasoning(m, m.text) + _calls(m, m.text, raw_strings=False)
                out += [(header, i, False), (body + "<|im_end|>", i, True), ("\n", i, False)]
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
    "chatml": Builtin(_chatml(None, "chatml"), ("<|im_start|>", "<|im_end|>")),
    "qwen2": Builtin(_chatml(QWEN25_SYSTEM, "qwen2"), ("<|im_start|>", "<|im_end|>")),
    "qwen3": Builtin(_chatml(None, "qwen3"), ("<|im_start|>", "<|im_end|>"), ("enable_thinking",)),
}

"""GLM-4 chat (glm-4-9b-chat's template).

``[gMASK]<sop>``, then ``<|{role}|>{metadata}\\n{content}`` per item: ``<|system|>\\nSYS``,
``<|user|>\\n...``, ``<|assistant|>\\n{answer}``, ``<|observation|>\\n{result}``. With tools, a
``<|system|>`` turn of ChatGLM's tool preamble comes first: the assistant's introduction, "#
可用工具" and, per function, ``## {name}``, its definition as 4-space-indented JSON and the
instruction to call it with JSON arguments. A tool call is an assistant item whose metadata
is the function's name and whose content is the arguments: ``<|assistant|>{name}\\n{json}``;
parallel calls are one such item each, after the turn's text (if it has any). Reasoning,
which GLM-4 has no format for, is a ``<think>`` block at the start of the turn's text.

A turn has no closing token of its own: the model stops by producing the next role token
(``<|user|>`` or ``<|observation|>``, GLM-4's end-of-turn tokens), so that token belongs to the
answer and carries loss, and ``<|endoftext|>`` closes the final answer. The ``<|assistant|>``
that opens each further call within a turn is the model's own output too.
"""

from __future__ import annotations

from ..normalize import ASSISTANT, SYSTEM, TOOL, USER, Conversation
from .base import Builtin, Piece, Specials, dumps, pretty, with_reasoning

TOOLS_INTRO = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
               "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")


def _glm4(conv: Conversation, sp: Specials) -> list[Piece]:
    msgs = conv.messages
    out: list[Piece] = [("[gMASK]<sop>", -1, False)]
    if conv.tools:
        defs = "".join(f"\n\n## {f.get('name', 'tool')}\n\n{pretty(f)}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
                       for f in conv.functions)
        out.append(("<|system|>\n" + TOOLS_INTRO + defs, -1, False))
    for i, m in enumerate(msgs):
        prev_answer = i > 0 and msgs[i - 1].role == ASSISTANT  # its answer already wrote our marker
        if m.role in (USER, SYSTEM):
            out.append((("" if prev_answer else f"<|{m.role}|>") + f"\n{m.text}", i, False))
        elif m.role == TOOL:
            out.append((("" if prev_answer else "<|observation|>") + f"\n{m.text}", i, False))
        else:
            text = with_reasoning(m, m.text)
            parts = ["\n" + text] if text or not m.tool_calls else []
            for c in m.tool_calls or ():
                args = c["arguments"] if isinstance(c["arguments"], str) else dumps(c["arguments"])
                parts.append(f"{c['name']}\n{args}")
            nxt = msgs[i + 1] if i + 1 < len(msgs) else None
            end = ("<|endoftext|>" if nxt is None else "<|observation|>" if nxt.role == TOOL
                   else "" if nxt.role == ASSISTANT else f"<|{nxt.role}|>")
            out += [("<|assistant|>", i, False), ("<|assistant|>".join(parts) + end, i, True)]
    return out


# name -> (render, the special tokens it writes: --add-special-tokens adds those a tokenizer lacks)
FAMILY = {
    "glm4": Builtin(_glm4, ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>")),
}

"""GLM-4 chat."""

from __future__ import annotations

from ..normalize import ASSISTANT, SYSTEM, TOOL, USER, Conversation
from .base import Builtin, Piece, Specials, dumps, pretty, with_reasoning


def _glm4(conv: Conversation, sp: Specials) -> list[Piece]:
    """GLM-4 chat (glm-4-9b-chat): ``[gMASK]<sop><|system|>\n{system}<|user|>\n{user}<|assistant|>\n{answer}``.
    A turn has no closing token of its own: the model stops by producing the next role token
    (``<|user|>`` or ``<|observation|>``, both end-of-turn tokens for GLM-4), so that token
    belongs to the answer and carries loss, and ``<|endoftext|>`` closes the final answer.
    Tools are listed in the system turn; a call is ``<|assistant|>{name}\n{arguments json}``,
    a result an ``<|observation|>`` turn."""
    msgs = conv.messages
    out: list[Piece] = [("[gMASK]<sop>", -1, False)]
    start = 1 if msgs[0].role == SYSTEM else 0
    system = msgs[0].text if start else None
    if conv.tools:
        defs = "".join(f"\n\n## {t.get('name', 'tool')}\n\n{pretty(t)}\n"
                       "在调用上述函数时，请使用 Json 格式表示调用的参数。" for t in conv.functions)
        system = (system + "\n\n" if system else "") + "# 可用工具" + defs
    if system is not None:
        out.append((f"<|system|>\n{system}", 0 if start else -1, False))
    for i in range(start, len(msgs)):
        m = msgs[i]
        prev_answer = i > start and msgs[i - 1].role == ASSISTANT  # its answer already wrote our marker
        if m.role == USER:
            out.append((("" if prev_answer else "<|user|>") + f"\n{m.text}", i, False))
        elif m.role == TOOL:
            out.append((("" if prev_answer else "<|observation|>") + f"\n{m.text}", i, False))
        else:
            nxt = msgs[i + 1] if i + 1 < len(msgs) else None
            if m.tool_calls:
                c = m.tool_calls[0]
                args = c["arguments"] if isinstance(c["arguments"], str) else dumps(c["arguments"])
                body = f"{c['name']}\n{args}"
            else:
                body = "\n" + with_reasoning(m, m.text)
            end = "<|endoftext|>" if nxt is None else ("<|observation|>" if nxt.role == TOOL else "<|user|>")
            out += [("<|assistant|>", i, False), (body + end, i, True)]
    return out


# name -> (render, the special tokens it writes: --add-special-tokens adds those a tokenizer lacks)
FAMILY = {
    "glm4": Builtin(_glm4, ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>")),
}

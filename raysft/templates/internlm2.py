"""InternLM2 chat with its plugin protocol."""

from __future__ import annotations

from ..normalize import ASSISTANT, SYSTEM, TOOL, Conversation
from .base import Builtin, Piece, Specials, call_json, dumps, with_reasoning


def _internlm2(conv: Conversation, sp: Specials) -> list[Piece]:
    """InternLM2 chat: ChatML after BOS. Tools follow InternLM2's plugin protocol: definitions
    in ``<|im_start|>system name=<|plugin|>``, calls as ``<|action_start|><|plugin|>\n{json}
    <|action_end|>``, results as ``<|im_start|>environment name=<|plugin|>``."""
    bos = sp.bos or "<s>"
    msgs = conv.messages
    out: list[Piece] = [(bos, -1, False)]
    start = 1 if msgs[0].role == SYSTEM else 0
    if start:
        out.append((f"<|im_start|>system\n{msgs[0].text}<|im_end|>\n", 0, False))
    if conv.tools:
        out.append(("<|im_start|>system name=<|plugin|>\n" + dumps(conv.functions) + "<|im_end|>\n", -1, False))
    for i in range(start, len(msgs)):
        m = msgs[i]
        if m.role == ASSISTANT:
            body = with_reasoning(m, m.text)
            for c in m.tool_calls or ():
                body += "<|action_start|><|plugin|>\n" + call_json(c, "parameters") + "<|action_end|>"
            out += [("<|im_start|>assistant\n", i, False), (body + "<|im_end|>", i, True), ("\n", i, False)]
        elif m.role == TOOL:
            out.append((f"<|im_start|>environment name=<|plugin|>\n{m.text}<|im_end|>\n", i, False))
        else:
            out.append((f"<|im_start|>{m.role}\n{m.text}<|im_end|>\n", i, False))
    return out


# name -> (render, the special tokens it writes: --add-special-tokens adds those a tokenizer lacks)
FAMILY = {
    "internlm2": Builtin(_internlm2, ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|plugin|>")),
}

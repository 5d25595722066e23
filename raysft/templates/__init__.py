"""Template stage, part 1: render a :class:`~raysft.normalize.Conversation` to text plus the
character spans that carry loss.

Pure Python. One module per template family (``llama``, ``chatml``, ``mistral``, ``internlm2``,
``deepseek``, ``glm4``), each registering its built-ins in ``FAMILY``, gathered here; ``auto``
is the tokenizer's own Jinja template (``jinja``). Adding a family is one module and one line
in ``FAMILIES``.

A template turns messages into pieces ``(text, message_index, is_answer)``; ``is_answer``
pieces are an assistant turn's output: its content, reasoning and tool calls, and the
end-of-turn marker that closes it. The loss policy then picks which answer pieces carry loss:

* ``assistant`` (default): every assistant turn;
* ``last``: only the last assistant turn (``--mask-history``);
* ``all``: every character (``--train-on-prompt``).

A message with ``loss: false`` / ``loss_weight: 0`` in the input never carries loss.
"""

from __future__ import annotations

import datetime

from ..normalize import ASSISTANT, Conversation, Message
from . import chatml, deepseek, glm4, internlm2, llama, mistral
from .base import Builtin, Piece, Rendered, Specials, TemplateError
from .jinja import DEFAULT_DATE, JinjaTemplate

LOSS_POLICIES = ("assistant", "last", "all")
FAMILIES = (llama, chatml, mistral, internlm2, deepseek, glm4)
BUILTINS: dict[str, Builtin] = {name: b for fam in FAMILIES for name, b in fam.FAMILY.items()}
# The special tokens each built-in writes (--add-special-tokens adds those a tokenizer lacks).
MARKERS: dict[str, tuple[str, ...]] = {name: b.markers for name, b in BUILTINS.items()}
TEMPLATE_NAMES = (*BUILTINS, "auto")


def to_hf_messages(conv: Conversation) -> list[dict]:
    """Messages in the shape Hugging Face chat templates expect (``apply_chat_template``):
    content as given (null stays null), ``reasoning_content``, ``tool_calls`` in OpenAI form
    with their ids, and a tool result's ``tool_call_id`` and ``name``."""
    out = []
    for m in conv.messages:
        d: dict = {"role": m.role, "content": m.content}
        if m.reasoning:
            d["reasoning_content"] = m.reasoning
        if m.tool_calls:
            d["tool_calls"] = [
                {**({"id": c["id"]} if "id" in c else {}), "type": "function",
                 "function": {"name": c["name"], "arguments": c["arguments"]}} for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


class Template:
    """A chat template plus a loss policy: ``render(conv) -> Rendered``."""

    def __init__(
        self,
        name: str,
        specials: Specials | None = None,
        chat_template: str | None = None,
        special_strings: tuple[str, ...] = (),
        loss: str = "assistant",
        template_kwargs: dict | None = None,
        special_map: dict | None = None,
        date: datetime.date | str | None = None,
    ):
        if loss not in LOSS_POLICIES:
            raise TemplateError(f"unknown loss policy {loss!r}; choose one of {', '.join(LOSS_POLICIES)}")
        self.name = name
        self.loss = loss
        self.kwargs = dict(template_kwargs or {})
        self._jinja = None
        if isinstance(date, str):
            try:
                date = datetime.date.fromisoformat(date)
            except ValueError:
                raise TemplateError(f"--template-date {date!r} is not a date (YYYY-MM-DD)") from None
        sp = specials or Specials()
        self.specials = Specials(sp.bos, sp.eos, sp.prefix_space, self.kwargs, date or DEFAULT_DATE)
        if name == "auto":
            if not chat_template:
                raise TemplateError(
                    "--template auto needs a tokenizer with a chat_template (in tokenizer_config.json "
                    f"or chat_template.jinja); choose a built-in instead: {', '.join(BUILTINS)}"
                )
            self._jinja = JinjaTemplate(chat_template, self.specials, self.kwargs, special_map, date or DEFAULT_DATE)
            self._special_strings = tuple(sorted(special_strings, key=len, reverse=True))
        elif name not in BUILTINS:
            raise TemplateError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")

    def pieces(self, conv: Conversation) -> list[Piece]:
        if self._jinja is not None:
            return self._jinja.pieces(conv, self._special_strings)
        return BUILTINS[self.name].render(conv, self.specials)

    def render(self, conv: Conversation) -> Rendered:
        pieces = self.pieces(conv)
        text = "".join(p[0] for p in pieces)
        if self.loss == "all":
            return Rendered(text, [(0, len(text))] if text else [])
        msgs = conv.messages
        spans: list[tuple[int, int]] = []
        pos = 0
        if self.loss == "assistant" and all(m.loss is None for m in msgs):  # the common case: every answer
            for piece, _, answer in pieces:
                end = pos + len(piece)
                if answer and piece:
                    if spans and spans[-1][1] == pos:
                        spans[-1] = (spans[-1][0], end)
                    else:
                        spans.append((pos, end))
                pos = end
            return Rendered(text, spans)
        last = max((i for i, m in enumerate(msgs) if m.role == ASSISTANT), default=-1)
        for piece, i, answer in pieces:
            end = pos + len(piece)
            if answer and piece and _carries_loss(msgs[i], i, last, self.loss):
                if spans and spans[-1][1] == pos:
                    spans[-1] = (spans[-1][0], end)
                else:
                    spans.append((pos, end))
            pos = end
        return Rendered(text, spans)


def _carries_loss(m: Message, i: int, last: int, policy: str) -> bool:
    if m.loss is not None:
        return m.loss and (policy != "last" or i == last)
    return policy == "assistant" or i == last


__all__ = ["BUILTINS", "MARKERS", "TEMPLATE_NAMES", "LOSS_POLICIES", "Template", "TemplateError", "Rendered",
           "Specials", "Piece", "to_hf_messages", "JinjaTemplate"]

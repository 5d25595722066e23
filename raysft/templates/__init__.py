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

from ..config import LOSS_POLICIES, THINK_LOSS
from ..normalize import ASSISTANT, Conversation, Message
from . import chatml, deepseek, glm4, internlm2, llama, mistral
from .base import ABSENT, Builtin, Piece, Rendered, Specials, TemplateError, to_hf_messages
from .jinja import DEFAULT_DATE, JinjaTemplate

FAMILIES = (llama, chatml, mistral, internlm2, deepseek, glm4)
BUILTINS: dict[str, Builtin] = {name: b for fam in FAMILIES for name, b in fam.FAMILY.items()}
# The special tokens each built-in writes (--add-special-tokens adds those a tokenizer lacks).
MARKERS: dict[str, tuple[str, ...]] = {name: b.markers for name, b in BUILTINS.items()}
TEMPLATE_NAMES = (*BUILTINS, "auto")
# The names LLaMA-Factory (``template:``) and MindSpeed-LLM (``--prompt-type``) give the formats
# raysft has built in: each maps to the built-in that writes the same text (docs/inputs.md, "Templates").
ALIASES = {
    "qwen": "qwen2", "qwen2.5": "qwen2", "qwen2_5": "qwen2", "intern2": "internlm2", "internlm": "internlm2",
    "deepseek3": "deepseek-v3", "deepseekv3": "deepseek-v3", "deepseek_v3": "deepseek-v3",
    "deepseekv31": "deepseek-v3.1", "deepseek_v3.1": "deepseek-v3.1", "llama-3": "llama3", "llama3_1": "llama3.1",
    "llama-3.1": "llama3.1", "llama-2": "llama2", "glm-4": "glm4", "chatglm4": "glm4",
}
# reasoning blocks --think-loss acts on: (opening, closing) markers
THINK_MARKERS = (("<think>", "</think>"), ("<seed:think>", "</seed:think>"), ("[THINK]", "[/THINK]"),
                 ("<|begin_of_thought|>", "<|end_of_thought|>"))


def canonical_template(name: str) -> str:
    """A template name as raysft knows it: a built-in, ``auto``, or a peer's name for a built-in
    (``ALIASES``); anything else is one line naming the close ones."""
    if name in BUILTINS or name == "auto":
        return name
    if name in ALIASES:
        return ALIASES[name]
    import difflib

    known = [*TEMPLATE_NAMES, *ALIASES]
    close = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise TemplateError(f"unknown template {name!r}{hint} (built-ins: {', '.join(TEMPLATE_NAMES)}; "
                        "LLaMA-Factory/MindSpeed names: see the template table of docs/inputs.md)")


def unknown_kwargs(name: str, kwargs: dict | None) -> str | None:
    """Why ``--template-kwargs`` cannot go with the built-in ``name`` (None: they can): a
    built-in reads only the kwargs it declares, and one it would ignore (``enable_thinking``
    on ``qwen3``, ``thinking`` on ``deepseek-v3.1``) is an error, not a silent no-op."""
    if name == "auto" or not kwargs or name not in BUILTINS:
        return None
    takes = BUILTINS[name].kwargs
    extra = sorted(set(kwargs) - set(takes))
    if not extra:
        return None
    return (f"--template-kwargs {', '.join(map(repr, extra))}: the built-in {name!r} does not read "
            f"{'it' if len(extra) == 1 else 'them'} ({'it reads ' + ', '.join(takes) if takes else 'it reads none'}); "
            "for a model template's own switches use --template auto with its tokenizer")


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
        think_loss: str = "auto",
    ):
        if loss not in LOSS_POLICIES:
            raise TemplateError(f"unknown loss policy {loss!r}; choose one of {', '.join(LOSS_POLICIES)}")
        if think_loss not in THINK_LOSS:
            raise TemplateError(f"unknown --think-loss {think_loss!r}; choose one of {', '.join(THINK_LOSS)}")
        name = canonical_template(name)
        why = unknown_kwargs(name, template_kwargs)
        if why:
            raise TemplateError(why)
        self.think_loss = think_loss
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

    def messages(self, conv: Conversation) -> list[dict]:
        """The conversation as ``apply_chat_template`` is handed it for this template (the
        parity gate's input): a tool-call-only turn in the form the template renders it."""
        return self._jinja.messages(conv) if self._jinja is not None else to_hf_messages(conv, "")

    def render_paths(self) -> tuple[int, int]:
        """``--template auto``: conversations so far replayed from render plans, and rendered
        (``raysft.templates.plan``); (0, 0) for a built-in."""
        if self._jinja is None:
            return 0, 0
        return self._jinja.plan_stats["planned"], self._jinja.plan_stats["rendered"]

    def pieces(self, conv: Conversation) -> list[Piece]:
        if self._jinja is not None:
            return self._jinja.pieces(conv, self._special_strings)
        return BUILTINS[self.name].render(conv, self.specials)

    def render(self, conv: Conversation) -> Rendered:
        r = self._render(conv)
        if self.think_loss != "auto" and any(op in r.text for op, _ in THINK_MARKERS):
            r.spans = think_spans(r.text, r.spans, self.think_loss)
        return r

    def _render(self, conv: Conversation) -> Rendered:
        pieces = self.pieces(conv)
        text = "".join([p[0] for p in pieces])
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


def _blocks(text: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """Reasoning blocks whose opening marker starts in ``[lo, hi)``: from the opening marker
    through the closing one and the whitespace after it (the answer starts after it)."""
    out = []
    for op, cl in THINK_MARKERS:
        k = text.find(op, lo, hi)
        while k >= 0:
            c = text.find(cl, k + len(op))
            if c < 0:
                break
            end = c + len(cl)
            while end < len(text) and text[end] in " \t\r\n":
                end += 1
            out.append((k, end))
            k = text.find(op, end, hi)
    return sorted(out)


def think_spans(text: str, spans: list[tuple[int, int]], mode: str) -> list[tuple[int, int]]:
    """``--think-loss``: ``train`` puts loss on the reasoning block (empty or not) that opens an
    assistant turn even where the template writes it as part of the prompt (Qwen3 with
    ``enable_thinking: false`` writes the empty block in its generation prompt); ``mask`` takes
    the loss off every reasoning block inside an answer, empty or not."""
    out: list[tuple[int, int]] = []
    prev_end = 0
    for s, e in spans:
        if mode == "train":
            head = text[prev_end:s]
            stripped = head.rstrip(" \t\r\n")
            for op, cl in THINK_MARKERS:
                if stripped.endswith(cl):
                    k = stripped.rfind(op)
                    if k >= 0:
                        s = prev_end + k
                    break
            out.append((s, e))
        else:
            pos = s
            for a, b in _blocks(text, s, e):
                if a > pos:
                    out.append((pos, a))
                pos = max(pos, min(b, e))
            if pos < e:
                out.append((pos, e))
        prev_end = e
    return out


def _carries_loss(m: Message, i: int, last: int, policy: str) -> bool:
    if m.loss is not None:
        return m.loss and (policy != "last" or i == last)
    return policy == "assistant" or i == last


__all__ = ["ALIASES", "THINK_LOSS", "canonical_template", "ABSENT", "BUILTINS", "MARKERS", "TEMPLATE_NAMES", "LOSS_POLICIES", "Template", "TemplateError", "Rendered",
           "Specials", "Piece", "to_hf_messages", "JinjaTemplate"]

"""Template stage, part 1: render a :class:`Conversation` to text plus the character spans
that carry loss.

Pure Python. A template turns messages into a list of pieces ``(text, message_index, is_answer)``;
``is_answer`` pieces are an assistant turn's output: its content (with any tool calls) and the
end-of-turn marker that closes it. The loss policy then picks which answer pieces carry loss:

* ``assistant`` (default): every assistant turn;
* ``last``: only the last assistant turn (``--mask-history``);
* ``all``: every character (``--train-on-prompt``).

A message with ``loss: false`` / ``loss_weight: 0`` in the input never carries loss.

Built-in templates follow each model family's published chat format. ``auto`` renders the
tokenizer's own Jinja ``chat_template`` (as ``transformers``' ``apply_chat_template`` does) and
finds each assistant turn by rendering the conversation prefix with a generation prompt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from .normalize import ASSISTANT, SYSTEM, TOOL, USER, Conversation, Message, RecordError

LOSS_POLICIES = ("assistant", "last", "all")

Piece = tuple[str, int, bool]  # text, message index (-1: template scaffolding), is_answer


class TemplateError(ValueError):
    """A template that cannot be used (unknown name, tokenizer without chat template...)."""


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # [start, end) character ranges that carry loss


@dataclass
class Specials:
    """Special-token strings of the tokenizer, for templates that use BOS/EOS literally."""

    bos: str | None = None
    eos: str | None = None


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


_PRETTY: dict[str, str] = {}


def _pretty(obj) -> str:
    """``json.dumps(obj, indent=4, ensure_ascii=False)``, remembered by the object's compact JSON
    (which the C encoder writes ~10x faster than Python writes the indented form): datasets
    repeat the same tool definitions across many records. Equal compact JSON means equal
    keys, order and values, so the indented text is the same."""
    key = _dumps(obj)
    text = _PRETTY.get(key)
    if text is None:
        if len(_PRETTY) >= 4096:
            _PRETTY.clear()
        text = _PRETTY[key] = json.dumps(obj, indent=4, ensure_ascii=False)
    return text


def _call_json(call: dict, args_key: str = "arguments") -> str:
    return _dumps({"name": call["name"], args_key: call["arguments"]})


# --------------------------------------------------------------------------- built-ins


def _llama3(conv: Conversation, sp: Specials) -> list[Piece]:
    """Meta Llama 3 / 3.1 format (content is trimmed, as the official template does).

    Tools follow Llama 3.1's JSON tool calling as its Hugging Face template renders it: the
    definitions go into the first user turn, a call is ``{"name": ..., "parameters": ...}`` and a
    tool result is an ``ipython`` turn.
    """
    out: list[Piece] = [("<|begin_of_text|>", -1, False)]
    tools_pending = conv.functions
    for i, m in enumerate(conv.messages):
        role = "ipython" if m.role == TOOL else m.role
        head = f"<|start_header_id|>{role}<|end_header_id|>\n\n"
        content = m.text.strip()
        if m.role == USER and tools_pending:
            intro = (
                "Given the following functions, please respond with a JSON for a function call "
                "with its proper arguments that best answers the given prompt.\n\n"
                'Respond in the format {"name": function name, "parameters": dictionary of '
                "argument name and its value}.Do not use variables.\n\n"
            )
            defs = "".join(_pretty(t) + "\n\n" for t in tools_pending)
            content = intro + defs + content
            tools_pending = None
        if m.role == ASSISTANT:
            body = _with_reasoning(m, content)
            if m.tool_calls:
                calls = "".join(_call_json(c, "parameters") for c in m.tool_calls)
                body = (content + "\n" if content else "") + calls
            out += [(head, i, False), (body + "<|eot_id|>", i, True)]
        else:
            out.append((head + content + "<|eot_id|>", i, False))
    return out


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
            defs = "".join("\n" + _dumps(t) for t in conv.functions)
            system = (system + "\n\n" if system else "") + QWEN_TOOLS.format(defs=defs)
        if system is not None:
            out.append((f"<|im_start|>system\n{system}<|im_end|>\n", 0 if start else -1, False))
        last_query = max((i for i, m in enumerate(msgs) if m.role == USER), default=-1)
        for i in range(start, len(msgs)):
            m = msgs[i]
            if m.role == ASSISTANT:
                if not think:
                    body = _with_reasoning(m, m.text)
                elif i > last_query and (i == len(msgs) - 1 or m.reasoning):
                    body = f"<think>\n{(m.reasoning or '').strip()}\n</think>\n\n{m.text.lstrip()}"
                else:
                    body = m.text
                for c in m.tool_calls or ():
                    body += ("\n" if body else "") + "<tool_call>\n" + _call_json(c) + "\n</tool_call>"
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


def _llama2(conv: Conversation, sp: Specials) -> list[Piece]:
    """Llama 2 chat: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>``."""
    bos, eos = sp.bos or "<s>", sp.eos or "</s>"
    msgs = conv.messages
    if conv.tools or any(m.role == TOOL or m.tool_calls for m in msgs):
        raise RecordError("template_unsupported", "the llama2 template has no tool-call format")
    system = msgs[0].text if msgs[0].role == SYSTEM else None
    out: list[Piece] = []
    body = msgs[1:] if system is not None else msgs
    offset = len(msgs) - len(body)
    for j, m in enumerate(body):
        i = j + offset
        content = m.text
        if j == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m.role == USER:
            out.append((f"{bos}[INST] {content.strip()} [/INST]", i, False))
        else:
            out += [(" ", i, False), (f"{_with_reasoning(m, content.strip())} {eos}", i, True)]
    return out


def _with_reasoning(m: Message, content: str) -> str:
    """Reasoning for families without a format of their own: a <think> block before the answer."""
    return f"<think>\n{m.reasoning.strip()}\n</think>\n\n{content}" if m.reasoning else content


QWEN_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{defs}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


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
                text += "[AVAILABLE_TOOLS] " + _dumps(tools) + "[/AVAILABLE_TOOLS]"
            content = f"{system}\n\n{m.text}" if system is not None and i == last_user else m.text
            out.append((text + f"[INST] {content}[/INST]", i, False))
        elif m.role == ASSISTANT:
            if m.tool_calls:
                calls = [{"name": c["name"], "arguments": c["arguments"]} for c in m.tool_calls]
                out += [(" " if m.text else "", i, False),
                        ((m.text + " " if m.text else "") + "[TOOL_CALLS] " + _dumps(calls) + eos, i, True)]
            else:
                out += [(" ", i, False), (_with_reasoning(m, m.text) + eos, i, True)]
        else:
            out.append(("[TOOL_RESULTS] " + _dumps({"content": m.text}) + "[/TOOL_RESULTS]", i, False))
    return out


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
        out.append(("<|im_start|>system name=<|plugin|>\n" + _dumps(conv.functions) + "<|im_end|>\n", -1, False))
    for i in range(start, len(msgs)):
        m = msgs[i]
        if m.role == ASSISTANT:
            body = _with_reasoning(m, m.text)
            for c in m.tool_calls or ():
                body += "<|action_start|><|plugin|>\n" + _call_json(c, "parameters") + "<|action_end|>"
            out += [("<|im_start|>assistant\n", i, False), (body + "<|im_end|>", i, True), ("\n", i, False)]
        elif m.role == TOOL:
            out.append((f"<|im_start|>environment name=<|plugin|>\n{m.text}<|im_end|>\n", i, False))
        else:
            out.append((f"<|im_start|>{m.role}\n{m.text}<|im_end|>\n", i, False))
    return out


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
            f"Parameters: {_dumps(t.get('parameters', {}))}\n" for t in conv.functions)
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
            body = _with_reasoning(m, m.text)
            if m.tool_calls:
                body += "<｜tool▁calls▁begin｜>" + "".join(
                    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>" + c["name"] + "\n```json\n"
                    + (c["arguments"] if isinstance(c["arguments"], str) else _dumps(c["arguments"]))
                    + "\n```<｜tool▁call▁end｜>" for c in m.tool_calls) + "<｜tool▁calls▁end｜>"
            out += [("" if after_tool else "<｜Assistant｜>", i, False), (body + eos, i, True)]
    return out


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
        defs = "".join(f"\n\n## {t.get('name', 'tool')}\n\n{_pretty(t)}\n"
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
                args = c["arguments"] if isinstance(c["arguments"], str) else _dumps(c["arguments"])
                body = f"{c['name']}\n{args}"
            else:
                body = "\n" + _with_reasoning(m, m.text)
            end = "<|endoftext|>" if nxt is None else ("<|observation|>" if nxt.role == TOOL else "<|user|>")
            out += [("<|assistant|>", i, False), (body + end, i, True)]
    return out


BUILTIN: dict[str, Callable[[Conversation, Specials], list[Piece]]] = {
    "llama3": _llama3,
    "llama2": _llama2,
    "chatml": _chatml(None),
    "qwen2": _chatml("You are a helpful assistant."),
    "qwen3": _chatml(None, think=True),
    "mistral": _mistral,
    "internlm2": _internlm2,
    "deepseek-v3": _deepseek_v3,
    "glm4": _glm4,
}
# The special tokens each built-in writes (--add-special-tokens adds those a tokenizer lacks).
MARKERS: dict[str, tuple[str, ...]] = {
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "llama2": (),
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen2": ("<|im_start|>", "<|im_end|>"),
    "qwen3": ("<|im_start|>", "<|im_end|>"),
    "mistral": ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                "[/TOOL_RESULTS]"),
    "internlm2": ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|plugin|>"),
    "deepseek-v3": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
                    "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
                    "<｜tool▁output▁end｜>"),
    "glm4": ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>"),
}
TEMPLATE_NAMES = (*BUILTIN, "auto")


# --------------------------------------------------------------------------- auto (Jinja)


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


class JinjaTemplate:
    """Renders a tokenizer's ``chat_template`` in a sandbox, as ``apply_chat_template`` does."""

    def __init__(self, source: str, specials: Specials, extra: dict | None = None):
        from jinja2.exceptions import TemplateError as JinjaError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise JinjaError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt):
            # Fixed date: output bytes must not depend on the day the job runs.
            import datetime

            return datetime.datetime(2024, 1, 1).strftime(fmt)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        self._jinja_error = JinjaError
        self.template = env.from_string(source)
        self.vars = {"bos_token": specials.bos or "", "eos_token": specials.eos or "", **(extra or {})}

    def __call__(self, messages: list[dict], tools, add_generation_prompt: bool) -> str:
        try:
            return self.template.render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **self.vars
            )
        except self._jinja_error as e:
            raise RecordError("template_error", f"chat template refused the conversation: {e}") from None

    def pieces(self, conv: Conversation, special_strings: tuple[str, ...]) -> list[Piece]:
        msgs = to_hf_messages(conv)
        tools = conv.tools
        full = self(msgs, tools, False)
        out: list[Piece] = []
        cursor = 0
        for i, m in enumerate(conv.messages):
            if m.role != ASSISTANT:
                continue
            prefix = self(msgs[:i], tools, True)
            through = self(msgs[: i + 1], tools, False)
            start, end = len(prefix), len(through)
            if not (full.startswith(prefix) and full.startswith(through) and cursor <= start <= end):
                # Templates that rewrite history (e.g. drop reasoning of earlier turns) have no
                # stable prefix: find the turn's content in the full text instead.
                start = full.find(m.text.strip(), cursor) if m.text.strip() else -1
                if start < 0:
                    raise RecordError(
                        "template_error",
                        f"cannot locate assistant turn {i} in the text the chat template rendered",
                    )
                end = start + len(m.text.strip())
                end = _extend_to_marker(full, end, special_strings)
            else:
                end = _trim_to_marker(full, start, end, special_strings)
            out.append((full[cursor:start], -1, False))
            out.append((full[start:end], i, True))
            cursor = end
        out.append((full[cursor:], -1, False))
        return out


def _trim_to_marker(text: str, start: int, end: int, specials: tuple[str, ...]) -> int:
    """End the answer at the end of the last special token inside it (drop trailing newlines
    that the template adds after the end-of-turn marker)."""
    best = -1
    for s in specials:
        k = text.rfind(s, start, end)
        if k >= 0:
            best = max(best, k + len(s))
    return best if best > start else end


def _extend_to_marker(text: str, end: int, specials: tuple[str, ...]) -> int:
    """Extend the answer through the first special token that follows it (its end-of-turn)."""
    best = None
    for s in specials:
        k = text.find(s, end)
        if k >= 0 and text[end:k].strip() == "" and (best is None or k < best[0]):
            best = (k, k + len(s))
    return best[1] if best else end


# --------------------------------------------------------------------------- public API


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
    ):
        if loss not in LOSS_POLICIES:
            raise TemplateError(f"unknown loss policy {loss!r}; choose one of {', '.join(LOSS_POLICIES)}")
        self.name = name
        self.loss = loss
        self.specials = specials or Specials()
        self._jinja = None
        if name == "auto":
            if not chat_template:
                raise TemplateError(
                    "--template auto needs a tokenizer with a chat_template (in tokenizer_config.json "
                    f"or chat_template.jinja); choose a built-in instead: {', '.join(BUILTIN)}"
                )
            self._jinja = JinjaTemplate(chat_template, self.specials, template_kwargs)
            self._special_strings = tuple(sorted(special_strings, key=len, reverse=True))
        elif name not in BUILTIN:
            raise TemplateError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")

    def pieces(self, conv: Conversation) -> list[Piece]:
        if self._jinja is not None:
            return self._jinja.pieces(conv, self._special_strings)
        return BUILTIN[self.name](conv, self.specials)

    def render(self, conv: Conversation) -> Rendered:
        pieces = self.pieces(conv)
        text = "".join(p[0] for p in pieces)
        if self.loss == "all":
            return Rendered(text, [(0, len(text))] if text else [])
        msgs = conv.messages
        last = max((i for i, m in enumerate(msgs) if m.role == ASSISTANT), default=-1)
        spans: list[tuple[int, int]] = []
        pos = 0
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

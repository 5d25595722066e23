"""Normalize stage: one raw record (a dict) -> one validated :class:`Conversation`.

Pure functions, no engine. Input layouts understood:

* ``alpaca``   ``instruction`` / ``input`` / ``output``, optional ``system`` and ``history``
  (a list of ``[prompt, response]`` pairs), optional ``tools``.
* ``sharegpt`` ``conversations``: a list of ``{"from", "value"}`` with ``from`` in human/user,
  gpt/assistant, system, function_call, observation/tool/function; optional ``system`` and
  ``tools`` (a list, or a JSON string as in glaive-style data). A ``function_call`` value is one
  call or a JSON list of calls (parallel calls). ``conversations`` whose turns use
  ``role``/``content`` keys are read as ``openai`` messages. Role names are LLaMA-Factory's
  ``tags`` (``role_tag``, ``content_tag``, ``user_tag``, ``assistant_tag``, ``observation_tag``,
  ``function_tag``, ``system_tag``) when ``--map-keys`` gives them.
* ``text``     ``text``: one plain-text document (continued pretraining): one sample with loss
  on every token, the tokenizer's EOS appended (``raysft.tokenize``), as Megatron-LM's
  ``preprocess_data.py --append-eod`` writes it. Detected on a record whose only text field is
  ``text`` (no ``messages``/``conversations``/``instruction``).
* ``openai``   ``messages``: a list of ``{"role", "content"}`` with role in system/developer,
  user, assistant, tool/function/ipython. Assistant messages may carry ``tool_calls``
  (``{"id", "type": "function", "function": {"name", "arguments"}}`` or bare ``{"name",
  "arguments"}``), the legacy ``function_call``, ``reasoning_content``/``reasoning``; tool
  messages ``tool_call_id`` and ``name``. Content may be a string, ``null`` (kept as null),
  or a list of parts: OpenAI's ``{"type": "text", "text"}`` and LLaMA-Factory's
  ``{"type": "text" | "reasoning" | "tool_call", "value"}``.

Consecutive assistant messages (a text answer and then its tool calls, as some datasets split
them) become one assistant message. Tool definitions are normalized to the OpenAI form chat
templates are written for (``{"type": "function", "function": {name, description,
parameters}}``), whatever form the dataset gives (glaive's bare ``{name, description,
parameters}``). Tool-call arguments given as a JSON string are parsed to the object
``apply_chat_template`` expects (kept as the string when it is not a JSON object).

``--map-keys`` renames input fields to these canonical names first (as MindSpeed-LLM and
LLaMA-Factory allow), e.g. ``{"prompt": "question", "response": "answer"}``, and takes their
nested role tags: ``{"messages": "conversations", "tags": {"role_tag": "role", ...}}``.

Rules every format shares (docs/inputs.md lists them beside the rejects they replace):

* A tool-call-only assistant turn (calls, no text: a ShareGPT ``function_call`` turn, an
  OpenAI message with ``tool_calls`` and null, empty or absent content, a LLaMA-Factory turn of
  only ``tool_call`` parts) has ``content = None``, whatever the input said; each chat template
  is then handed the form under which it renders the call (``raysft.templates``).
* Role order is LLaMA-Factory's positional rule: after an optional system message, turns
  alternate between the user side (user, tool result) and the assistant side; consecutive tool
  results (parallel calls) are one user-side turn; the conversation ends on an assistant turn.
  A tool result may follow any assistant turn (an ``observation`` after a plain ``gpt`` turn is
  valid ShareGPT).

Every validation failure raises :class:`RecordError` with a short machine-readable ``reason``
(used to count rejects) and a human message; the caller adds the file and row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .config import FORMATS

SYSTEM, USER, ASSISTANT, TOOL = "system", "user", "assistant", "tool"

# Canonical key -> names accepted in --map-keys for it (MindSpeed-LLM / LLaMA-Factory spellings).
KEY_ALIASES = {
    "prompt": ("prompt", "instruction"),
    "query": ("query", "input"),
    "response": ("response", "output"),
    "system": ("system",),
    "history": ("history",),
    "messages": ("messages", "conversations"),
    "tools": ("tools",),
    "text": ("text",),
    "chosen": ("chosen",),
    "rejected": ("rejected",),
}
# LLaMA-Factory's / MindSpeed's role tags (ShareGPT and OpenAI-style turns), given flat or under "tags"
TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
# LLaMA-Factory column names raysft has no use for in a text-only SFT build: an explicit error
UNSUPPORTED_KEYS = {"kto_tag": "KTO labels", "images": "images", "videos": "videos", "audios": "audio"}

SHAREGPT_ROLES = {
    "human": USER,
    "user": USER,
    "gpt": ASSISTANT,
    "assistant": ASSISTANT,
    "system": SYSTEM,
    "function_call": ASSISTANT,
    "observation": TOOL,
    "tool": TOOL,
    "function": TOOL,
}
OPENAI_ROLES = {SYSTEM: SYSTEM, "developer": SYSTEM, USER: USER, ASSISTANT: ASSISTANT, TOOL: TOOL, "ipython": TOOL,
                "function": TOOL}


class RecordError(ValueError):
    """A record that cannot become a valid conversation."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class Message:
    role: str
    content: str | None  # None: the dataset gave null (an assistant turn of only tool calls or reasoning)
    tool_calls: list[dict] | None = None  # [{"name": str, "arguments": dict|str, "id"?: str}]
    loss: bool | None = None  # None: decided by the loss policy; False: never; True: always
    reasoning: str | None = None  # assistant reasoning ("reasoning_content"), trained as output
    tool_call_id: str | None = None  # a tool result: the call it answers
    name: str | None = None  # a tool result: the function's name

    @property
    def text(self) -> str:
        """The content as text ("" for null)."""
        return self.content or ""


@dataclass
class Conversation:
    messages: list[Message]
    tools: list[dict] | None = None  # OpenAI form: {"type": "function", "function": {...}}
    meta: dict = field(default_factory=dict)

    @property
    def functions(self) -> list[dict] | None:
        """The tool definitions' function objects ({name, description, parameters})."""
        if not self.tools:
            return None
        return [t["function"] if t.get("type") == "function" and isinstance(t.get("function"), dict) else t
                for t in self.tools]


def parse_map_keys(spec: str | dict | None) -> dict[str, str]:
    """Parse ``--map-keys``: canonical name -> input field name. Takes LLaMA-Factory's and
    MindSpeed-LLM's spellings (``instruction``, ``conversations``...), their nested ``tags``
    (role names) and a ``columns`` object as a ``dataset_info.json`` entry writes it."""
    if not spec:
        return {}
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"--map-keys is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError('--map-keys must be a JSON object of strings, e.g. {"prompt": "question"}')
    flat: dict = {}
    for key, value in spec.items():
        if key in ("tags", "columns"):
            if not isinstance(value, dict):
                raise ValueError(f'--map-keys: "{key}" must be an object of strings, e.g. {{"role_tag": "role"}}')
            flat.update(value)
        else:
            flat[key] = value
    out = {}
    for key, source in flat.items():
        if key in UNSUPPORTED_KEYS:
            raise ValueError(f"--map-keys: {key!r} names {UNSUPPORTED_KEYS[key]}, which raysft does not read")
        if not isinstance(source, str):
            raise ValueError(f"--map-keys: the value of {key!r} must be a string (a field or tag name)")
        canon = key if key in TAGS else next((c for c, names in KEY_ALIASES.items() if key in names), None)
        if canon is None:
            known = sorted({n for names in KEY_ALIASES.values() for n in names} | set(TAGS))
            raise ValueError(f"--map-keys: unknown key {key!r}; known keys: {', '.join(known)} (and 'tags')")
        out[canon] = source
    return out


def _turns_look_like_openai(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0] \
        and "from" not in value[0]


def detect_format(record: dict, keys: dict[str, str]) -> str:
    if keys.get("messages", "messages") in record and "messages" in record:
        return "openai"
    msgs_key = keys.get("messages")
    if msgs_key and msgs_key in record:
        value = _maybe_json(record[msgs_key])
        if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]:
            return "sharegpt"
        return "openai"
    if "conversations" in record:
        return "openai" if _turns_look_like_openai(_maybe_json(record["conversations"])) else "sharegpt"
    if keys.get("prompt", "instruction") in record or "instruction" in record:
        return "alpaca"
    if keys.get("text", "text") in record:
        return "text"
    raise RecordError(
        "unknown_format",
        "cannot tell the layout: expected 'messages' (openai), 'conversations' (sharegpt), "
        f"'instruction' (alpaca) or 'text' (plain text); fields present: {sorted(record)[:10]}",
    )


@dataclass
class Document:
    """A plain-text record (``format: text``): one sample, loss on every token."""

    text: str


@dataclass
class Pair:
    """A preference record: one prompt and two responses. ``chosen`` and ``rejected`` are whole
    conversations (the prompt, then that response) whose first ``prompt`` messages are the
    shared prompt; those never carry loss."""

    chosen: Conversation
    rejected: Conversation
    prompt: int


def normalize(record: Any, fmt: str = "auto", keys: dict[str, str] | None = None) -> Conversation | Document | Pair:
    """Turn one decoded record into a validated conversation, a plain-text document or a
    preference pair (a record with ``chosen`` and ``rejected``), or raise :class:`RecordError`."""
    keys = keys or {}
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"record is a {type(record).__name__}, not a JSON object")
    if keys.get("chosen", "chosen") in record or keys.get("rejected", "rejected") in record:
        return _pair(record, fmt, keys)
    if fmt == "auto":
        fmt = detect_format(record, keys)
    if fmt == "text":
        name, value = _get(record, keys, "text")
        if value is None:
            raise RecordError("missing_field", f"text record has no '{name}' field")
        if type(value) is not str:
            value = _text(value, f"'{name}'")
        return Document(value)
    return _conversation(record, fmt, keys)


def _conversation(record: dict, fmt: str, keys: dict[str, str]) -> Conversation:
    if fmt == "alpaca":
        conv = _from_alpaca(record, keys)
    elif fmt == "sharegpt":
        name, turns = _get(record, keys, "messages", "conversations")
        if _turns_look_like_openai(_maybe_json(turns)):
            conv = _from_openai(record, dict(keys, messages=name))
        else:
            conv = _from_sharegpt(record, keys)
    elif fmt == "openai":
        if keys.get("messages", "messages") not in record and "conversations" in record:
            keys = dict(keys, messages="conversations")  # role/content turns under ShareGPT's key
        conv = _from_openai(record, keys)
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    conv.messages = _merge_assistant_turns(conv.messages)
    for m in conv.messages:  # the one form of a tool-call-only turn, whatever the input wrote
        if m.tool_calls and m.role == ASSISTANT and not m.content:
            m.content = None
    validate(conv)
    return conv


# --------------------------------------------------------------------------- preference pairs


def _pair(record: dict, fmt: str, keys: dict[str, str]) -> Pair:
    """A preference record in the forms users have (docs/pairs.md):

    * LLaMA-Factory Alpaca: ``instruction``/``input`` (+ ``system``, ``history``) and ``chosen``/
      ``rejected`` answers (strings);
    * LLaMA-Factory ShareGPT / OpenAI: ``conversations`` or ``messages`` (the prompt, ending on a
      user turn) and ``chosen``/``rejected`` turns (an object, a list of them, or a string);
    * TRL: ``prompt`` (a list of messages, or a string) and ``chosen``/``rejected`` (lists of
      messages, or strings); or, with no prompt, ``chosen``/``rejected`` as whole conversations
      (the implicit prompt: the messages they share).

    Each side is normalized as a conversation of its own; the prompt is the messages both sides
    begin with (up to the first assistant turn where they differ)."""
    cname, chosen = _get(record, keys, "chosen")
    rname, rejected = _get(record, keys, "rejected")
    if chosen is None or rejected is None:
        raise RecordError("missing_field", f"a preference record needs both '{cname}' and '{rname}' "
                          f"(no '{cname if chosen is None else rname}')")
    rest = {k: v for k, v in record.items() if k not in (cname, rname)}
    sides = [_side(rest, _maybe_json(v), fmt, keys, f"'{n}'") for v, n in ((chosen, cname), (rejected, rname))]
    a, b = sides[0].messages, sides[1].messages
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    if k == len(a) and k == len(b):
        raise RecordError("same_response", f"'{cname}' and '{rname}' are the same response")
    while k > 0 and not (k < len(a) and k < len(b) and a[k].role == ASSISTANT and b[k].role == ASSISTANT):
        k -= 1
    if k == 0:
        raise RecordError("no_prompt", f"'{cname}' and '{rname}' share no prompt ending on a user turn")
    for conv in sides:
        for m in conv.messages[:k]:
            m.loss = False  # the prompt: the same on both sides, never trained
    return Pair(sides[0], sides[1], k)


def _side(rest: dict, response: Any, fmt: str, keys: dict[str, str], what: str) -> Conversation:
    """One side of a pair as a whole conversation: the record's prompt, then ``response``."""
    mname = keys.get("messages")
    for name in ([mname] if mname else []) + ["messages", "conversations"]:
        if name in rest:  # ShareGPT / OpenAI prompt turns
            turns = _maybe_json(rest[name])
            if not isinstance(turns, list):
                raise RecordError("bad_type", f"'{name}' must be a list of turns")
            if fmt == "auto":
                fmt = "openai" if not turns or _turns_look_like_openai(turns) else "sharegpt"
            return _conversation({**rest, name: turns + _turns(response, fmt, keys, what)}, fmt,
                                 dict(keys, messages=name))
    pname = keys.get("prompt", "instruction")
    if pname in rest or ("prompt" in rest and fmt in ("auto", "alpaca") and "prompt" not in keys):
        prompt = rest.get(pname, rest.get("prompt"))
        if isinstance(_maybe_json(prompt), list):  # TRL conversational: a list of messages
            return _conversation({**rest, "messages": _maybe_json(prompt) + _turns(response, "openai", keys, what)},
                                 "openai", {k: v for k, v in keys.items() if k != "messages"})
        if pname not in rest:  # TRL standard: the prompt is the user's text
            rest = {**{k: v for k, v in rest.items() if k != "prompt"}, "instruction": prompt}
            keys = {k: v for k, v in keys.items() if k != "prompt"}
        answer = response if isinstance(response, str) else _text(_only_content(response, what), what)
        return _conversation({**rest, keys.get("response", "output"): answer}, "alpaca", keys)
    if isinstance(response, list):  # implicit prompt: each side a whole conversation
        fmt = "openai" if _turns_look_like_openai(response) or not response else "sharegpt"
        return _conversation({**rest, "messages": response}, fmt, dict(keys, messages="messages"))
    raise RecordError("missing_field", "a preference record needs a prompt ('instruction', 'prompt', 'messages' or "
                      f"'conversations'), or {what} as a whole conversation")


def _turns(response: Any, fmt: str, keys: dict[str, str], what: str) -> list:
    """A response as turns in the prompt's dialect: a string becomes one assistant turn."""
    if isinstance(response, str):
        if fmt == "sharegpt":
            return [{keys.get("role_tag", "from"): keys.get("assistant_tag", "gpt"),
                     keys.get("content_tag", "value"): response}]
        return [{keys.get("role_tag", "role"): ASSISTANT, keys.get("content_tag", "content"): response}]
    if isinstance(response, dict):
        return [response]
    if isinstance(response, list) and response:
        return response
    raise RecordError("bad_type", f"{what} must be a response: a string, a turn or a list of turns")


def _only_content(response: Any, what: str) -> Any:
    """The text of a one-turn response given as a turn (or a list of one) to an Alpaca prompt."""
    if isinstance(response, list) and len(response) == 1:
        response = response[0]
    if isinstance(response, dict):
        for k in ("content", "value", "text"):
            if k in response:
                return response[k]
    raise RecordError("bad_type", f"{what} must be a string answer for an instruction prompt")


def _get(record: dict, keys: dict[str, str], canon: str, default_name: str | None = None):
    name = keys.get(canon, default_name or canon)
    return name, record.get(name)


def _maybe_json(value: Any) -> Any:
    """A list given as a JSON string (CSV cells, string columns) is that list."""
    if isinstance(value, str) and value[:1] == "[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _text(value: Any, what: str, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        parts = []
        for p in value:
            kind = p.get("type", "text")
            text = p.get("text", p.get("value"))
            if kind != "text" or not isinstance(text, str):
                raise RecordError("bad_content", f"{what}: only text content parts are supported here (got {kind!r})")
            parts.append(text)
        return "".join(parts)
    raise RecordError("bad_type", f"{what} must be a string, got {type(value).__name__}")


def _tools(record: dict, keys: dict[str, str]) -> list[dict] | None:
    name, value = _get(record, keys, "tools")
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RecordError("bad_tools", f"'{name}' is a string but not valid JSON") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RecordError("bad_tools", f"'{name}' must be a list of tool definitions (objects)")
    out = []
    for i, t in enumerate(value):
        if t.get("type") == "function" and isinstance(t.get("function"), dict):
            fn = t["function"]
        elif isinstance(t.get("name"), str):
            fn = t  # dataset form: the function object itself
        else:
            raise RecordError("bad_tools", f"'{name}'[{i}]: a tool definition needs a 'name' (or a 'function')")
        if not isinstance(fn.get("name"), str):
            raise RecordError("bad_tools", f"'{name}'[{i}]: the function needs a string 'name'")
        out.append({"type": "function", "function": fn})
    return out or None


def _arguments(args: Any) -> Any:
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError:
            return args  # kept as given: templates render a string verbatim
        return parsed if isinstance(parsed, dict) else args
    return args


def _tool_call(value: Any, what: str) -> dict:
    """A tool call from a ShareGPT ``function_call`` value, an OpenAI ``tool_calls`` entry, a
    legacy ``function_call`` or a LLaMA-Factory ``tool_call`` part."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RecordError("bad_tool_call", f"{what}: function call is not valid JSON") from None
    call_id = value.get("id") if isinstance(value, dict) else None
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]  # OpenAI {"id", "type": "function", "function": {...}}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise RecordError("bad_tool_call", f"{what}: a function call needs a string 'name'")
    call = {"name": value["name"], "arguments": _arguments(value.get("arguments", value.get("parameters", {})))}
    if call_id is not None:
        if not isinstance(call_id, str):
            raise RecordError("bad_tool_call", f"{what}: a tool call 'id' must be a string")
        call["id"] = call_id
    return call


def _loss_flag(m: dict, where: str) -> bool | None:
    for k in ("loss", "loss_weight"):
        if k in m and m[k] is not None:
            v = m[k]
            if isinstance(v, bool) or isinstance(v, (int, float)):
                return bool(v)
            raise RecordError("bad_type", f"{where}: '{k}' must be a number or boolean")
    return None


_ALPACA_NAMES = ("instruction", "input", "output", "system", "history", "tools")


def _from_alpaca(record: dict, keys: dict[str, str]) -> Conversation:
    pname, qname, rname, sname, hname, tname = _ALPACA_NAMES if not keys else (
        keys.get("prompt", "instruction"), keys.get("query", "input"), keys.get("response", "output"),
        keys.get("system", "system"), keys.get("history", "history"), keys.get("tools", "tools"))
    get = record.get
    prompt, query, response, system, history = get(pname), get(qname), get(rname), get(sname), get(hname)
    if prompt is None:
        raise RecordError("missing_field", f"alpaca record has no '{pname}' field")
    if response is None:
        raise RecordError("missing_field", f"alpaca record has no '{rname}' field")
    if type(prompt) is not str:
        prompt = _text(prompt, f"'{pname}'")
    if type(query) is not str:
        query = _text(query, f"'{qname}'", allow_none=True) or ""
    if type(response) is not str:
        response = _text(response, f"'{rname}'")
    msgs: list[Message] = []
    if system is not None and system != "":
        msgs.append(Message(SYSTEM, _text(system, f"'{sname}'")))
    if history is not None and history != []:
        history = _maybe_json(history)
    if history is not None and history != []:
        if not isinstance(history, list):
            raise RecordError("bad_type", f"'{hname}' must be a list of [prompt, response] pairs")
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise RecordError("bad_type", f"'{hname}'[{i}] must be a [prompt, response] pair")
            msgs.append(Message(USER, _text(pair[0], f"'{hname}'[{i}][0]")))
            msgs.append(Message(ASSISTANT, _text(pair[1], f"'{hname}'[{i}][1]")))
    user = prompt + "\n" + query if query else prompt
    msgs.append(Message(USER, user))
    msgs.append(Message(ASSISTANT, response))
    return Conversation(msgs, _tools(record, keys) if tname in record else None)


FUNCTION_CALL = "function_call"  # a ShareGPT turn that holds a call: the assistant side


def sharegpt_roles(keys: dict[str, str]) -> dict[str, str]:
    """ShareGPT role names -> roles: LLaMA-Factory's tags where ``--map-keys`` gives them (each
    replacing its default), the usual spellings otherwise."""
    given = {t: keys[t] for t in ("user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
             if t in keys}
    if not given:
        return SHAREGPT_ROLES
    defaults = {"user_tag": "human", "assistant_tag": "gpt", "observation_tag": "observation",
                "function_tag": "function_call", "system_tag": "system"}
    roles = {"user_tag": USER, "assistant_tag": ASSISTANT, "observation_tag": TOOL, "function_tag": FUNCTION_CALL,
             "system_tag": SYSTEM}
    return {given.get(t, d): roles[t] for t, d in defaults.items()}


def _from_sharegpt(record: dict, keys: dict[str, str]) -> Conversation:
    name, turns = _get(record, keys, "messages", "conversations")
    role_tag = keys.get("role_tag", "from")
    content_tag = keys.get("content_tag", "value")
    names = sharegpt_roles(keys)
    turns = _maybe_json(turns)
    if turns is None:
        raise RecordError("missing_field", f"sharegpt record has no '{name}' field")
    if not isinstance(turns, list):
        raise RecordError("bad_type", f"'{name}' must be a list of turns")
    msgs: list[Message] = []
    sname, system = _get(record, keys, "system")
    if system not in (None, ""):
        msgs.append(Message(SYSTEM, _text(system, f"'{sname}'")))
    for i, t in enumerate(turns):
        where = f"'{name}'[{i}]"
        if not isinstance(t, dict):
            raise RecordError("bad_type", f"{where} must be an object")
        if role_tag not in t or content_tag not in t:
            raise RecordError("missing_field", f"{where} needs '{role_tag}' and '{content_tag}'")
        tag = t[role_tag]
        role = names.get(tag) if isinstance(tag, str) else None
        if role is None:
            raise RecordError("unknown_role", f"{where}: unknown role {tag!r} (known: {', '.join(names)})")
        if role == FUNCTION_CALL or tag == "function_call":  # a call turn holds calls, no text
            msgs.append(Message(ASSISTANT, None, _tool_calls(t[content_tag], where), _loss_flag(t, where)))
        else:
            msgs.append(Message(role, _text(t[content_tag], f"{where}.{content_tag}"), None, _loss_flag(t, where)))
    return Conversation(msgs, _tools(record, keys))


def _tool_calls(value: Any, where: str) -> list[dict]:
    """The calls of a ShareGPT ``function_call`` turn: one call, or a list of them."""
    if isinstance(value, str) and value.lstrip()[:1] == "[":
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RecordError("bad_tool_call", f"{where}: function call is not valid JSON") from None
    if isinstance(value, list):
        if not value:
            raise RecordError("bad_tool_call", f"{where}: an empty list of function calls")
        return [_tool_call(c, f"{where}[{j}]") for j, c in enumerate(value)]
    return [_tool_call(value, where)]


def _merge_assistant_turns(msgs: list[Message]) -> list[Message]:
    """An assistant message directly followed by another assistant message that only carries
    tool calls (or that adds them to reasoning) is one assistant turn: datasets store "text,
    then the call" as two messages, templates render one turn."""
    out: list[Message] = []
    for m in msgs:
        prev = out[-1] if out else None
        if (prev is not None and prev.role == ASSISTANT and m.role == ASSISTANT and m.tool_calls
                and not prev.tool_calls and not m.text and not (m.reasoning and prev.reasoning)
                and m.loss == prev.loss):
            prev.tool_calls = m.tool_calls
            prev.reasoning = prev.reasoning or m.reasoning
        else:
            out.append(m)
    return out


def _parts(value: list, where: str) -> tuple[str | None, str | None, list[dict]]:
    """LLaMA-Factory / OpenAI content parts -> (text, reasoning, tool calls)."""
    text: list[str] = []
    reasoning: list[str] = []
    calls: list[dict] = []
    for j, p in enumerate(value):
        if not isinstance(p, dict):
            raise RecordError("bad_content", f"{where}[{j}]: a content part must be an object")
        kind = p.get("type", "text")
        v = p.get("value", p.get("text"))
        if kind == "text" and isinstance(v, str):
            text.append(v)
        elif kind in ("reasoning", "thinking") and isinstance(v, str):
            reasoning.append(v)
        elif kind == "tool_call":
            calls.append(_tool_call(v, f"{where}[{j}]"))
        else:
            raise RecordError("bad_content", f"{where}[{j}]: content part of type {kind!r} is not supported "
                              "(text, reasoning and tool_call are)")
    return ("".join(text) if text else None), ("".join(reasoning) if reasoning else None), calls


def _from_openai(record: dict, keys: dict[str, str]) -> Conversation:
    name, turns = _get(record, keys, "messages")
    turns = _maybe_json(turns)
    if turns is None:
        raise RecordError("missing_field", f"openai record has no '{name}' field")
    if not isinstance(turns, list):
        raise RecordError("bad_type", f"'{name}' must be a list of messages")
    role_tag = keys.get("role_tag", "role")
    content_tag = keys.get("content_tag", "content")
    names = {**OPENAI_ROLES, **sharegpt_roles(keys)} if any(t in keys for t in TAGS[2:]) else OPENAI_ROLES
    msgs: list[Message] = []
    for i, t in enumerate(turns):
        where = f"'{name}'[{i}]"
        if not isinstance(t, dict):
            raise RecordError("bad_type", f"{where} must be an object")
        role = t.get(role_tag)
        if not isinstance(role, str) or role not in names:
            raise RecordError("unknown_role", f"{where}: unknown role {role!r}")
        role = names[role]
        if role == FUNCTION_CALL:  # a tag-named call turn (LLaMA-Factory's function_tag)
            msgs.append(Message(ASSISTANT, None, _tool_calls(t.get(content_tag), where), _loss_flag(t, where)))
            continue
        raw = t.get(content_tag)
        reasoning = None
        calls: list[dict] = []
        if isinstance(raw, list):
            content, reasoning, calls = _parts(raw, f"{where}.{content_tag}")
            if content is None and not reasoning and not calls:
                content = ""
        elif content_tag not in t and not (role == ASSISTANT and (t.get("tool_calls") or t.get("function_call"))):
            raise RecordError("missing_field", f"{where} has no '{content_tag}'")
        else:
            content = _text(raw, f"{where}.{content_tag}", allow_none=True)
        if role == ASSISTANT:
            if t.get("tool_calls"):
                if not isinstance(t["tool_calls"], list):
                    raise RecordError("bad_type", f"{where}.tool_calls must be a list")
                calls += [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(t["tool_calls"])]
            if t.get("function_call"):  # the legacy single call
                calls.append(_tool_call(t["function_call"], f"{where}.function_call"))
            for key in ("reasoning_content", "reasoning"):
                if t.get(key) not in (None, ""):
                    reasoning = _text(t[key], f"{where}.{key}")
        elif calls or reasoning:
            raise RecordError("bad_content", f"{where}: only assistant messages carry tool calls or reasoning")
        m = Message(role, content, calls or None, _loss_flag(t, where), reasoning)
        if role == TOOL:
            for key, attr in (("tool_call_id", "tool_call_id"), ("name", "name")):
                v = t.get(key)
                if v is not None:
                    if not isinstance(v, str):
                        raise RecordError("bad_type", f"{where}.{key} must be a string")
                    setattr(m, attr, v)
            if m.content is None:
                raise RecordError("bad_type", f"{where}: a tool result needs content")
        elif role in (USER, SYSTEM) and m.content is None:
            raise RecordError("bad_type", f"{where}.{content_tag} must be a string, got null")
        msgs.append(m)
    return Conversation(msgs, _tools(record, keys))


USER_SIDE = (USER, TOOL)


def validate(conv: Conversation) -> None:
    """Role order, LLaMA-Factory's positional rule (module doc): an optional system message
    first, then turns alternating between the user side (a user turn, or tool results: several
    in a row are one turn) and the assistant side, ending on an assistant turn."""
    msgs = conv.messages
    body = msgs[1:] if msgs and msgs[0].role == SYSTEM else msgs
    if not body:
        raise RecordError("empty_conversation", "conversation has no user/assistant turns")
    prev = None
    for i, m in enumerate(body):
        if m.role == SYSTEM:
            raise RecordError("role_order", f"turn {i}: a system message is only allowed first")
        if prev is None and m.role == ASSISTANT:
            raise RecordError("role_order", f"turn {i}: conversation must start with a user turn, not {m.role}")
        if prev is not None:
            if m.role == ASSISTANT and prev.role == ASSISTANT:
                raise RecordError("role_order", f"turn {i}: assistant after assistant")
            if m.role == USER and prev.role in USER_SIDE:
                raise RecordError("role_order", f"turn {i}: user after {prev.role} (two user-side turns in a row)")
            if m.role == TOOL and prev.role == USER:
                raise RecordError("role_order", f"turn {i}: tool result after a user turn")
        if m.role == ASSISTANT and (not m.content or m.content.isspace()) and not m.tool_calls and not m.reasoning:
            raise RecordError("empty_assistant", f"turn {i}: assistant turn has empty content")
        prev = m
    if prev.role != ASSISTANT:
        raise RecordError("no_final_assistant", f"conversation ends on a {prev.role} turn, not an assistant turn")

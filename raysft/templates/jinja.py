"""``--template auto``: the tokenizer's own Jinja chat template, rendered as ``transformers``'
``apply_chat_template`` renders it, and each assistant message's own text found by design.

Rendering matches ``apply_chat_template`` (transformers 4.45+/5.x): the same sandboxed Jinja
environment (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, the ``generation`` tag,
``tojson``, ``raise_exception``, ``strftime_now``, ``namespace``), the messages as it passes them
(keys whose value is null dropped, reasoning under ``reasoning_content`` and ``thinking``), the
tokenizer's named special tokens (``bos_token``, ``eos_token``, ...) and ``--template-kwargs``
as template variables. Two differences, both for reproducible, bounded jobs: ``strftime_now``
returns a fixed date (``--template-date``, default 26 Jul 2024, the date Llama's templates fall
back to), and a template that raises, or builds a string of more than ``MAX_CHARS``
characters, rejects the record as ``template_error`` instead of crashing or exhausting memory.

Which characters are assistant output (they carry loss), per assistant message ``i``:

1. ``{% generation %}`` blocks, where the template marks them (as ``apply_chat_template(...,
   return_assistant_tokens_mask=True)`` does);
2. else, when the template renders history the same whatever follows (checked: the renders of
   ``messages[:i]`` with a generation prompt and of ``messages[:i+1]`` are both prefixes of
   the full render), the text between the two;
3. else, for templates that re-render history (Qwen3 drops earlier reasoning, Mistral moves
   the system prompt): differential rendering. The full conversation is rendered again twice
   with message ``i``'s own payload (content, reasoning, tool-call names and argument values)
   replaced by sentinel strings that differ in their first and last characters; where the
   renders part is where message ``i``'s output starts, where they meet again where it ends
   (exact whatever the payload holds: no text is searched for). The output is then extended
   back to the end of the template's generation prompt (the assistant header: found as the
   text ``add_generation_prompt`` adds, or its first line) and forward through the first
   special token after it (the end-of-turn marker).

In every case a turn's output ends at the first EOS token after its text, where generation
stops: what a template writes after it (Command-R's tool-use instructions after the last
message, the next turn's header) is never trained. A turn another turn follows is closed by
the marker its own render writes (gpt-oss: ``<|end|>`` there, ``<|return|>`` for the last one),
and the turn's own text after its last special token (GLM's plain ``</tool_call>``) stays in
it. An answer a template continues after tool results with no header of its own starts where
the conversation up to those results ends, as the template renders it for generation. A call's
name the template repeats after the turn (gpt-oss' tool-result header ``<|start|>functions.NAME``)
is not the turn's: its end is where the renders meet again with the names kept and the
arguments changed. What the generation prompt supplies is not output, also where the turn
renders it in another form (the prompt less its trailing white space: Nemotron-3's ``<think>``
before an empty ``</think>``); nor is white space a ``{% generation %}`` block holds after its
end-of-turn marker (LFM2.5's newline after ``<|im_end|>``). A turn's closing never holds the
marker every turn opens with (``_opener``: the next turn's header, or Command-R7B's prompt
written after the last message whatever ``add_generation_prompt`` says); a turn that renders
the generation prompt in another form (DeepSeek-V3.2's ``</think>`` for the prompt's
``<think></think>``) starts where the two part. Another message's block the template writes
inside a turn (Gemma-4's tool results between the turn's calls and its text) is cut out of it.

A message whose output cannot be placed this way (the renders disagree in ways the rules do
not cover) rejects the record with ``template_error``: text is never guessed at, so loss never
lands on a prompt that happens to contain the answer's words.

These rules take several renders of a conversation. Conversations of a shape already seen are
not rendered at all: they are replayed from the shape's render plan (``.plan``), which ran the
same rules once on tracked stand-ins for the conversation's texts.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import re
import signal
import threading

from ..normalize import ASSISTANT, Conversation, RecordError
from . import plan
from .base import ABSENT, Piece, Specials, TemplateError, to_hf_messages

MAX_CHARS = 64 << 20  # a template building a longer string rejects the record
MAX_OWNED_PREFIX = 512  # template text between the assistant header and its first payload byte
DEFAULT_DATE = datetime.date(2024, 7, 26)
_GEN_BEGIN, _GEN_END = "\ue0f0", "\ue0f1"  # private-use characters marking {% generation %} blocks
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# marker-shaped text (where the tokenizer has no special token for a template's markers)
_MARKER = re.compile(r"<[|｜][^<>\s]{1,48}?[|｜]>|<[A-Za-z_][\w:.-]{0,30}>|\[[A-Za-z_]{2,20}\]")


def hf_messages(messages: list[dict]) -> list[dict]:
    """Messages as ``apply_chat_template`` hands them to the template: keys whose value is null
    dropped (transformers' ``_normalize_chat_messages``), reasoning also under ``thinking`` and
    ``reasoning_content``."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def string_arguments(messages: list[dict], dumps=None) -> list[dict] | None:
    """The messages with every tool call's object arguments as compact JSON text (None when
    there are none to convert); ``dumps``: the JSON writer (a render plan's, while planning)."""
    out, changed = [], False
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = c.get("function") or {}
                if isinstance(fn.get("arguments"), (dict, list)):
                    fn = dict(fn, arguments=dumps(fn["arguments"]) if dumps else json.dumps(fn["arguments"],
                                                                                            ensure_ascii=False))
                    changed = True
                calls.append(dict(c, function=fn))
            m = dict(m, tool_calls=calls)
        out.append(m)
    return out if changed else None


def _environment(date: datetime.date, mark_generation: bool, tracking: bool = False):
    """The environment ``apply_chat_template`` renders in. ``tracking``: the same, with every
    way a template reaches a value's text routed through :mod:`.plan`'s hooks (used to build
    render plans; see there)."""
    import jinja2
    import jinja2.ext
    from jinja2.compiler import CodeGenerator
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.runtime import LoopContext, Macro
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def length(x) -> int:
        return str.__len__(x) if isinstance(x, str) else len(x)

    class TrackingCodeGenerator(CodeGenerator):
        """Compiles ``in``/``not in`` and ``~`` to calls :mod:`.plan` can follow."""

        def visit_Compare(self, node, frame):
            if not any(op.op in ("in", "notin") for op in node.ops):
                return super().visit_Compare(node, frame)
            self.write("environment.rs_compare(")
            self.visit(node.expr, frame)
            for op in node.ops:
                self.write(f", {op.op!r}, ")
                self.visit(op.expr, frame)
            self.write(")")

        def visit_Concat(self, node, frame):
            self.write("environment.rs_join((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox, refusing operators that would build huge strings or lists."""

        intercepted_binops = frozenset(["*", "+", "**"])
        if tracking:
            code_generator_class = TrackingCodeGenerator

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and length(seq) * n > MAX_CHARS:
                        raise TemplateError(f"the template builds a sequence of {length(seq) * n:,} items")
            elif operator == "+" and isinstance(left, (str, list)) and isinstance(right, (str, list)):
                if length(left) + length(right) > MAX_CHARS:
                    raise TemplateError("the template builds a string of more than {MAX_CHARS:,} characters")
            elif operator == "**" and isinstance(right, int) and right > 4096:
                raise TemplateError(f"the template raises to the power {right}")
            return super().call_binop(context, operator, left, right)

        if tracking:
            def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
                given = [*args, *(v for k, v in kwargs.items() if k[:1] != "_")]  # (_loop_vars...: jinja's own)
                callee = getattr(__obj, "__name__", type(__obj).__name__)
                if plan._has_opaque(given) and not isinstance(__obj, Macro):
                    raise plan.UntrackedOpaque(f"a tool or argument object handed to {callee}")
                if plan._has_node(given) and not __self.rs_follows(__obj):
                    raise plan.Untracked(f"a payload handed to {callee}")
                return ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs)

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_block"), [], [], body).set_lineno(lineno)

        def _block(self, caller):
            rv = caller()
            return _GEN_BEGIN + rv + _GEN_END if mark_generation else rv

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        if tracking:
            return plan.LIVE[0].tojson(x, ensure_ascii, indent, separators, sort_keys)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime(date.year, date.month, date.day).strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"a template may not store {name!r} on a namespace")

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    template_dict = TemplateDict()
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=template_dict,
                       namespace=Namespace)
    if tracking:
        _track(env, (Namespace, template_dict, raise_exception), (dict, list, LoopContext, TemplateDict), Macro)
    return env


def _track(env, allowed: tuple, containers: tuple, macro) -> None:
    """The tracking environment's hooks (:mod:`.plan`)."""
    import jinja2.filters
    from jinja2.utils import pass_eval_context

    def follows(obj) -> bool:
        """Whether a callable handed a payload keeps it tracked: a macro, a payload's own
        method, a container's method, ``namespace``/``dict``/``raise_exception``."""
        return (getattr(obj, "rs_tracked", False) or isinstance(obj, macro) or any(obj is a for a in allowed)
                or isinstance(getattr(obj, "__self__", None), containers))

    env.rs_follows = follows
    env.finalize = lambda v: str.__str__(v) if type(v) is plan.Node else v
    env.concat = lambda parts: plan.LIVE[0].lift("".join(parts))
    env.rs_compare = plan.compare
    env.rs_join = lambda parts: plan.LIVE[0].concat(*[p if isinstance(p, str) else str(p) for p in parts])

    # filters that read a value's text in C (regular expressions, number parsing, escaping)
    def refuse(name, f):
        @functools.wraps(f)  # (keeps jinja's pass_eval_context mark)
        def checked(*args, **kwargs):
            if plan._has_node(args) or plan._has_node(kwargs.values()):
                raise plan.Untracked(f"a payload handed to {name}")
            return f(*args, **kwargs)

        return checked

    for name in ("wordcount", "title", "wordwrap", "urlize", "int", "float", "escape", "e", "forceescape",
                 "urlencode", "striptags", "xmlattr", "pprint", "format", "filesizeformat", "indent"):
        if name in env.filters:
            env.filters[name] = refuse(f"the {name} filter", env.filters[name])

    @pass_eval_context
    def join(eval_ctx, value, d="", attribute=None):
        if attribute is not None:
            value = map(jinja2.filters.make_attrgetter(eval_ctx.environment, attribute), value)
        items = list(value)
        if not plan._has_node([items, d]):
            return jinja2.filters.do_join(eval_ctx, items, d)
        out: list = []
        for k, x in enumerate(items):
            if k:
                out.append(d)
            out.append(x if isinstance(x, str) else str(x))
        return plan.LIVE[0].concat(*out)

    @pass_eval_context
    def replace(eval_ctx, s, old, new, count=None):
        if not plan._has_node([s, old, new]):
            return jinja2.filters.do_replace(eval_ctx, s, old, new, count)
        if not isinstance(s, plan.Node):
            raise plan.Untracked("replace() of plain text by a payload")
        return s.replace(old, new, -1 if count is None else count)

    safe = env.filters["safe"]
    env.filters["safe"] = lambda value: plan.LIVE[0].safe(value) if type(value) is plan.Node else safe(value)
    env.filters["join"] = join
    env.filters["replace"] = replace
    env.tests["in"] = lambda value, seq: plan.compare(value, "in", seq)
    # what a str always is, whatever its text
    for name in ("iterable", "sequence"):
        env.tests[name] = (lambda test: lambda value: True if type(value) in (plan.Node, plan.Opaque)
                           else test(value))(env.tests[name])
    for name in ("lower", "upper"):
        env.tests[name] = refuse(f"the {name} test", env.tests[name])


def _sentinel(k: int, variant: int) -> str:
    """Slot ``k``'s stand-in; the two variants differ in their first and last characters."""
    return ("Q", "J")[variant] + f"rsft{k:05d}x" + ("Z", "K")[variant]


def _replace_payload(m: dict, variant: int, names: bool = True) -> dict:
    """A copy of an HF message with its own payload (content, reasoning, tool-call names and
    string argument values) replaced by sentinels (``names=False``: the calls' names kept, and a
    sentinel argument added to object arguments)."""
    m = dict(m)
    counter = [0]

    def s() -> str:
        counter[0] += 1
        return _sentinel(counter[0], variant)

    if isinstance(m.get("content"), str) and m["content"]:
        m["content"] = s()
    if isinstance(m.get("reasoning_content"), str) and m["reasoning_content"]:
        m["reasoning_content"] = s()
    if m.get("tool_calls"):
        calls = []
        for c in m["tool_calls"]:
            c = dict(c)
            fn = dict(c.get("function") or {})
            if names and isinstance(fn.get("name"), str):
                fn["name"] = s()
            args = fn.get("arguments")
            if type(args) is plan.Opaque:  # an object payload of a render plan's run
                fn["arguments"] = plan.opaque_variant(args, variant + 1)
            elif isinstance(args, str) and args:
                fn["arguments"] = s()
            elif isinstance(args, dict):
                fn["arguments"] = {k: (s() if isinstance(v, str) and v else v) for k, v in args.items()}
                if not names:  # a stand-in that changes with the variant whatever the values are
                    fn["arguments"]["rsft"] = s()
            c["function"] = fn
            calls.append(c)
        m["tool_calls"] = calls
    return m


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n  # binary search on the first difference (string comparisons run in C)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid :] == b[len(b) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class JinjaTemplate:
    """Renders a tokenizer's ``chat_template`` and finds each assistant message's output."""

    def __init__(self, source: str, specials: Specials, extra: dict | None = None,
                 special_map: dict | None = None, date: datetime.date | None = None):
        from jinja2.exceptions import TemplateError as JinjaError

        self._jinja_error = JinjaError
        self.date = date or DEFAULT_DATE
        self.generation = bool(_GENERATION_TAG.search(source))
        try:
            self.template = _environment(self.date, self.generation).from_string(source)
        except JinjaError as e:
            raise TemplateError(f"the chat template does not compile: {e}") from None
        names = special_map if special_map is not None else {"bos_token": specials.bos, "eos_token": specials.eos}
        self.vars = {**{k: v for k, v in names.items() if v is not None}, **(extra or {})}
        self.source = source
        self.eos = specials.eos  # where generation stops: a turn's output ends with the first one after it
        self._active = self.template  # the compiled template _render runs (the tracking one while planning)
        self._tracker: plan.Tracker | None = None
        self.call_form = self._call_form()
        # render plans (.plan): off where the template's own text holds the marker characters
        self._opener_text: tuple[str, str] | None = None  # _opener
        self._probe_head = self._first_turn_head()
        self._plans: dict | None = None if any(c in source for c in (plan.MARK_OPEN, plan.MARK_CLOSE, _GEN_BEGIN,
                                                                      _GEN_END)) else {}
        self._seen: set[int] = set()
        self._tracking = None
        self._opaque = True  # tools and object arguments as one payload each, until the template reads into one
        self._lock = threading.RLock()
        self.plan_stats = {"planned": 0, "rendered": 0, "plans": 0, "unplanned_shapes": 0, "retired": 0}
        self.plan_reasons: dict[str, int] = {}

    # ---- the form of a tool-call-only turn

    CALL_FORMS = (("empty", ""), ("absent", ABSENT))

    def _call_form(self):
        """The content a tool-call-only assistant turn is handed to this template with: ``""``,
        else no content key (a null content is the same: ``apply_chat_template`` drops null
        keys), whichever the template renders the call under first (Qwen3's template raises on
        a missing content; a template that writes calls only for a turn without content
        string drops them under ``""``). Found once, by rendering a probe conversation whose
        call names a sentinel function; ``""`` where no form renders it (each such turn is
        then rejected, ``tool_call_not_rendered``, as is any turn whose call a template leaves
        out)."""
        name, other = "rsftprobefn", "rsftprobetool"
        fn = {"name": name, "description": "probe", "parameters": {"type": "object", "properties": {
            "q": {"type": "string", "description": "q"}}, "required": ["q"]}}
        tools = [{"type": "function", "function": fn}]
        call = {"id": "abcdefghi", "type": "function", "function": {"name": name, "arguments": {"q": "x"}}}
        user = {"role": "user", "content": "Hi"}
        for label, form in self.CALL_FORMS:
            turn = {"role": "assistant", "tool_calls": [call]}
            if form is not ABSENT:
                turn["content"] = form
            msgs = [user, turn, {"role": "tool", "content": "r", "tool_call_id": "abcdefghi", "name": other},
                    {"role": "assistant", "content": "Done."}]
            try:
                with render_budget(RENDER_BUDGET_S):
                    before = self._render([user], tools, False).count(name)
                    rendered = self._render(msgs, tools, False).count(name)
            except RecordError:
                continue
            if rendered > before:
                self.call_form_name = label
                return form
        self.call_form_name = "none renders a call"
        return ""

    def messages(self, conv: Conversation) -> list[dict]:
        """The conversation as this template (and ``apply_chat_template``, for the parity
        gate) is handed it."""
        return to_hf_messages(conv, self.call_form)

    def __call__(self, messages: list[dict], tools, add_generation_prompt: bool) -> str:
        """The text ``apply_chat_template(messages, tools, tokenize=False)`` gives. Tool-call
        arguments go in as objects (the ``apply_chat_template`` convention); a template that
        fails on them and takes them as JSON text instead (it concatenates them into a string,
        as DeepSeek-R1's does) is given the text."""
        try:
            return self._render(messages, tools, add_generation_prompt)
        except RecordError:
            as_text = string_arguments(messages, self._tracker.tojson if self._tracker is not None else None)
            if as_text is None:
                raise
            return self._render(as_text, tools, add_generation_prompt)

    def _render(self, messages: list[dict], tools, add_generation_prompt: bool) -> str:
        tracker = self._tracker
        try:
            if tracker is not None:
                plan.LIVE[0] = tracker
            text = self._active.render(messages=hf_messages(messages), tools=tools, documents=None,
                                       add_generation_prompt=add_generation_prompt, **self.vars)
            if tracker is not None:
                text = plan._text(text)
        except RecordError:
            raise
        except MemoryError:
            raise RecordError("template_error", "the chat template ran out of memory on this record") from None
        except RecursionError:
            raise RecordError("template_error", "the chat template recursed too deeply on this record") from None
        except Exception as e:  # noqa: BLE001 - whatever a template raises rejects the record
            what = "refused the conversation" if isinstance(e, self._jinja_error) else f"failed ({type(e).__name__})"
            raise RecordError("template_error", f"chat template {what}: {str(e).splitlines()[0][:300] if str(e) else ''}") \
                from None
        finally:
            if tracker is not None:
                plan.LIVE[0] = None
        if len(text) > MAX_CHARS:
            raise RecordError("template_error", f"the chat template rendered {len(text):,} characters")
        return text

    # ---- where the assistant output is

    def pieces(self, conv: Conversation, special_strings: tuple[str, ...]) -> list[Piece]:
        """The conversation's pieces. One conversation at a time per template (the local engine's
        driver threads may ask one template for cuts together): a plan's run switches the
        template it renders with."""
        with self._lock:
            return self._pieces(conv, special_strings)

    def _pieces(self, conv: Conversation, special_strings: tuple[str, ...]) -> list[Piece]:
        msgs = self.messages(conv)
        out = self._planned(msgs, conv.tools, special_strings) if self._plans is not None else None
        if out is None:
            self.plan_stats["rendered"] += 1
            with render_budget(RENDER_BUDGET_S):
                out = self._locate(msgs, conv.tools, special_strings)
        else:
            self.plan_stats["planned"] += 1
        if not any(m.tool_calls for m in conv.messages):
            return out  # no call to look for (most records)
        if self.generation:
            answer = "".join(t for t, _, a in out if a)
            _check_calls(conv, {i: answer for i in range(len(msgs))})
        else:
            answers: dict[int, str] = {}
            for t, i, a in out:
                if a:
                    answers[i] = answers.get(i, "") + t
            _check_calls(conv, answers)
        return out

    # ---- render plans (.plan)

    _MISSING = object()

    def _planned(self, msgs: list[dict], tools, special_strings) -> list[Piece] | None:
        """The pieces from this conversation's shape's plan, or None to render it (a shape's
        first sighting, one the template cannot be planned for, or a conversation that leaves
        its shape's plan)."""
        payloads: list[str] = []
        key = plan.conversation_key(msgs, tools, payloads, self._opaque)
        found = self._plans.get(key, self._MISSING)
        if found is self._MISSING:
            h = hash(key)
            if h not in self._seen:
                if len(self._seen) >= plan.MAX_SEEN:
                    self._seen.clear()
                self._seen.add(h)
                return None
            st = self.plan_stats
            built = st["plans"] + st["unplanned_shapes"]
            if built >= plan.FREE_BUILDS and st["planned"] < plan.USES_PER_BUILD * built:
                return None  # shapes here rarely repeat: a build would cost more than it saves
            with render_budget(RENDER_BUDGET_S):
                found = self._new_plan(key, msgs, tools, special_strings)
        if found is None:
            return None
        out = found.fill(payloads)
        if out is None or found.verified:
            return out
        # a plan's first replay is checked against the record-by-record pieces of its conversation
        with render_budget(RENDER_BUDGET_S):
            reference = self._locate(msgs, tools, special_strings)
        if out == reference:
            found.verified = True
        else:
            self._unplanned(key, "its replay differs from the template's render")
            self.plan_stats["retired"] += 1
            self.plan_stats["plans"] -= 1
        return reference

    def _new_plan(self, key, msgs, tools, special_strings) -> plan.Plan | None:
        """Build the plan of a shape from one of its conversations (None: the template does
        something with a payload a plan cannot replay; each conversation of the shape is then
        rendered)."""
        if len(self._plans) >= plan.MAX_PLANS:
            self._plans.clear()
        tracker = plan.Tracker()
        with plan.RUN_LOCK:  # one tracked run at a time in a process: plan.LIVE is the process's
            return self._build(key, msgs, tools, special_strings, tracker)

    def _build(self, key, msgs, tools, special_strings, tracker) -> plan.Plan | None:
        try:
            if self._tracking is None:
                self._tracking = _environment(self.date, self.generation, tracking=True).from_string(self.source)
            smsgs = plan.slotted(msgs, tracker, opaque=self._opaque)
            stools = plan.slotted_tools(tools, tracker, self._opaque) if tools else tools
            self._active, self._tracker = self._tracking, tracker
            built = plan.Plan(tracker, self._locate(smsgs, stools, special_strings), special_strings)
        except plan.UntrackedOpaque as e:
            self._opaque = False  # this template reads into tools or arguments: their structure joins the shape
            return self._unplanned(key, str(e))
        except plan.Untracked as e:
            return self._unplanned(key, str(e))
        except RecordError as e:
            return self._unplanned(key, f"the template refuses the shape ({e.reason})")
        finally:
            self._active, self._tracker = self.template, None
        self._plans[key] = built
        self.plan_stats["plans"] += 1
        return built

    def _unplanned(self, key, reason: str) -> None:
        self._plans[key] = None
        self.plan_stats["unplanned_shapes"] += 1
        self.plan_reasons[reason] = self.plan_reasons.get(reason, 0) + 1

    def _locate(self, msgs: list[dict], tools, special_strings: tuple[str, ...]) -> list[Piece]:
        """The conversation's pieces: its render, cut where each assistant message's output
        is (the rules in the module's docstring)."""
        if self.generation:
            return self._generation_pieces(msgs, tools, special_strings)
        full = self(msgs, tools, False)
        spans: list[tuple[int, int, int]] = []
        cursor = 0
        stable = True
        for i, m in enumerate(msgs):
            if m.get("role") != ASSISTANT:
                continue
            span = self._prefix_span(msgs, tools, full, i, special_strings) if stable else None
            if span is None:
                stable = False
                span = self._differential_span(msgs, tools, full, i, special_strings, cursor)
                if span is None:
                    continue  # the template renders nothing of this message
            start, end = span
            if start < cursor or end < start:
                raise RecordError("template_error", f"cannot place assistant turn {i}: the chat template renders it "
                                  "before the turn preceding it")
            spans.append((start, end, i))
            cursor = end
        out: list[Piece] = []
        pos = 0
        for start, end, i in spans:
            out.append((full[pos:start], -1, False))
            for a, b in self._foreign(msgs, tools, full, start, end, i):
                # another message's block the template writes inside this turn: not its output
                out += [(full[start:a], i, True), (full[a:b], -1, False)]
                start = b
            out.append((full[start:end], i, True))
            pos = end
        out.append((full[pos:], -1, False))
        return out

    def _foreign(self, msgs, tools, full: str, start: int, end: int, i: int) -> list[tuple[int, int]]:
        """The blocks of other messages the template writes inside assistant turn i's span
        ``[start, end)`` (Gemma-4 writes the tool results of a turn's calls inside the model's
        turn, before the turn's text): each from where the turn's render as the last message
        parts from ``full`` (after the call's own closing) to where the turn's own text goes
        on after the other messages' payloads (its text or reasoning, else the turn's end). Cheap
        where no other message's text is in the span (every template but such ones)."""
        inside = [k for k, m in enumerate(msgs) if k != i and m.get("role") != ASSISTANT
                  and isinstance(m.get("content"), str) and m["content"] and m["content"] in full[start:end]]
        if not inside:
            return []
        holes: list[tuple[int, int]] = []
        alone = None
        own = [t for t in (msgs[i].get("content"), msgs[i].get("reasoning_content")) if isinstance(t, str) and t]
        for k in inside:
            ps, pe, same = self._changed(msgs, tools, full, k)
            if same or not (start < ps and pe <= end) or (holes and ps < holes[-1][1]):
                continue
            if alone is None:
                alone = self(msgs[: i + 1], tools, False)
            lo = holes[-1][1] if holes else start
            a = lo + _whole_markers(full[lo:], _common_prefix(full[lo:ps], alone[lo:])) \
                if full.startswith(alone[:lo]) else ps
            resume = [x for x in (full.find(t, pe, end) for t in own) if x >= 0]
            b = min(resume) if resume else end
            if lo <= a <= ps and pe <= b:
                holes.append((a, b))
        return holes

    def _prefix_span(self, msgs, tools, full: str, i: int, specials) -> tuple[int, int] | None:
        prefix = self(msgs[:i], tools, True)
        through = self(msgs[: i + 1], tools, False)
        if not (full.startswith(prefix) and full.startswith(through) and len(prefix) <= len(through)):
            return None
        start, end = len(prefix), len(through)
        cut = _trim_to_marker(full, start, end, specials)
        if cut == end or self._appends_after(full, start, cut, end, specials):
            # no special token closes it, or the template writes more after the end-of-turn token
            # of the last message (Command-R's tool-use instructions): the closing is the
            # template's text after the payload, through that token
            tail = self._tail(msgs, tools, i)
            cut = end - len(tail) + self._before_opener(tail, _closing_length(tail, specials, self.eos), specials, full)
        return start, cut

    def _appends_after(self, full: str, start: int, cut: int, end: int, specials) -> bool:
        """Whether the span of a conversation's last message holds template text after its
        end-of-turn token: a special token after the last EOS in it (cheap: no render)."""
        if end != len(full) or not self.eos:
            return False
        at = full.rfind(self.eos, start, cut)
        return at >= 0 and any(s and full.find(s, at + len(self.eos), cut) >= 0 for s in specials)

    def _differential_span(self, msgs, tools, full: str, i: int, specials, lo: int) -> tuple[int, int] | None:
        start, end, same = self._changed(msgs, tools, full, i)
        if start >= len(full) or end <= start:
            if same:
                return None
            end = max(end, start)
        body = self._body_start(msgs, tools, full, i, lo, start, specials)
        if body is None or start - body > MAX_OWNED_PREFIX:
            raise RecordError("template_error", f"cannot place assistant turn {i}: no assistant header before its "
                              "text in what the chat template rendered")
        own = self._end_before_repeated_names(msgs, tools, full, i, start, end)
        if own is not None:
            return body, own + self._closing(msgs, tools, full, i, own, specials, names=False)
        return body, end + self._closing(msgs, tools, full, i, end, specials)

    def _end_before_repeated_names(self, msgs, tools, full: str, i: int, start: int, end: int) -> int | None:
        """For a call's turn another message follows, where its own text ends when the
        template writes its calls' names again after it (gpt-oss' tool-result header
        ``<|start|>functions.NAME``): where the renders with the names kept and the arguments
        changed meet again, when the names were written before that; else None."""
        if not msgs[i].get("tool_calls") or i + 1 >= len(msgs) or start >= end:
            return None
        try:
            kept = self._changed(msgs, tools, full, i, names=False)[1]
        except RecordError:  # the template refuses the stand-in argument: the general rule
            return None
        names = [c["function"]["name"] for c in msgs[i]["tool_calls"]
                 if isinstance((c.get("function") or {}).get("name"), str)]
        if start < kept < end and names and all(n in full[start:kept] for n in names):
            return kept
        return None

    def _changed(self, msgs, tools, full: str, i: int, names: bool = True,
                 gen: bool = False) -> tuple[int, int, bool]:
        """Where ``full`` (the render of ``msgs``, with a generation prompt if ``gen``) changes
        when message i's payload is replaced by sentinels (``names``: as
        :func:`_replace_payload` takes it): the first changed byte, the end of the last one, and
        whether nothing changes at all."""
        renders = []
        for variant in (0, 1):
            alt = list(msgs)
            alt[i] = _replace_payload(msgs[i], variant, names)
            renders.append(self(alt, tools, gen))
        return (min(_common_prefix(full, r) for r in renders),
                len(full) - min(_common_suffix(full, r) for r in renders), all(r == full for r in renders))

    def _closing(self, msgs, tools, full: str, i: int, end: int, specials, names: bool = True) -> int:
        """How much of what follows message i's last payload byte in ``full`` is its own
        closing (its end-of-turn marker): the text the template writes after that payload when
        the message ends the conversation, as far as ``full`` has it, cut after its last
        special token (a newline after the marker is not the model's to produce), or, where
        the tokenizer has no special token for the marker, after its last visible character."""
        tail = self._tail(msgs, tools, i, names)
        after = full[end : end + len(tail) + MAX_OWNED_PREFIX]
        shared = _common_prefix(after, tail)
        if self.eos and self.eos in tail[:shared]:  # where generation stops, whatever follows
            return tail.index(self.eos) + len(self.eos)
        if shared < len(tail):  # this turn is closed otherwise than a last one: its own render says how
            own = _own_closing(after, shared, specials, self.eos, tail)
            if own is not None:
                return self._before_opener(after, own, specials, full)
        return self._before_opener(tail, _closing_length(tail[:shared], specials, self.eos), specials, full)

    def _before_opener(self, closing: str, n: int, specials, full: str) -> int:
        """``n`` (a turn's closing: the first ``n`` characters of ``closing``), cut where the
        marker that opens every turn of this template (``_opener``) begins in it after the
        marker that ends every turn (``<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>``): that
        starts the next turn, or what the template writes after the last message (Command-R7B
        writes its generation prompt, ``<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>``, whatever
        ``add_generation_prompt`` says), and is never the turn's own output (Kimi-K3's
        ``<|sep|><|open|>argument`` inside a call is). White space before it is not the turn's
        either."""
        opener, ender = self._opener(specials, full)
        if not opener:
            return n
        k = closing.find(opener, 0, n)
        while k >= 0 and ender and not closing[:k].rstrip().endswith(ender):
            k = closing.find(opener, k + 1, n)
        return n if k < 0 else len(closing[:k].rstrip())

    def _first_turn_head(self) -> str | None:
        """What a conversation of one user message renders before its text (None: the template
        refuses one; ``_opener`` then reads the render being cut). Rendered once, here, not
        while a render plan is being recorded."""
        try:
            with render_budget(RENDER_BUDGET_S):
                text = self._render([{"role": "user", "content": _sentinel(0, 0)}], None, False)
        except RecordError:
            return None
        return text[: max(0, text.find(_sentinel(0, 0)))]

    def _opener(self, specials, full: str = "") -> tuple[str, str]:
        """The marker a render begins with after the BOS token (``<|im_start|>``,
        ``<|START_OF_TURN_TOKEN|>``, ``[INST]``): a special token, or marker-shaped text where
        the tokenizer has none for it; "" where a render begins with plain text. And the
        marker before it where a user message's turn begins after another block (the system
        preamble's ``<|END_OF_TURN_TOKEN|>``), "" where none. Found once, from a conversation
        of one user message; from ``full`` (the render being cut) where the template refuses
        that one (Command-R+'s tool-use template wants tools)."""
        if self._opener_text is not None:
            return self._opener_text
        head, known = (self._probe_head, True) if self._probe_head is not None else (full, False)
        bos = self.vars.get("bos_token")
        start = len(bos) if isinstance(bos, str) and bos and head.startswith(bos) else 0
        start += len(head[start:]) - len(head[start:].lstrip())
        opener = _marker_at(head, start, [s for s in specials if s != bos])
        ender = ""
        if opener and known:
            at = head.rfind(opener)  # the user message's own turn
            before = head[:at].rstrip()
            ends = [s for s in specials if s and before.endswith(s)]
            tail = [m for m in _MARKER.finditer(before) if m.end() == len(before)]
            ender = max(ends, key=len) if ends else (tail[-1].group() if tail else "")
        if known:
            self._opener_text = (opener, ender)
        return opener, ender

    def _tail(self, msgs, tools, i: int, names: bool = True) -> str:
        """What the template writes after message i's payload when it ends the conversation
        (``names``: as :func:`_replace_payload` takes it)."""
        alone = self(msgs[: i + 1], tools, False)
        _, end, same = self._changed(msgs[: i + 1], tools, alone, i, names)
        return "" if same else alone[end:]  # "": the template writes nothing of the payload

    def _header_after(self, msgs, tools, i: int, with_gen: str) -> str:
        """What the template writes after message i-1's payload when the conversation ends
        there with a generation prompt (found as the renders with that payload replaced by
        sentinels meet again), up to its end; "" when there is no such message or payload."""
        if i == 0 or not any(isinstance(msgs[i - 1].get(k), str) and msgs[i - 1].get(k)
                             for k in ("content", "reasoning_content")):
            return ""
        return with_gen[self._changed(msgs[:i], tools, with_gen, i - 1, gen=True)[1]:]

    def _body_start(self, msgs, tools, full: str, i: int, lo: int, start: int, specials) -> int | None:
        """Where message i's output begins: after the generation prompt (the assistant
        header), searched back from the first byte of its payload, not before ``lo``."""
        with_gen = self(msgs[:i], tools, True)
        without = self(msgs[:i], tools, False)
        gen = with_gen[len(without) :] if with_gen.startswith(without) else ""
        if gen:
            for cand in _header_candidates(gen, specials):
                k = full.rfind(cand, lo, start)
                if k >= 0:
                    return k + len(cand)
            if full.startswith(without) and lo <= len(without) <= start:
                # the turn renders the prompt in another form where the prompt is written
                # (DeepSeek-V3.2's ``<｜Assistant｜></think>`` for ``<｜Assistant｜><think></think>``,
                # ``\n\n</think>`` after tool results): the prompt's part it writes, whole markers
                n = _whole_markers(gen, _common_prefix(full[len(without):start], gen))
                if n:
                    return len(without) + n
        header = self._header_after(msgs, tools, i, with_gen) if not gen else None
        if header and header.strip():
            # a template that writes its generation prompt whatever ``add_generation_prompt``
            # says (Command-R7B's, with an empty reasoning block a turn in the history does not
            # have; Mistral-Nemo's ``[/INST]``): the longest start of what it writes after the
            # preceding payload
            body = _longest_start(full, header, lo, start)
            if body is not None:
                return body
        last = _last_special(with_gen, specials)
        if last:
            k = full.rfind(last, lo, start)
            if k >= 0:
                return k + len(last)
        # markers the tokenizer has no special token for: the longest start of the generation
        # prompt (at least half of it) that is in the render
        body = _longest_start(full, gen, lo, start)
        if body is not None:
            return body
        if header is None:
            header = self._header_after(msgs, tools, i, with_gen)
        if header.strip():
            # markers that are no special tokens: the text the template writes after the
            # preceding message's payload when the conversation ends there, for generation (a
            # template with no generation prompt of its own, Mistral-Nemo's ``[/INST]``, is
            # placed by the same text above)
            k = full.rfind(header, lo, start)
            if k >= 0:
                return k + len(header)
        if i > 0:
            # a turn the template writes with no header of its own: after a tool result
            # (DeepSeek-R1's, Apertus' answers continue the results' block), or after any other
            # message where nothing of the generation prompt's first marker is written before
            # its text (DeepSeek-R1-Distill-Qwen's second call of a conversation follows the
            # user's text directly): its output starts where the conversation up to the
            # preceding message ends, as the template renders it for generation
            m = _MARKER.search(gen)
            for before in (with_gen, without):
                if full.startswith(before) and lo <= len(before) <= start and (
                        msgs[i - 1].get("role") == "tool" or (m and m.group() not in full[len(before):start])):
                    return len(before)
        return None

    def _generation_pieces(self, msgs, tools, specials=()) -> list[Piece]:
        marked = self(msgs, tools, False)
        out: list[Piece] = []
        pos, inside = 0, False
        for m in re.finditer(f"[{_GEN_BEGIN}{_GEN_END}]", marked):
            out.append((marked[pos : m.start()], -1, inside))
            inside = m.group() == _GEN_BEGIN
            pos = m.end()
        out.append((marked[pos:], -1, inside))
        # every piece inside a generation block is assistant output; which message it is does
        # not matter for the loss policy but for --mask-history: number them in order
        numbered, k = [], 0
        assistants = [j for j, m in enumerate(msgs) if m.get("role") == ASSISTANT]
        for text, _, answer in out:
            if answer:
                # white space a block holds after its end-of-turn marker (LFM2.5's
                # ``<|im_end|>\n``) is not the model's output: it stops at the marker
                own = _trim_to_marker(text, 0, len(text), tuple(m for m in (self.eos, *specials) if m))
                numbered.append((text[:own], assistants[min(k, len(assistants) - 1)] if assistants else -1, True))
                if own < len(text):
                    numbered.append((text[own:], -1, False))
                k += 1
            else:
                numbered.append((text, -1, False))
        return numbered


RENDER_BUDGET_S = 20.0  # wall-clock seconds a chat template may take for one record


@contextlib.contextmanager
def render_budget(seconds: float):
    """A record whose template runs longer than ``seconds`` (a loop that never ends, a CPU
    bomb) is a ``template_error`` reject instead of a stalled worker: a real-time timer whose
    signal raises inside the render. Main thread only (where signals are delivered: the
    tokenizer actors and processes); elsewhere the stage's stall watchdog stays the guard."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame):
        raise RecordError("template_error", f"the chat template ran for more than {seconds:g} s on this record")

    before = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def _check_calls(conv: Conversation, answers: dict[int, str]) -> None:
    """Every tool call of an assistant turn is in that turn's rendered output (its function's
    name, as text or as JSON text): a template that leaves a call out (DeepSeek-R1-Distill's
    drops the calls of a turn that also has text) rejects the record instead of writing an
    answer without its call."""
    for i, m in enumerate(conv.messages):
        if not m.tool_calls:
            continue
        text = answers.get(i, "")
        for c in m.tool_calls:
            name = c["name"]
            if name not in text and json.dumps(name)[1:-1] not in text:
                raise RecordError("tool_call_not_rendered", f"assistant turn {i}: the chat template does not write its "
                                  f"call of {name!r}")


def _header_candidates(gen: str, specials) -> list[str]:
    """The generation prompt; then, when the whole of it is not in the render, the prompt less
    its trailing white space (Nemotron-3's prompt opens the reasoning block, ``<think>\n``, and
    a turn without reasoning renders ``<think></think>``: the ``<think>`` is the prompt's, not
    the model's output); then its first line (the role header: a prompt that also writes an
    empty reasoning block, Qwen3's without thinking)."""
    out = [gen]
    bare = gen.rstrip()
    found = [gen.find(s) + len(s) for s in specials if s and s in gen]
    nl = gen.find("\n", min(found) if found else 0)
    if bare != gen and (nl < 0 or len(bare) > nl + 1):
        out.append(bare)
    if 0 <= nl < len(gen) - 1 and gen[: nl + 1].strip():
        out.append(gen[: nl + 1])
    return out  # never white space alone (DeepSeek-V3.2's prompt after tool results, ``\n\n<think></think>``)


def _longest_start(full: str, prompt: str, lo: int, start: int) -> int | None:
    """Where the longest start of ``prompt`` (at least half of it) found in ``full[lo:start]``
    ends (the last one found), never inside a marker the match has opened (``<｜Assistant｜><``
    of ``<｜Assistant｜><｜tool▁calls▁begin｜>``: the ``<`` is the next marker's); None when there
    is none."""
    for n in range(len(prompt), max(2, (len(prompt) + 1) // 2) - 1, -1):
        k = full.rfind(prompt[:n], lo, start)
        if k >= 0:
            cut = _whole_markers(prompt, n)
            if cut:
                return k + cut
    return None


def _marker_at(text: str, pos: int, specials) -> str:
    """The marker ``text`` holds at ``pos``: its longest special token there, else marker-shaped
    text (a template's marker the tokenizer has no special token for); "" where none."""
    found = [s for s in specials if s and text.startswith(s, pos)]
    if found:
        return max(found, key=len)
    m = _MARKER.match(text, pos)
    return m.group() if m else ""


def _whole_markers(prompt: str, n: int) -> int:
    """``n`` (a matched start of ``prompt``), less a marker the match has opened but not
    closed (``<｜Assistant｜><`` of ``<｜Assistant｜><think>``: the ``<`` is the next marker's)."""
    opened = prompt.rfind("<", 0, n)
    return opened if n < len(prompt) and opened > prompt.rfind(">", 0, n) else n


def _last_special(text: str, specials) -> str | None:
    """The special token that ends last in ``text``."""
    best, at = None, -1
    for s in specials:
        k = text.rfind(s) if s else -1
        if k >= 0 and k + len(s) > at:
            best, at = s, k + len(s)
    return best


def _own_closing(after: str, shared: int, specials, eos: str | None, tail: str = "") -> int | None:
    """The closing of a turn the template ends otherwise when another turn follows (gpt-oss:
    ``<|end|>`` there, ``<|return|>`` last; a template that writes EOS only between turns):
    ``after`` is what follows its last payload byte, whose first ``shared`` characters the
    last-turn form (``tail``) shares. The marker both forms had begun (it straddles where they
    part), or an EOS token right there, or the marker the last-turn form writes where they part
    when this form writes it after white space (Nemotron-Nano-v2: ``\n<SPECIAL_12>`` between
    turns, ``<SPECIAL_12>`` last); None when none (the next turn's header starts there)."""
    for s in specials:
        if not s:
            continue
        k = after.find(s, 0, shared + len(s))
        if 0 <= k < shared < k + len(s):
            return k + len(s)
    if eos and after.startswith(eos, shared):
        return shared + len(eos)
    opened = after.rfind("<", 0, shared)  # a marker as plain text, begun by both forms
    if opened >= 0 and after.rfind(">", 0, shared) < opened:
        close = after.find(">", shared)
        if close >= 0:
            return close + 1
    marker = _marker_at(tail, shared, specials)
    rest = after[shared:]
    space = len(rest) - len(rest.lstrip())
    if marker and space and rest.startswith(marker, space):
        return shared + space + len(marker)
    return None


def _closing_length(closing: str, specials, eos: str | None = None) -> int:
    """The end-of-turn marker's share of ``closing`` (the template's text after a turn's last
    payload byte): through the first EOS token in it, where generation stops (what a template
    writes after it, such as Command-R's instructions after the last turn or the next turn's
    header, is not the model's output); else through its last special token, or through the
    text after that token where there is some that is not the start of a marker; else through
    its last character that is not whitespace (``<|im_end|>`` on a tokenizer that has no such
    token; the newline after it is the next turn's)."""
    if eos and eos in closing:
        return closing.index(eos) + len(eos)
    at = max((closing.rfind(s) + len(s) for s in specials if s and s in closing), default=0)
    rest = closing[at:].strip()
    if rest and not any(s and s.startswith(rest) for s in specials):
        return len(closing.rstrip())  # the turn's own text goes on (GLM's </tool_call>): through it
    return at or len(closing.rstrip())


def _trim_to_marker(text: str, start: int, end: int, specials: tuple[str, ...]) -> int:
    """End the answer at the end of the last special token inside it when only white space
    follows it (the newline a template adds after the end-of-turn marker); a turn whose own text
    goes on after its last special token (GLM's ``</tool_call>`` after the special
    ``</arg_value>``) keeps it: ``end``."""
    best = -1
    for s in specials:
        k = text.rfind(s, start, end)
        if k >= 0:
            best = max(best, k + len(s))
    return best if best > start and not text[best:end].strip() else end




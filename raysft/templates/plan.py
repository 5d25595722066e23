"""Render plans: ``--template auto`` at the cost of a built-in, for every template, by design.

A chat template is a program whose input is a conversation. Most of what it reads decides its
path (roles, which keys a message has, how many tool calls, the tools' structure), and most of
what it writes of a message's text (content, reasoning, tool-call names and arguments, tool
descriptions) it writes as it is, or through a string method (``content | trim``,
``reasoning.strip('\\n')``), or as JSON (``arguments | tojson``). A plan is that program run once
per conversation *shape* on stand-ins, then replayed for every conversation of the shape:

* **Shape** (:func:`shape`): the messages and tools with every non-empty string (other than a
  ``role`` or ``type``) taken out as a payload; keys, their order, roles, types, numbers, empty
  strings and the number of messages, calls and tools stay. Two conversations of one shape
  differ only in their payloads.
* **Tracking** (:class:`Node`): the shape is rendered with each payload replaced by a
  :class:`Node`, a ``str`` whose text is a marker (``\\ue0f2<id>\\ue0f3``) and whose every
  operation is recorded. A string result of a method, slice, ``+``, ``~``, ``join``,
  ``replace`` or ``tojson`` is a new node (an expression over the payloads); a ``bool`` or
  ``int`` the template computes from a payload (``'</think>' in content``, ``content |
  length``, ``content == ''``, ``content.startswith(...)``) is a *guard*: the value the run saw,
  which a conversation must reproduce to share the plan. Anything else a template can do with a
  payload's text (iterate it, hash it, ``split`` it into a list, hand it to a filter or
  function that reads it outside these hooks) stops the run: :class:`Untracked`, and the shape is
  rendered record by record as before. The tracking environment routes every way Jinja reaches
  a value's text through these hooks: attribute and item access, the binary operators,
  ``in``/``not in`` (compiled through :func:`compare`), ``~`` and block/macro output (lifted
  back into nodes), filters that read text at C level (refused), calls of anything but a macro,
  a payload's own method or a container's (refused when handed a payload), and ``str()``
  outside output (refused).
* **Replay** (:meth:`Plan.fill`): evaluate the guards and the nodes the pieces need on the
  real payloads; if every guard holds and no payload-derived text holds a special-token string
  (the span rules look for those), the pieces are the run's pieces with each marker replaced by
  its node's value: the bytes the template writes for that conversation, and the assistant
  spans the record-by-record rules find, without rendering it.

A plan is built at a shape's second sighting (a shape seen once costs only its key) and checked
once against the record-by-record result of that conversation; a mismatch retires the shape.
"""

from __future__ import annotations

import json
import operator
import re
import threading

MARK_OPEN, MARK_CLOSE = "\ue0f2", "\ue0f3"
MARK = re.compile("\ue0f2(\\d+)\ue0f3")
STRUCTURAL = frozenset(("role", "type"))  # keys whose string values decide a template's path
MAX_PLANS = 4096  # shapes remembered per process
MAX_SEEN = 1 << 16
# A plan costs about three renders of its conversation to build and check. Past FREE_BUILDS,
# a new shape is planned only while plans have been replayed USES_PER_BUILD times per build.
FREE_BUILDS, USES_PER_BUILD = 16, 2


class Untracked(BaseException):  # noqa: N818 - BaseException: a template's own except clauses never catch it
    """The template used a payload in a way a plan cannot replay."""


class UntrackedOpaque(Untracked):
    """The template reads into a tool definition or an argument object: plan this template
    with their structure in the shape instead."""


class _Mark:
    """A payload's place in a shape key (equal only to itself)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


PAYLOAD, LIST, DICT, OPAQUE = _Mark("payload"), _Mark("list"), _Mark("dict"), _Mark("opaque")
OPAQUE_KEYS = frozenset(("arguments",))  # object values under these keys may be one payload (see Opaque)


def shape(value, payloads: list, structural: bool = False, opaque: bool = False):
    """The shape key of a JSON-like value; its payload strings appended to ``payloads`` in the
    order :func:`slotted` numbers them. (Run for every conversation: kept lean.)"""
    t = type(value)
    if t is dict:
        out = [DICT]
        add = out.append
        for k, v in value.items():
            add(k)
            if type(v) is str:
                if v and k not in STRUCTURAL:
                    payloads.append(v)
                    add(PAYLOAD)
                else:
                    add(v)
            elif opaque and type(v) is dict and v and k in OPAQUE_KEYS:
                payloads.append(v)
                add(OPAQUE)
            else:
                add(shape(v, payloads, opaque=opaque))
        return tuple(out)
    if t is str:
        if structural or not value:
            return value
        payloads.append(value)
        return PAYLOAD
    if t is list or t is tuple:
        return (LIST, *[shape(v, payloads, opaque=opaque) for v in value])
    if value is None:
        return None
    return (t, value)  # numbers and booleans: True and 1 are different shapes


def conversation_key(msgs: list[dict], tools, payloads: list, opaque: bool = False) -> tuple:
    """:func:`shape` of a conversation's messages and tools as one flat key (the same payload
    order), written out for the common case: one pass over each message's keys. ``opaque``:
    each tool definition and each call's object arguments are one payload (:class:`Opaque`),
    so that conversations with different tools share a shape."""
    key: list = []
    add = key.append
    for m in msgs:
        add(DICT)
        for k, v in m.items():
            add(k)
            if type(v) is str:
                if v and k not in STRUCTURAL:
                    payloads.append(v)
                    add(PAYLOAD)
                else:
                    add(v)
            else:
                add(shape(v, payloads, opaque=opaque))
    if tools:
        add(LIST)
        for t in tools:
            if opaque and type(t) is dict and t:
                payloads.append(t)
                add(OPAQUE)
            else:
                add(shape(t, payloads))
    return tuple(key)


def slotted(value, tracker: Tracker, structural: bool = False, opaque: bool = False, key: str = ""):
    """A copy of ``value`` with each payload replaced by a leaf node (or an :class:`Opaque`), in
    :func:`shape`'s order."""
    t = type(value)
    if t is str:
        return value if structural or not value else tracker.leaf()
    if t is dict:
        if opaque and value and key in OPAQUE_KEYS:
            return tracker.opaque()
        return {k: slotted(v, tracker, k in STRUCTURAL, opaque, k) for k, v in value.items()}
    if t is list or t is tuple:
        return [slotted(v, tracker, opaque=opaque) for v in value]
    return value


def slotted_tools(tools: list, tracker: Tracker, opaque: bool) -> list:
    return [tracker.opaque() if opaque and type(t) is dict and t else slotted(t, tracker) for t in tools]


# --------------------------------------------------------------------------- tracking

LIVE: list = [None]  # the tracker whose template run is in progress (None: nodes act as plain str)
RUN_LOCK = threading.RLock()  # tracked runs, one at a time per process

_OPS = {
    "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "lteq": operator.le, "gt": operator.gt,
    "gteq": operator.ge, "in": lambda a, b: a in b, "notin": lambda a, b: a not in b, "bool": bool, "len": len,
}


def _text(x):
    return str.__str__(x) if type(x) is Node else x


def _refusing(method, what: str, error: type = Untracked):
    """An operation that, inside a tracked run, ends it (``error(what)``: the shape is then
    rendered record by record), and outside one is ``method``."""

    def refused(self, *args):
        if LIVE[0] is not None:
            raise error(what)
        return method(self, *args)

    return refused


class Node(str):
    """A payload, or an expression over payloads, inside a tracked template run."""

    # ---- a str method is a recorded operation (names with "_" are Python's and this class's own)
    def __getattribute__(self, name):
        if name[0] == "_" or LIVE[0] is None:
            return str.__getattribute__(self, name)
        _markup(self, f"{name}()")
        method = getattr(str, name)  # AttributeError for what a str does not have, as for a str
        if not callable(method):
            return method

        def call(*args, **kwargs):
            return LIVE[0].method(self, name, args, kwargs)

        call.rs_tracked = True
        return call

    @property
    def _nid(self) -> int:
        return str.__getattribute__(self, "__dict__")["nid"]

    # ---- operations that give a value the template can branch on: guards
    def _guard(self, op, other, reflected=False):
        if LIVE[0] is None:
            a, b = (_text(other), str.__str__(self)) if reflected else (str.__str__(self), _text(other))
            return _OPS[op](a, b)
        return LIVE[0].guard(op, other, self) if reflected else LIVE[0].guard(op, self, other)

    def __eq__(self, other):
        return self._guard("eq", other)

    def __ne__(self, other):
        return self._guard("ne", other)

    def __lt__(self, other):
        return self._guard("lt", other)

    def __le__(self, other):
        return self._guard("lteq", other)

    def __gt__(self, other):
        return self._guard("gt", other)

    def __ge__(self, other):
        return self._guard("gteq", other)

    def __contains__(self, item):
        return self._guard("in", item, reflected=True)

    def __bool__(self):
        t = LIVE[0]
        if t is None:
            return bool(str.__len__(self))
        if t.specs[self._nid][0] == "p":  # a payload is never empty (its shape says so)
            return True
        return t.guard("bool", self)

    def __len__(self):
        return str.__len__(self) if LIVE[0] is None else LIVE[0].guard("len", self)

    # ---- operations that give text: new nodes
    def __add__(self, other):
        if LIVE[0] is None or not isinstance(other, str):
            return str.__add__(self, other)
        _markup(self, "+")
        _markup(other, "+")
        return LIVE[0].concat(self, other)

    def __radd__(self, other):
        if LIVE[0] is None or not isinstance(other, str):
            return str.__add__(other, self) if isinstance(other, str) else NotImplemented
        _markup(self, "+")
        return LIVE[0].concat(other, self)

    def __getitem__(self, key):
        if LIVE[0] is None or not isinstance(key, (int, slice)) or isinstance(key, bool):
            return str.__getitem__(self, key)
        _markup(self, "[]")
        return LIVE[0].method(self, "__getitem__", (key,), {})

    # ---- anything else that reads the text: not replayable
    __hash__ = _refusing(str.__hash__, "a payload used as a key")
    __iter__ = _refusing(str.__iter__, "a payload iterated")
    __str__ = _refusing(str.__str__, "a payload's text taken by str()")
    __repr__ = _refusing(str.__repr__, "a payload's repr")
    __format__ = _refusing(str.__format__, "a payload formatted")
    __mod__ = _refusing(str.__mod__, "a payload used as a % format")
    __rmod__ = _refusing(lambda self, other: NotImplemented, "a payload formatted with %")
    __mul__ = __rmul__ = _refusing(str.__mul__, "a payload repeated")
    __int__ = _refusing(lambda self: int(str.__str__(self)), "a payload read as a number")
    __float__ = _refusing(lambda self: float(str.__str__(self)), "a payload read as a number")


def _markup(x, what: str) -> None:
    """A ``| safe`` payload is a ``Markup``, whose ``+``, methods and slices escape or differ
    from a str's: not followed."""
    if type(x) is Node and LIVE[0].specs[x._nid][0] == "k":
        raise Untracked(f"{what} of a payload marked safe")


class Opaque(dict):
    """A tool definition, or a call's object arguments, as one payload: a template may only
    write it as JSON (``tojson``, or the JSON text of arguments a template takes as text).
    Reading into it (an attribute, a key, its items, its length, iterating it, handing it to a
    function) ends the run with :class:`UntrackedOpaque`. An empty ``dict`` underneath: nothing
    reads it outside a run but :func:`tojson` and ``_replace_payload``, which know it."""

    def __getattribute__(self, name):
        if name[0] != "_" and LIVE[0] is not None:
            raise UntrackedOpaque(f"{name} of a tool or argument object")
        return dict.__getattribute__(self, name)

    __getitem__ = _refusing(dict.__getitem__, "a key of a tool or argument object", UntrackedOpaque)
    __iter__ = _refusing(dict.__iter__, "a tool or argument object iterated", UntrackedOpaque)
    __len__ = _refusing(dict.__len__, "a tool or argument object's length", UntrackedOpaque)
    __contains__ = _refusing(dict.__contains__, "a key looked up in a tool or argument object", UntrackedOpaque)
    __eq__ = _refusing(lambda self, other: self is other, "a tool or argument object compared", UntrackedOpaque)

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = None

    def __bool__(self):
        return True  # never empty: its shape says so

    __repr__ = __str__ = _refusing(lambda self: f"Opaque({dict.__getattribute__(self, '__dict__').get('idx')})",
                                   "a tool or argument object as text", UntrackedOpaque)


def opaque_variant(o: Opaque, variant: int) -> Opaque:
    """The sentinel variant of an object payload (the span rules render message ``i`` with
    its payloads swapped for sentinels)."""
    d = dict.__getattribute__(o, "__dict__")
    v = Opaque()
    dict.__getattribute__(v, "__dict__").update(idx=d["idx"], variant=variant)
    return v


def _spec_value(x):
    """An argument of a recorded operation: a node's id, or a plain hashable value."""
    if type(x) is Node:
        return ("n", x._nid)
    if isinstance(x, slice):
        return ("sl", _spec_value(x.start), _spec_value(x.stop), _spec_value(x.step))
    if isinstance(x, tuple):
        return ("t", tuple(_spec_value(v) for v in x))
    if x is None or isinstance(x, (str, int, float, bool)):
        return ("v", x)
    raise Untracked(f"a payload operation with a {type(x).__name__} argument")


def _holds(args, kinds: tuple) -> bool:
    """Whether ``args``, or a list, tuple or dict among them, hold a value of one of ``kinds``."""
    for a in args:
        if type(a) in kinds:
            return True
        if isinstance(a, (list, tuple)) and any(type(v) in kinds for v in a):
            return True
        if isinstance(a, dict) and any(type(v) in kinds for v in a.values()):
            return True
    return False


def _has_node(args) -> bool:
    """Whether ``args`` hold a payload (a text or an object) of a tracked run."""
    return _holds(args, (Node, Opaque))


def _has_opaque(args) -> bool:
    return _holds(args, (Opaque,))


class Tracker:
    """The nodes and guards of one shape's tracked runs (every render a plan needs)."""

    def __init__(self):
        self.specs: list[tuple] = []  # node id -> ("p", payload index) | ("m", ...) | ("c", parts) | ("j", id, ascii)
        self.index: dict[tuple, int] = {}
        self.objs: list[Node] = []
        self.guards: dict[tuple, object] = {}  # guard expression -> the value the run saw
        self.payloads = 0
        self.opaques: set[int] = set()  # payloads that are objects (Opaque)

    def _node(self, spec: tuple, text: str | None = None) -> Node:
        nid = self.index.get(spec)
        if nid is not None:
            return self.objs[nid]
        nid = len(self.specs)
        node = Node(text if text is not None else f"{MARK_OPEN}{nid}{MARK_CLOSE}")
        str.__getattribute__(node, "__dict__")["nid"] = nid
        self.specs.append(spec)
        self.index[spec] = nid
        self.objs.append(node)
        return node

    def leaf(self) -> Node:
        self.payloads += 1
        return self._node(("p", self.payloads - 1))

    def opaque(self, idx: int | None = None, variant: int = 0) -> Opaque:
        """Payload ``idx``'s object stand-in (a new payload when None); ``variant``: the
        sentinel variants the span rules render message ``i`` with."""
        if idx is None:
            self.payloads += 1
            idx = self.payloads - 1
            self.opaques.add(idx)
        o = Opaque()
        dict.__getattribute__(o, "__dict__").update(idx=idx, variant=variant)
        return o

    def opaque_json(self, o: Opaque, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> Node:
        d = dict.__getattribute__(o, "__dict__")
        sep = tuple(separators) if separators is not None else None
        return self._node(("J", d["idx"], d["variant"], bool(ensure_ascii), indent, sep, bool(sort_keys)))

    def method(self, node: Node, name: str, args: tuple, kwargs: dict):
        spec = ("m", node._nid, name, tuple(_spec_value(a) for a in args),
                tuple((k, _spec_value(v)) for k, v in sorted(kwargs.items())))
        result = getattr(str, name)(str.__str__(node), *[_plain(a) for a in args],
                                    **{k: _plain(v) for k, v in kwargs.items()})
        if type(result) is str:
            return self._node(spec)
        if type(result) in (bool, int):
            self.guards[spec] = result
            return result
        raise Untracked(f"{name}() of a payload gives a {type(result).__name__}")

    def guard(self, op: str, a, b=None):
        spec = ("g", op, _spec_value(a), _spec_value(b))
        result = _OPS[op](_plain(a)) if op in ("bool", "len") else _OPS[op](_plain(a), _plain(b))
        self.guards[spec] = result
        return result

    def safe(self, x):
        """``x | safe``: its text as it is, kept apart (a ``Markup`` is not a str everywhere)."""
        return self._node(("k", x._nid))

    def parts(self, x) -> tuple:
        if type(x) is Node:
            spec = self.specs[x._nid]
            return spec[1] if spec[0] == "c" else (("n", x._nid),)
        return (("s", str.__str__(x)),) if x else ()  # (a Markup's own + would escape what follows it)

    def concat(self, *items) -> str:
        parts: list = []
        for x in items:
            for p in self.parts(x):
                if parts and p[0] == "s" and parts[-1][0] == "s":
                    parts[-1] = ("s", parts[-1][1] + p[1])
                else:
                    parts.append(p)
        if not any(p[0] == "n" for p in parts):
            return "".join(p[1] for p in parts)
        if len(parts) == 1:
            return self.objs[parts[0][1]]
        text = "".join(p[1] if p[0] == "s" else str.__str__(self.objs[p[1]]) for p in parts)
        return self._node(("c", tuple(parts)), text)

    def lift(self, text: str):
        """Text that holds markers (a block's or macro's output) as a node."""
        if MARK_OPEN not in text:
            return text
        items: list = []
        pos = 0
        for m in MARK.finditer(text):
            items.append(text[pos : m.start()])
            items.append(self.objs[int(m.group(1))])
            pos = m.end()
        items.append(text[pos:])
        return self.concat(*items)

    def tojson(self, value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        """``tojson`` of a value holding nodes: each string node's JSON text is a node of its
        own (JSON escapes a string character by character, so a concatenation's JSON text is
        its parts' JSON texts)."""
        if type(value) is Opaque:  # a whole tool or argument object: its JSON text is one node
            return self.opaque_json(value, ensure_ascii, indent, separators, sort_keys)
        if type(value) is list and value and all(type(v) is Opaque for v in value) and indent is None:
            # a list of them (``tools | tojson``): its items' JSON texts, joined as json.dumps joins them
            sep = separators[0] if separators is not None else ", "
            items: list = ["["]
            for k, v in enumerate(value):
                if k:
                    items.append(sep)
                items.append(self.opaque_json(v, ensure_ascii, indent, separators, sort_keys))
            items.append("]")
            return self.concat(*items)

        def swap(x):
            if type(x) is Opaque:
                if indent is not None or ensure_ascii:  # (its JSON text would depend on where it sits)
                    raise UntrackedOpaque("a tool or argument object inside a value written as indented JSON")
                return str.__str__(self.opaque_json(x, False, None, separators, sort_keys)) + MARK_OPEN

            if type(x) is Node:
                if ensure_ascii:
                    raise Untracked("a payload written by tojson with ensure_ascii")
                return "".join(p[1] if p[0] == "s" else str.__str__(self._node(("j", p[1])))
                               for p in self.parts(x))
            if isinstance(x, dict):
                if any(type(k) is Node for k in x):
                    raise Untracked("a payload used as a JSON key")
                return {k: swap(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [swap(v) for v in x]
            return x

        text = json.dumps(swap(value), ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)
        # an object's JSON text went in as a string ("<marker>\ue0f2"): take its quotes off
        text = re.sub('"(\ue0f2\\d+\ue0f3)\ue0f2"', r"\1", text)
        return self.lift(text)


def _plain(x):
    if type(x) is Node:
        return str.__str__(x)
    if isinstance(x, tuple):
        return tuple(_plain(v) for v in x)
    return x


def compare(first, *rest):
    """A chain of comparisons holding ``in``/``not in`` (the tracking environment compiles them
    here: ``payload in 'literal'`` would otherwise read the payload's text in C)."""
    left, result = first, True
    for k in range(0, len(rest), 2):
        op, right = rest[k], rest[k + 1]
        if op in ("in", "notin") and LIVE[0] is not None and type(left) is Node and type(right) is not Node \
                and isinstance(right, str):
            result = LIVE[0].guard(op, left, right)
        else:
            result = _OPS[op](left, right)
        if not result:
            return result
        left = right
    return result


# --------------------------------------------------------------------------- replay


class Plan:
    """One shape's pieces as literal text and node references, its guards, and the nodes they
    need."""

    def __init__(self, tracker: Tracker, pieces: list, special_strings: tuple[str, ...]):
        self.specs = tracker.specs
        self.guards = list(tracker.guards.items())
        self.payloads, self.opaques = tracker.payloads, set(tracker.opaques)
        self.pieces = []
        out_nodes: set[int] = set()
        for text, i, answer in pieces:
            parts: list = []
            pos = 0
            for m in MARK.finditer(text):
                if m.start() > pos:
                    parts.append(text[pos : m.start()])
                nid = int(m.group(1))
                parts.append(nid)
                out_nodes.add(nid)
                pos = m.end()
            if pos < len(text):
                parts.append(text[pos:])
            literal = "".join(p for p in parts if type(p) is str)
            if MARK_OPEN in literal or MARK_CLOSE in literal:
                raise Untracked("a piece boundary falls inside a payload's expression")
            self.pieces.append((parts[0] if len(parts) == 1 and type(parts[0]) is str else tuple(parts), i, answer))
        self.out_nodes = sorted(out_nodes)
        needed: set[int] = set()
        for nid in self.out_nodes:
            self._need(nid, needed)
        for spec, _ in self.guards:
            for x in spec[2:]:
                self._need_value(x, needed)
        self.order = sorted(needed)
        self.verified = False
        specials = sorted({s for s in special_strings if s}, key=len, reverse=True)
        self.specials = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
        self.lead = "".join(sorted({s[0] for s in specials}))
        self._compile()

    def _need(self, nid: int, needed: set) -> None:
        if nid in needed:
            return
        needed.add(nid)
        spec = self.specs[nid]
        if spec[0] == "m":
            self._need(spec[1], needed)
            for a in spec[3]:
                self._need_value(a, needed)
            for _, a in spec[4]:
                self._need_value(a, needed)
        elif spec[0] == "c":
            for p in spec[1]:
                if p[0] == "n":
                    self._need(p[1], needed)
        elif spec[0] in ("j", "k"):
            self._need(spec[1], needed)
        # "p" and "J" read payloads only

    def _need_value(self, x, needed: set) -> None:
        if isinstance(x, tuple):
            if x and x[0] == "n":
                self._need(x[1], needed)
            else:
                for v in x:
                    self._need_value(v, needed)

    def _compile(self) -> None:
        """The replay as one Python function (generated once per shape: replaying it is the
        per-conversation cost of ``--template auto``). Every literal it uses is a name bound
        in its namespace, never text in its source."""
        ns: dict = {"_dumps": json.dumps}

        def const(value) -> str:
            name = f"_c{len(ns)}"
            ns[name] = value
            return name

        def arg(x) -> str:
            kind = x[0]
            if kind == "v":
                return const(x[1])
            if kind == "n":
                return f"v{x[1]}"
            if kind == "sl":
                return f"slice({arg(x[1])}, {arg(x[2])}, {arg(x[3])})"
            return "(" + "".join(arg(v) + ", " for v in x[1]) + ")"

        def joined(parts) -> str:  # literal text (str) and node ids (int), concatenated
            return "''.join((" + "".join((const(x) if type(x) is str else f"v{x}") + ", " for x in parts) + "))"

        def call(spec) -> str:
            args = [f"v{spec[1]}", *[arg(a) for a in spec[3]], *[f"{k}={arg(a)}" for k, a in spec[4]]]
            return f"{const(getattr(str, spec[2]))}({', '.join(args)})"

        ops = {"eq": "==", "ne": "!=", "lt": "<", "lteq": "<=", "gt": ">", "gteq": ">=", "in": "in",
               "notin": "not in"}
        lines = ["def fill(P):", "    try:"]
        for nid in self.order:
            spec = self.specs[nid]
            kind = spec[0]
            if kind == "p":
                expr = f"P[{spec[1]}]"
            elif kind == "m":
                expr = call(spec)
            elif kind == "c":
                expr = joined([p[1] for p in spec[1]])
            elif kind == "j":
                expr = f"_dumps(v{spec[1]}, ensure_ascii=False)[1:-1]"
            elif kind == "J":
                if spec[2]:  # a sentinel variant's stand-in: never in a plan's pieces
                    raise Untracked("a sentinel object in a plan")
                expr = (f"_dumps(P[{spec[1]}], ensure_ascii={spec[3]}, indent={const(spec[4])}, "
                        f"separators={const(spec[5])}, sort_keys={spec[6]})")
            else:
                expr = f"v{spec[1]}"
            lines.append(f"        v{nid} = {expr}")
        for spec, seen in self.guards:
            if spec[0] == "m":
                expr = call(spec)
            elif spec[1] in ("bool", "len"):
                expr = f"{spec[1]}({arg(spec[2])})"
            else:
                expr = f"({arg(spec[2])} {ops[spec[1]]} {arg(spec[3])})"
            lines.append(f"        r = {expr}")
            lines.append(f"        if r != {const(seen)} or type(r) is not {const(type(seen))}: return None")
        lines.append("    except Exception:")
        lines.append("        return None")
        if self.out_nodes:  # as in the run, every text the template writes of a payload is non-empty
            lines.append("    if not (" + " and ".join(f"v{n}" for n in self.out_nodes) + "): return None")
        if self.specials is not None:  # the span rules look for special tokens in every render
            ns["_search"] = self.specials.search
            test = " or ".join(f"{const(c)} in p" for c in self.lead)
            strings = [k for k in range(self.payloads) if k not in self.opaques]
            lines.append(f"    for p in ({'P' if not self.opaques else '[P[k] for k in ' + const(strings) + ']'}):")
            lines.append(f"        if ({test}) and _search(p): return None")
            for k in sorted(self.opaques):
                lines.append(f"    if _search(_dumps(P[{k}], ensure_ascii=False)): return None")
        items = []
        for p, i, a in self.pieces:
            items.append(f"({const(p) if type(p) is str else joined(p)}, {i}, {a})")
        lines.append("    return [" + ", ".join(items) + "]")
        exec(compile("\n".join(lines), "<raysft render plan>", "exec"), ns)  # noqa: S102 - our own generated code
        self.fill = ns["fill"]

    def fill(self, payloads: list) -> list | None:
        """The pieces for a conversation of this shape, or None where it leaves the plan (a
        guard that does not hold, an operation that fails on its text, an empty text where
        the run wrote a payload, special-token text in a payload). Replaced by the generated
        function of :meth:`_compile`."""
        raise NotImplementedError

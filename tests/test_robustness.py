"""Nothing lost, nothing half-written: bad input, fuzzing, overlong policies, atomic output,
killed workers."""

import json
import random
import threading
import time

import numpy as np
import pytest
from helpers import build, file_bytes, reader

from raysft.engine.driver import BuildError
from raysft.tokenize import SampleBuilder

GOOD = {"instruction": "Say hello.", "output": "Hello!"}

BAD_ROWS = {
    "invalid_json": b'{"instruction": "x", "output": ',
    "invalid_utf8": b'{"instruction": "\xff\xfe", "output": "y"}',
    "missing_field": json.dumps({"instruction": "no output"}).encode(),
    "bad_type": json.dumps({"instruction": ["a"], "output": "b"}).encode(),
    "empty_conversation": json.dumps({"conversations": []}).encode(),
    "role_order": json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                                {"from": "gpt", "value": "c"}]}).encode(),
    "no_final_assistant": json.dumps({"messages": [{"role": "user", "content": "a"}]}).encode(),
    "unknown_role": json.dumps({"messages": [{"role": "wizard", "content": "a"}]}).encode(),
    "empty_assistant": json.dumps({"messages": [{"role": "user", "content": "a"},
                                                {"role": "assistant", "content": ""}]}).encode(),
    "all_masked": json.dumps({"messages": [{"role": "user", "content": "a"},
                                           {"role": "assistant", "content": "b", "loss": 0}]}).encode(),
    "not_an_object": b"[1, 2, 3]",
}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for r in rows:
            f.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")
    return path


def test_every_reason_is_counted_and_listed(tmp_path, ray_session, llama3_dir):
    rows = [GOOD, *BAD_ROWS.values(), GOOD]
    src = write_jsonl(tmp_path / "in" / "mixed.jsonl", rows)
    stats = build(tmp_path / "out", [src], llama3_dir, template="llama3", seq_length=256, on_bad_record="skip")
    assert stats["rejected"] == {k: 1 for k in BAD_ROWS}
    assert stats["rows_read"] == len(rows) == stats["rows_written"] + sum(stats["rejected"].values())
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == list(BAD_ROWS)
    assert [r["position"].rsplit(" ", 1)[1] for r in rejects] == [str(i + 2) for i in range(len(BAD_ROWS))]
    assert rejects[0]["record"].startswith('{"instruction": "x"')
    # fail policy: one line naming file, line and reason, as soon as a bad record is found
    # (whichever the tokenizer actors meet first)
    with pytest.raises(BuildError, match=r"mixed\.jsonl line \d+: [a-z_]+: ") as e:
        build(tmp_path / "out2", [src], llama3_dir, template="llama3", seq_length=256)
    import re

    line, reason = re.search(r"line (\d+): ([a-z_]+):", str(e.value)).groups()
    assert list(BAD_ROWS)[int(line) - 2] == reason and "\n" not in str(e.value)
    assert not (tmp_path / "out2" / "_SUCCESS").exists()


def fuzz_rows(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    roles = ["user", "assistant", "system", "tool", "gpt", "human", "bot", "", None, 3]
    values = ["hi", "", "  ", None, 7, [], {}, ["x"], {"type": "text"}, "é" * 3, "<|eot_id|>", "x" * 300]
    rows = []
    for _ in range(n):
        kind = rng.randrange(7)
        if kind == 0:
            rec = {"instruction": rng.choice(values), "output": rng.choice(values), "input": rng.choice(values)}
        elif kind == 1:
            rec = {"conversations": [{"from": rng.choice(roles), "value": rng.choice(values)}
                                     for _ in range(rng.randrange(5))], "tools": rng.choice(["[]", "{", "[1]", None])}
        elif kind == 2:
            rec = {"messages": [{"role": rng.choice(roles), "content": rng.choice(values),
                                 **({"tool_calls": rng.choice([[], [{}], "x", [{"name": "f"}]])} if rng.random() < 0.2 else {})}
                                for _ in range(rng.randrange(5))]}
        elif kind == 3:
            rec = rng.choice([1, "s", None, [], [{}], {"unrelated": True}])
        else:
            rec = {"messages": [{"role": "user", "content": "q" * rng.randrange(1, 50)},
                                {"role": "assistant", "content": " ".join(["word"] * rng.randrange(1, 200))}]}
        raw = json.dumps(rec).encode()
        m = rng.random()
        if m < 0.1:
            raw = raw[: rng.randrange(len(raw) + 1)] or b"{"
        elif m < 0.15:
            raw = raw.replace(b"q", b"\xc3(", 1)
        elif m < 0.18:
            raw = b"[" * 5000 + b"]" * 5000
        rows.append(raw.replace(b"\n", b" "))
    return rows


def test_fuzz_pure_builder_never_raises(llama3_info):
    b = SampleBuilder(llama3_info, "llama3")
    rows = fuzz_rows(3000, seed=1)
    ids, reasons, messages = b(rows, [""] * len(rows))
    assert len(ids) == len(rows)
    for arr, reason, msg in zip(ids, reasons, messages):
        assert (arr is None) == bool(reason)
        assert bool(reason) == bool(msg)


def test_fuzz_build_accounts_for_every_row(tmp_path, ray_session, llama3_dir):
    rows = fuzz_rows(3000, seed=2)
    src = write_jsonl(tmp_path / "in" / "fuzz.jsonl", rows)
    stats = build(tmp_path / "out", [src], llama3_dir, template="llama3", seq_length=128, on_bad_record="skip")
    rejected, dropped = sum(stats["rejected"].values()), sum(stats["dropped"].values())
    assert stats["rows_read"] == len(rows)
    assert stats["rows_read"] == stats["rows_written"] + rejected + dropped
    assert rejected > 500 and stats["rows_written"] > 500 and dropped > 0
    assert len((tmp_path / "out" / "rejects.jsonl").read_text().splitlines()) == rejected + dropped
    assert len(reader(tmp_path / "out")) == stats["samples_written"]


@pytest.mark.parametrize("policy", ["drop", "truncate", "split"])
def test_overlong_policies(tmp_path, ray_session, shared_data, llama3_dir, policy):
    S = 400  # glaive rows: 184..4043 tokens, median 415
    stats = build(tmp_path, [shared_data / "glaive_toolcall_en_demo.json"], llama3_dir, template="llama3",
                  seq_length=S, overlong=policy)
    r = reader(tmp_path)
    assert max(r.index.sequence_lengths) <= S
    assert stats["rows_read"] == 300 == stats["rows_written"] + sum(stats["dropped"].values())
    assert all((r[i] >= 0).any() for i in range(len(r)))  # every sample trains on something
    if policy == "drop":
        assert stats["dropped"]["overlong"] > 0 and stats["samples_written"] == stats["rows_written"]
    elif policy == "truncate":
        assert stats["overlong"]["rows_kept"] > 0 and stats["samples_written"] == stats["rows_written"]
    else:
        assert stats["samples_written"] > stats["rows_written"]


@pytest.mark.slow  # (default run kept well under 15 min: CI's slow run)
def test_interrupted_job_leaves_no_final_names(tmp_path, ray_session, shared_data, llama3_dir, monkeypatch):
    import raysft.layouts.base as base

    def boom(*a, **k):
        raise RuntimeError("simulated crash during merge")

    monkeypatch.setattr(base, "merge_index_files", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(out, [shared_data / "glaive_toolcall_en_demo.json"], llama3_dir, template="llama3", seq_length=2048)
    assert sorted(p.name for p in out.iterdir()) == ["_tmp"]
    monkeypatch.undo()
    build(out, [shared_data / "glaive_toolcall_en_demo.json"], llama3_dir, template="llama3", seq_length=2048)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["_SUCCESS", "data.bin", "data.idx", "data_order.txt", "inputs.json", "manifest.json", "provenance.bin",
         "rejects.jsonl", "report.html", "shards", "stats.json"])


def _kill_once(match: str, stop: threading.Event, killed: list):
    import psutil

    while not stop.is_set() and not killed:
        for p in psutil.process_iter(["pid", "name", "cmdline"]):
            title = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
            if match in title:
                time.sleep(1.0)  # let it get into its work
                try:
                    p.kill()
                    killed.append(p.info["pid"])
                except psutil.NoSuchProcess:
                    continue
                return
        time.sleep(0.05)


@pytest.mark.slow  # (default run kept well under 15 min: CI's slow run)
def test_killed_tokenizer_actor_gives_identical_output(tmp_path, ray_session, shared_data, llama3_dir):
    inputs = [shared_data / "alpaca_en_demo.json", shared_data / "alpaca_zh_demo.json"]
    flags = dict(template="llama3", seq_length=2048, batch_size=64)
    build(tmp_path / "clean", inputs, llama3_dir, **flags)
    stop, killed = threading.Event(), []
    t = threading.Thread(target=_kill_once, args=("Tokenize", stop, killed), daemon=True)
    t.start()
    try:
        build(tmp_path / "faulty", inputs, llama3_dir, **flags)
    finally:
        stop.set()
        t.join()
    assert killed, "the tokenizer actor was never seen, so never killed"
    assert file_bytes(tmp_path / "clean") == file_bytes(tmp_path / "faulty")


def test_trust_remote_code_off_by_default():
    from raysft.config import BuildConfig

    assert BuildConfig().trust_remote_code is False


def test_out_path_refuses_escapes():
    from raysft.output import OutputError, out_path

    assert out_path("/o", "shards/part-00000") == "/o/shards/part-00000"
    for bad in ("../x", "/etc/passwd", "a/../../b", "a//b"):
        with pytest.raises(OutputError):
            out_path("/o", bad)


@pytest.mark.slow  # (default run kept well under 15 min: CI's slow run)
def test_resume_reuses_completed_shards_and_refuses_changes(tmp_path, ray_session, shared_data, llama3_dir,
                                                            monkeypatch):
    import raysft.layouts.base as base

    inputs = [shared_data / "glaive_toolcall_en_demo.json"]
    flags = dict(template="llama3", seq_length=1024, num_shards=3)
    build(tmp_path / "clean", inputs, llama3_dir, **flags)

    out = tmp_path / "out"
    monkeypatch.setattr(base, "merge_index_files", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        build(out, inputs, llama3_dir, **flags)
    monkeypatch.undo()
    shards = sorted((out / "_tmp" / "shards").glob("*.bin"))
    assert len(shards) == 3
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}

    from raysft.output import OutputError

    with pytest.raises(OutputError, match=r"cannot resume: --seq-length changed"):
        build(out, inputs, llama3_dir, **(flags | {"seq_length": 2048}), resume=True)

    build(out, inputs, llama3_dir, **flags, resume=True)
    assert file_bytes(out) == file_bytes(tmp_path / "clean")
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.bin")} == stamps  # reused, not rewritten


@pytest.mark.slow  # (default run kept well under 15 min: CI's slow run)
def test_truncation_never_ends_inside_a_split_marker(tmp_path, ray_session, shared_data, llama3_dir, llama3_info):
    stats = build(tmp_path, [shared_data / "glaive_toolcall_en_demo.json"], llama3_dir, template="chatml",
                  seq_length=300, overlong="truncate")
    assert stats["overlong"]["rows_kept"] > 50
    tok, r = llama3_info.load(), reader(tmp_path)
    markers = ("<|im_start|>", "<|im_end|>")
    for i in range(len(r)):
        signed = r[i]
        text = tok.decode(np.where(signed < 0, ~signed, signed).tolist(), skip_special_tokens=False)
        tail = text[-12:]
        for m in markers:
            assert not any(tail.endswith(m[:k]) for k in range(2, len(m))), (i, tail)

"""The red team's rules (#38) on the input side: every byte stream verifies its own end, a
malformed row is a reject at its own position, no file is read twice, and a file that is not a
regular file is one line instead of a hang or an empty input."""

import bz2
import gzip
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from raysft.read import InputError, expand_inputs, plan_chunks, read_chunk

ROOT = Path(__file__).resolve().parents[1]
QWEN3 = ROOT.parent / "shared" / "tokenizers" / "qwen3"


def _rows(shared_data, n=300) -> bytes:
    rows = json.loads((shared_data / "alpaca_en_demo.json").read_text())[:n]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _build(path, out, *extra, engine="local"):
    return subprocess.run([sys.executable, "-m", "raysft.build", "--input", str(path), "--tokenizer", str(QWEN3),
                           "--output", str(out), "--engine", engine, "--seq-length", "1024", *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def _error_line(r) -> str:
    lines = [x for x in r.stderr.splitlines() if x.startswith("raysft.build: error")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def _cut_files(tmp_path, shared_data) -> tuple[dict, bytes]:
    data = _rows(shared_data)
    third = len(data) // 3 + 1
    frames = [zstandard.ZstdCompressor(write_checksum=True).compress(data[i:i + third])
              for i in range(0, len(data), third)]
    cuts = {
        "cut.jsonl.zst": b"".join(frames)[: len(frames[0]) + len(frames[1]) // 2],  # inside a frame
        "cut.jsonl.gz": gzip.compress(data)[:-40],
        "cut.jsonl.bz2": bz2.compress(data)[:-40],
        "cut.jsonl.xz": lzma.compress(data)[:-40],
        "bad.jsonl.gz": (lambda g: g[:60] + b"\x00" * 40 + g[100:])(gzip.compress(data)),
    }
    for name, payload in cuts.items():
        (tmp_path / name).write_bytes(payload)
    (tmp_path / "whole.jsonl.zst").write_bytes(b"".join(frames))
    return cuts, data


def test_a_compressed_input_cut_short_is_one_line_naming_it(tmp_path, shared_data):
    cuts, data = _cut_files(tmp_path, shared_data)
    for name in cuts:
        path = tmp_path / name
        [chunk] = plan_chunks(expand_inputs([str(path)]))
        with pytest.raises(InputError, match="cut short|corrupt") as e:
            for _ in read_chunk(chunk):
                pass
        assert str(path) in str(e.value)
    [chunk] = plan_chunks(expand_inputs([str(tmp_path / "whole.jsonl.zst")]))
    assert sum(len(rows.raw) for rows in read_chunk(chunk)) == 300  # every frame, nothing more


@pytest.mark.slow  # three builds (~30 s): CI's slow run
def test_a_compressed_input_cut_short_fails_a_build_on_either_engine(tmp_path, shared_data):
    _cut_files(tmp_path, shared_data)
    for k, (name, policy, engine) in enumerate([("cut.jsonl.zst", "fail", "ray"), ("cut.jsonl.gz", "skip", "local")]):
        path = tmp_path / name  # a file-level fault is no skippable row, on either engine
        r = _build(path, tmp_path / f"out{k}", "--on-bad-record", policy, engine=engine)
        assert r.returncode == 1, (name, r.stderr)
        line = _error_line(r)
        assert str(path) in line and ("cut short" in line or "corrupt" in line), line
    r = _build(tmp_path / "whole.jsonl.zst", tmp_path / "whole")
    assert r.returncode == 0 and json.loads((tmp_path / "whole" / "stats.json").read_text())["rows_read"] == 300


def test_a_csv_row_with_an_extra_field_is_one_reject_at_its_own_row(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('instruction,output\nhi,there\n"a, b",c\nx,y,z\nq,"multi\nline"\nlast,one\n', encoding="utf-8")
    r = _build(path, tmp_path / "out", "--on-bad-record", "skip")
    assert r.returncode == 0, r.stderr
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rows_read"] == 5 and stats["samples_written"] == 4 and stats["rejected"] == {"bad_csv_row": 1}
    [rej] = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert rej["position"].endswith("data.csv record 2 (0-based)")
    r = _build(path, tmp_path / "out2")
    assert r.returncode == 1 and "record 2" in _error_line(r) and "bad_csv_row" in _error_line(r)


def test_a_file_is_read_once_however_it_is_linked(tmp_path, shared_data):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(_rows(shared_data, 10))
    os.link(folder / "a.jsonl", folder / "b.jsonl")  # a hard link: the same file
    (folder / "c.jsonl").symlink_to(folder / "a.jsonl")
    assert [Path(f.url).name for f in expand_inputs([str(folder)])] == ["a.jsonl"]


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_file_that_is_not_a_regular_file_is_one_line(tmp_path, kind):
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "x.jsonl"
    if kind == "device":
        path.symlink_to("/dev/zero")
    else:
        os.mkfifo(path)
    with pytest.raises(InputError, match="is not a regular file"):
        expand_inputs([str(folder)])
    r = _build(path, tmp_path / "out")
    assert r.returncode == 1 and "is not a regular file" in _error_line(r)


def test_the_manifest_records_every_files_size_and_hash_and_verify_checks_them(tmp_path, shared_data):
    from raysft.reader import PackedReader
    from raysft.verify import VerifyError

    src = tmp_path / "in.jsonl"
    src.write_bytes(_rows(shared_data, 200))
    out = tmp_path / "out"
    assert _build(src, out).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["checksums"]) == set(manifest["files"])
    assert manifest["checksums"]["data.bin"]["size"] == (out / "data.bin").stat().st_size
    verify = [sys.executable, "-m", "raysft", "verify", str(out)]
    r = subprocess.run(verify, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "every file matches" in r.stdout, r.stderr
    assert len(PackedReader(str(out))) == json.loads((out / "stats.json").read_text())["packs"]
    data = (out / "stats.json").read_bytes()
    (out / "stats.json").write_bytes(data.replace(b'"packs"', b'"pack5"'))  # same size, other content
    r = subprocess.run(verify, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "stats.json: its content differs" in r.stderr
    with open(out / "data.bin", "r+b") as f:
        f.truncate((out / "data.bin").stat().st_size // 2)
    r = subprocess.run(verify, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "data.bin:" in r.stderr and "the manifest says" in r.stderr
    with pytest.raises(VerifyError, match="data.bin"):
        PackedReader(str(out))


def test_a_cache_entry_is_trusted_only_under_its_own_key_and_vocabulary(tmp_path):
    import pyarrow as pa

    from raysft.cache import Cache

    cache = Cache(str(tmp_path / "cache"))
    ids = pa.array([[1, 2, ~3], [5, 6]], pa.list_(pa.int32()))
    table = pa.table({"src": pa.array([0, 0], pa.int32()), "ids": ids})
    cache.save("aa" + "1" * 38, table)
    assert cache.load("aa" + "1" * 38, vocab_size=100).num_rows == 2
    other = Path(cache.path("bb" + "2" * 38))
    other.parent.mkdir(parents=True)
    other.write_bytes(Path(cache.path("aa" + "1" * 38)).read_bytes())  # checksum intact, key not its own
    assert cache.load("bb" + "2" * 38) is None
    assert cache.load("aa" + "1" * 38, vocab_size=6) is None  # id 6 is outside a 6-token vocabulary
    assert cache.bad == 2 and cache.hits == 1


@pytest.mark.parametrize("line,says", [
    ("overlong: bogus", "--overlong must be one of"), ("on_bad_record: bogus", "--on-bad-record must be one of"),
    ("seq_length: '4096'", "seq-length must be a whole number"), ('pack: "no"', "pack must be true/false"),
    ('no_pack: "yes"', "no-pack must be true/false"), ("epochs: 1.5", "epochs must be a whole number"),
    ("seq_length: 1000000000000", "--seq-length must be from 2 to"), ("template_kwargs: [1]", "template-kwargs must"),
    ("format: bogus", "--format must be one of"), ("batch_size: 0", "--batch-size must be at least 1"),
])
def test_a_bad_job_file_value_is_one_usage_line(tmp_path, shared_data, line, says):
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {shared_data / 'alpaca_en_demo.json'}\ntokenizer: {QWEN3}\noutput: {tmp_path / 'out'}\n"
                   f"{line}\n")
    r = subprocess.run([sys.executable, "-m", "raysft.build", "--config", str(job)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2 and says in r.stderr.strip().splitlines()[-1], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_tokenizer_and_lock_files_of_the_wrong_shape_are_one_line(tmp_path, shared_data):
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(QWEN3, tok)
    src = tmp_path / "in.jsonl"
    src.write_bytes(_rows(shared_data, 20))
    for content in ("{not json", "[1, 2]"):
        (tok / "tokenizer_config.json").write_text(content)
        r = subprocess.run([sys.executable, "-m", "raysft.build", "--input", str(src), "--tokenizer", str(tok),
                            "--output", str(tmp_path / "o"), "--engine", "local"], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
        assert r.returncode == 1 and "tokenizer_config.json" in _error_line(r), r.stderr
    out = tmp_path / "out"
    out.mkdir()
    (out / "_LOCK").write_text("[1, 2, 3]")  # not a lock raysft wrote; old enough is taken over, else one line
    r = _build(src, out)
    assert r.returncode in (0, 3) and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr


def test_a_template_that_never_ends_is_a_template_error_within_its_budget(monkeypatch):
    import time

    from raysft.templates import jinja
    from raysft.tokenize import SampleBuilder, load_tokenizer_info

    monkeypatch.setattr(jinja, "RENDER_BUDGET_S", 1.0)
    info = load_tokenizer_info(str(QWEN3))
    info.chat_template = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                          "{{ messages[0]['content'] }}")
    b = SampleBuilder(info, "auto")  # the probe for tool-call forms runs under the budget too
    t0 = time.time()
    _, reasons, messages = b([json.dumps({"instruction": "hi", "output": "x"}).encode()])
    assert reasons == ["template_error"] and "more than 1 s" in messages[0] and time.time() - t0 < 5


@pytest.mark.slow  # two builds interrupted mid-way (~40 s): CI's slow run
@pytest.mark.parametrize("engine,started", [("ray", "tokenizer actors:"), ("local", "local engine:")])
def test_sigterm_is_an_interrupt_with_one_line_and_resume_continues(tmp_path, shared_data, engine, started):
    import signal
    import time

    src = tmp_path / "in.jsonl"
    src.write_bytes(_rows(shared_data, 999) * 40)
    p = subprocess.Popen([sys.executable, "-m", "raysft.build", "--input", str(src), "--tokenizer", str(QWEN3),
                          "--output", str(tmp_path / "out"), "--engine", engine], stderr=subprocess.PIPE, text=True,
                         cwd=ROOT)
    seen = []
    for line in p.stderr:  # the engine is up and tokenizes
        seen.append(line)
        if started in line:
            break
    time.sleep(1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    err = "".join(seen) + err
    assert p.returncode == 130, err[-2000:]
    lines = [x for x in err.splitlines() if x.startswith("raysft.build: error")]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    if engine == "local":  # what --resume does after it (the same on both engines)
        r = _build(src, tmp_path / "out", "--resume", "--seq-length", "4096")
        assert r.returncode == 0 and (tmp_path / "out" / "_SUCCESS").exists(), r.stderr

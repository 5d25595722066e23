"""An output that cannot be wrong (raysft.output): the lock against a second build, a dead
owner's lock taken over, files raysft did not write left alone, a commit killed at every step
finished by the next run, and one line (with its exit code) for each fault of the folder."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from raysft.output import LOCK, SUCCESS, TMP, Output, OutputError, OutputLock

ROOT = Path(__file__).resolve().parents[1]


def _local(path: Path):
    import fsspec

    return fsspec.filesystem("file"), str(path)


# --------------------------------------------------------------------------- lock


def _race(folder: str, barrier, results):
    fs, root = _local(Path(folder))
    lock = OutputLock(fs, root, folder)
    barrier.wait()
    try:
        lock.acquire()
        results.put(("won", os.getpid()))
        time.sleep(1.5)  # hold it while the others try
        lock.release()
    except OutputError as e:
        results.put(("refused", str(e)))


def test_two_process_race_one_build_wins(tmp_path):
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "out"), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(30)
    assert sorted(k for k, _ in got) == ["refused", "refused", "refused", "won"]
    assert all("is being written by another build (pid" in m for k, m in got if k == "refused")
    assert not (tmp_path / "out" / LOCK).exists()  # the winner released it


def test_dead_owners_lock_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "started": 1.0,
                                        "since": time.time(), "token": "old"}))
    fs, root = _local(out)
    lock = OutputLock(fs, root, str(out))
    lock.acquire()
    assert json.loads((out / LOCK).read_text())["token"] == lock.token
    assert "taking over the lock" in caplog.text and "is gone" in caplog.text
    lock.release()


def test_lock_of_a_live_owner_on_another_host_holds_until_its_lease_ends(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": time.time(),
                                        "heartbeat": time.time(), "token": "x"}))
    fs, root = _local(out)
    with pytest.raises(OutputError, match="being written by another build .* on elsewhere"):
        OutputLock(fs, root, str(out)).acquire()
    (out / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0, "heartbeat": 0, "token": "x"}))
    lock = OutputLock(fs, root, str(out))
    lock.acquire()  # no heartbeat for longer than the lease: stale
    lock.release()


def _cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "raysft.build", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def test_a_second_build_is_refused_with_one_line(tmp_path, shared_data, llama3_dir):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fsspec, time
        from raysft.output import OutputLock
        lock = OutputLock(fsspec.filesystem("file"), {str(out)!r}, {str(out)!r})
        lock.acquire()
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = _cli("--input", str(shared_data / "alpaca_en_demo.json"), "--tokenizer", llama3_dir, "--template",
                 "llama3", "--output", str(out))
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 3
    lines = [x for x in r.stderr.splitlines() if x.startswith("raysft.build: error")]
    assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "being written by another build" in lines[0]
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == [LOCK]  # the holder's lock, nothing else touched


# --------------------------------------------------------------------------- the folder


@pytest.mark.parametrize("case", ["file", "foreign", "unmarked"])
def test_folder_faults_are_one_line(tmp_path, shared_data, llama3_dir, case):
    out = tmp_path / "out"
    if case == "file":
        out.write_text("not a folder")
        want = "is a file, not a folder"
    elif case == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        want = "is not empty and holds no raysft dataset"
    else:
        out.mkdir()
        (out / "data.bin").write_bytes(b"x")
        (out / "manifest.json").write_text(json.dumps({"version": 2, "flags": {}, "files": ["data.bin"]}))
        want = "holds an unfinished raysft dataset"
    r = _cli("--input", str(shared_data / "alpaca_en_demo.json"), "--tokenizer", llama3_dir, "--template", "llama3",
             "--output", str(out))
    assert r.returncode == 3, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("raysft.build: error")]
    assert len(lines) == 1 and want in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    if case != "file":
        assert not (out / TMP).exists() and not (out / LOCK).exists()


# --------------------------------------------------------------------------- commit


def _dataset(out: Path, tag: str, names: list[str]) -> None:
    """Commit a fake dataset whose files hold ``tag``."""
    fs, root = _local(out)
    o = Output(fs, root, str(out))
    o.prepare_tmp({"tokenizer": "t", "flags": {}, "version": 2}, resume=False)
    for n in names:
        p = out / TMP / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"{tag}:{n}")
    o.commit(names, {"tokenizer": "t", "flags": {}, "version": 2})


OLD = ["data.bin", "data.idx", "stats.json", "shards/part-00000.bin", "shards/part-00001.bin", "old_only.txt"]
NEW = ["data.bin", "data.idx", "stats.json", "shards/part-00000.bin", "tokenizer/tokenizer.json"]

CRASHER = """
import os, sys
import fsspec
import fsspec.implementations.local
from raysft.output import Output
out, names, after = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
calls = [0]
real_replace, real_rm = os.replace, fsspec.implementations.local.LocalFileSystem.rm
def count():
    calls[0] += 1
    if calls[0] == after:
        os._exit(9)  # kill -9: no cleanup, no finally
def replace(*a, **k):
    count(); return real_replace(*a, **k)
def rm(self, *a, **k):
    count(); return real_rm(self, *a, **k)
fs = fsspec.filesystem("file")
o = Output(fs, out, out)
o.prepare_tmp({"tokenizer": "t", "flags": {}, "version": 2}, resume=False)
for n in names:
    p = os.path.join(out, "_tmp", n)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    open(p, "w").write("new:" + n)
os.replace = replace
fsspec.implementations.local.LocalFileSystem.rm = rm
o.commit(names, {"tokenizer": "t", "flags": {}, "version": 2})
print("steps", calls[0])
"""


def _state(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_commit_killed_at_any_step_is_finished_by_the_next_run(tmp_path):
    ref = tmp_path / "ref"
    _dataset(ref, "old", OLD)
    (ref / "notes.txt").write_text("user file")
    (ref / "shards" / "mine.txt").write_text("user file in shards/")
    r = subprocess.run([sys.executable, "-c", CRASHER, str(ref), ",".join(NEW), "0"], capture_output=True,
                       text=True, cwd=ROOT)
    steps = int(r.stdout.split()[-1])
    want = _state(ref)
    assert want["data.bin"] == "new:data.bin" and "old_only.txt" not in want and "shards/part-00001.bin" not in want
    assert want["notes.txt"] == "user file" and want["shards/mine.txt"] == "user file in shards/"
    assert SUCCESS in want
    for k in range(1, steps + 1):
        out = tmp_path / f"k{k}"
        _dataset(out, "old", OLD)
        (out / "notes.txt").write_text("user file")
        (out / "shards" / "mine.txt").write_text("user file in shards/")
        before = _state(out)
        r = subprocess.run([sys.executable, "-c", CRASHER, str(out), ",".join(NEW), str(k)], cwd=ROOT)
        assert r.returncode == 9
        now = _state(out)
        # whatever the step: either the old dataset, complete and marked, or no _SUCCESS and a
        # journal that completes the new one
        if SUCCESS in now:
            olds = {n: v for n, v in now.items() if not n.startswith(TMP)}
            assert olds in (before, want), f"step {k}: a marked mix"
        fs, root = _local(out)
        recovered = Output(fs, root, str(out)).recover()
        after = _state(out)
        if recovered:
            assert after == want, f"step {k}: the finished commit differs"
        else:
            assert {n: v for n, v in after.items() if not n.startswith(TMP)} == before, f"step {k}: old dataset hurt"


@pytest.mark.slow  # (default run kept well under 15 min: CI's slow run)
def test_failed_overwrite_keeps_the_old_dataset_marked(tmp_path, ray_session, shared_data, llama3_dir):
    from helpers import build, file_bytes

    out = tmp_path / "out"
    build(out, [shared_data / "glaive_toolcall_en_demo.json"], llama3_dir, template="llama3", seq_length=2048)
    before = file_bytes(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{broken\n')
    from raysft.engine.driver import BuildError

    with pytest.raises(BuildError, match=r"bad.jsonl"):
        build(out, [bad], llama3_dir, template="llama3", seq_length=2048, overwrite=True)
    assert (out / SUCCESS).exists()
    assert file_bytes(out) == before


def test_template_exceptions_and_huge_renders_are_counted_template_errors(llama3_info):
    from raysft.tokenize import SampleBuilder

    raw = [json.dumps({"instruction": "q", "output": "a"}).encode()]
    for bad in ("{{ 1/0 }}", "{{ 'x' * 10**12 }}", "{{ raise_exception('no') }}", "{% for m in messages %}{{ m.x.y }}"
                "{% endfor %}", "{{ messages[0]['content'] * 100000000 }}"):
        info = dataclasses.replace(llama3_info, chat_template=bad)
        _, reasons, messages = SampleBuilder(info, "auto")(raw)
        assert reasons == ["template_error"], (bad, reasons, messages)
        assert messages[0] and "\n" not in messages[0]


@pytest.mark.slow  # interrupted and resumed builds (~30 s): CI's slow run
def test_resume_after_same_size_same_mtime_change_reuses_nothing_stale(tmp_path, ray_session, shared_data,
                                                                        llama3_dir, monkeypatch):
    """``cp -p`` / ``rsync -a`` keep size and mtime: shards are reused only when the chunks that
    fed them hash the same."""
    import shutil

    from helpers import build, file_bytes

    import raysft.layouts.base as base

    inputs = []
    for name in ("alpaca_en_demo.json", "glaive_toolcall_en_demo.json"):
        shutil.copy2(shared_data / name, tmp_path / name)
        inputs.append(tmp_path / name)
    flags = dict(template="llama3", seq_length=1024, num_shards=4, chunk_bytes=64 << 10)
    out = tmp_path / "out"
    monkeypatch.setattr(base, "merge_index_files", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        build(out, inputs, llama3_dir, **flags)
    monkeypatch.undo()
    # same size, same mtime, other content: digits change (Llama 3 writes 1-3 digits as one token,
    # so every length, and the packing plan, stay the same: only content hashes can tell)
    p = inputs[1]
    st = p.stat()
    text = p.read_bytes()
    p.write_bytes(text.replace(b"5 units", b"7 units").replace(b"10 units", b"30 units"))
    assert p.read_bytes() != text
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert p.stat().st_size == st.st_size and p.stat().st_mtime_ns == st.st_mtime_ns
    stats = build(out, inputs, llama3_dir, **flags, resume=True)
    clean = build(tmp_path / "clean", inputs, llama3_dir, **flags)
    assert stats["tokens"] == clean["tokens"]
    assert file_bytes(out) == file_bytes(tmp_path / "clean")


# --------------------------------------------------------------------------- only through a verified manifest


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _small_build(out: Path, shared_data, llama3_dir, *extra):
    return _cli("--input", str(shared_data / "alpaca_en_demo.json"), "--tokenizer", llama3_dir, "--template", "llama3",
                "--output", str(out), "--engine", "local", "--seq-length", "1024", *extra)


def test_overwrite_without_a_manifest_touches_no_file_of_the_user(tmp_path, shared_data, llama3_dir):
    """No list of usual names: a folder without a raysft manifest is not raysft's, even with
    --overwrite, and a link out of it is never followed."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "tokenizer.json").write_text("the user's tokenizer")
    (victim / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer").symlink_to(victim)  # a link out of the output folder
    (out / "stats.json.bak").write_text("mine")
    r = _small_build(out, shared_data, llama3_dir)
    assert r.returncode == 3 and "holds no raysft dataset" in r.stderr  # not "an unfinished raysft dataset"
    before = _files(victim)
    r = _small_build(out, shared_data, llama3_dir, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert _files(victim) == before and (out / "stats.json.bak").read_text() == "mine"
    assert (out / "_SUCCESS").exists()


def test_a_file_raysft_did_not_write_is_never_replaced(tmp_path, shared_data, llama3_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.bin").write_text("the user's own data.bin")
    r = _small_build(out, shared_data, llama3_dir, "--overwrite")
    lines = [x for x in r.stderr.splitlines() if x.startswith("raysft.build: error")]
    assert r.returncode == 3 and len(lines) == 1 and "refusing to replace" in lines[0] and "data.bin" in lines[0]
    assert (out / "data.bin").read_text() == "the user's own data.bin" and not (out / TMP).exists()


def test_a_users_tmp_folder_is_never_removed(tmp_path, shared_data, llama3_dir):
    out = tmp_path / "out"
    (out / TMP).mkdir(parents=True)
    (out / TMP / "notes.txt").write_text("mine")
    for extra in ((), ("--overwrite",)):
        r = _small_build(out, shared_data, llama3_dir, *extra)
        assert r.returncode == 3 and "is not a raysft build's work folder" in r.stderr, r.stderr
        assert (out / TMP / "notes.txt").read_text() == "mine"


def test_a_manifest_or_journal_naming_paths_outside_is_never_applied(tmp_path, shared_data, llama3_dir):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    out = tmp_path / "out"
    r = _small_build(out, shared_data, llama3_dir)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(m | {"files": [*m["files"], "../outside.txt"]}))
    (out / TMP).mkdir()
    (out / TMP / "manifest.json").write_text(json.dumps({"flags": {}, "version": 2}))
    (out / TMP / "_COMMIT.json").write_text(json.dumps({"new": [], "remove": [str(outside)], "success": True}))
    r = _small_build(out, shared_data, llama3_dir)  # a tampered manifest is not raysft's: a foreign folder
    assert r.returncode == 3 and "holds no raysft dataset" in r.stderr, r.stderr
    assert (out / "_SUCCESS").exists() and outside.read_text() == "keep me"
    r = _small_build(out, shared_data, llama3_dir, "--overwrite")  # a way out: the journal is ignored, not applied
    assert r.returncode == 3 and "refusing to replace" in r.stderr  # its files are in no verified manifest
    assert outside.read_text() == "keep me" and (out / "_SUCCESS").exists()

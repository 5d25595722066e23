"""--engine local (no Ray) writes the bytes --engine ray writes, for every output file, under
the features that route data differently: rejects, overlong splits, several shards, a layout
with its own capacity rule, a weighted mixture with a validation split and epochs, and
re-packs from the tokenized cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import build

from raysft.engine.driver import BuildError


def _files(out: Path) -> dict[str, bytes]:
    """Every file of an output (the lock's heartbeat aside), by path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def _same(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name == "stats.json":  # names the folder of its cache; all else equal
            sa, sb = json.loads(fa[name]), json.loads(fb[name])
            sa.pop("cache", None), sb.pop("cache", None)
            assert sa == sb
        elif name == "manifest.json":  # the same but for the checksums of the two files above
            ma, mb = json.loads(fa[name]), json.loads(fb[name])
            for m in (ma, mb):
                for k in ("stats.json", "report.html"):
                    m["checksums"].pop(k, None)
            assert ma == mb
        elif name != "report.html":
            assert fa[name] == fb[name], name


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_data):
    d = tmp_path_factory.mktemp("engines")
    lines = (shared_data / "gsm8k_train.jsonl").read_text().splitlines()[:600]
    lines.insert(17, '{"question": "broken')  # a bad record, skipped and listed in rejects.jsonl
    (d / "gsm8k.jsonl").write_text("\n".join(lines) + "\n")
    return {"alpaca": str(shared_data / "alpaca_en_demo.json"), "tools": str(shared_data / "glaive_toolcall_en_demo.json"),
            "math": str(d / "gsm8k.jsonl")}


FLAGS = dict(template="llama3", seq_length=384, overlong="split", on_bad_record="skip", num_shards=3,
             chunk_bytes=300_000, map_keys={"prompt": "question", "response": "answer"})


def test_local_engine_writes_the_ray_engines_bytes(tmp_path, ray_session, inputs, llama3_dir):
    srcs = [inputs["alpaca"], inputs["tools"], inputs["math"]]
    a = build(tmp_path / "ray", srcs, llama3_dir, **FLAGS)
    b = build(tmp_path / "local", srcs, llama3_dir, engine="local", **FLAGS)
    assert a == b and a["rejected"] and a["overlong"]["rows_kept"] and a["shards"] == 3
    _same(tmp_path / "ray", tmp_path / "local")


@pytest.mark.slow
def test_local_engine_pai_with_one_tokenizer_process(tmp_path, ray_session, inputs, llama3_dir):
    # pai: packs one token short of seq-length, ends never after id 0
    srcs = [inputs["alpaca"], inputs["tools"], inputs["math"]]
    build(tmp_path / "ray-pai", srcs, llama3_dir, layout="pai", **FLAGS)
    build(tmp_path / "local-pai", srcs, llama3_dir, layout="pai", engine="local", tokenize_workers=1, **FLAGS)
    _same(tmp_path / "ray-pai", tmp_path / "local-pai")


@pytest.mark.slow
def test_local_engine_mixture_validation_epochs_and_cache(tmp_path, ray_session, inputs, llama3_dir):
    flags = dict(template="llama3", seq_length=2048, epochs=2, validation="0.1", mix_unit="samples",
                 sources=[{"name": "alpaca", "input": inputs["alpaca"], "share": 0.6},
                          {"name": "math", "input": inputs["math"], "share": 0.4,
                           "map_keys": {"prompt": "question", "response": "answer"}}])
    build(tmp_path / "ray", [], llama3_dir, on_bad_record="skip", **flags)
    cache = tmp_path / "cache"
    b = build(tmp_path / "local", [], llama3_dir, on_bad_record="skip", engine="local", cache=str(cache), **flags)
    assert b["cache"]["rows_tokenized"] == b["rows_read"]
    _same(tmp_path / "ray", tmp_path / "local")
    assert (tmp_path / "local" / "valid" / "data.bin").exists()
    # a re-pack from the cache at another seq-length: nothing tokenized, the bytes of a fresh build
    c = build(tmp_path / "repack", [], llama3_dir, on_bad_record="skip", engine="local", cache=str(cache),
              **(flags | {"seq_length": 1024}))
    assert c["cache"]["rows_tokenized"] == 0 and c["cache"]["rows_from_cache"] == c["rows_read"]
    build(tmp_path / "ray-1024", [], llama3_dir, on_bad_record="skip", **(flags | {"seq_length": 1024}))
    _same(tmp_path / "repack", tmp_path / "ray-1024")
    # the encoder's verdict was filed with the chunks and taken from there
    assert list((cache / "verdicts").glob("*.json"))


def test_local_engine_bad_record_is_one_line_naming_file_and_line(tmp_path, inputs, llama3_dir):
    with pytest.raises(BuildError, match=r"gsm8k\.jsonl line 18: invalid_json"):
        build(tmp_path / "out", [inputs["math"]], llama3_dir, template="llama3", engine="local",
              map_keys={"prompt": "question", "response": "answer"})
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_engine_flag(tmp_path):
    from raysft.build import config_from_args

    base = ["--input", "x.jsonl", "--tokenizer", "t", "--output", str(tmp_path / "o")]
    assert config_from_args(base).engine == "ray"
    assert config_from_args(base + ["--engine", "local"]).engine == "local"
    with pytest.raises(SystemExit):
        config_from_args(base + ["--engine", "local", "--ray-address", "auto"])
    with pytest.raises(SystemExit):
        config_from_args(base + ["--engine", "spark"])


def test_both_engines_are_executors_the_stages_are_written_against(tmp_path):
    from raysft.config import BuildConfig
    from raysft.engine.executor import Executor, LocalExecutor, RayExecutor, make_executor

    cfg = BuildConfig(inputs=["x.jsonl"], output=str(tmp_path / "o"), tokenizer="t")
    for cls in (RayExecutor, LocalExecutor):
        missing = [name for name in ("start", "tokenized", "task", "get", "wait", "put", "check_storage", "close",
                                     "shared_memory") if not hasattr(cls, name)]
        assert not missing, (cls.__name__, missing)
    ex = make_executor(cfg, "local")
    try:
        assert isinstance(ex, Executor) and ex.shared_memory
    finally:
        ex.close()
    assert isinstance(RayExecutor(cfg), Executor) and not RayExecutor.shared_memory


def _no_actor(kwargs, spill):  # for the test below: a tokenizer process with nothing to load
    pass


def _die(item):  # ... that dies on its first chunk, as one killed for memory would
    import os

    os._exit(9)


def test_a_dead_tokenizer_process_is_one_line(monkeypatch):
    from raysft.config import BuildConfig
    from raysft.engine import executor
    from raysft.engine.session import ClusterError, TokenizePool
    from raysft.errors import classify
    from raysft.read import Chunk, Piece

    monkeypatch.setattr(executor, "_start_actor", _no_actor)
    monkeypatch.setattr(executor, "_tokenize_chunk", _die)
    ex = executor.LocalExecutor(BuildConfig())
    chunk = Chunk(0, (Piece(0, "x.jsonl", "jsonl", 0, 10),))
    try:
        with pytest.raises(ClusterError, match="tokenizer process of --engine local died") as e:
            list(ex.tokenized([chunk], {}, TokenizePool(1, 1, 1.0, 1.0)))
        assert classify(e.value)[0] == 4
    finally:
        ex.close()


def _cli(out: Path, inputs: list, llama3_dir, *extra: str) -> str:
    """One ``python -m raysft.build`` (Ray is not started in this test process); its log."""
    import os
    import subprocess
    import sys

    args = [a for i in inputs for a in ("--input", i)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, "-m", "raysft.build", *args, "--tokenizer", str(llama3_dir),
                        "--template", "llama3", "--output", str(out), "--overwrite", "--on-bad-record", "skip",
                        "--map-keys", '{"prompt": "question", "response": "answer"}',
                        *extra], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stderr + p.stdout


def test_an_all_cached_build_starts_no_ray_and_a_bad_entry_is_tokenized_again(tmp_path, inputs, llama3_dir):
    """--engine ray (the default) with every chunk in the cache starts no Ray instance: the
    driver serves the entries (the local engine's path) and writes the bytes it wrote when it
    tokenized them, with another worker count than the one that filled the cache. An entry that fails its checksum is tokenized again by a tokenizer process."""
    srcs = [inputs["alpaca"], inputs["math"]]
    cache = tmp_path / "cache"
    job = tmp_path / "job.yaml"
    job.write_text("chunk_bytes: 200000\n")  # several chunks, so one bad entry is a part of the rows
    _cli(tmp_path / "first", srcs, llama3_dir, "--config", str(job), "--engine", "local", "--cache", str(cache),
         "--tokenize-workers", "2")
    assert len(list(cache.glob("??/*.arrow"))) > 2
    # another worker count cuts other chunks at the end: their entries are found as parts or whole
    log = _cli(tmp_path / "again", srcs, llama3_dir, "--config", str(job), "--cache", str(cache),
               "--tokenize-workers", "1")
    assert "nothing to tokenize, so no Ray instance is started" in log and "Ray instance" in log
    assert "Started a local Ray instance" not in log
    _same(tmp_path / "first", tmp_path / "again")
    entry = sorted(cache.glob("??/*.arrow"))[0]
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    log = _cli(tmp_path / "mended", srcs, llama3_dir, "--config", str(job), "--engine", "local", "--cache", str(cache))
    assert "fails its checksum" in log
    stats = json.loads((tmp_path / "mended" / "stats.json").read_text())
    assert 0 < stats["cache"]["rows_tokenized"] < stats["rows_read"]
    _same(tmp_path / "first", tmp_path / "mended")


def test_cached_chunks_need_every_entry_whatever_the_worker_count(tmp_path, inputs, llama3_dir):
    """The all-cached check finds a chunk's entry whole or as its parts: a cache made by a run
    that cut the last chunks for two workers serves a run that would cut them for one or for
    eight, and the chunks it hands on are the ones the entries were made of."""
    from raysft.config import BuildConfig
    from raysft.engine.driver import run
    from raysft.engine.prepare import cached_chunks, prepare
    from raysft.read import split_tail

    cache = tmp_path / "cache"
    cfg = BuildConfig(inputs=[inputs["math"]], output=str(tmp_path / "o"), tokenizer=str(llama3_dir),
                      template="llama3", engine="local", num_cpus=2, cache=str(cache), chunk_bytes=40_000,
                      on_bad_record="skip", map_keys={"prompt": "question", "response": "answer"})
    run(cfg)
    storage, info, files, chunks, sources, file_source = prepare(cfg)
    assert len(chunks) > 4
    made = [c.pieces for c in split_tail(chunks, 4)]  # as the two processes cut them
    for tail in (2, 4, 16, 0):
        got = cached_chunks(cfg, storage, info, chunks, sources, file_source, 2, tail)
        assert got is not None, tail
        ran, digests, complete = got
        assert complete and [c.pieces for c in ran] == made and sorted(digests) == [c.chunk for c in ran]
    for entry in cache.glob("??/*.arrow"):
        entry.unlink()
    assert cached_chunks(cfg, storage, info, chunks, sources, file_source, 2, 4) is None
    # the local engine's driver goes on past a miss: this run's own cut, every chunk hashed once
    ran, digests, complete = cached_chunks(cfg, storage, info, chunks, sources, file_source, 2, 2, stop_at_miss=False)
    assert not complete and [c.pieces for c in ran] == [c.pieces for c in split_tail(chunks, 2)]
    assert len(set(digests.values())) == len(ran)


def test_a_ray_the_build_starts_itself_starts_no_dashboard_and_no_autoscaler(tmp_path, monkeypatch, inputs, llama3_dir):
    """The build's own one-node Ray starts neither the API server (``ray.init`` waits ~1 s for
    it, and it only serves usage statistics without a dashboard) nor the autoscaler monitor (a
    fixed node); its raylet and workers do start, the actors' log lines still reach the build's
    log, and Ray's methods are as they were after the start."""
    import shutil
    import tempfile

    from ray._private.node import Node

    before = (Node.start_api_server, Node.start_monitor)
    root = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        monkeypatch.setenv("RAY_TMPDIR", root)
        log = _cli(tmp_path / "out", [inputs["math"]], llama3_dir, "--engine", "ray")
        logs = [p.name for p in Path(root).rglob("logs/*")]
        assert any(n.startswith("raylet") for n in logs), logs
        assert not any(n.startswith(("dashboard.", "monitor.")) for n in logs), logs
        assert "tokenize:" in log and (tmp_path / "out" / "data.idx").exists()
        # one node: no worker process but the tokenizer actors' (the small tasks run in the
        # driver's threads, and no idle worker is started ahead)
        actors = int(re.search(r"tokenizer actors: (\d+)", log).group(1))
        workers = {n.split("_")[-1].split(".")[0] for n in logs if n.startswith("python-core-worker-")}
        assert len(workers) == actors, logs
    finally:
        shutil.rmtree(root, ignore_errors=True)
    from raysft.engine import session

    with session._lean_head():
        assert Node.start_monitor is not before[1]
    assert (Node.start_api_server, Node.start_monitor) == before


def test_the_object_store_holds_the_tokenized_input_below_rays_spill_threshold(monkeypatch):
    """An in-process Ray's store, sized from the input where memory allows, keeps the tokenized
    blocks (~1.6 bytes a byte of JSON input) under the 80% at which Ray starts spilling; it
    never takes more than its share of the memory available, nor less than its floor."""
    from raysft.engine import session

    class Cfg:
        object_store_memory = None

    gib = 1 << 30
    monkeypatch.setattr(session, "_available_memory", lambda default: 20 * gib)
    monkeypatch.setattr(session, "_shm_free", lambda: 20 * gib)
    for size in (gib // 2, gib, 3 * gib):
        assert 0.8 * session.object_store_bytes(Cfg, size) >= 1.6 * size
    assert session.object_store_bytes(Cfg, 100 * gib) <= session.STORE_SHARE * 20 * gib
    assert session.object_store_bytes(Cfg, 0) >= min(session.OBJECT_STORE_BYTES, 0.3 * gib)

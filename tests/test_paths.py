"""Local paths are made absolute on the driver before anything reaches a worker (#40): a worker
resolves a relative path against its own working folder (a raylet's, or a job's unpacked
working_dir), so a relative --output or --cache named a different folder on each node."""

import os
import subprocess
import sys
from pathlib import Path

from raysft.config import BuildConfig
from raysft.engine.prepare import with_absolute_paths

ROOT = Path(__file__).resolve().parents[1]
QWEN3 = ROOT.parent / "shared" / "tokenizers" / "qwen3"


def test_every_local_path_of_a_build_is_absolute_before_the_engine_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(BuildConfig(
        inputs=["data/*.jsonl", "s3://bucket/x.jsonl"], output="out", cache="cache", tokenizer="missing-hub-name",
        spill_dir="spill", sources=[{"input": "a.jsonl"}, {"inputs": ["b.jsonl", "s3://b/c.jsonl"]}]))
    assert cfg.inputs == [str(tmp_path / "data/*.jsonl"), "s3://bucket/x.jsonl"]
    assert (cfg.output, cfg.cache, cfg.spill_dir) == (str(tmp_path / "out"), str(tmp_path / "cache"),
                                                      str(tmp_path / "spill"))
    assert cfg.sources == [{"input": str(tmp_path / "a.jsonl")},
                           {"inputs": [str(tmp_path / "b.jsonl"), "s3://b/c.jsonl"]}]
    assert cfg.tokenizer == "missing-hub-name"  # not a local path: its own error line says so


def test_a_build_with_relative_paths_writes_where_the_user_stood(tmp_path, shared_data):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.json").write_bytes((shared_data / "alpaca_en_demo.json").read_bytes())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "raysft.build", "--input", "data/a.json", "--tokenizer",
                        os.path.relpath(QWEN3, tmp_path), "--output", "out", "--cache", "cache", "--engine", "local"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out" / "_SUCCESS").exists() and any((tmp_path / "cache").rglob("*.arrow"))

"""Test helpers: run builds in the session's Ray instance and read outputs back."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np

from raysft.config import BuildConfig
from raysft.engine.driver import run
from raysft.indexed import IndexedReader
from raysft.tokenize import SampleBuilder


def build(out: Path, inputs: list, tokenizer: str, **kw) -> dict:
    cfg = BuildConfig(inputs=[str(i) for i in inputs], output=str(out), tokenizer=str(tokenizer), **kw)
    return run(cfg)


def reader(out: Path, name: str = "data") -> IndexedReader:
    return IndexedReader((Path(out) / f"{name}.idx").read_bytes(), open(Path(out) / f"{name}.bin", "rb"))


def expected_samples(info, paths, template="llama3", seq_length=None, **kw) -> Counter:
    """Every input record built in-process, one record at a time: the reference output."""
    b = SampleBuilder(info, template, **kw)
    out = Counter()
    for p in paths:
        text = Path(p).read_text(encoding="utf-8")
        recs = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
        for r in recs:
            [ids], [reason], _ = b([json.dumps(r, ensure_ascii=False).encode()], [""])
            if reason == "" and (seq_length is None or len(ids) <= seq_length):
                out[ids.tobytes()] += 1
    return out


def written_samples(out: Path) -> Counter:
    r = reader(out)
    return Counter(r[i].astype(np.int32).tobytes() for i in range(len(r)))


def file_bytes(out: Path) -> dict:
    return {n: (Path(out) / n).read_bytes() for n in ("data.bin", "data.idx", "data_order.txt")}


__all__ = ["build", "reader", "expected_samples", "written_samples", "file_bytes", "io"]

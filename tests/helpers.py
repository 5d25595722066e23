"""Test helpers: run builds in the session's Ray instance and read outputs back."""

from __future__ import annotations

import io
import json
import socket
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


def expected_fitted(info, paths, template="llama3", capacity=None, overlong="drop", avoid_end=(), **kw) -> list[np.ndarray]:
    """Every input record built in-process one at a time, then fitted to ``capacity`` by
    ``--overlong`` (the reference of what a build writes), as signed token arrays."""
    from raysft.tokenize import fit_overlong

    b = SampleBuilder(info, template, **kw)
    out = []
    for p in paths:
        text = Path(p).read_text(encoding="utf-8")
        recs = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
        for r in recs:
            raw = json.dumps(r, ensure_ascii=False).encode()
            [ids], [reason], _ = b([raw], [""])
            if reason:
                continue
            if capacity is not None and len(ids) > capacity:
                from raysft.samples import cut_unsafe

                unsafe = cut_unsafe(b, raw, ids, avoid_end) if overlong != "drop" else None
                out += fit_overlong(ids, capacity, overlong, unsafe)[0]
            else:
                out.append(ids)
    return out


def as_pairs(samples) -> list[tuple[bytes, bytes]]:
    """(ids, loss) of signed samples, as sortable bytes."""
    out = []
    for s in samples:
        s = np.asarray(s, np.int64)
        out.append((np.where(s >= 0, s, ~s).astype(np.int64).tobytes(), (s >= 0).tobytes()))
    return sorted(out)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: all bound at once, so the system cannot hand one out twice (one
    at a time, a port just closed can come back at once: a `ray start` given the same port for
    two servers fails)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()

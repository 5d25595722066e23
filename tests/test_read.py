"""Chunked reading of JSON Lines: every line belongs to exactly one chunk, whatever the cut."""

import random

import pytest

from raysft.read import expand_inputs, plan_chunks, read_chunk, split_tail


def reference_lines(data: bytes) -> list[tuple[int, bytes]]:
    """(byte offset, line without its newline) of every non-blank line."""
    out, pos = [], 0
    for line in data.split(b"\n"):
        if line.strip():
            out.append((pos, line.rstrip(b"\r")))
        pos += len(line) + 1
    return out


def lines_by_chunks(path, chunk_bytes: int, tail: int = 0) -> list[tuple[int, bytes]]:
    chunks = split_tail(plan_chunks(expand_inputs([str(path)]), None, chunk_bytes), tail)
    assert [c.chunk for c in chunks] == list(range(len(chunks)))
    got = []
    for c in chunks:
        for rows in read_chunk(c):
            assert rows.idx == list(range(len(rows.idx)))
            got += list(zip(rows.offset, rows.raw))
    return got


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_every_line_once_for_any_chunk_size(tmp_path, trailing_newline):
    rng = random.Random(7)
    lines = []
    for i in range(300):
        kind = rng.random()
        if kind < 0.05:
            lines.append(b"")  # blank line: no record
        elif kind < 0.1:
            lines.append(b"   \r")
        else:
            body = b'{"instruction": "%d", "output": "%s"}' % (i, b"x" * rng.randrange(0, 300))
            lines.append(body + (b"\r" if kind < 0.2 else b""))
    data = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    want = reference_lines(data)
    assert len(want) > 250
    for chunk_bytes in (5, 64, 100, 333, 1000, 4096, len(data) - 1, len(data), 1 << 20):
        assert lines_by_chunks(path, chunk_bytes) == want, chunk_bytes
        assert lines_by_chunks(path, chunk_bytes, tail=3) == want, chunk_bytes  # last 3 chunks cut in 4


def test_split_tail_cuts_only_the_last_chunks(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n' * 1000)
    chunks = plan_chunks(expand_inputs([str(path)]), None, 1000)  # 9 chunks
    split = split_tail(chunks, 2)
    assert len(split) == 7 + 2 * 4
    ranges = [(c.pieces[0].start, c.pieces[0].end) for c in split]
    assert ranges[:7] == [(c.pieces[0].start, c.pieces[0].end) for c in chunks[:7]]
    assert [b - a for a, b in ranges[7:]] == [250] * 8
    assert ranges[-1][1] == 9000 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_chunk_cut_exactly_after_a_newline(tmp_path):
    data = b'{"a": 1}\n{"b": 2}\n{"c": 3}\n'
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    # a cut right after each newline (9 and 18) and in the middle of lines
    for chunk_bytes in (9, 3, 18):
        assert lines_by_chunks(path, chunk_bytes) == [(0, b'{"a": 1}'), (9, b'{"b": 2}'), (18, b'{"c": 3}')]


def test_line_longer_than_many_chunks(tmp_path):
    long = b'{"output": "' + b"y" * 200_000 + b'"}'
    data = b'{"a": 1}\n' + long + b"\n" + b'{"z": 0}'
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    assert lines_by_chunks(path, 1000) == [(0, b'{"a": 1}'), (9, long), (10 + len(long), b'{"z": 0}')]


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_a_digest_alone_hashes_the_bytes_the_parse_reads(tmp_path, monkeypatch, trailing_newline):
    """chunk_digest(keep=False) hashes local files in place; it must give the digest the
    parse's read gives, for any cut of a JSON Lines file and for whole files of any size."""
    import gzip

    import raysft.read as read
    from raysft.read import chunk_digest

    rng = random.Random(3)
    data = b"\n".join(b'{"q": "%s"}' % (b"y" * rng.randrange(0, 90)) for _ in range(200))
    data += b"\n" if trailing_newline else b""
    (tmp_path / "a.jsonl").write_bytes(data)
    (tmp_path / "b.json").write_bytes(b"[" + b",".join([b'{"q": "z"}'] * 300) + b"]")
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(data))
    monkeypatch.setattr(read, "STREAM_HASH_BLOCK", 1000)  # b.json and c.jsonl.gz: hashed as big files
    files = expand_inputs([str(tmp_path / n) for n in ("a.jsonl", "b.json", "c.jsonl.gz")])
    for chunk_bytes in (7, 100, 999, 1 << 20):
        chunks = split_tail(plan_chunks(files, None, chunk_bytes), 2)
        for c in chunks:
            assert chunk_digest(c, keep=False)[0] == chunk_digest(c)[0], (chunk_bytes, c)
    monkeypatch.setattr(read, "STREAM_HASH_BLOCK", 1 << 30)  # now small: hashed whole
    for c in plan_chunks(files, None, 1 << 20):
        assert chunk_digest(c, keep=False)[0] == chunk_digest(c)[0]


@pytest.mark.parametrize("suffix", ["", ".gz", ".bz2", ".xz", ".zst"])
def test_line_numbers_of_increasing_offsets_in_plain_and_compressed_files(tmp_path, monkeypatch, suffix):
    import bz2
    import gzip
    import lzma

    import zstandard

    from raysft.read import LineCounter

    data = b"".join(b'{"a": %d}\n' % i for i in range(5000))
    pack = {"": bytes, ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": zstandard.ZstdCompressor().compress}[suffix]
    path = tmp_path / f"x.jsonl{suffix}"
    path.write_bytes(pack(data))
    monkeypatch.setattr(LineCounter, "BUFFER", 1000)  # many reads into the one buffer
    offsets = [0, 5, 999, 1000, 1001, len(data) // 3, len(data) - 3]
    c = LineCounter(str(path))
    try:
        assert [c.line(o) for o in offsets] == [data[:o].count(b"\n") + 1 for o in offsets]
    finally:
        c.close()

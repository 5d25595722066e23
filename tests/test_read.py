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

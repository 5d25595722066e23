import errno
import os
import pathlib

import fsspec
import numpy as np
import pytest

from raysft.indexed import decode_index
from raysft.merge import merge_shards
from raysft.write import IGNORE, ShardWriter, encode_shard


def signed(ids, loss):
    ids = np.asarray(ids, np.int32)
    return np.where(np.asarray(loss, bool), ids, ~ids).astype(np.int32)


SAMPLES = [
    signed([10, 11, 12, 13], [0, 0, 1, 1]),
    signed([20, 21, 22], [0, 1, 1]),
    signed([30, 31], [0, 1]),
]


def test_native_layout_orders_by_pack_then_position():
    [(tokens, idx)] = encode_shard(SAMPLES, np.array([1, 0, 0]), np.array([0, 1, 0]), "native", 8, 0)
    assert tokens.tolist() == SAMPLES[2].tolist() + SAMPLES[1].tolist() + SAMPLES[0].tolist()
    assert idx.sequence_lengths.tolist() == [2, 3, 4]
    assert idx.document_indices.tolist() == [0, 2, 3]


def test_pai_layout():
    S = 8
    [(tokens, idx)] = encode_shard(SAMPLES, np.array([0, 0, 1]), np.array([0, 1, 0]), "pai", S, 99)
    assert idx.sequence_lengths.tolist() == [16, 16]
    assert idx.document_indices.tolist() == [0, 1, 2]
    seq0 = tokens[:16]
    inputs, labels = seq0[:S], seq0[S:]
    # sample ends marked as -1-id; padding with pad id
    assert inputs.tolist() == [10, 11, 12, -1 - 13, 20, 21, -1 - 22, 99]
    # labels[i] is the target of position i; no loss across sample boundary or on prompt
    assert labels.tolist() == [IGNORE, 12, 13, IGNORE, 21, 22, IGNORE, IGNORE]
    seq1 = tokens[16:]
    assert seq1[:S].tolist() == [30, -1 - 31, 99, 99, 99, 99, 99, 99]
    assert seq1[S:].tolist() == [31] + [IGNORE] * 7


def _copy_file_range_refused_at(call: int, unit: int):
    """os.copy_file_range that copies ``unit`` bytes per call and fails on call number ``call``."""
    real, seen = os.copy_file_range, [0]

    def fake(src, dst, count, *args):
        seen[0] += 1
        if seen[0] == call:
            raise OSError(errno.EXDEV, "refused")
        return real(src, dst, min(count, unit), *args)

    return fake


@pytest.mark.parametrize("fs_name, refuse_at", [("file", None), ("file", 1), ("file", 3), ("memory", None)])
def test_merge_concatenates_shards(tmp_path, monkeypatch, fs_name, refuse_at):
    """Local disk copies in the kernel, falling back to a buffered copy where copy_file_range
    is refused (at a file's start or mid-file; the next shard goes back to the kernel copy);
    other file systems stream. The bytes are the same."""
    if refuse_at is not None:
        monkeypatch.setattr(os, "copy_file_range", _copy_file_range_refused_at(refuse_at, 4))
    fs = fsspec.filesystem(fs_name)
    if fs_name == "memory":
        tmp_path = pathlib.PurePosixPath(f"/merge-{refuse_at}")
    prefixes = []
    for k, (samples, packs) in enumerate([(SAMPLES[:2], [0, 1]), (SAMPLES[2:], [2])]):
        p = str(tmp_path / f"part-{k}")
        writer = ShardWriter(fs, p, "native", 8, 0)
        writer.write_all(samples, np.array(packs))
        writer.close()
        prefixes.append(p)
    merged = merge_shards(fs, prefixes, str(tmp_path / "data"))
    assert merged.sequence_lengths.tolist() == [4, 3, 2]
    assert merged.document_indices.tolist() == [0, 1, 2, 3]
    data = np.frombuffer(fs.cat_file(str(tmp_path / "data.bin")), dtype="<i4")
    assert data.tolist() == sum((s.tolist() for s in SAMPLES), [])
    assert decode_index(fs.cat_file(str(tmp_path / "data.idx"))).sequence_lengths.tolist() == [4, 3, 2]


def test_mindspeed_layout():
    S = 8
    parts = encode_shard(SAMPLES, np.array([0, 0, 1]), np.array([0, 1, 0]), "mindspeed", S, 99)
    (ids, idx), (labels, _), (segments, _) = parts
    assert idx.sequence_lengths.tolist() == [S, S] and idx.document_indices.tolist() == [0, 1, 2]
    assert ids[:S].tolist() == [10, 11, 12, 13, 20, 21, 22, 99]
    assert labels[:S].tolist() == [IGNORE, IGNORE, 12, 13, IGNORE, 21, 22, IGNORE]  # unshifted
    assert segments[:S].tolist() == [1, 1, 1, 1, 2, 2, 2, 0]
    assert ids[S:].tolist() == [30, 31] + [99] * 6
    assert labels[S:].tolist() == [IGNORE, 31] + [IGNORE] * 6
    assert segments[S:].tolist() == [1, 1] + [0] * 6


@pytest.mark.parametrize("layout", ["native", "pai", "mindspeed"])
def test_shard_writer_slices_give_the_same_bytes(tmp_path, monkeypatch, layout):
    """Writing a shard a few packs at a time gives exactly the bytes of encoding it whole."""
    import raysft.write as w

    S = 16
    rng = np.random.default_rng(3)
    samples, packs = [], []
    for p in range(40):
        room = S
        while room > 2 and rng.random() < 0.8:
            n = int(rng.integers(1, room))
            samples.append(signed(rng.integers(0, 1000, n), rng.integers(0, 2, n)))
            packs.append(p)
            room -= n
        if not packs or packs[-1] != p:
            samples.append(signed([5], [1]))
            packs.append(p)
    packs = np.array(packs)
    fs = fsspec.filesystem("file")
    whole = w.encode_ordered(samples, packs, layout, S, 7)
    monkeypatch.setattr(w, "SLICE_TOKENS", 40)  # a few packs per slice
    writer = w.ShardWriter(fs, str(tmp_path / "part"), layout, S, 7)
    writer.write_all(samples, packs)
    meta = writer.close()
    assert len(writer.indexes[0]) > 5  # it did write in slices
    for suffix, (tokens, index) in zip(w.layout_parts(layout), whole):
        assert (tmp_path / f"part{suffix}.bin").read_bytes() == tokens.astype("<i4").tobytes()
        got = decode_index((tmp_path / f"part{suffix}.idx").read_bytes())
        assert got.sequence_lengths.tolist() == index.sequence_lengths.tolist()
        assert got.document_indices.tolist() == index.document_indices.tolist()
    assert meta["documents"] == 40

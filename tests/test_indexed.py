import io
import struct

import numpy as np
import pytest

from raysft.indexed import Index, IndexedReader, IndexFormatError, decode_index, encode_index


def test_header_bytes_exact():
    idx = Index(np.dtype(np.int32), np.array([3, 2, 4], np.int32), np.array([0, 2, 3], np.int64))
    data = encode_index(idx)
    assert data[:9] == b"MMIDIDX\x00\x00"
    assert data[9:17] == struct.pack("<Q", 1)
    assert data[17:18] == b"\x04"  # int32
    assert data[18:26] == struct.pack("<Q", 3)  # sequences
    assert data[26:34] == struct.pack("<Q", 3)  # document index entries
    assert data[34:46] == np.array([3, 2, 4], "<i4").tobytes()
    assert data[46:70] == np.array([0, 12, 20], "<i8").tobytes()  # byte pointers
    assert data[70:94] == np.array([0, 2, 3], "<i8").tobytes()
    assert len(data) == 94


def test_roundtrip_and_reader():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(-1000, 1000, size=n).astype(np.int32) for n in (5, 1, 7, 3)]
    idx = Index(np.dtype(np.int32), np.array([len(s) for s in seqs], np.int32), np.array([0, 1, 4], np.int64))
    raw = encode_index(idx)
    back = decode_index(raw)
    assert np.array_equal(back.sequence_lengths, idx.sequence_lengths)
    assert np.array_equal(back.document_indices, idx.document_indices)
    reader = IndexedReader(raw, io.BytesIO(b"".join(s.tobytes() for s in seqs)))
    for i, s in enumerate(seqs):
        assert np.array_equal(reader[i], s)
    assert [len(x) for x in reader.document(1)] == [1, 7, 3]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"XXIDIDX\x00\x00" + b[9:], "bad magic"),
        (lambda b: b[:9] + struct.pack("<Q", 2) + b[17:], "version 2"),
        (lambda b: b[:-8], "header implies"),
        (lambda b: b[:17] + b"\x63" + b[18:], "unknown dtype"),
    ],
)
def test_bad_index_is_refused(mutate, message):
    idx = Index(np.dtype(np.int32), np.array([3], np.int32), np.array([0, 1], np.int64))
    with pytest.raises(IndexFormatError, match=message):
        decode_index(mutate(encode_index(idx)))


def test_document_indices_validated():
    with pytest.raises(IndexFormatError):
        encode_index(Index(np.dtype(np.int32), np.array([3, 1], np.int32), np.array([0, 1], np.int64)))

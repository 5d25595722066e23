"""Megatron ``MMIDIDX`` version-1 IndexedDataset files (.bin/.idx), in pure numpy.

Byte layout of the .idx file (all little endian), as read by
``megatron.core.datasets.indexed_dataset.IndexedDataset``::

    9 bytes   magic  b"MMIDIDX\\x00\\x00"
    u64       version (1)
    u8        dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    u64       sequence count  S
    u64       document count  D  (length of the document index array, i.e. documents + 1)
    i32[S]    sequence lengths, in tokens
    i64[S]    sequence pointers, byte offsets into the .bin file
    i64[D]    document indices: 0, then the sequence index one past the end of each document

The .bin file is the concatenation of every sequence's tokens in the declared dtype.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8

DTYPE_CODES: dict[np.dtype, int] = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class IndexFormatError(ValueError):
    """An .idx file that is not a Megatron MMIDIDX version-1 index."""


@dataclass
class Index:
    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32
    document_indices: np.ndarray  # int64, starts with 0 and ends with len(sequence_lengths)

    @property
    def sequence_pointers(self) -> np.ndarray:
        return sequence_pointers(self.sequence_lengths, self.dtype)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1


def sequence_pointers(lengths: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Byte offset of each sequence in the .bin file."""
    ptr = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], dtype=np.int64, out=ptr[1:])
    return ptr * np.dtype(dtype).itemsize


def encode_index(index: Index) -> bytes:
    """The exact bytes of the .idx file for ``index``."""
    dtype = np.dtype(index.dtype)
    if dtype not in DTYPE_CODES:
        raise IndexFormatError(f"dtype {dtype} has no Megatron code")
    lengths = np.ascontiguousarray(index.sequence_lengths, dtype="<i4")
    docs = np.ascontiguousarray(index.document_indices, dtype="<i8")
    if len(docs) == 0 or docs[0] != 0 or docs[-1] != len(lengths):
        raise IndexFormatError("document indices must start at 0 and end at the sequence count")
    if np.any(np.diff(docs) < 0):
        raise IndexFormatError("document indices must not decrease")
    header = MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", DTYPE_CODES[dtype])
    header += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(docs))
    pointers = sequence_pointers(lengths, dtype).astype("<i8")
    return header + lengths.tobytes() + pointers.tobytes() + docs.tobytes()


def decode_index(data: bytes, name: str = "<index>") -> Index:
    """Parse .idx bytes; checks the header and that the pointers agree with the lengths."""
    if len(data) < HEADER_SIZE or data[: len(MAGIC)] != MAGIC:
        raise IndexFormatError(f"{name}: not a Megatron MMIDIDX index (bad magic)")
    off = len(MAGIC)
    (version,) = struct.unpack_from("<Q", data, off)
    if version != VERSION:
        raise IndexFormatError(f"{name}: index version {version}, expected {VERSION}")
    (code,) = struct.unpack_from("<B", data, off + 8)
    if code not in CODE_DTYPES:
        raise IndexFormatError(f"{name}: unknown dtype code {code}")
    seq_count, doc_count = struct.unpack_from("<QQ", data, off + 9)
    off = HEADER_SIZE
    expected = off + seq_count * 4 + seq_count * 8 + doc_count * 8
    if len(data) != expected:
        raise IndexFormatError(f"{name}: {len(data)} bytes, header implies {expected}")
    lengths = np.frombuffer(data, dtype="<i4", count=seq_count, offset=off).astype(np.int32)
    off += seq_count * 4
    pointers = np.frombuffer(data, dtype="<i8", count=seq_count, offset=off)
    off += seq_count * 8
    docs = np.frombuffer(data, dtype="<i8", count=doc_count, offset=off).astype(np.int64)
    dtype = CODE_DTYPES[code]
    if not np.array_equal(pointers, sequence_pointers(lengths, dtype)):
        raise IndexFormatError(f"{name}: sequence pointers do not follow the lengths")
    return Index(dtype=dtype, sequence_lengths=lengths, document_indices=docs)


class IndexedReader:
    """Random access to a written dataset: ``reader[i]`` is sequence i as a numpy array.

    ``bin_file`` is any binary file object supporting seek/read (local file, fsspec/S3 file).
    """

    def __init__(self, idx_bytes: bytes, bin_file: BinaryIO, name: str = "<dataset>"):
        self.index = decode_index(idx_bytes, name)
        self._bin = bin_file
        self._ptr = self.index.sequence_pointers

    def __len__(self) -> int:
        return len(self.index.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        n = int(self.index.sequence_lengths[i])
        self._bin.seek(int(self._ptr[i]))
        raw = self._bin.read(n * self.index.dtype.itemsize)
        return np.frombuffer(raw, dtype=self.index.dtype.newbyteorder("<")).astype(self.index.dtype)

    def document(self, d: int) -> list[np.ndarray]:
        docs = self.index.document_indices
        return [self[i] for i in range(int(docs[d]), int(docs[d + 1]))]


def shard_meta(prefix: str, index: Index) -> dict:
    """What the merge needs to know of a written MMIDIDX shard."""
    return {"prefix": prefix, "sequences": len(index.sequence_lengths), "documents": index.num_documents,
            "tokens": index.num_tokens, "bytes": index.num_tokens * index.dtype.itemsize}

"""Merge stage: concatenate per-shard .bin/.idx files into one dataset.

Pure fsspec + numpy. The merged index is built from the shard indexes alone; the .bin bytes
are streamed shard by shard in bounded buffers (on S3, s3fs turns the stream into a multipart
upload; on local disk the kernel copies them), so the merge never holds the dataset in memory.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from .indexed import Index, decode_index, encode_index

COPY_BUFFER = 16 << 20


class MergeError(RuntimeError):
    pass


def merge_indexes(indexes: list[Index]) -> Index:
    if not indexes:
        raise MergeError("nothing to merge")
    dtype = indexes[0].dtype
    lengths, docs = [], [np.zeros(1, np.int64)]
    offset = 0
    for idx in indexes:
        if idx.dtype != dtype:
            raise MergeError(f"shards disagree on dtype: {dtype} and {idx.dtype}")
        lengths.append(idx.sequence_lengths)
        docs.append(idx.document_indices[1:] + offset)
        offset += len(idx.sequence_lengths)
    return Index(dtype, np.concatenate(lengths).astype(np.int32), np.concatenate(docs).astype(np.int64))


def merge_shards(fs, shard_prefixes: list[str], out_prefix: str) -> Index:
    """Write ``out_prefix.bin/.idx`` from the shards, in the order given."""
    indexes = []
    for p in shard_prefixes:
        with fs.open(p + ".idx", "rb") as f:
            indexes.append(decode_index(f.read(), p + ".idx"))
    merged = merge_indexes(indexes)
    local = isinstance(fs, LocalFileSystem)
    with (open(out_prefix + ".bin", "wb") if local else fs.open(out_prefix + ".bin", "wb")) as out:
        for p, idx in zip(shard_prefixes, indexes):
            expected = idx.num_tokens * idx.dtype.itemsize
            copied = _copy_local(p + ".bin", out) if local else _copy_stream(fs, p + ".bin", out)
            if copied != expected:
                raise MergeError(f"{p}.bin has {copied} bytes, its index says {expected}")
    with fs.open(out_prefix + ".idx", "wb") as f:
        f.write(encode_index(merged))
    return merged


def _copy_stream(fs, path: str, out) -> int:
    """Append a file to ``out`` in bounded buffers; the bytes copied."""
    copied = 0
    with fs.open(path, "rb") as f:
        while buf := f.read(COPY_BUFFER):
            out.write(buf)
            copied += len(buf)
    return copied


def _copy_local(path: str, out) -> int:
    """Append a local file to the local file ``out`` inside the kernel (``copy_file_range``: no
    trip through Python buffers), falling back to a buffered copy where the call is refused."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        copied = 0
        try:
            while copied < size:
                n = os.copy_file_range(f.fileno(), out.fileno(), size - copied)
                if n == 0:
                    break
                copied += n
        except OSError:  # e.g. a file system or kernel without it: copy the rest by hand
            f.seek(copied)
            out.seek(0, os.SEEK_END)
            before = out.tell()
            shutil.copyfileobj(f, out, COPY_BUFFER)
            out.flush()  # the next shard may go through copy_file_range again
            copied += out.tell() - before
    return copied

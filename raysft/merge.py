"""Merge stage: concatenate per-shard .bin/.idx files into one dataset.

Pure fsspec + numpy. The merged index is built from the shard indexes alone; the .bin bytes
are streamed shard by shard in bounded buffers (on S3, s3fs turns the stream into a multipart
upload), so the merge never holds the dataset in memory.
"""

from __future__ import annotations

import numpy as np

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
    with fs.open(out_prefix + ".bin", "wb") as out:
        for p, idx in zip(shard_prefixes, indexes):
            expected = idx.num_tokens * idx.dtype.itemsize
            copied = 0
            with fs.open(p + ".bin", "rb") as f:
                while True:
                    buf = f.read(COPY_BUFFER)
                    if not buf:
                        break
                    out.write(buf)
                    copied += len(buf)
            if copied != expected:
                raise MergeError(f"{p}.bin has {copied} bytes, its index says {expected}")
    with fs.open(out_prefix + ".idx", "wb") as f:
        f.write(encode_index(merged))
    return merged

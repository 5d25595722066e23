"""Merge stage: concatenate per-shard files into one dataset, with bounded memory.

Pure fsspec + numpy. Two jobs:

* ``copy_into``: concatenate files into one. On local disk the kernel copies the bytes
  (``copy_file_range``); on S3 the object is assembled by a multipart upload whose parts are
  server-side copies of the shards (``UploadPartCopy``), so no data byte passes through this
  process (shards under S3's 5 MiB minimum part size are joined here into one part); other
  file systems stream in bounded buffers.
* ``merge_index_files``: the merged ``.idx`` written from the shard indexes in three streaming
  passes (lengths, pointers, document indices), each shard's index read in blocks of
  ``INDEX_BLOCK`` entries, so the driver's memory grows neither with the number of samples nor
  with the samples per shard.
"""

from __future__ import annotations

import os
import shutil
import struct

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from .errors import STORAGE
from .fs import call_within
from .indexed import CODE_DTYPES, DTYPE_CODES, HEADER_SIZE, MAGIC, VERSION, Index, decode_index

COPY_BUFFER = 16 << 20
S3_MIN_PART = 5 << 20  # S3's smallest part but the last
S3_MAX_PART = 5 << 30  # S3's largest part (a server-side copy range too)


class MergeError(RuntimeError):
    exit_code = STORAGE


def merge_indexes(indexes: list[Index]) -> Index:
    """Concatenate in-memory indexes (a shard writer's slices)."""
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


class MergedIndex:
    """What a streamed merge wrote: counts only (the arrays were never held in memory)."""

    def __init__(self, sequences: int, documents: int, tokens: int):
        self.sequences, self.num_documents, self.num_tokens = sequences, documents, tokens


def _read_index(fs, path: str) -> Index:
    with fs.open(path, "rb") as f:
        return decode_index(f.read(), path)


INDEX_BLOCK = 1 << 20  # entries of an index read at a time (4 MiB of lengths, 8 MiB of pointers)


class ShardIndex:
    """One shard's ``.idx`` read in blocks: its header, then its lengths, pointers and document
    indices ``INDEX_BLOCK`` entries at a time (never the whole index in memory)."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        with fs.open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE or head[: len(MAGIC)] != MAGIC:
            raise MergeError(f"{path}: not a Megatron MMIDIDX index (bad magic)")
        (version,) = struct.unpack_from("<Q", head, len(MAGIC))
        (code,) = struct.unpack_from("<B", head, len(MAGIC) + 8)
        self.sequences, docs = struct.unpack_from("<QQ", head, len(MAGIC) + 9)
        if version != VERSION or code not in CODE_DTYPES:
            raise MergeError(f"{path}: index version {version} / dtype code {code} not understood")
        self.dtype = CODE_DTYPES[code]
        self.documents = docs - 1
        size = int(fs.info(path)["size"])
        if size != HEADER_SIZE + self.sequences * 12 + docs * 8:
            raise MergeError(f"{path}: {size} bytes, its header implies {HEADER_SIZE + self.sequences * 12 + docs * 8}")
        self._ptr_at = HEADER_SIZE + self.sequences * 4
        self._docs_at = self._ptr_at + self.sequences * 8
        self.tokens = sum(int(b.sum()) for b in self.lengths())

    def _blocks(self, at: int, count: int, dtype: str, width: int):
        with self.fs.open(self.path, "rb") as f:
            f.seek(at)
            for k in range(0, count, INDEX_BLOCK):
                n = min(INDEX_BLOCK, count - k)
                yield np.frombuffer(f.read(n * width), dtype=dtype, count=n).astype(np.int64)

    def lengths(self):
        return self._blocks(HEADER_SIZE, self.sequences, "<i4", 4)

    def pointers(self):
        return self._blocks(self._ptr_at, self.sequences, "<i8", 8)

    def document_indices(self):
        return self._blocks(self._docs_at, self.documents + 1, "<i8", 8)


def merge_index_files(fs, shard_prefixes: list[str], out_prefix: str) -> MergedIndex:
    """Write ``out_prefix.bin/.idx`` from the shards, in the order given; the .bin bytes are
    copied by ``copy_into`` and checked against each shard's index. Every pass reads the shard
    indexes in blocks: the driver's memory is flat in the samples per shard (each shard's
    pointers are checked against its lengths on the way)."""
    if not shard_prefixes:
        raise MergeError("nothing to merge")
    shards = [ShardIndex(fs, p + ".idx") for p in shard_prefixes]
    dtype = shards[0].dtype
    if any(s.dtype != dtype for s in shards):
        raise MergeError(f"shards disagree on dtype in {shard_prefixes[0]}...")
    sizes = copy_into(fs, [p + ".bin" for p in shard_prefixes], out_prefix + ".bin")
    for p, size, sh in zip(shard_prefixes, sizes, shards):
        if size != sh.tokens * dtype.itemsize:
            raise MergeError(f"{p}.bin has {size} bytes, its index says {sh.tokens * dtype.itemsize}")
    S = sum(sh.sequences for sh in shards)
    D = sum(sh.documents for sh in shards)
    with fs.open(out_prefix + ".idx", "wb") as out:
        out.write(MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", DTYPE_CODES[np.dtype(dtype)])
                  + struct.pack("<Q", S) + struct.pack("<Q", D + 1))
        for sh in shards:  # sequence lengths
            for block in sh.lengths():
                out.write(block.astype("<i4").tobytes())
        base = 0
        for sh in shards:  # sequence pointers, continuing across shards
            at = 0  # the shard's own byte offset of the next sequence
            for lengths, ptr in zip(sh.lengths(), sh.pointers()):
                own = np.empty(len(lengths), np.int64)
                own[0] = at
                np.cumsum(lengths[:-1] * dtype.itemsize, out=own[1:])
                own[1:] += at
                if not np.array_equal(own, ptr):
                    raise MergeError(f"{sh.path}: sequence pointers do not follow the lengths")
                out.write((own + base).astype("<i8").tobytes())
                at = int(own[-1] + lengths[-1] * dtype.itemsize)
            base += sh.tokens * dtype.itemsize
        out.write(np.zeros(1, "<i8").tobytes())  # document indices
        offset = 0
        for sh in shards:
            first = True
            for docs in sh.document_indices():
                out.write(((docs[1:] if first else docs) + offset).astype("<i8").tobytes())  # one leading 0
                first = False
            offset += sh.sequences
    return MergedIndex(S, D, sum(sh.tokens for sh in shards))


def merge_shards(fs, shard_prefixes: list[str], out_prefix: str) -> Index:
    """``merge_index_files`` and the merged index read back (for small datasets and tests)."""
    merge_index_files(fs, shard_prefixes, out_prefix)
    return _read_index(fs, out_prefix + ".idx")


# --------------------------------------------------------------------------- concatenation


def copy_into(fs, sources: list[str], dest: str) -> list[int]:
    """Concatenate ``sources`` into ``dest`` (same file system); the size of each source."""
    if isinstance(fs, LocalFileSystem):
        with open(dest, "wb") as out:
            return [_copy_local(p, out) for p in sources]
    if getattr(fs, "protocol", None) in ("s3", ("s3", "s3a")) and hasattr(fs, "call_s3"):
        return _copy_s3(fs, sources, dest)
    with fs.open(dest, "wb") as out:
        return [_copy_stream(fs, p, out) for p in sources]


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


def _split_s3(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


def _copy_s3(fs, sources: list[str], dest: str) -> list[int]:
    """A multipart upload of ``dest`` whose parts are server-side copies of the sources. Only
    what cannot be a part of its own passes through this process: a source (or the start of
    one) that would leave a part under S3's 5 MiB minimum is read and joined with its
    neighbours into one part, so at most 5 MiB is held at a time."""
    sizes = [int(fs.info(p)["size"]) for p in sources]
    bucket, key = _split_s3(dest)
    if sum(sizes) < S3_MIN_PART:  # one small object: no multipart upload needed
        with fs.open(dest, "wb") as out:
            return [_copy_stream(fs, p, out) for p in sources]
    uid = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    parts: list[dict] = []
    pending: list[bytes] = []

    def add_part(**kw) -> None:
        n = len(parts) + 1
        if "Body" in kw:
            r = fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=uid, PartNumber=n, **kw)
            etag = r["ETag"]
        else:
            r = fs.call_s3("upload_part_copy", Bucket=bucket, Key=key, UploadId=uid, PartNumber=n, **kw)
            etag = r["CopyPartResult"]["ETag"]
        parts.append({"PartNumber": n, "ETag": etag})

    def flush() -> None:
        if pending:
            add_part(Body=b"".join(pending))
            pending.clear()

    try:
        for p, size in zip(sources, sizes):
            offset = 0
            held = sum(len(b) for b in pending)
            if held:  # top the held bytes up to a whole part from this source's start
                take = min(size, S3_MIN_PART - held)
                pending.append(fs.cat_file(p, start=0, end=take) if take else b"")
                offset = take
                if held + take >= S3_MIN_PART:
                    flush()
            rest = size - offset
            if rest >= S3_MIN_PART:  # whole parts copied inside the store
                sb, sk = _split_s3(p)
                pieces = -(-rest // S3_MAX_PART)
                step = -(-rest // pieces)
                for lo in range(offset, size, step):
                    hi = min(size, lo + step) - 1
                    add_part(CopySource={"Bucket": sb, "Key": sk}, CopySourceRange=f"bytes={lo}-{hi}")
            elif rest > 0:
                pending.append(fs.cat_file(p, start=offset, end=size))
        flush()  # the last part may be small
        fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=uid,
                   MultipartUpload={"Parts": parts})
    except BaseException:
        _abort_upload(fs, bucket, key, uid)
        raise
    fs.invalidate_cache(dest)
    return sizes


def _abort_upload(fs, bucket: str, key: str, uid: str, limit_s: float = 10.0) -> None:
    """Abort a multipart upload (its parts would be kept, and billed), given ``limit_s``: the
    error being raised may be the storage's own (a frozen endpoint), and must not wait on it."""
    def abort() -> None:
        try:
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=uid)
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass

    call_within(abort, limit_s, "raysft-abort-upload")


__all__ = ["MergeError", "merge_indexes", "merge_index_files", "merge_shards", "copy_into", "MergedIndex",
           "HEADER_SIZE"]

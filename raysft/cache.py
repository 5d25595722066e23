"""The tokenized cache (``--cache DIR``, local or ``s3://``): the tokenize stage's cacheable
half (``raysft.samples.ENCODED``) of each read chunk, content-addressed.

The key of a chunk is a hash of everything its encoded rows depend on: the chunk's content
(the hash of the bytes it is read from) and layout (its pieces' kinds and ranges), the
tokenizer (its files, added special tokens included), the template (name, Jinja text,
``--template-kwargs``, ``--template-date``), the source's format, ``--map-keys`` and loss
policy, and raysft's version. Not in it: ``--seq-length``, ``--overlong``, the layout, the
mixture, the seed, the split, the epochs: a rebuild that changes only those reads every chunk
from the cache and tokenizes nothing, and a source whose files changed re-tokenizes only its
own chunks.

An entry is one Arrow IPC file, ``DIR/ab/abcdef....arrow``, whose last 16 bytes are the
XXH3-128 of the rest (a checksum against damage, at memory speed, so that checking an entry
costs next to nothing beside reading it): an entry that does not check out (cut short,
corrupted, written by something else) is not used; the chunk is tokenized again and the entry
rewritten. Entries are written whole under a temporary name and renamed (local) or put in one
request (S3); a local entry is read memory-mapped, so its tokens are not copied into the heap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets

import pyarrow as pa
import xxhash

from .fs import get_fs, join
from .output import is_local

log = logging.getLogger("raysft")
DIGEST = 16
FORMAT = 3  # of an entry (in every key: entries of another format are never looked at); 3: preference pairs


def chunk_key(digest: int, pieces: list[tuple], context: str) -> str:
    """The entry name of a chunk: its content hash, its pieces' layout (kind, start, end,
    compression) and the build context (``context_digest``)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps([int(digest), [list(p) for p in pieces], context, FORMAT]).encode())
    return h.hexdigest()


def context_digest(info, template: str, template_kwargs: dict, template_date: str | None, fmt: str, map_keys: dict,
                   loss: str, version: str, think_loss: str = "auto") -> str:
    """What a source's encoded rows depend on besides the chunk's bytes."""
    h = hashlib.blake2b(digest_size=20)
    h.update(info.tokenizer_json.encode())
    parts = [info.bos, info.eos, info.chat_template, info.special_strings, info.special_map,
             template, template_kwargs, template_date, fmt, map_keys, loss, version]
    if think_loss != "auto":  # (entries made before --think-loss existed keep their keys)
        parts.append(think_loss)
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()


class Cache:
    def __init__(self, url: str, storage: dict | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = get_fs(self.url, storage)
        self.hits = self.misses = self.bad = 0

    def path(self, key: str) -> str:
        return join(self.root, key[:2], key + ".arrow")

    def exists(self, key: str) -> bool:
        try:
            return self.fs.exists(self.path(key))
        except OSError:
            return False

    def load(self, key: str, vocab_size: int | None = None) -> pa.Table | None:
        """The entry, or None when there is none or it does not check out: its checksum, the
        key and row count written inside the checksummed body (an entry copied or renamed to
        another key is not this chunk's), and, with ``vocab_size``, every token id in range."""
        p = self.path(key)
        try:
            if is_local(self.fs):
                with pa.memory_map(p, "r") as f:
                    data = f.read_buffer()
            else:
                with self.fs.open(p, "rb") as f:
                    data = pa.py_buffer(f.read())
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError as e:
            log.warning("tokenized cache: cannot read %s (%s): tokenizing the chunk again", p, e)
            self.bad += 1
            return None
        body, tail = data[: max(0, data.size - DIGEST)], data[max(0, data.size - DIGEST) :]
        if data.size <= DIGEST or checksum(body) != tail.to_pybytes():
            log.warning("tokenized cache: %s fails its checksum: tokenizing the chunk again", p)
            self.bad += 1
            return None
        try:
            table = pa.ipc.open_file(pa.BufferReader(body)).read_all()
        except pa.ArrowInvalid as e:
            log.warning("tokenized cache: %s is not readable (%s): tokenizing the chunk again", p, e)
            self.bad += 1
            return None
        why = self._mismatch(table, key, vocab_size)
        if why:
            log.warning("tokenized cache: %s %s: tokenizing the chunk again", p, why)
            self.bad += 1
            return None
        self.hits += 1
        return table

    @staticmethod
    def _mismatch(table: pa.Table, key: str, vocab_size: int | None) -> str:
        meta = table.schema.metadata or {}
        if meta.get(b"raysft_key", b"").decode() != key:
            return "is not the entry of this chunk (its own key differs)"
        if meta.get(b"rows") != str(table.num_rows).encode():
            return "does not hold the rows it says"
        if vocab_size is not None and table.num_rows:
            col = table.column("ids")
            v = (col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()).flatten().to_numpy()
            if len(v) and (int(v.max()) >= vocab_size or int(~v.min()) >= vocab_size):
                return f"holds token ids outside this tokenizer's vocabulary of {vocab_size:,}"
        return ""

    def save(self, key: str, table: pa.Table) -> None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"raysft_key": key.encode(),
                                               b"rows": str(table.num_rows).encode()})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        body = sink.getvalue()
        self._put(self.path(key), body, checksum(body))

    def _put(self, p: str, *data) -> None:
        """Write a file of the cache whole: under a temporary name and renamed (local), in one
        request (S3); a cache that cannot be written never fails the build."""
        try:
            self.fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
            if is_local(self.fs):
                tmp = f"{p}.{secrets.token_hex(4)}.tmp"
                with open(tmp, "wb") as f:
                    for d in data:
                        f.write(d)
                os.replace(tmp, p)
            else:
                with self.fs.open(p, "wb") as f:
                    f.write(b"".join(bytes(d) for d in data))
        except OSError as e:
            log.warning("tokenized cache: cannot write %s (%s)", p, e)

    # The encoder's start-up verdict (raysft.encode.choose: fastokens checked against hf on the
    # canary) depends only on the tokenizer, the two encoders' versions and the canary's texts:
    # a rebuild from the cache takes it from here instead of loading fastokens to repeat it.

    def verdict(self, key: str) -> dict | None:
        try:
            with self.fs.open(join(self.root, "verdicts", key + ".json"), "rb") as f:
                v = json.loads(f.read())
            return v if isinstance(v, dict) and {"name", "version", "why"} <= set(v) else None
        except (OSError, ValueError):
            return None

    def save_verdict(self, key: str, verdict: dict) -> None:
        self._put(join(self.root, "verdicts", key + ".json"), json.dumps(verdict).encode())


def checksum(data) -> bytes:
    """An entry's checksum: XXH3-128 of its bytes (any buffer)."""
    return xxhash.xxh3_128(memoryview(data)).digest()


def verdict_key(info, mode: str, texts: list[str], version: str) -> str:
    """The key of an encoder verdict: tokenizer, --encoder mode, encoder versions, canary texts."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    versions = []
    for pkg in ("fastokens", "tokenizers"):
        try:
            versions.append(pkg_version(pkg))
        except PackageNotFoundError:
            versions.append(None)
    h = hashlib.blake2b(digest_size=20)
    h.update(info.tokenizer_json.encode())
    h.update(json.dumps([mode, versions, version, info.special_strings, texts]).encode())
    return h.hexdigest()


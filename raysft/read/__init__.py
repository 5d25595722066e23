"""Read stage: find the input files and cut them into chunks that workers read on their own.

Pure (fsspec + pyarrow + numpy, no engine). Inputs are files, folders or globs on local disk
or object storage. Files are ordered by full path, so the same file set always gives the same
order, whatever order the user listed them in.

What is read: ``.jsonl``/``.ndjson``, ``.json`` (one array, or JSON Lines), ``.parquet``,
``.arrow``/``.feather``/``.ipc``, ``.csv``/``.tsv`` and ``.txt`` (plain text, one document a
line, read as ``{"text": line}`` records; blank lines hold none), the text formats also
compressed (``.gz``, ``.zst``, ``.bz2``, ``.xz``). A ``datasets`` ``save_to_disk`` folder is read
as the Arrow files its ``state.json`` lists; ``dataset_info.json``, ``state.json`` and
``dataset_dict.json`` in an input folder are a registry or a saved dataset's state, never data
(a LLaMA-Factory data folder's ``dataset_info.json`` is read by ``raysft.read.registry``). When a folder or a glob is expanded, names starting
with ``.`` or ``_`` are not data (the convention of Spark, Hive and pyarrow: ``_SUCCESS``,
``.part-0.crc``, ``_temporary/``, ``.ipynb_checkpoints/``) and are skipped, with a log line;
any other file in an input folder that is no known format is an error naming it. A symbolic
link is read once (by what it points to); a broken one is an error.

A chunk is a unit of reading:

* an uncompressed JSON Lines file: byte ranges of about ``chunk_bytes``, a line belonging to
  the chunk in which it starts;
* a JSON array, a compressed file, a CSV file: the whole file, read as a stream (a JSON array
  element by element, ``jsonarray``), in bounded memory;
* Parquet: a row group; Arrow IPC: a record batch;
* small files of any format are gathered into one chunk (up to ``chunk_bytes``), so two
  thousand one-row files are a few chunks, not two thousand tasks.

``read_chunk`` yields every record of a chunk as raw JSON bytes with its position, good or
bad, in batches: decoding and validation happen in the tokenize stage, which records each
failure with the file and row. Nothing is skipped silently, except blank lines in JSON Lines
files, which hold no record.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import lzma
import os
import re
import stat
import zlib
from dataclasses import asdict, dataclass

import xxhash

from ..errors import BAD_INPUT, STORAGE
from ..fs import full_url, get_fs, is_remote
from .columnar import csv_records, table_records
from .jsonarray import ArrayError, iter_elements

log = logging.getLogger("raysft")

TEXT_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".txt": "txt"}
LINE_KINDS = ("jsonl", "txt")  # read in byte ranges, a record a line
STATE_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # registries and saved-dataset state
BINARY_KINDS = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}
COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}
KNOWN = "(.jsonl, .ndjson, .json, .parquet, .arrow, .feather, .csv, .tsv, .txt; text ones also .gz, .zst, .bz2, .xz)"
DEFAULT_CHUNK_BYTES = 16 << 20
STREAM_HASH_BLOCK = 8 << 20
REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "oss", "hdfs", "abfs", "az", "http", "https")


class InputError(ValueError):
    """Inputs that cannot be found or read."""

    exit_code = BAD_INPUT


@dataclass(frozen=True)
class InputFile:
    url: str
    size: int
    kind: str  # jsonl | json | csv | tsv | parquet | arrow
    compression: str | None = None


@dataclass(frozen=True)
class Piece:
    """A part of one input file that a chunk reads."""

    src: int  # index of the file in the sorted file list
    url: str
    kind: str  # jsonl (a byte range) | stream (whole text file) | array | csv | tsv | parquet | arrow
    start: int  # bytes for jsonl ranges, row group / record batch for parquet / arrow
    end: int
    compression: str | None = None


@dataclass(frozen=True)
class Chunk:
    chunk: int  # global chunk number: the order of chunks is the order of records
    pieces: tuple[Piece, ...]

    def to_item(self) -> dict:
        return {"chunk": self.chunk, "spec": json.dumps([asdict(p) for p in self.pieces])}

    @classmethod
    def from_item(cls, item: dict) -> Chunk:
        return cls(int(item["chunk"]), tuple(Piece(**p) for p in json.loads(str(item["spec"]))))

    @property
    def bytes(self) -> int:
        return sum(p.end - p.start if p.kind in LINE_KINDS else 0 for p in self.pieces)


def file_kind(name: str) -> tuple[str | None, str | None]:
    """(kind, compression) of a file name, or (None, None) when it is no input format."""
    low = name.lower()
    compression = None
    for ext, comp in COMPRESSIONS.items():
        if low.endswith(ext):
            compression, low = comp, low[: -len(ext)]
            break
    for ext, kind in TEXT_KINDS.items():
        if low.endswith(ext):
            return kind, compression
    if compression is None:
        for ext, kind in BINARY_KINDS.items():
            if low.endswith(ext):
                return kind, None
    return None, None


def check_url(text: str, what: str) -> None:
    """A URL whose scheme lost a slash (``s3:/bucket/x``) would read as a local path."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):(/?)(?!/)", text)
    if m and m.group(1).lower() in REMOTE_SCHEMES:
        fixed = f"{m.group(1)}://{text[m.end():].lstrip('/')}"
        raise InputError(f"{what} {text} is not a valid URL: did you mean {fixed}?")


def _hidden(rel: str) -> bool:
    return any(part[:1] in (".", "_") for part in rel.replace("\\", "/").split("/") if part)


def _static_prefix(path: str) -> str:
    """The folder part of a glob before its first wildcard."""
    cut = min([i for i in (path.find("*"), path.find("?"), path.find("[")) if i >= 0], default=len(path))
    return path[:cut].rsplit("/", 1)[0] if "/" in path[:cut] else ""


def _local_walk(root: str, skipped: list[str]) -> list[str]:
    """Files below a local folder, following symbolic links (each folder once), without the
    hidden and underscore-prefixed names."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        keep = []
        for d in sorted(dirnames):
            rel = os.path.relpath(os.path.join(dirpath, d), root)
            (skipped.append(rel + "/") if _hidden(d) else keep.append(d))
        dirnames[:] = keep
        for f in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            (skipped.append(rel) if _hidden(f) else out.append(os.path.join(dirpath, f)))
    return out


def _expand(fs, path: str, pat: str, skipped: list[str]) -> list[str]:
    """Files a pattern names: a literal file first (even with glob characters in its name),
    then a glob, then a folder."""
    remote = is_remote(pat)
    if fs.exists(path) and not fs.isdir(path):
        return [path]
    if not remote and os.path.islink(path) and not os.path.exists(path):
        raise InputError(f"--input {pat}: broken symbolic link (points to {os.readlink(path)})")
    if any(ch in path for ch in "*?["):
        base = _static_prefix(path)
        out = []
        for p in sorted(fs.glob(path)):
            rel = p[len(base) :].lstrip("/") if base and p.startswith(base) else p.rsplit("/", 1)[-1]
            if _hidden(rel):
                skipped.append(rel)
            elif fs.isdir(p):
                out += _expand_dir(fs, p, remote, skipped)
            elif p.rpartition("/")[2] in STATE_FILES:
                skipped.append(rel)
            else:
                out.append(p)
        return out
    if fs.isdir(path):
        return _expand_dir(fs, path, remote, skipped)
    raise InputError(f"--input {pat}: no such file or folder")


def _expand_dir(fs, path: str, remote: bool, skipped: list[str]) -> list[str]:
    if not remote:
        out = _local_walk(path, skipped)
    else:
        out = []
        for p in sorted(fs.find(path)):
            rel = p[len(path.rstrip("/")) :].lstrip("/")
            (skipped.append(rel) if _hidden(rel) else out.append(p))
    return _saved_datasets(fs, out, skipped)


def _saved_datasets(fs, paths: list[str], skipped: list[str]) -> list[str]:
    """Folder contents without registry and state files; in a folder ``datasets``'
    ``save_to_disk`` wrote (a ``state.json``), only the Arrow files its state lists; of a saved
    ``DatasetDict`` (a ``dataset_dict.json``), only its ``train`` split when it has one (as
    LLaMA-Factory's ``split: train``): a test split is never trained on by accident."""
    listed: dict[str, set] = {}
    left_out: list[str] = []
    for p in paths:
        folder, _, name = p.rpartition("/")
        if name == "dataset_dict.json":
            try:
                with fs.open(p, "rb") as fh:
                    splits = json.loads(fh.read()).get("splits") or []
            except (OSError, ValueError, AttributeError) as e:
                raise InputError(f"{p}: not a readable datasets dict file ({_short(e)})") from None
            if "train" in splits:
                left_out += [folder + "/" + s + "/" for s in splits if s != "train"]
                if len(splits) > 1:
                    log.info("%s: a saved DatasetDict: its train split is read (not %s)", folder,
                             ", ".join(s for s in splits if s != "train"))
        elif name == "state.json":
            try:
                with fs.open(p, "rb") as fh:
                    state = json.loads(fh.read())
                listed[folder] = {d["filename"] for d in state.get("_data_files", []) if isinstance(d, dict)}
            except (OSError, ValueError, TypeError, KeyError) as e:
                raise InputError(f"{p}: not a readable datasets state file ({_short(e)})") from None
    out = []
    for p in paths:
        folder, _, name = p.rpartition("/")
        if name in STATE_FILES or (folder in listed and name not in listed[folder]) or \
                any(p.startswith(x) for x in left_out):
            skipped.append(p)
        else:
            out.append(p)
    return out


def expand_inputs(patterns: list[str], storage: dict | None = None) -> list[InputFile]:
    """Resolve files, folders and globs to a sorted, de-duplicated list of input files."""
    if not patterns:
        raise InputError("no --input given")
    found: dict[str, InputFile] = {}
    real_seen: dict[tuple, str] = {}
    for pat in patterns:
        check_url(pat, "--input")
        fs, path = get_fs(pat, storage)
        check_bucket(fs, path, pat, "--input")
        skipped: list[str] = []
        try:
            paths = _expand(fs, path, pat, skipped)
        except InputError:
            raise
        except FileNotFoundError:
            raise InputError(f"--input {pat}: no such bucket, file or folder") from None
        except PermissionError as e:
            raise InputError(f"--input {pat}: access denied ({_short(e)})") from None
        except OSError as e:
            raise InputError(f"--input {pat}: cannot list ({_short(e)})") from None
        if skipped:
            log.info("--input %s: skipped %d hidden, underscore-prefixed, registry or state name(s), not data: %s",
                     pat, len(skipped),
                     ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
        explicit = len(paths) == 1 and paths[0] == path
        unknown = [p for p in paths if file_kind(p)[0] is None]
        if unknown and not explicit:
            raise InputError(f"--input {pat}: {unknown[0]} is no known input format {KNOWN}"
                             + (f" (and {len(unknown) - 1} more such files)" if len(unknown) > 1 else "")
                             + "; move it out of the input folder or name the files to read")
        if unknown:
            raise InputError(f"--input {pat}: not a known input format {KNOWN}")
        if not paths:
            raise InputError(f"--input {pat}: matches no input file {KNOWN}")
        for p in paths:
            if not is_remote(pat):
                if os.path.islink(p) and not os.path.exists(p):
                    raise InputError(f"--input {pat}: {p} is a broken symbolic link (points to {os.readlink(p)})")
                try:
                    p.encode("utf-8")
                except UnicodeEncodeError:
                    raise InputError(f"--input {pat}: a file name that is not UTF-8 ({p!r}); rename it") from None
                try:
                    st = os.stat(p)
                except OSError as e:
                    raise InputError(f"--input {pat}: cannot read {p} ({_short(e)})") from None
                if not stat.S_ISREG(st.st_mode):  # /dev/zero, a FIFO, a socket: no end, or no data
                    raise InputError(f"--input {pat}: {p} is not a regular file (a device, pipe or socket)")
                if not os.access(p, os.R_OK):
                    raise InputError(f"--input {pat}: {p} cannot be read (permission denied)")
                ident = (st.st_dev, st.st_ino)  # a symbolic or a hard link to a file read already: once
                if ident in real_seen:
                    if real_seen[ident] != p:
                        log.info("--input: %s is the same file as %s: read once", p, real_seen[ident])
                    continue
                real_seen[ident] = p
            url = full_url(fs, p, pat)
            kind, compression = file_kind(p)
            found[url] = InputFile(url, int(fs.size(p) or 0), kind, compression)
    return [found[u] for u in sorted(found)]


class StorageUnavailable(InputError):
    """An object store that cannot be reached, or a bucket that is missing or closed to these
    credentials: a storage fault (exit 3), not bad records."""

    exit_code = STORAGE


def check_bucket(fs, path: str, url: str, what: str) -> None:
    """One clear line for a bucket that does not exist or cannot be reached (s3fs's
    ``exists`` answers False for an endpoint that does not answer: ask the store itself)."""
    if not is_remote(url):
        return
    bucket = path.split("/", 1)[0]
    try:
        ok = fs.exists(bucket)
    except PermissionError as e:
        raise StorageUnavailable(f"{what} {url}: access to bucket '{bucket}' denied ({_short(e)})") from None
    except OSError as e:
        raise StorageUnavailable(f"{what} {url}: cannot reach bucket '{bucket}' ({_short(e)})") from None
    if ok:
        return
    why = ""
    if hasattr(fs, "call_s3"):
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:  # the bucket is missing: the default line below
            pass
        except PermissionError as e:
            why = f"access to bucket '{bucket}' denied ({_short(e)})"
        except Exception as e:  # noqa: BLE001 - botocore's connection errors are not OSErrors
            name = type(e).__name__
            if "Endpoint" in name or "Connect" in name or "Timeout" in name or isinstance(e, OSError):
                endpoint = getattr(getattr(getattr(fs, "s3", None), "meta", None), "endpoint_url", None) or \
                    (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url", "the object store")
                why = f"cannot reach {endpoint} ({_short(e)})"
    raise StorageUnavailable(f"{what} {url}: " + (why or f"bucket '{bucket}' does not exist (or these credentials "
                                                         "cannot see it)"))


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200]


# --------------------------------------------------------------------------- planning


TAIL_PARTS = 4


def split_parts(c: Chunk, parts: int = TAIL_PARTS) -> list[tuple[Piece, ...]] | None:
    """The byte ranges a chunk is cut into at the end of a run (single JSON Lines ranges only),
    or None for a chunk that is not cut. They depend on the chunk alone, so a cache entry made
    of a part is found again whichever run cut it."""
    p = c.pieces[0]
    if len(c.pieces) != 1 or p.kind not in LINE_KINDS or p.end - p.start < parts:
        return None
    step = -(-(p.end - p.start) // parts)
    return [(Piece(p.src, p.url, p.kind, lo, min(p.end, lo + step)),) for lo in range(p.start, p.end, step)]


def split_tail(chunks: list[Chunk], count: int, parts: int = TAIL_PARTS) -> list[Chunk]:
    """Cut each of the last ``count`` chunks into ``parts`` byte ranges (``split_parts``),
    renumbered in order. Workers take chunks in order, so the last ones decide when the stage
    ends: smaller final chunks let every worker finish at about the same time."""
    out: list[Chunk] = []
    first = len(chunks) - count
    for i, c in enumerate(chunks):
        for group in (split_parts(c, parts) if i >= first else None) or [c.pieces]:
            out.append(Chunk(len(out), group))
    return out


class ZstdReader(io.RawIOBase):
    """A zstd stream, frame after frame, that verifies its own end: input that ends inside a
    frame (a file cut short at a block boundary) raises ``EOFError``, as gzip, bz2 and xz do
    (the zstandard library's stream reader returns what it has and ends quietly). Frames
    carrying a checksum are checked by the decompressor."""

    def __init__(self, raw, block: int = 1 << 20):
        import zstandard

        self.raw, self.block, self._z = raw, block, zstandard
        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._fed = False  # the current frame has input
        self._buf = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while not self._buf and not self._eof:
            data = self.raw.read(self.block)
            if not data:
                self._eof = True
                if self._fed and not self._d.eof:
                    raise EOFError("the zstd stream ends inside a frame (the file was cut short)")
                return
            while data:
                out = self._d.decompress(data)
                self._fed = True
                self._buf += out
                if self._d.eof:  # a frame ended: what follows is the next frame
                    data = self._d.unused_data
                    self._d = self._z.ZstdDecompressor().decompressobj()
                    self._fed = False
                else:
                    data = b""

    def readinto(self, b) -> int:
        self._fill()
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def checked_stream(raw, compression: str):
    """A decompressed view of ``raw`` that raises at a stream cut short (every format)."""
    if compression == "zstd":
        return io.BufferedReader(ZstdReader(raw), 1 << 20)
    import fsspec.compression

    return fsspec.compression.compr[compression](raw, mode="rb")


def _open(fs, path: str, compression: str | None):
    if compression is None:
        return fs.open(path, "rb")
    return checked_stream(fs.open(path, "rb"), compression)


def _pieces(src: int, f: InputFile, storage: dict | None, chunk_bytes: int) -> list[Piece]:
    fs, path = get_fs(f.url, storage)
    kind = f.kind
    if kind in ("json", "jsonl") and f.compression is None and kind == "json":
        kind = "array" if _starts_with_bracket(fs, path) else "jsonl"
    if kind in LINE_KINDS and f.compression is None:
        n = max(1, -(-f.size // chunk_bytes))
        return [Piece(src, f.url, kind, i * chunk_bytes, min(f.size, (i + 1) * chunk_bytes)) for i in range(n)]
    if kind == "txt":  # compressed plain text: one stream of lines
        return [Piece(src, f.url, "txtstream", 0, f.size, f.compression)]
    if kind in ("json", "jsonl"):  # compressed: one stream, an array or lines (looked at when read)
        return [Piece(src, f.url, "stream", 0, f.size, f.compression)]
    if kind in ("array", "csv", "tsv"):
        return [Piece(src, f.url, kind, 0, f.size, f.compression)]
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            with fs.open(path, "rb") as fh:
                groups = pq.ParquetFile(fh).metadata.num_row_groups
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{f.url}: not a readable Parquet file ({_short(e)})") from None
        return [Piece(src, f.url, "parquet", g, g + 1) for g in range(max(groups, 1))]
    if kind == "arrow":
        import pyarrow.ipc as ipc

        try:
            with fs.open(path, "rb") as fh:
                batches = ipc.open_file(fh).num_record_batches
            return [Piece(src, f.url, "arrow", b, b + 1) for b in range(max(batches, 1))]
        except Exception:  # noqa: BLE001 - the streaming IPC format: one chunk
            return [Piece(src, f.url, "arrow", -1, 0)]
    raise InputError(f"{f.url}: unknown input kind {kind}")


def plan_chunks(files: list[InputFile], storage: dict | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                groups: list[int] | None = None) -> list[Chunk]:
    """Read chunks in input order; runs of small whole files share a chunk (never across
    ``groups``: the files of different sources are never in one chunk)."""
    chunks: list[Chunk] = []
    group: list[Piece] = []
    group_bytes = 0
    small = max(1, chunk_bytes // 16)  # a file this small is gathered with its neighbours

    def flush():
        nonlocal group, group_bytes
        if group:
            chunks.append(Chunk(len(chunks), tuple(group)))
        group, group_bytes = [], 0

    for src, f in enumerate(files):
        pieces = _pieces(src, f, storage, chunk_bytes)
        if groups is not None and src and groups[src] != groups[src - 1]:
            flush()
        if len(pieces) == 1 and f.size <= small:
            if group_bytes + f.size > chunk_bytes:
                flush()
            group.append(pieces[0])
            group_bytes += f.size
            continue
        flush()
        for p in pieces:
            chunks.append(Chunk(len(chunks), (p,)))
    flush()
    return chunks


def _starts_with_bracket(fs, path: str) -> bool:
    with fs.open(path, "rb") as fh:
        head = fh.read(4096)
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


# --------------------------------------------------------------------------- reading


@dataclass
class RawRows:
    """Records of (part of) one chunk: raw JSON bytes with their position in their file."""

    src: list[int]  # index of each record's file
    idx: list[int]  # ordinal of the record within the chunk
    row: list[int]  # record index in the file (0-based); -1 when only the byte offset is known
    offset: list[int]  # byte offset of the line (JSON Lines; in the decompressed text), else -1
    raw: list[bytes]
    error: list[str]  # "" or "reason: message" for records that cannot even be cut out
    digest: int = 0  # 64-bit hash of the bytes the whole chunk was read from


def content_hash(*parts: bytes) -> int:
    """A chunk's content fingerprint (64-bit XXH3 of its bytes, as a signed int64)."""
    h = xxhash.xxh3_64()
    for p in parts:
        h.update(p)
    return int.from_bytes(h.digest(), "little", signed=True)


class _Batcher:
    """Collects a chunk's records and hands them out ``batch`` at a time."""

    def __init__(self, batch: int, digest: int):
        self.batch, self.digest, self.idx = batch, digest, 0
        self._new()

    def _new(self):
        self.rows = RawRows([], [], [], [], [], [], self.digest)

    def add(self, src: int, row: int, offset: int, raw: bytes, error: str = "") -> RawRows | None:
        r = self.rows
        r.src.append(src)
        r.idx.append(self.idx)
        r.row.append(row)
        r.offset.append(offset)
        r.raw.append(raw)
        r.error.append(error)
        self.idx += 1
        if len(r.idx) >= self.batch:
            out = self.rows
            self._new()
            return out
        return None

    def rest(self) -> RawRows | None:
        if self.rows.idx:
            out = self.rows
            self._new()
            return out
        return None


def _range_bytes(fs, path: str, start: int, end: int) -> tuple[bytes, int]:
    """The lines that start in [start, end) of a JSON Lines file: read in one request (plus
    the byte before it, and the rest of its last line); returns them and their offset."""
    base = max(start - 1, 0)
    with fs.open(path, "rb", block_size=min(end - base + 1, 64 << 20) or None) as fh:
        fh.seek(base)
        data = fh.read(end - base)
        if data and not data.endswith(b"\n"):
            tail = [data]
            while True:
                more = fh.read(1 << 16)
                if not more:
                    break
                cut = more.find(b"\n")
                if cut >= 0:
                    tail.append(more[: cut + 1])
                    break
                tail.append(more)
            data = b"".join(tail)
    pos = base
    if start > 0:  # skip the line that started in the previous chunk
        first = data.find(b"\n")
        pos = base + first + 1 if first >= 0 else base + len(data)
        data = data[pos - base :]
    return data, pos


def _lines(data: bytes, pos: int):
    """(offset, line) of the non-blank lines of ``data`` (which starts at byte ``pos``)."""
    start = pos
    for line in data.split(b"\n"):
        if line.strip():
            yield start, line.rstrip(b"\r")
        start += len(line) + 1


def _stream_hash(fs, path: str) -> int:
    h = xxhash.xxh3_64()
    with fs.open(path, "rb") as fh:
        while block := fh.read(STREAM_HASH_BLOCK):
            h.update(block)
    return int.from_bytes(h.digest(), "little", signed=True)


def _mapped_hash(h, path: str, start: int | None, end: int | None) -> None:
    """Hash a local file's bytes in place (memory-mapped: no copy, no buffer): the whole
    file, or with ``start``/``end`` the bytes ``_range_bytes`` gives for that line range
    (the lines that start in it)."""
    import mmap

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        base, stop = (0, size) if start is None else (max(start - 1, 0), min(end, size))
        if stop <= base:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if start is not None and m[stop - 1] != 0x0A:  # the rest of the range's last line
                nl = m.find(b"\n", stop)
                stop = size if nl < 0 else nl + 1
            if start:  # not the line that started in the previous range
                nl = m.find(b"\n", base, stop)
                base = stop if nl < 0 else nl + 1
            with memoryview(m) as view, view[base:stop] as part:
                h.update(part)


def chunk_digest(c: Chunk, storage: dict | None = None, keep: bool = True) -> tuple[int, dict]:
    """The chunk's content hash (the bytes as stored: a line range, a row group's column
    chunks, the whole file otherwise) and what was read to get it, kept for the parse so a
    range is read once (``keep=False``: the hash alone, local files hashed in place). The
    hash is XXH3-64 (tens of GB/s: hashing costs next to nothing beside reading), a
    fingerprint against change, not against an adversary."""
    h = xxhash.xxh3_64()
    kept: dict = {}
    for p in c.pieces:
        fs, path = get_fs(p.url, storage)
        if not keep and p.kind != "parquet" and fs.protocol in ("file", ("file", "local")):
            if p.kind in LINE_KINDS:
                _mapped_hash(h, path, p.start, p.end)
            elif p.end - p.start <= STREAM_HASH_BLOCK:
                _mapped_hash(h, path, None, None)
            else:  # as _stream_hash: the whole file's hash goes in
                whole = xxhash.xxh3_64()
                _mapped_hash(whole, path, None, None)
                h.update(whole.digest())
        elif p.kind in LINE_KINDS:
            data, pos = _range_bytes(fs, path, p.start, p.end)
            kept[(p.url, p.start)] = (data, pos)
            h.update(data)
        elif p.kind == "parquet":
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as fh:
                md = pq.ParquetFile(fh).metadata
                if md.num_row_groups:
                    rg = md.row_group(p.start)
                    starts, ends = [], []
                    for j in range(rg.num_columns):
                        col = rg.column(j)
                        s = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
                        starts.append(s)
                        ends.append(s + col.total_compressed_size)
                    fh.seek(min(starts))
                    h.update(fh.read(max(ends) - min(starts)))
                h.update(str(p.start).encode())
        else:
            size = p.end - p.start
            if size <= STREAM_HASH_BLOCK:  # small: read once, parse from memory
                with fs.open(path, "rb") as fh:
                    data = fh.read()
                kept[(p.url, p.start)] = data
                h.update(data)
            else:
                h.update(_stream_hash(fs, path).to_bytes(8, "little", signed=True))
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "little", signed=True), kept


def read_chunk(c: Chunk, storage: dict | None = None, batch: int = 1 << 30, digested: tuple | None = None):
    """Yield the chunk's records, ``batch`` at a time (see module doc). ``digested``: what
    ``chunk_digest`` already gave for this chunk (its bytes are not read twice). A compressed
    file that is cut short or corrupt is one line naming it (exit 1), never a shorter input."""
    digest, kept = digested if digested is not None else chunk_digest(c, storage)
    out = _Batcher(batch, digest)
    for p in c.pieces:
        if p.compression is None:
            yield from _read_piece(p, storage, kept.get((p.url, p.start)), out)
            continue
        try:
            yield from _read_piece(p, storage, kept.get((p.url, p.start)), out)
        except (EOFError, zlib.error, lzma.LZMAError, _ZstdError) as e:
            raise InputError(f"{p.url}: the {p.compression} stream is cut short or corrupt ({_short(e)})") from None
        except OSError as e:
            if not _decoder_error(e):
                raise
            raise InputError(f"{p.url}: the {p.compression} stream is corrupt ({_short(e)})") from None
    if (r := out.rest()) is not None:
        yield r


def _piece_stream(fs, path: str, p: Piece, got):
    """The piece's file as a (decompressed) byte stream: from the bytes already read for its
    hash when it was small, else opened again."""

    if isinstance(got, bytes):
        return io.BytesIO(got) if p.compression is None else checked_stream(io.BytesIO(got), p.compression)
    return _open(fs, path, p.compression)


def _iter_lines(fh, block: int = 1 << 20):
    """Lines (with their newline) of a byte stream that may not support ``readline`` (the
    zstandard reader does not)."""
    rest = b""
    while buf := fh.read(block):
        parts = (rest + buf).split(b"\n")
        rest = parts.pop()
        for line in parts:
            yield line + b"\n"
    if rest:
        yield rest


def _stream_lines(fs, path: str, p: Piece, got, out: _Batcher, text: bool):
    """The non-blank lines of a (decompressed) stream as records, at their offsets in the
    decompressed text; ``text``: plain-text lines (``{"text": line}``), else JSON."""
    with _piece_stream(fs, path, p, got) as fh:
        offset = 0
        for line in _iter_lines(fh):
            if line.strip():
                line_ = line.rstrip(b"\r\n")
                if (r := out.add(p.src, -1, offset, *(_text_record(line_) if text else (line_,)))) is not None:
                    yield r
            offset += len(line)


def _read_piece(p: Piece, storage, got, out: _Batcher):
    fs, path = get_fs(p.url, storage)
    if p.kind in LINE_KINDS:
        data, pos = got
        text = p.kind == "txt"
        for offset, line in _lines(data, pos):
            if (r := out.add(p.src, -1, offset, *(_text_record(line) if text else (line,)))) is not None:
                yield r
        return
    kind = p.kind
    if kind == "txtstream":  # compressed plain text: a document a line
        yield from _stream_lines(fs, path, p, got, out, text=True)
        return
    if kind == "stream":  # a compressed text file: JSON Lines or one array
        with _piece_stream(fs, path, p, got) as fh:
            head = fh.read(4096)
        if not head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            yield from _stream_lines(fs, path, p, got, out, text=False)
            return
        kind = "array"
    if kind == "array":
        with _piece_stream(fs, path, p, got) as fh:
            try:
                for i, element in iter_elements(fh):
                    if (r := out.add(p.src, i, -1, element)) is not None:
                        yield r
            except ArrayError as e:
                if (r := out.add(p.src, e.index, -1, b"", f"invalid_json: {e}")) is not None:
                    yield r
        return
    yield from _read_columnar(p, fs, path, got, out)


def _read_columnar(p: Piece, fs, path: str, got, out: _Batcher):
    import pyarrow as pa

    row = 0
    if p.kind == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if pf.metadata.num_row_groups == 0:
                return
            row = sum(pf.metadata.row_group(g).num_rows for g in range(p.start))
            batches = (pa.Table.from_batches([b]) for b in pf.iter_batches(batch_size=4096, row_groups=[p.start]))
            yield from _emit(batches, p, row, out)
        return
    if p.kind == "arrow":
        import pyarrow.ipc as ipc

        with fs.open(path, "rb") as fh:
            if p.start >= 0:
                r = ipc.open_file(fh)
                row = sum(r.get_batch(b).num_rows for b in range(p.start))
                batches = [pa.Table.from_batches([r.get_batch(p.start)])]
            else:
                batches = (pa.Table.from_batches([b]) for b in ipc.open_stream(fh))
            yield from _emit(batches, p, row, out)
        return
    with _piece_stream(fs, path, p, got) as fh:
        try:
            for row, raw, err in csv_records(fh, "\t" if p.kind == "tsv" else ","):
                if (r := out.add(p.src, row, -1, raw, err)) is not None:
                    yield r
        except csv.Error as e:  # (a NUL byte, a field over the size limit): the rest of the file
            if (r := out.add(p.src, row, -1, b"", f"bad_csv_row: not readable as CSV from here on ({_short(e)})")) \
                    is not None:
                yield r


def _emit(tables, p: Piece, row: int, out: _Batcher):
    for t in tables:
        raws, errors = table_records(t)
        for raw, err in zip(raws, errors):
            if (r := out.add(p.src, row, -1, raw, err)) is not None:
                yield r
            row += 1


try:
    from zstandard import ZstdError as _ZstdError
except ImportError:  # pragma: no cover - zstandard is a dependency
    class _ZstdError(Exception):
        pass


def _decoder_error(e: OSError) -> bool:
    """A decompressor's complaint about its data (gzip's BadGzipFile, bz2's "Invalid data
    stream", zstd's ZstdError), not a storage fault."""
    name = type(e).__name__
    return name in ("BadGzipFile", "ZstdError") or "Invalid data stream" in str(e) or "Not a gzipped file" in str(e)


def _text_record(line: bytes) -> tuple[bytes, str]:
    """A line of a plain-text file as the record ``{"text": line}`` (and its error, if any)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return b"", f"invalid_utf8: not valid UTF-8 ({e.reason} at byte {e.start})"
    return json.dumps({"text": text}, ensure_ascii=False).encode(), ""


def _compression_of(url: str) -> str | None:
    return file_kind(url)[1]


class LineCounter:
    """1-based line numbers of increasing byte offsets in one file, counted in a single forward
    pass (rejects come in input order, so each file is read at most once, only as far as its
    last bad line). Compressed files are counted in their decompressed text."""

    BUFFER = 4 << 20

    def __init__(self, url: str, storage: dict | None = None):
        self.url, self.storage = url, storage
        self.fh = None
        self.pos = 0
        self.lines = 0

    def line(self, offset: int) -> int:
        if offset < self.pos:  # out of order (not expected): count from the start again
            self.close()
            self.pos = self.lines = 0
        if self.fh is None:
            fs, path = get_fs(self.url, self.storage)
            self.fh = _open(fs, path, _compression_of(self.url))
            if self.pos:
                self.fh.seek(self.pos)
        buf = self.__dict__.setdefault("_buf", bytearray(self.BUFFER))  # one buffer, read into again and again
        with memoryview(buf) as view:
            while self.pos < offset:
                n = self.fh.readinto(view[: min(offset - self.pos, len(buf))])
                if not n:
                    break
                self.lines += buf.count(b"\n", 0, n)
                self.pos += n
        return self.lines + 1

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def line_number(url: str, offset: int, storage: dict | None = None) -> int:
    """1-based line number of the byte ``offset`` in a JSON Lines file (for error messages)."""
    c = LineCounter(url, storage)
    try:
        return c.line(offset)
    finally:
        c.close()


def describe_position(url: str, row: int, offset: int, storage: dict | None = None) -> str:
    """Human position of a record: ``file line N`` for JSON Lines, ``file record N`` otherwise."""
    if offset >= 0:
        return f"{url} line {line_number(url, offset, storage)}"
    return f"{url} record {row} (0-based)"


__all__ = ["InputError", "InputFile", "Piece", "Chunk", "RawRows", "expand_inputs", "plan_chunks", "split_parts", "split_tail",
           "read_chunk", "check_bucket", "StorageUnavailable", "check_url", "describe_position", "line_number", "LineCounter",
           "content_hash", "file_kind", "DEFAULT_CHUNK_BYTES"]

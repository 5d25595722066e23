"""Read stage: find the input files and cut them into chunks that workers read on their own.

Pure (fsspec + pyarrow, no engine). Inputs are files, folders or globs on local disk or
object storage. Files are ordered by full path, so the same file set always gives the same
order, whatever order the user listed them in. A chunk is a unit of reading:

* ``.jsonl`` (and ``.json`` that is not an array): byte ranges of about ``chunk_bytes``,
  a line belonging to the chunk in which it starts;
* ``.json`` holding one array: the whole file;
* ``.parquet``: one row group.

``read_chunk`` yields every record of a chunk as raw JSON bytes with its position, good or
bad: decoding and validation happen in the tokenize stage, which records each failure with
the file and row. Nothing is skipped silently, except blank lines in JSON Lines files, which
hold no record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import accumulate

from .fs import full_url, get_fs, is_remote

EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".ndjson": "jsonl"}
DEFAULT_CHUNK_BYTES = 16 << 20


class InputError(ValueError):
    """Inputs that cannot be found or read."""


@dataclass(frozen=True)
class InputFile:
    url: str
    size: int
    kind: str  # jsonl | json | parquet


@dataclass(frozen=True)
class Chunk:
    chunk: int  # global chunk number: the order of chunks is the order of records
    src: int  # index of the file in the sorted file list
    url: str
    kind: str
    start: int  # bytes for jsonl, row group for parquet
    end: int


def _kind(path: str) -> str | None:
    low = path.lower()
    for ext, kind in EXTENSIONS.items():
        if low.endswith(ext):
            return kind
    return None


def expand_inputs(patterns: list[str], so: dict | None = None) -> list[InputFile]:
    """Resolve files, folders and globs to a sorted, de-duplicated list of input files."""
    if not patterns:
        raise InputError("no --input given")
    found: dict[str, InputFile] = {}
    for pat in patterns:
        fs, path = get_fs(pat, so)
        check_bucket(fs, path, pat, "--input")
        try:
            if any(ch in path for ch in "*?["):
                paths = fs.glob(path)
            elif fs.isdir(path):
                paths = [p for p in fs.find(path) if _kind(p)]
            elif fs.exists(path):
                paths = [path]
            else:
                raise InputError(f"--input {pat}: no such file or folder")
        except InputError:
            raise
        except FileNotFoundError:
            raise InputError(f"--input {pat}: no such bucket, file or folder") from None
        except PermissionError as e:
            raise InputError(f"--input {pat}: access denied ({_short(e)})") from None
        except OSError as e:
            raise InputError(f"--input {pat}: cannot list ({_short(e)})") from None
        matched = [p for p in paths if _kind(p) and not fs.isdir(p)]
        if not matched:
            raise InputError(f"--input {pat}: matches no .jsonl, .json or .parquet file")
        for p in matched:
            url = full_url(fs, p, pat)
            found[url] = InputFile(url, int(fs.size(p) or 0), _kind(p))
    return [found[u] for u in sorted(found)]


def check_bucket(fs, path: str, url: str, what: str) -> None:
    """One clear line for a bucket that does not exist or cannot be reached."""
    if not is_remote(url):
        return
    bucket = path.split("/", 1)[0]
    try:
        ok = fs.exists(bucket)
    except PermissionError as e:
        raise InputError(f"{what} {url}: access to bucket '{bucket}' denied ({_short(e)})") from None
    except OSError as e:
        raise InputError(f"{what} {url}: cannot reach bucket '{bucket}' ({_short(e)})") from None
    if not ok:
        raise InputError(f"{what} {url}: bucket '{bucket}' does not exist (or these credentials cannot see it)")


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200]


def split_tail(chunks: list[Chunk], count: int, parts: int = 4) -> list[Chunk]:
    """Cut each of the last ``count`` chunks into ``parts`` byte ranges (JSON Lines chunks
    only), renumbered in order. Workers take chunks in order, so the last ones decide when the
    stage ends: smaller final chunks let every worker finish at about the same time."""
    out: list[Chunk] = []
    first = len(chunks) - count
    for i, c in enumerate(chunks):
        if i >= first and c.kind == "jsonl" and c.end - c.start >= parts:
            step = -(-(c.end - c.start) // parts)
            for lo in range(c.start, c.end, step):
                out.append(Chunk(len(out), c.src, c.url, c.kind, lo, min(c.end, lo + step)))
        else:
            out.append(Chunk(len(out), c.src, c.url, c.kind, c.start, c.end))
    return out


def plan_chunks(files: list[InputFile], so: dict | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[Chunk]:
    chunks: list[Chunk] = []
    for src, f in enumerate(files):
        kind = f.kind
        if kind == "json" and not _is_json_array(f, so):
            kind = "jsonl"
        if kind == "jsonl":
            n = max(1, -(-f.size // chunk_bytes))
            for i in range(n):
                chunks.append(Chunk(len(chunks), src, f.url, kind, i * chunk_bytes, min(f.size, (i + 1) * chunk_bytes)))
        elif kind == "json":
            chunks.append(Chunk(len(chunks), src, f.url, kind, 0, f.size))
        else:
            import pyarrow.parquet as pq

            fs, path = get_fs(f.url, so)
            try:
                with fs.open(path, "rb") as fh:
                    groups = pq.ParquetFile(fh).metadata.num_row_groups
            except Exception as e:  # noqa: BLE001
                raise InputError(f"{f.url}: not a readable Parquet file ({_short(e)})") from None
            for g in range(max(groups, 1)):
                chunks.append(Chunk(len(chunks), src, f.url, kind, g, g + 1))
    return chunks


def _is_json_array(f: InputFile, so: dict | None) -> bool:
    fs, path = get_fs(f.url, so)
    with fs.open(path, "rb") as fh:
        head = fh.read(4096)
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


@dataclass
class RawRows:
    """Records of one chunk: raw JSON bytes with their position in the file."""

    idx: list[int]  # ordinal of the record within the chunk
    row: list[int]  # row in the file (0-based); -1 when only the byte offset is known
    offset: list[int]  # byte offset of the line (jsonl), else -1
    raw: list[bytes]
    error: list[str]  # "" or "reason: message" for records that cannot even be cut out
    digest: int = 0  # 64-bit hash of the bytes the chunk was read from


def content_hash(*parts: bytes) -> int:
    """A chunk's content fingerprint (64-bit BLAKE2b of its bytes, as a signed int64)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p)
    return int.from_bytes(h.digest(), "little", signed=True)


def read_chunk(c: Chunk, so: dict | None = None) -> RawRows:
    fs, path = get_fs(c.url, so)
    out = RawRows([], [], [], [], [])

    def add(row: int, offset: int, raw: bytes, error: str = "") -> None:
        out.idx.append(len(out.idx))
        out.row.append(row)
        out.offset.append(offset)
        out.raw.append(raw)
        out.error.append(error)

    if c.kind == "jsonl":
        # a chunk owns the lines that start in [start, end): read the range in one request
        # (plus the byte before it, and the rest of its last line), then cut lines in memory
        base = max(c.start - 1, 0)
        with fs.open(path, "rb", block_size=min(c.end - base + 1, 64 << 20) or None) as fh:
            fh.seek(base)
            data = fh.read(c.end - base)
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
        if c.start > 0:  # skip the line that started in the previous chunk
            first = data.find(b"\n")
            pos = base + first + 1 if first >= 0 else base + len(data)
            data = data[pos - base :]
        lines = data.split(b"\n")
        starts = list(accumulate((len(line) + 1 for line in lines), initial=pos))
        keep = [i for i, line in enumerate(lines) if line.strip()]  # blank lines are no records
        n = len(keep)
        return RawRows(list(range(n)), [-1] * n, [starts[i] for i in keep], [lines[i].rstrip(b"\r") for i in keep],
                       [""] * n, content_hash(data))
    elif c.kind == "json":
        with fs.open(path, "rb") as fh:
            data = fh.read()
        out.digest = content_hash(data)
        try:
            records = json.loads(data)
        except UnicodeDecodeError as e:
            add(0, -1, b"", f"invalid_utf8: file is not valid UTF-8 ({e.reason} at byte {e.start})")
            return out
        except json.JSONDecodeError as e:
            add(0, -1, b"", f"invalid_json: file is not valid JSON (line {e.lineno} col {e.colno}: {e.msg})")
            return out
        if not isinstance(records, list):
            records = [records]
        for i, rec in enumerate(records):
            add(i, -1, json.dumps(rec, ensure_ascii=False).encode())
    else:
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            first = sum(pf.metadata.row_group(g).num_rows for g in range(c.start))
            if pf.metadata.num_row_groups == 0:
                return out
            table = pf.read_row_group(c.start)
        out.digest = content_hash(str(table.to_pydict()).encode())
        for i, rec in enumerate(table.to_pylist()):
            add(first + i, -1, json.dumps(rec, ensure_ascii=False, default=str).encode())
    return out


def line_number(url: str, offset: int, so: dict | None = None) -> int:
    """1-based line number of the byte ``offset`` in a JSON Lines file (for error messages)."""
    fs, path = get_fs(url, so)
    count = 0
    with fs.open(path, "rb") as fh:
        remaining = offset
        while remaining > 0:
            buf = fh.read(min(remaining, 8 << 20))
            if not buf:
                break
            count += buf.count(b"\n")
            remaining -= len(buf)
    return count + 1


def describe_position(url: str, row: int, offset: int, so: dict | None = None) -> str:
    """Human position of a record: ``file line N`` for JSON Lines, ``file row N`` otherwise."""
    if offset >= 0:
        return f"{url} line {line_number(url, offset, so)}"
    return f"{url} record {row} (0-based)"


class LineCounter:
    """1-based line numbers of increasing byte offsets in one file, counted in a single forward
    pass (rejects come in input order, so each file is read at most once, only as far as its
    last bad line)."""

    def __init__(self, url: str, so: dict | None = None):
        self.url, self.so = url, so
        self.fh = None
        self.pos = 0
        self.lines = 0

    def line(self, offset: int) -> int:
        if offset < self.pos:  # out of order (not expected): count from the start again
            self.close()
            self.pos = self.lines = 0
        if self.fh is None:
            fs, path = get_fs(self.url, self.so)
            self.fh = fs.open(path, "rb")
            self.fh.seek(self.pos)
        while self.pos < offset:
            buf = self.fh.read(min(offset - self.pos, 8 << 20))
            if not buf:
                break
            self.lines += buf.count(b"\n")
            self.pos += len(buf)
        return self.lines + 1

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None

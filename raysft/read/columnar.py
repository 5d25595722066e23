"""Parquet, Arrow (IPC/Feather) and CSV inputs: their rows as the JSON records they stand for.

Rule: a record read from a columnar file normalizes exactly as the same record read from
JSON. What a columnar schema adds is taken back out:

* a struct column holds every key any row had, the missing ones as null: a null in a struct
  (or a top-level null column) is a key the record did not have, and is dropped;
* ``binary`` columns hold text: decoded as UTF-8 (a row that is not valid UTF-8 is a counted
  ``invalid_utf8`` reject naming the column), never written as a Python ``b'...'`` repr;
* map columns are objects; timestamps, dates and decimals are written as text;
* CSV has no types: every column is read as text (an empty cell is an empty string), and a
  cell holding a JSON list (a ``messages`` or ``history`` column) is read by the normalizer.

Each record comes out as JSON bytes, the form every input takes into the tokenize stage.
"""

from __future__ import annotations

import csv
import io

import pyarrow as pa

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency
    orjson = None
import json


def _dumps(rec) -> bytes:
    if orjson is not None:
        return orjson.dumps(rec, default=str, option=orjson.OPT_NON_STR_KEYS)
    return json.dumps(rec, ensure_ascii=False, default=str).encode()


def _clean(v, t: pa.DataType):
    """A value of Arrow type ``t`` (from ``to_pylist``) as JSON would have given it."""
    if v is None:
        return None
    if pa.types.is_struct(t):
        out = {}
        for f in t:
            x = _clean(v.get(f.name), f.type)
            if x is not None:
                out[f.name] = x
        return out
    if pa.types.is_map(t):
        return {str(k): _clean(x, t.item_type) for k, x in v}
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return [_clean(x, t.value_type) for x in v]
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return v.decode("utf-8")  # UnicodeDecodeError: the caller rejects the row
    if pa.types.is_dictionary(t):
        return _clean(v, t.value_type)
    return v


def _plain_type(t: pa.DataType) -> bool:
    """Columns whose Python values need no cleaning."""
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
            or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t))


def _column_values(col, t: pa.DataType, name: str, errors: list[str]) -> list:
    """Python values of one column; rows it cannot decode get an error in ``errors``."""
    try:
        values = col.to_pylist()
    except (UnicodeDecodeError, pa.ArrowException, ValueError):
        # a string column holding bytes that are not UTF-8: go row by row on the raw bytes
        raw = col.cast(pa.binary()).to_pylist() if pa.types.is_string(t) or pa.types.is_large_string(t) else None
        if raw is None:
            raise
        values = []
        for i, b in enumerate(raw):
            try:
                values.append(None if b is None else b.decode("utf-8"))
            except UnicodeDecodeError as e:
                values.append(None)
                errors[i] = errors[i] or f"invalid_utf8: column {name!r} is not valid UTF-8 ({e.reason} at byte {e.start})"
        return values
    if _plain_type(t):
        return values
    out = []
    for i, v in enumerate(values):
        try:
            out.append(_clean(v, t))
        except UnicodeDecodeError as e:
            out.append(None)
            errors[i] = errors[i] or f"invalid_utf8: column {name!r} is not valid UTF-8 ({e.reason} at byte {e.start})"
    return out


def table_records(table: pa.Table) -> tuple[list[bytes], list[str]]:
    """The rows of ``table`` as JSON records (bytes), and an error per row ("" when fine)."""
    n = table.num_rows
    errors = [""] * n
    columns = []
    for name, col in zip(table.column_names, table.columns):
        columns.append((name, _column_values(col, col.type, name, errors)))
    raws = []
    for i in range(n):
        if errors[i]:
            raws.append(b"")
            continue
        rec = {name: vals[i] for name, vals in columns if vals[i] is not None}
        raws.append(_dumps(rec))
    return raws, errors


MAX_CELL = (1 << 31) - 1  # characters of one CSV cell (a record is bounded by --seq-length's drop anyway)


def csv_records(stream, delimiter: str):
    """The rows of a CSV stream as JSON records of text cells, one at a time: ``(row, raw,
    error)``, ``row`` counted from 0 after the header. A row whose field count differs from the
    header's, or that is not UTF-8, is a reject at its own position (``bad_csv_row``,
    ``invalid_utf8``); the rows around it are read as usual. Python's csv module, not Arrow's
    reader, so that one bad row never costs the file."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    csv.field_size_limit(MAX_CELL)  # the module's default of 131,072 characters would end a long answer's file
    reader = csv.reader(text, delimiter=delimiter)
    names = next(reader, None)
    if names is None:
        return
    width = len(names)
    for row, cells in enumerate(reader):
        if not cells:
            continue  # a blank line holds no record
        if len(cells) != width:
            yield row, b"", f"bad_csv_row: {len(cells)} fields where the header has {width}"
            continue
        try:
            yield row, _dumps(dict(zip(names, cells))), ""
        except UnicodeEncodeError as e:  # surrogate-escaped bytes that are not UTF-8
            yield row, b"", f"invalid_utf8: a cell is not valid UTF-8 ({e.reason})"

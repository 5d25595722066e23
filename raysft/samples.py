"""The tokenize stage's rows: a batch of records -> one row per sample piece or rejected record.

Pure (numpy + pyarrow, no engine). ``tokenize_batch`` runs a :class:`~raysft.tokenize.SampleBuilder`
over raw records, applies ``--overlong`` and returns the Arrow table the later stages read:
position columns (chunk, src, idx, piece, row, offset), lengths, loss-bearing counts, the
signed tokens, the reject reason of each record that gave no sample, and each kept sample's
*run key and rank*:

A run is a maximal stretch of rows of one chunk in record order with nothing missing (the next
piece of the same record, or the first piece of the next record). Runs are disjoint ranges of
one chunk, so ordering them by (chunk, first ordinal) is input order, however the engine cut
the rows into blocks. A sample's rank among the same-length samples of its run, plus the count
of same-length samples in all earlier runs (``raysft.pack.RunOffsets``), is its rank in its
length class in input order, from which its pack slot follows (``raysft.pack.assign_block``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .tokenize import SampleBuilder, fit_overlong, loss_counts

PIECES = 1 << 16  # record ordinal = idx * PIECES + piece: a split record's pieces stay in order

SCHEMA = pa.schema([
    ("chunk", pa.int32()), ("src", pa.int32()), ("idx", pa.int64()), ("piece", pa.int32()), ("row", pa.int64()),
    ("offset", pa.int64()), ("n", pa.int32()), ("orig_n", pa.int32()), ("loss_n", pa.int32()),
    ("run_first", pa.int64()), ("run_rank", pa.int64()), ("ids", pa.list_(pa.int32())), ("reason", pa.string()),
    ("message", pa.string()), ("bad_raw", pa.binary()), ("chunk_hash", pa.int64()),
    # the encoder's parity and fallback counts of the batch, on its first row (0 elsewhere), so
    # they add up whatever the engine does to the rows
    ("enc_checked", pa.int32()), ("enc_mismatch", pa.int32()), ("enc_fallback", pa.int32()),
    # the chat-template parity outcome of the record (raysft.parity), on its first piece
    ("tpl_parity", pa.int8()),
])


def _on_first(n: int, value: int) -> np.ndarray:
    out = np.zeros(n, np.int32)
    if n:
        out[0] = value
    return out


def run_first(chunk: np.ndarray, idx: np.ndarray, piece: np.ndarray) -> np.ndarray:
    """Ordinal (``idx * PIECES + piece``) of the first row of the run each row belongs to."""
    n = len(idx)
    new = np.ones(n, dtype=bool)
    if n > 1:
        same = (idx[1:] == idx[:-1]) & (piece[1:] == piece[:-1] + 1)
        nxt = (idx[1:] == idx[:-1] + 1) & (piece[1:] == 0)
        new[1:] = (chunk[1:] != chunk[:-1]) | ~(same | nxt)
    first_pos = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    return idx[first_pos] * PIECES + piece[first_pos]


def run_ranks(chunk: np.ndarray, first: np.ndarray, lengths: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Rank of each kept row among the kept rows of the same length in its run (input order)."""
    rank = np.zeros(len(lengths), dtype=np.int64)
    kpos = np.nonzero(kept)[0]
    if len(kpos):
        key = np.lexsort((kpos, lengths[kpos], first[kpos], chunk[kpos]))
        sk = kpos[key]
        run_key = np.stack([chunk[sk], first[sk], lengths[sk]], axis=1)
        grp_start = np.ones(len(sk), dtype=bool)
        grp_start[1:] = (run_key[1:] != run_key[:-1]).any(axis=1)
        start = np.maximum.accumulate(np.where(grp_start, np.arange(len(sk)), 0))
        rank[sk] = np.arange(len(sk)) - start
    return rank


def kept_mask(table: pa.Table):
    """Rows of a tokenized block that are samples to write (the others carry their reason)."""
    return pc.equal(table.column("reason"), "")


def cut_unsafe(builder: SampleBuilder, raw: bytes, signed: np.ndarray, avoid_end: tuple[int, ...]) -> np.ndarray | None:
    """Cut positions a piece must not end at: inside a template marker the tokenizer splits
    into several tokens, or right after a token id the layout cannot end a sample with."""
    unsafe = builder.unsafe_cuts(raw) if builder.markers else None
    if avoid_end:
        ids = np.where(signed >= 0, signed, ~signed)
        after = np.zeros(len(signed) + 1, dtype=bool)
        after[1:] = np.isin(ids, avoid_end)
        unsafe = after if unsafe is None else (unsafe | after)
    return unsafe


def tokenize_batch(builder: SampleBuilder, raws: list[bytes], errors: list[str], pos: dict, seq_length: int,
                   overlong: str = "drop", chunk_hash: int = 0, avoid_end: tuple[int, ...] = ()) -> pa.Table:
    """Records -> the stage's rows (see module doc). ``pos`` holds per record ``chunk``, ``src``,
    ``idx``, ``row`` and ``offset`` arrays. ``avoid_end``: token ids the output layout cannot end
    a sample with; ``--overlong truncate/split`` never cut right after them."""
    e = builder.encode(raws, errors)
    S = seq_length
    ends = np.cumsum(e.lengths)  # record i's tokens are e.values[ends[i] - lengths[i]:ends[i]]
    rows_of = np.ones(len(raws), dtype=np.int64)  # output rows per record
    fitted: dict[int, tuple[list[np.ndarray], str]] = {}  # overlong records: (pieces, reason)
    for i in np.flatnonzero(e.ok & (e.lengths > S)).tolist():
        arr = e.values[ends[i] - e.lengths[i] : ends[i]]
        unsafe = cut_unsafe(builder, raws[i], arr, avoid_end) if overlong != "drop" else None
        fitted[i] = fit_overlong(arr, S, overlong, unsafe)
        rows_of[i] = max(1, len(fitted[i][0]))
    take = np.repeat(np.arange(len(raws)), rows_of)
    n = len(take)
    piece = np.arange(n) - np.repeat(np.cumsum(rows_of) - rows_of, rows_of)
    orig_n = np.where(e.ok, e.lengths, -1)[take].astype(np.int32)
    kept = e.ok[take]
    lengths = orig_n.copy()
    records = take.tolist()
    reason = [e.reasons[i] for i in records]
    message = [e.messages[i] for i in records]
    values = e.values
    if fitted:
        segments, done, first_row = [], 0, np.cumsum(rows_of) - rows_of  # first output row per record
        for i, (pieces, why) in fitted.items():
            segments.append(e.values[done : ends[i] - e.lengths[i]])
            segments += pieces
            done = ends[i]
            if pieces:
                lengths[first_row[i] : first_row[i] + len(pieces)] = [len(p) for p in pieces]
            else:
                kept[first_row[i]] = False
                reason[first_row[i]] = why
                message[first_row[i]] = f"{e.lengths[i]} tokens > seq-length {S}"
        segments.append(e.values[done:])
        values = np.concatenate(segments)
    bad_raw = [b"" if k else raws[i] for i, k in zip(records, kept.tolist())]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.where(kept, lengths, 0), out=offsets[1:])
    loss_n = (loss_counts(values, offsets) if fitted else e.loss[take] * kept).astype(np.int32)
    chunk = np.asarray(pos["chunk"], np.int32)[take]
    idx = np.asarray(pos["idx"], np.int64)[take]
    first = run_first(chunk, idx, piece)
    return pa.table({
        "chunk": pa.array(chunk),
        "src": pa.array(np.asarray(pos["src"], np.int32)[take]),
        "idx": pa.array(idx),
        "piece": pa.array(piece.astype(np.int32)),
        "row": pa.array(np.asarray(pos["row"], np.int64)[take]),
        "offset": pa.array(np.asarray(pos["offset"], np.int64)[take]),
        "n": pa.array(lengths),
        "orig_n": pa.array(orig_n),
        "loss_n": pa.array(loss_n),
        "run_first": pa.array(first),
        "run_rank": pa.array(run_ranks(chunk, first, lengths, kept)),
        "ids": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.int32())),
        "reason": pa.array(reason, pa.string()),
        "message": pa.array(message, pa.string()),
        "bad_raw": pa.array(bad_raw, pa.binary()),
        "chunk_hash": pa.array(np.full(n, chunk_hash, np.int64)),
        "enc_checked": pa.array(_on_first(n, getattr(e.batch, "parity_rows", 0))),
        "enc_mismatch": pa.array(_on_first(n, getattr(e.batch, "parity_mismatches", 0))),
        "enc_fallback": pa.array(_on_first(n, getattr(e.batch, "fallback_rows", 0))),
        "tpl_parity": pa.array(np.where(piece == 0, e.parity[take], 0).astype(np.int8) if e.parity is not None
                               else np.zeros(n, np.int8)),
    }, schema=SCHEMA)

"""The tokenize stage's rows: a batch of records -> one row per sample piece, preference pair or rejected record.

Pure (numpy + pyarrow, no engine). ``encode_records`` runs a :class:`~raysft.tokenize.SampleBuilder`
over raw records and ``fit_records`` applies ``--overlong``, giving the Arrow table the later stages read:
position columns (chunk, src, idx, piece, row, offset), lengths, loss-bearing counts, the
signed tokens, the reject reason of each record that gave no sample, and each kept sample's
*run key and rank*:

A run is a maximal stretch of rows of one chunk in record order with nothing missing (the next
piece of the same record, or the first piece of the next record). Runs are disjoint ranges of
one chunk, so ordering them by (chunk, first ordinal) is input order, however the engine cut
the rows into blocks. A sample's rank among the same-length samples of its run, plus the count
of same-length samples in all earlier runs (``raysft.pack.RunOffsets``), is its rank in its
length class in input order, from which its pack slot follows (``raysft.pack.assign_slots``).
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .tokenize import SampleBuilder, fit_overlong, fit_pair, loss_counts

PIECES = 1 << 16  # record ordinal = idx * PIECES + piece: a split record's pieces stay in order

SCHEMA = pa.schema([
    ("chunk", pa.int32()), ("src", pa.int32()), ("idx", pa.int64()), ("piece", pa.int32()), ("row", pa.int64()),
    ("offset", pa.int64()), ("n", pa.int32()), ("orig_n", pa.int32()), ("loss_n", pa.int32()),
    ("run_first", pa.int64()), ("run_rank", pa.int64()), ("ids", pa.list_(pa.int32())), ("reason", pa.string()),
    ("message", pa.string()), ("bad_raw", pa.binary()), ("chunk_hash", pa.int64()),
    # the encoder's parity and fallback counts of the batch, on its first row (0 elsewhere), so
    # they add up whatever the engine does to the rows
    ("enc_checked", pa.int32()), ("enc_mismatch", pa.int32()), ("enc_fallback", pa.int32()),
    # --template auto: the batch's conversations replayed from render plans and rendered, on its
    # first row (raysft.templates.plan)
    ("tpl_planned", pa.int32()), ("tpl_rendered", pa.int32()),
    # the chat-template parity outcome of the record (raysft.parity), on its first piece
    ("tpl_parity", pa.int8()),
    ("source", pa.int16()),  # the record's source (raysft.sources), by position in the build's list
    ("rec_hash", pa.int64()),  # 64 bits of the record's content (mixture and validation picks)
    ("cached", pa.bool_()),  # read from the tokenized cache (raysft.cache), not tokenized
    ("chosen_n", pa.int32()),  # a preference pair (one row): its chosen side's tokens, then the rejected's; else 0
])

# The tokenize stage's cacheable half (one row per record, before --overlong and --seq-length
# apply): what ``encode_records`` gives and ``fit_records`` cuts into the stage's rows.
# ``cut_raw`` is the record itself, kept for the records longer than ``keep_over`` tokens (the
# schema metadata says which): an overlong record that is dropped is listed with its record in
# rejects.jsonl, and cutting one may need its text again.
ENCODED = pa.schema([
    ("src", pa.int32()), ("idx", pa.int64()), ("row", pa.int64()), ("offset", pa.int64()), ("n", pa.int32()),
    ("loss_n", pa.int32()), ("ids", pa.list_(pa.int32())), ("reason", pa.string()), ("message", pa.string()),
    ("bad_raw", pa.binary()), ("cut_raw", pa.binary()), ("rec_hash", pa.int64()), ("tpl_parity", pa.int8()),
    ("enc_checked", pa.int32()), ("enc_mismatch", pa.int32()), ("enc_fallback", pa.int32()),
    ("tpl_planned", pa.int32()), ("tpl_rendered", pa.int32()), ("chosen_n", pa.int32()),
])


TEMPLATE_PATHS = ("tpl_planned", "tpl_rendered")  # per batch: --template auto's two paths (raysft.templates.plan)


def record_hash(raw: bytes) -> int:
    """64 bits of a record's content (CRC-32 and Adler-32 of its bytes), as int64."""
    h = zlib.crc32(raw) | (zlib.adler32(raw) << 32)
    return h - (1 << 64) if h >= 1 << 63 else h


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
    unsafe = None
    if builder is not None and builder.markers:
        if not raw:
            raise ValueError("cutting this record needs its text, which was not kept")
        unsafe = builder.unsafe_cuts(raw)
    if avoid_end:
        ids = np.where(signed >= 0, signed, ~signed)
        after = np.zeros(len(signed) + 1, dtype=bool)
        after[1:] = np.isin(ids, avoid_end)
        unsafe = after if unsafe is None else (unsafe | after)
    return unsafe


def encode_records(builder: SampleBuilder, raws: list[bytes], errors: list[str], pos: dict,
                   keep_over: int = 0) -> pa.Table:
    """Records -> one ``ENCODED`` row each: its signed tokens (whole, as the template and the
    tokenizer give them) or why it was rejected. Depends on the record, the tokenizer, the
    template and the source's format, keys and loss policy only (and ``keep_over``: records
    longer keep their bytes): what the cache keeps."""
    e = builder.encode(raws, errors)
    n = len(raws)
    lengths = np.where(e.ok, e.lengths, 0)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    long_ = (e.ok & (e.lengths > keep_over)).tolist()
    return pa.table({
        "src": pa.array(np.asarray(pos["src"], np.int32)),
        "idx": pa.array(np.asarray(pos["idx"], np.int64)),
        "row": pa.array(np.asarray(pos["row"], np.int64)),
        "offset": pa.array(np.asarray(pos["offset"], np.int64)),
        "n": pa.array(np.where(e.ok, e.lengths, -1).astype(np.int32)),
        "loss_n": pa.array(np.where(e.ok, e.loss, 0).astype(np.int32)),
        "ids": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(e.values, pa.int32())),
        "reason": pa.array(e.reasons, pa.string()),
        "message": pa.array(e.messages, pa.string()),
        "bad_raw": pa.array([b"" if k else r for r, k in zip(raws, e.ok.tolist())], pa.binary()),
        "cut_raw": pa.array([r if k else b"" for r, k in zip(raws, long_)], pa.binary()),
        "rec_hash": pa.array(np.fromiter(map(record_hash, raws), np.int64, n)),
        "tpl_parity": pa.array(e.parity if e.parity is not None else np.zeros(n, np.int8)),
        "enc_checked": pa.array(_on_first(n, getattr(e.batch, "parity_rows", 0))),
        "enc_mismatch": pa.array(_on_first(n, getattr(e.batch, "parity_mismatches", 0))),
        "enc_fallback": pa.array(_on_first(n, getattr(e.batch, "fallback_rows", 0))),
        "tpl_planned": pa.array(_on_first(n, e.planned)),
        "tpl_rendered": pa.array(_on_first(n, e.rendered)),
        "chosen_n": pa.array((e.first if e.first is not None else np.zeros(n)).astype(np.int32)),
    }, schema=ENCODED.with_metadata({"keep_over": str(int(keep_over))}))


def _take_with(column: pa.ChunkedArray, rows: np.ndarray, at: list[int], values: list, missing=None):
    """``column`` at ``rows`` (-1: ``missing``), with ``values`` put at positions ``at``."""
    extra = [*values, missing]
    idx = np.where(rows < 0, len(column) + len(values), rows).astype(np.int64)
    idx[at] = len(column) + np.arange(len(values))
    return pa.chunked_array([*column.chunks, pa.array(extra, column.type)], column.type).take(pa.array(idx))


class Align:
    """``--pad-to-multiple``: each sample padded at its end with ``pad`` (an EOS id, stored
    without loss) to ``aligned(n)`` tokens: the length the trainer attends over (``n - shift``,
    ``shift`` the layout's ``label_shift``) a multiple of ``multiple``. Where the trainer drops
    the last token (``shift`` 1: Megatron-Bridge), at least one EOS is added, so every token of
    the sample is among its inputs (Bridge's context parallelism takes the trailing EOS tokens of
    an input for padding: without one, a sample ending in EOS would lose it from its sequence)."""

    def __init__(self, multiple: int, shift: int, pad: int):
        self.m, self.shift, self.pad = int(multiple), int(shift), int(pad)

    def aligned(self, n: np.ndarray) -> np.ndarray:
        return -(-n // self.m) * self.m + self.shift

    def fit(self, capacity: int) -> int:
        """The longest sample whose aligned length fits ``capacity``."""
        return (capacity - self.shift) // self.m * self.m

    def apply(self, ids: pa.Array | pa.ChunkedArray, lengths: np.ndarray, kept: np.ndarray):
        """(ids, lengths) with each kept row padded to its aligned length (no loss: ``~pad``)."""
        new = np.where(kept, self.aligned(lengths.astype(np.int64)), 0)
        old = np.where(kept, lengths, 0).astype(np.int64)
        flat = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        values = flat.flatten().to_numpy()
        new_off = np.zeros(len(new) + 1, np.int64)
        np.cumsum(new, out=new_off[1:])
        old_off = np.zeros(len(old) + 1, np.int64)
        np.cumsum(old, out=old_off[1:])
        out = np.full(int(new_off[-1]), ~self.pad, np.int32)
        out[np.repeat(new_off[:-1] - old_off[:-1], old) + np.arange(int(old_off[-1]))] = values
        return (pa.ListArray.from_arrays(pa.array(new_off.astype(np.int32)), pa.array(out, pa.int32())),
                np.where(kept, new, lengths).astype(lengths.dtype))


def fit_records(enc: pa.Table, chunk: int, seq_length: int, overlong: str = "drop", chunk_hash: int = 0,
                avoid_end: tuple[int, ...] = (), source: int = 0, builder: SampleBuilder | None = None,
                cached: bool = False, align: Align | None = None, pair_limits: tuple[int, int] | None = None
                ) -> pa.Table:
    """``ENCODED`` rows -> the stage's rows (see module doc): ``--overlong`` applied at
    ``seq_length``, run keys and ranks. ``builder``: for the marker cuts of overlong records
    (needed only when ``cut_raw`` was kept). ``align``: ``--pad-to-multiple`` (records fitted so
    that their padded length fits ``seq_length``). ``pair_limits``: the most tokens of a
    preference pair, both sides together and each side (``Layout.pair_limits``; default
    ``seq_length`` for both)."""
    S = seq_length if align is None else align.fit(seq_length)
    total, side = pair_limits or (S, S)
    n_rec = enc.num_rows
    orig = enc.column("n").to_numpy()
    ok = orig >= 0
    lengths_rec = np.where(ok, orig, 0).astype(np.int64)
    chosen_n = (enc.column("chosen_n").to_numpy().astype(np.int64) if "chosen_n" in enc.column_names
                else np.zeros(n_rec, np.int64))
    pair = chosen_n > 0
    chosen_rec = chosen_n.copy()  # as encoded (a truncated pair's own count changes)
    col = enc.column("ids")
    # the tokens back to back, without a copy where they are one chunk (a cache entry's slice)
    values = ((col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()).flatten().to_numpy()
              if n_rec else np.zeros(0, np.int32))
    ends = np.cumsum(lengths_rec)
    rows_of = np.ones(n_rec, dtype=np.int64)
    fitted: dict[int, tuple[list[np.ndarray], str]] = {}
    cut_raw = enc.column("cut_raw")
    for i in np.flatnonzero(ok & pair & ((lengths_rec > total) | (np.maximum(chosen_n, lengths_rec - chosen_n) > side))
                            ).tolist():
        tokens, chosen_n[i], why = fit_pair(values[ends[i] - lengths_rec[i] : ends[i]], int(chosen_n[i]), total, side,
                                            overlong)
        fitted[i] = ([tokens] if tokens is not None else [], why)
    for i in np.flatnonzero(ok & ~pair & (lengths_rec > S)).tolist():
        arr = values[ends[i] - lengths_rec[i] : ends[i]]
        unsafe = cut_unsafe(builder, cut_raw[i].as_py(), arr, avoid_end) if overlong != "drop" else None
        fitted[i] = fit_overlong(arr, S, overlong, unsafe)
        rows_of[i] = max(1, len(fitted[i][0]))
    take = np.repeat(np.arange(n_rec), rows_of)
    n = len(take)
    piece = np.arange(n) - np.repeat(np.cumsum(rows_of) - rows_of, rows_of)
    orig_n = orig[take].astype(np.int32)
    kept = ok[take]
    lengths = orig_n.copy()  # orig is -1 on rejected records already
    first_row = np.cumsum(rows_of) - rows_of
    if not fitted:  # one row per record, as encoded: its columns as they are (no per-row Python)
        reason, message, bad_raw = enc.column("reason"), enc.column("message"), enc.column("bad_raw")
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.where(kept, lengths, 0), out=offsets[1:])
        ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.int32()))
    else:
        # the rows between cut records are slices of the encoded column (no copy of their
        # tokens); a cut record's rows are its pieces, or one empty row when it is dropped
        listed = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        segments, done = [], 0
        fix: dict[int, tuple[str, str, bytes]] = {}  # row -> reason, message, record of a drop
        for i, (pieces, why) in fitted.items():
            if i > done:
                segments.append(listed.slice(done, i - done))
            done = i + 1
            if pieces:
                lengths[first_row[i] : first_row[i] + len(pieces)] = [len(p) for p in pieces]
                cuts = np.cumsum([0] + [len(p) for p in pieces]).astype(np.int32)
                segments.append(pa.ListArray.from_arrays(pa.array(cuts), pa.array(np.concatenate(pieces), pa.int32())))
            else:
                kept[first_row[i]] = False
                # a dropped overlong record is listed in rejects.jsonl with its record
                limit = f"seq-length {S}" if not pair[i] else \
                    f"a pair's limit ({total} together, {side} a side; chosen {chosen_rec[i]}, rejected {lengths_rec[i] - chosen_rec[i]})"
                fix[int(first_row[i])] = (why, f"{lengths_rec[i]} tokens > {limit}", cut_raw[i].as_py() or b"")
                segments.append(pa.array([[]], listed.type))
        if n_rec > done:
            segments.append(listed.slice(done))
        ids = pa.chunked_array(segments, listed.type)
        # the record columns taken per row, a drop's own values put in (arrow takes, no per-row Python)
        at = list(fix)
        reason = _take_with(enc.column("reason"), take, at, [f[0] for f in fix.values()])
        message = _take_with(enc.column("message"), take, at, [f[1] for f in fix.values()])
        raw_rows = np.where(kept, -1, take)  # a kept row has no record in rejects.jsonl
        bad_raw = _take_with(enc.column("bad_raw"), raw_rows, at, [f[2] for f in fix.values()], b"")
    if align is not None:
        ids, lengths = align.apply(ids, lengths, kept)
    # a record's count on its one row; the pieces of a cut record count their own tokens
    loss_n = (enc.column("loss_n").to_numpy()[take] * kept).astype(np.int32)
    for i, (pieces, _) in fitted.items():
        if pieces:
            loss_n[first_row[i] : first_row[i] + len(pieces)] = loss_counts(
                np.concatenate(pieces), np.cumsum([0] + [len(p) for p in pieces]))
    chunk_a = np.full(n, chunk, np.int32)
    idx = enc.column("idx").to_numpy()[take]
    first = run_first(chunk_a, idx, piece)
    first_piece = piece == 0

    def per_record(name, dtype):
        if name not in enc.column_names or (cached and name in TEMPLATE_PATHS):
            return pa.array(np.zeros(len(take), dtype))  # served from the cache: nothing rendered
        return pa.array(np.where(first_piece, enc.column(name).to_numpy()[take], 0).astype(dtype))

    return pa.table({
        "chunk": pa.array(chunk_a),
        "src": pa.array(enc.column("src").to_numpy()[take]),
        "idx": pa.array(idx),
        "piece": pa.array(piece.astype(np.int32)),
        "row": pa.array(enc.column("row").to_numpy()[take]),
        "offset": pa.array(enc.column("offset").to_numpy()[take]),
        "n": pa.array(lengths),
        "orig_n": pa.array(orig_n),
        "loss_n": pa.array(loss_n),
        "run_first": pa.array(first),
        "run_rank": pa.array(run_ranks(chunk_a, first, lengths, kept)),
        "ids": ids,
        "reason": reason,
        "message": message,
        "bad_raw": bad_raw,
        "chunk_hash": pa.array(np.full(n, chunk_hash, np.int64)),
        "enc_checked": per_record("enc_checked", np.int32),
        "enc_mismatch": per_record("enc_mismatch", np.int32),
        "enc_fallback": per_record("enc_fallback", np.int32),
        "tpl_planned": per_record("tpl_planned", np.int32),
        "tpl_rendered": per_record("tpl_rendered", np.int32),
        "tpl_parity": per_record("tpl_parity", np.int8),
        "source": pa.array(np.full(n, source, np.int16)),
        "rec_hash": pa.array(enc.column("rec_hash").to_numpy()[take]),
        "cached": pa.array(np.full(n, cached, bool)),
        "chosen_n": pa.array((chosen_n[take] * kept).astype(np.int32)),
    }, schema=SCHEMA)

"""Write-shards stage: the samples of a range of output packs -> one shard of the layout's files.

Pure numpy + fsspec, no engine. Samples arrive with their output pack and position in the
pack (``raysft.pack``), in any order; ``write_shard`` sorts them into output order, writes
their provenance and hands the layout (``raysft.layouts``) slices of about ``SLICE_TOKENS``
stored tokens cut between packs, so a writer's memory is bounded by a slice, not a shard.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .indexed import Index, shard_meta  # noqa: F401 - shard_meta: the writers' result
from .layouts import Layout, Placement
from .provenance import provenance_records

SLICE_TOKENS = 1 << 20  # a writer encodes this many stored pack tokens at a time

def order_samples(out_pack: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return np.lexsort((np.asarray(pos), np.asarray(out_pack)))


def slices(lengths: np.ndarray, packs: np.ndarray, per_pack: int | None, budget: int = SLICE_TOKENS) -> list[int]:
    """Sample indices where slices start (and the end): whole packs, about ``budget`` stored
    tokens each (``per_pack`` values per pack for padded layouts, else the tokens)."""
    if not len(packs):
        return [0]
    first = np.flatnonzero(np.concatenate([[True], packs[1:] != packs[:-1]]))  # first sample of each pack
    stored = np.full(len(first), per_pack) if per_pack else np.add.reduceat(lengths, first)
    cuts, used = [0], 0
    for k, n in enumerate(stored.tolist()):
        if used and used + n > budget:
            cuts.append(int(first[k]))
            used = 0
        used += n
    cuts.append(len(packs))
    return cuts


def split_pairs(lengths: np.ndarray, packs: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Preference pairs (one unit each: ``chosen`` tokens, then the rejected side's) -> two
    samples each, chosen then rejected, in the same pack."""
    if not (chosen > 0).all() or (chosen >= lengths).any():
        raise ValueError("a pair build holds a unit that is not a pair of two non-empty samples")
    return np.stack([chosen, lengths - chosen], axis=1).reshape(-1), np.repeat(packs, 2)


def write_ordered(fs, prefix: str, layout: Layout, seq_length: int, pad_id: int, flat,
                  lengths: np.ndarray, packs: np.ndarray, token_dtype: str = "int32",
                  chosen: np.ndarray | None = None) -> dict:
    """Samples in output order -> the shard; its meta. ``flat``: their signed tokens back to
    back, or a :class:`Gather` that gives them a slice of samples at a time. ``chosen``: a
    preference-pair build's chosen tokens per unit (each unit written as its two samples)."""
    lengths = np.asarray(lengths, np.int64)
    packs = np.asarray(packs, np.int64)
    writer = layout.writer(fs, prefix, seq_length, pad_id, token_dtype)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    cuts = slices(lengths, packs, layout.stored_per_pack(seq_length), SLICE_TOKENS)
    lossy: Counter = Counter()
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        if hi > lo:
            tokens = flat(lo, hi) if isinstance(flat, Gather) else flat[bounds[lo] : bounds[hi]]
            if chosen is None:
                p = Placement(tokens, lengths[lo:hi], packs[lo:hi])
            else:
                p = Placement(tokens, *split_pairs(lengths[lo:hi], packs[lo:hi], np.asarray(chosen[lo:hi], np.int64)))
            lossy.update(layout.unrepresentable(p))
            writer.write(p)
    return writer.close() | {"unrepresentable": dict(lossy)}


class Gather:
    """The tokens of samples held in list columns (the tokenized blocks, or the shuffle's parts,
    each read in place: memory-mapped, not concatenated), a slice of samples at a time in the
    order given: one copy of each token from its source to the output."""

    SLICE_MIN_MEAN = 64  # mean sample length from which one copy per sample beats index arrays

    def __init__(self, values: list[np.ndarray], source: np.ndarray, start: np.ndarray, length: np.ndarray):
        self.values = values  # each source's tokens back to back
        self.source, self.start, self.length = source, start, length  # per sample, in output order

    def __call__(self, lo: int, hi: int) -> np.ndarray:
        src, start, length = self.source[lo:hi], self.start[lo:hi], self.length[lo:hi]
        total = int(length.sum())
        if not total:
            return np.zeros(0, np.int32)
        if total >= self.SLICE_MIN_MEAN * len(length):
            # long samples: a view of each, copied once (a Python step per sample, no index arrays)
            v = self.values
            return np.concatenate([v[k][a : a + n] for k, a, n in zip(src.tolist(), start.tolist(), length.tolist())])
        # short samples: index arrays of the slice's length (grouped by source, then put in order)
        order = np.argsort(src, kind="stable")
        ln = length[order]
        first = np.cumsum(ln) - ln  # where each sample goes in the grouped copy
        step = np.arange(total, dtype=np.int64)
        grouped = np.empty(total, np.int32)
        take = np.repeat(start[order] - first, ln) + step
        storage = src[order]
        groups = np.flatnonzero(np.concatenate([[True], storage[1:] != storage[:-1]]))
        ends = np.append(first[groups[1:]], total)
        for g, a, b in zip(groups.tolist(), first[groups].tolist(), ends.tolist()):
            np.take(self.values[storage[g]], take[a:b], out=grouped[a:b])
        at = np.empty(len(order), np.int64)
        at[order] = first
        return np.take(grouped, np.repeat(at - (np.cumsum(length) - length), length) + step)

    @classmethod
    def of(cls, parts: list, rows: list[np.ndarray], order: np.ndarray) -> Gather:
        """The ``ids`` of rows ``rows[i]`` (ascending) of table ``parts[i]``, in ``order`` (of
        the rows of all parts, one after the other)."""
        values, source, start, length = [], [], [], []
        for t, r in zip(parts, rows):
            base = 0
            for ch in t.column("ids").chunks:  # a chunk's offsets index its whole child array
                lo, hi = np.searchsorted(r, [base, base + len(ch)])
                if hi > lo:
                    off = ch.offsets.to_numpy().astype(np.int64)
                    k = r[lo:hi] - base
                    source.append(np.full(hi - lo, len(values), np.int32))
                    start.append(off[k])
                    length.append(off[k + 1] - off[k])
                    values.append(ch.values.to_numpy())
                base += len(ch)
        cat = [np.concatenate(a) if a else np.zeros(0, np.int64) for a in (source, start, length)]
        return cls(values, *(a[order] for a in cat))


PROVENANCE_COLUMNS = ("src", "piece", "row", "offset", "out_pack")


def shard_rows(parts: list, shard: int | None) -> list[np.ndarray]:
    """The rows of each part that shard ``shard`` writes (its ``shard`` column; all for None)."""
    if shard is None:
        return [np.arange(t.num_rows) for t in parts]
    return [np.flatnonzero(t.column("shard").to_numpy() == shard) for t in parts]


def column_of(parts: list, rows: list[np.ndarray], name: str) -> np.ndarray:
    """Column ``name`` of those rows, the parts one after the other."""
    cols = [t.column(name).to_numpy()[r] for t, r in zip(parts, rows)]
    return np.concatenate(cols) if cols else np.zeros(0, np.int64)


def write_shard(fs, prefix: str, layout: Layout, seq_length: int, pad_id: int, parts: list,
                shard: int | None = None, token_dtype: str = "int32", pairs: bool = False) -> dict:
    """Assigned samples (tables with columns ``ids``, ``out_pack``, ``pos``, ``shard`` and the
    provenance columns) -> shard ``shard``'s files and ``prefix.prov``; its meta. The parts may
    hold other shards' rows (``shard`` -1: not in this packing): only this shard's are read.
    ``pairs``: a preference-pair build (column ``chosen_n``: each unit is two samples)."""
    rows = shard_rows(parts, shard)
    out_pack, pos = column_of(parts, rows, "out_pack"), column_of(parts, rows, "pos")
    order = order_samples(out_pack, pos)
    prov = provenance_records(*(column_of(parts, rows, k)[order] for k in PROVENANCE_COLUMNS))
    with fs.open(prefix + ".prov", "wb") as f:
        f.write(prov.tobytes())
    gather = Gather.of(parts, rows, order)
    chosen = column_of(parts, rows, "chosen_n")[order] if pairs else None
    return write_ordered(fs, prefix, layout, seq_length, pad_id, gather, gather.length, out_pack[order], token_dtype,
                         chosen)

"""Write-shards stage: the samples of a range of output packs -> one shard of the layout's files.

Pure numpy + fsspec, no engine. Samples arrive with their output pack and position in the
pack (``raysft.pack``), in any order; ``write_shard`` sorts them into output order, writes
their provenance and hands the layout (``raysft.layouts``) slices of about ``SLICE_TOKENS``
stored tokens cut between packs, so a writer's memory is bounded by a slice, not a shard.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .indexed import Index
from .layouts import Layout, Placement

SLICE_TOKENS = 1 << 20  # a writer encodes this many stored pack tokens at a time

# provenance.bin: one record per sample, in output order
# (src: index in inputs.json, piece: part of a split record, row: record index or -1,
#  offset: byte offset of the JSON line or -1, pack: output pack = Megatron document)
PROVENANCE_DTYPE = np.dtype([("src", "<i4"), ("piece", "<i4"), ("row", "<i8"), ("offset", "<i8"), ("pack", "<i8")])


def provenance_records(src, piece, row, offset, pack) -> np.ndarray:
    out = np.empty(len(src), dtype=PROVENANCE_DTYPE)
    out["src"], out["piece"], out["row"], out["offset"], out["pack"] = src, piece, row, offset, pack
    return out


def read_provenance(fs, root: str) -> np.ndarray:
    with fs.open(f"{root}/provenance.bin", "rb") as f:
        return np.frombuffer(f.read(), dtype=PROVENANCE_DTYPE)


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


def write_ordered(fs, prefix: str, layout: Layout, seq_length: int, pad_id: int, flat: np.ndarray,
                  lengths: np.ndarray, packs: np.ndarray) -> dict:
    """Samples in output order (``flat`` signed tokens back to back) -> the shard; its meta."""
    lengths = np.asarray(lengths, np.int64)
    packs = np.asarray(packs, np.int64)
    writer = layout.writer(fs, prefix, seq_length, pad_id)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    cuts = slices(lengths, packs, layout.stored_per_pack(seq_length), SLICE_TOKENS)
    lossy: Counter = Counter()
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        if hi > lo:
            p = Placement(flat[bounds[lo] : bounds[hi]], lengths[lo:hi], packs[lo:hi])
            lossy.update(layout.unrepresentable(p))
            writer.write(p)
    return writer.close() | {"unrepresentable": dict(lossy)}


def write_shard(fs, prefix: str, layout: Layout, seq_length: int, pad_id: int, table) -> dict:
    """Assigned samples (columns ``ids``, ``out_pack``, ``pos`` and the provenance columns) of
    one shard -> its files and ``prefix.prov``; its meta."""
    import pyarrow as pa

    out_pack, pos = table.column("out_pack").to_numpy(), table.column("pos").to_numpy()
    order = order_samples(out_pack, pos)
    prov = provenance_records(*(table.column(k).to_numpy()[order] for k in ("src", "piece", "row", "offset", "out_pack")))
    with fs.open(prefix + ".prov", "wb") as f:
        f.write(prov.tobytes())
    # the samples' tokens in output order: one take of the list column (a copy per sample)
    ids = table.column("ids").take(pa.array(order)).combine_chunks()
    offsets = ids.offsets.to_numpy().astype(np.int64) if len(ids) else np.zeros(1, np.int64)
    lengths = offsets[1:] - offsets[:-1]
    values = ids.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return write_ordered(fs, prefix, layout, seq_length, pad_id, values, lengths, out_pack[order])


def shard_meta(prefix: str, index: Index) -> dict:
    """What the merge needs to know of a written MMIDIDX shard."""
    return {"prefix": prefix, "sequences": len(index.sequence_lengths), "documents": index.num_documents,
            "tokens": index.num_tokens, "bytes": index.num_tokens * index.dtype.itemsize}

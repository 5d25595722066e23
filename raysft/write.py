"""Write-shards stage: turn the samples of a range of packs into one .bin/.idx shard.

Pure numpy + fsspec. Input: each sample's signed token array (see ``tokenize``), its output
pack and its position in the pack. Two layouts, both Megatron MMIDIDX v1 int32:

``native``  one Megatron sequence per sample, one document per pack; no padding; a token
            without loss is stored as ``~id`` (``-id-1``).
``mindspeed`` three datasets per output, as MindSpeed-LLM's packed fine-tuning reads them:
            ``*_packed_input_ids_document`` (ids padded to seq_length with the pad id),
            ``*_packed_labels_document`` (unshifted labels: the id where the token carries loss,
            -100 elsewhere and on padding) and ``*_packed_attention_mask_document`` (segment
            ids 1, 2, 3... per sample, 0 on padding, as its neat-pack mode uses); each pack is
            one document of exactly one sequence of seq_length, int32.
``pai``     one sequence of ``2 * seq_length`` per pack, as Pai-Megatron-Patch's SFT trainer
            reads with sequence packing: input ids padded to seq_length with the pad id, then
            labels shifted by one (``label[i]`` is the target at position i, -100 where there is
            no loss or padding); the last token of each sample in the first half is stored as
            ``-1-id`` to mark sample boundaries.
"""

from __future__ import annotations

import numpy as np

from .indexed import Index, encode_index

LAYOUTS = ("native", "pai", "mindspeed")
# mindspeed writes three datasets side by side; the others one
MINDSPEED_PARTS = ("packed_input_ids_document", "packed_labels_document", "packed_attention_mask_document")


def layout_parts(layout: str) -> tuple[str, ...]:
    """Name suffixes of the datasets a layout writes ("" = the dataset itself)."""
    return tuple("_" + p for p in MINDSPEED_PARTS) if layout == "mindspeed" else ("",)

# provenance.bin: one record per sample, in output order (native: per sequence)
# (src: index in inputs.json, piece: part of a split record, row: record index or -1,
#  offset: byte offset of the JSON line or -1, pack: output pack = Megatron document)
PROVENANCE_DTYPE = np.dtype([("src", "<i4"), ("piece", "<i4"), ("row", "<i8"), ("offset", "<i8"), ("pack", "<i8")])


def provenance_records(src, piece, row, offset, pack) -> np.ndarray:
    out = np.empty(len(src), dtype=PROVENANCE_DTYPE)
    out["src"], out["piece"], out["row"], out["offset"], out["pack"] = src, piece, row, offset, pack
    return out
IGNORE = -100


def order_samples(out_pack: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return np.lexsort((np.asarray(pos), np.asarray(out_pack)))


def flatten(samples: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(s) for s in samples), dtype=np.int64, count=len(samples))
    flat = np.concatenate(samples).astype(np.int32, copy=False) if samples else np.zeros(0, np.int32)
    return flat, lengths


def encode_native(samples: list[np.ndarray], packs: np.ndarray) -> tuple[np.ndarray, Index]:
    """``samples`` and ``packs`` already in output order."""
    flat, lengths = flatten(samples)
    packs = np.asarray(packs)
    boundaries = np.nonzero(np.diff(packs))[0] + 1 if len(packs) else np.zeros(0, np.int64)
    docs = np.concatenate([[0], boundaries, [len(samples)]]).astype(np.int64) if len(samples) else np.zeros(1, np.int64)
    return flat, Index(np.dtype(np.int32), lengths.astype(np.int32), docs)


def _placement(samples: list[np.ndarray], packs: np.ndarray, seq_length: int):
    """Where every token of packed samples goes: (flat tokens, pack row per token, position in
    the pack per token, sample index per token, sample ends in flat, first sample of each pack
    mask, pack row per sample, number of packs). ``samples``/``packs`` are in output order."""
    flat, lengths = flatten(samples)
    packs = np.asarray(packs, dtype=np.int64)
    new_pack = np.concatenate([[True], packs[1:] != packs[:-1]]) if len(packs) else np.zeros(0, bool)
    row = np.cumsum(new_pack) - 1  # pack row of each sample, 0..P-1 in order of appearance
    P = int(row[-1]) + 1 if len(row) else 0
    ends = np.cumsum(lengths)
    pack_first = (ends - lengths)[new_pack]  # flat offset where each pack begins
    token_sample = np.repeat(np.arange(len(samples)), lengths)
    token_row = row[token_sample]
    token_pos = np.arange(len(flat), dtype=np.int64) - pack_first[token_row]
    if len(flat) and token_pos.max() >= seq_length:
        raise ValueError("a pack is longer than seq_length")
    return flat, token_row, token_pos, token_sample, ends, new_pack, row, P


def encode_pai(samples: list[np.ndarray], packs: np.ndarray, seq_length: int, pad_id: int) -> tuple[np.ndarray, Index]:
    S = seq_length
    flat, token_row, token_pos, _, ends, _, _, P = _placement(samples, packs, S)
    loss = flat >= 0
    ids = np.where(loss, flat, ~flat)
    labels = np.full(len(flat), IGNORE, dtype=np.int32)
    if len(flat) > 1:
        nxt_ok = loss[1:].copy()
        nxt_ok[ends[:-1] - 1] = False  # never predict across a sample boundary
        labels[:-1] = np.where(nxt_ok, ids[1:], IGNORE)
    marked = ids.copy()
    marked[ends - 1] = -1 - ids[ends - 1]
    out = np.empty((P, 2 * S), dtype=np.int32)
    out[:, :S] = pad_id
    out[:, S:] = IGNORE
    out[token_row, token_pos] = marked
    out[token_row, S + token_pos] = labels
    index = Index(np.dtype(np.int32), np.full(P, 2 * S, dtype=np.int32), np.arange(P + 1, dtype=np.int64))
    return out.reshape(-1), index


def encode_mindspeed(samples: list[np.ndarray], packs: np.ndarray, seq_length: int, pad_id: int) -> list[np.ndarray]:
    """[input ids, labels, segment ids], each (packs, seq_length) int32, flattened."""
    S = seq_length
    flat, token_row, token_pos, token_sample, _, new_pack, row, P = _placement(samples, packs, S)
    sample_no = np.arange(len(row)) - np.flatnonzero(new_pack)[row]  # 0-based index in its pack
    loss = flat >= 0
    ids = np.where(loss, flat, ~flat)
    out = [np.full((P, S), pad_id, np.int32), np.full((P, S), IGNORE, np.int32), np.zeros((P, S), np.int32)]
    out[0][token_row, token_pos] = ids
    out[1][token_row, token_pos] = np.where(loss, ids, IGNORE)
    out[2][token_row, token_pos] = sample_no[token_sample] + 1
    return [a.reshape(-1) for a in out]


def encode_ordered(
    samples: list[np.ndarray], packs: np.ndarray, layout: str, seq_length: int, pad_id: int
) -> list[tuple[np.ndarray, Index]]:
    """The shard's datasets (one per ``layout_parts(layout)``) as (tokens, index) pairs, for
    samples already in output order (see ``order_samples``)."""
    if layout == "native":
        return [encode_native(samples, packs)]
    if layout == "pai":
        return [encode_pai(samples, packs, seq_length, pad_id)]
    if layout == "mindspeed":
        arrays = encode_mindspeed(samples, packs, seq_length, pad_id)
        P = len(arrays[0]) // seq_length
        index = Index(np.dtype(np.int32), np.full(P, seq_length, np.int32), np.arange(P + 1, dtype=np.int64))
        return [(a, index) for a in arrays]
    raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def encode_shard(
    samples: list[np.ndarray], out_pack: np.ndarray, pos: np.ndarray, layout: str, seq_length: int, pad_id: int
) -> list[tuple[np.ndarray, Index]]:
    """``encode_ordered`` for samples in any order, placed by their (pack, position)."""
    order = order_samples(out_pack, pos)
    return encode_ordered([samples[i] for i in order], np.asarray(out_pack)[order], layout, seq_length, pad_id)


SLICE_TOKENS = 1 << 20  # a writer encodes this many pack tokens at a time


class ShardWriter:
    """Writes one shard's datasets (one per ``layout_parts``) a pack range at a time, so a
    writer's memory is bounded by a slice, not by the shard.

    ``write`` takes whole packs, samples in output order; ``close`` writes each ``.idx`` (after
    its ``.bin`` is complete) and returns what the merge needs to know."""

    def __init__(self, fs, prefix: str, layout: str, seq_length: int, pad_id: int):
        self.fs, self.prefix, self.layout = fs, prefix, layout
        self.seq_length, self.pad_id = seq_length, pad_id
        self.suffixes = layout_parts(layout)
        self.files = [fs.open(prefix + s + ".bin", "wb") for s in self.suffixes]
        self.indexes: list[list[Index]] = [[] for _ in self.suffixes]

    def write(self, samples: list[np.ndarray], packs: np.ndarray) -> None:
        for f, indexes, (tokens, index) in zip(
            self.files, self.indexes, encode_ordered(samples, packs, self.layout, self.seq_length, self.pad_id)
        ):
            f.write(memoryview(np.ascontiguousarray(tokens, dtype="<i4")).cast("B"))
            indexes.append(index)

    def write_all(self, samples: list[np.ndarray], packs: np.ndarray) -> None:
        """``write`` in slices of about ``SLICE_TOKENS`` stored tokens, cut between packs."""
        packs = np.asarray(packs)
        if not len(packs):
            return
        per_pack = {"pai": 2 * self.seq_length, "mindspeed": self.seq_length}.get(self.layout)
        sizes = np.fromiter((len(s) for s in samples), np.int64, len(samples))
        first = np.flatnonzero(np.concatenate([[True], packs[1:] != packs[:-1]]))  # first sample of each pack
        stored = np.full(len(first), per_pack) if per_pack else np.add.reduceat(sizes, first)
        cuts = [0]
        budget = 0
        for k, n in enumerate(stored.tolist()):
            if budget and budget + n > SLICE_TOKENS:
                cuts.append(int(first[k]))
                budget = 0
            budget += n
        cuts.append(len(samples))
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            self.write(samples[lo:hi], packs[lo:hi])

    def close(self) -> dict:
        from .merge import merge_indexes

        for f in self.files:
            f.close()
        metas = []
        for suffix, indexes in zip(self.suffixes, self.indexes):
            index = merge_indexes(indexes) if indexes else Index(np.dtype(np.int32), np.zeros(0, np.int32),
                                                               np.zeros(1, np.int64))
            with self.fs.open(self.prefix + suffix + ".idx", "wb") as f:
                f.write(encode_index(index))
            metas.append(shard_meta(self.prefix + suffix, index))
        return metas[0]


def shard_meta(prefix: str, index: Index) -> dict:
    """What the merge needs to know of a written shard."""
    return {"prefix": prefix, "sequences": len(index.sequence_lengths), "documents": index.num_documents,
            "tokens": index.num_tokens, "bytes": index.num_tokens * index.dtype.itemsize}

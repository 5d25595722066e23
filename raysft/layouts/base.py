"""What every output layout shares: the interface, where each token of a pack goes, and the
Megatron ``MMIDIDX`` plumbing the index-based layouts (native, pai, mindspeed) write with.

A layout receives the samples of a range of output packs *in output order*, as one flat
array of signed tokens (``~id`` where a token carries no loss, see ``raysft.tokenize``), the
length of each sample and the output pack of each sample. It encodes them into its own files
(``ShardWriter``), merges the shards of a build into one dataset (``merge``), decodes a pack
back into (token ids, loss mask) per sample for ``raysft.inspect`` and the tests
(``read_pack``), and says what it cannot represent (``unrepresentable``).

Pure numpy + fsspec, no engine.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np

from ..indexed import Index, IndexedReader, decode_index, encode_index, shard_meta
from ..merge import MergeError, copy_into, merge_index_files, merge_indexes

IGNORE = -100  # label of a position without loss, as every Megatron-family trainer reads it


@dataclass
class Placement:
    """Where each token of packed samples goes. ``flat``, ``lengths`` and ``packs`` are in
    output order (samples of one pack consecutive, in pack order)."""

    flat: np.ndarray  # int32 signed tokens of every sample, back to back
    lengths: np.ndarray  # int64 tokens per sample
    packs: np.ndarray  # int64 output pack of each sample

    def __post_init__(self):
        self.flat = np.asarray(self.flat, dtype=np.int32)
        self.lengths = np.asarray(self.lengths, dtype=np.int64)
        self.packs = np.asarray(self.packs, dtype=np.int64)
        n = len(self.packs)
        self.new_pack = np.concatenate([[True], self.packs[1:] != self.packs[:-1]]) if n else np.zeros(0, bool)
        self.row = np.cumsum(self.new_pack) - 1  # pack row of each sample, 0..P-1 in order of appearance
        self.num_packs = int(self.row[-1]) + 1 if n else 0
        self.ends = np.cumsum(self.lengths)
        self.starts = self.ends - self.lengths

    # per token (what the padded layouts scatter with): made on first use, as they cost
    # several int64 arrays of the slice's length

    @cached_property
    def token_sample(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.packs)), self.lengths)

    @cached_property
    def token_row(self) -> np.ndarray:
        return self.row[self.token_sample]

    @cached_property
    def token_pos(self) -> np.ndarray:
        pack_first = self.starts[self.new_pack]  # flat offset where each pack begins
        return np.arange(len(self.flat), dtype=np.int64) - pack_first[self.token_row]

    @cached_property
    def token_pos_in_sample(self) -> np.ndarray:
        return np.arange(len(self.flat), dtype=np.int64) - np.repeat(self.starts, self.lengths)

    @cached_property
    def sample_no(self) -> np.ndarray:
        """Position of each sample in its pack (0, 1, 2...)."""
        n = len(self.packs)
        return np.arange(n) - np.flatnonzero(self.new_pack)[self.row] if n else np.zeros(0, np.int64)

    def tokens_of(self, samples: np.ndarray) -> np.ndarray:
        """Flat token positions of the samples at ``samples``, one after the other."""
        lengths = self.lengths[samples]
        first = np.cumsum(lengths) - lengths
        return np.repeat(self.starts[samples] - first, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)

    def pair_sides(self) -> tuple[np.ndarray, np.ndarray]:
        """A pair build's samples where each pack holds one pair (chosen, then rejected): the
        chosen samples' numbers and the rejected ones'."""
        if len(self.lengths) % 2 or (self.num_packs and (self.sample_no.max() > 1
                                                         or (self.sample_no[1::2] != 1).any())):
            raise ValueError("a pairwise pack holds one pair: its chosen and its rejected sample")
        every = np.arange(len(self.lengths))
        return every[0::2], every[1::2]

    @property
    def loss(self) -> np.ndarray:
        return self.flat >= 0

    @property
    def ids(self) -> np.ndarray:
        return np.where(self.flat >= 0, self.flat, ~self.flat)

    def pack_fill(self) -> np.ndarray:
        """Tokens in each pack."""
        return np.add.reduceat(self.lengths, np.flatnonzero(self.new_pack)) if len(self.lengths) else self.lengths

    def check_capacity(self, capacity: int) -> None:
        if len(self.flat) and self.pack_fill().max() > capacity:
            raise ValueError(f"a pack holds more than {capacity} tokens")


class ShardWriter:
    """Writes one shard a slice of packs at a time; ``close`` returns what the merge needs."""

    def write(self, p: Placement) -> None:
        raise NotImplementedError

    def close(self) -> dict:
        raise NotImplementedError


class Layout:
    """One output layout: its files, what a pack may hold, how it is encoded, merged and read."""

    name: ClassVar[str]
    trainer: ClassVar[str]  # which trainer reads it (README, docs/output.md, --help)
    summary: ClassVar[str]  # one line for --help
    # the merged dataset's files under the output folder (a prefix may stand for several)
    parts: ClassVar[tuple[str, ...]] = ("",)
    # token ids a sample must not end with (``--overlong truncate/split`` cut elsewhere)
    avoid_end_ids: ClassVar[tuple[int, ...]] = ()
    # stored tokens of a sample beyond what the trainer attends over: Megatron-Bridge drops a
    # sample's last token from its inputs (``--pad-to-multiple`` aligns what is left)
    label_shift: ClassVar[int] = 0
    # the shards stay beside the merged dataset (data_order.txt lists them); False: the trainer
    # would read them as data (XTuner reads every .bin of the folder) or they repeat it whole
    keeps_shards: ClassVar[bool] = True
    # the merge's "samples" count is the samples written (checked against the plan); False where
    # it counts something else (one sequence per pack, one per pair)
    counts_samples: ClassVar[bool] = True
    # holds preference pairs (chosen and rejected side by side); a pair build with another
    # layout is refused with one line
    pairs: ClassVar[bool] = False
    # a pair build packs pairs (False: one pair per pack, as the trainer reads them unpacked)
    packs_pairs: ClassVar[bool] = True

    def capacity(self, seq_length: int) -> int:
        """Most tokens one pack may hold."""
        return seq_length

    def form(self, pairs: bool, packed: bool) -> Layout:
        """The layout as a build with these settings writes it: a preference-pair build's pair
        form (``for_pairs``); ``packed`` False is ``--no-pack`` (layouts whose rows differ
        unpacked say so)."""
        return self.for_pairs() if pairs else self

    def for_pairs(self) -> Layout:
        """This layout's form for a preference-pair build (each pair's chosen then rejected
        sample, side by side in one pack)."""
        if not self.pairs:
            raise ValueError(f"--layout {self.name} has no form for preference pairs")
        return self

    def pair_limits(self, seq_length: int) -> tuple[int, int]:
        """Most tokens of one preference pair: both sides together, and each side."""
        cap = self.capacity(seq_length)
        return cap, cap

    def stored_per_pack(self, seq_length: int) -> int | None:
        """Values stored per pack when packs are padded to a fixed size (None: unpadded)."""
        return None

    def writer(self, fs, prefix: str, seq_length: int, pad_id: int, token_dtype: str = "int32") -> ShardWriter:
        """``token_dtype``: what a plain-text (pretraining) build stores its ids as
        (``raysft.layouts.token_dtype``); the layouts that store loss or padding keep int32."""
        raise NotImplementedError

    def shard_files(self, prefix: str) -> list[str]:
        """The files a shard writer makes for ``prefix`` (the .idx-like one last)."""
        raise NotImplementedError

    def final_files(self) -> list[str]:
        """The merged dataset's files, relative to the output folder."""
        raise NotImplementedError

    def merge(self, fs, shard_prefixes: list[str], out_prefix: str, metas: list[dict]) -> dict:
        """Merge the shards (in order) into ``out_prefix``'s files; returns counts to check:
        ``packs``, ``samples``, ``tokens``."""
        raise NotImplementedError

    def data_order(self, shard_names: list[str]) -> list[str]:
        """Lines of data_order.txt: the files a trainer reads, in order, relative to the output."""
        return [f"{n}{s}.bin" for n in shard_names for s in self.parts]

    def read_pack(self, fs, root: str, stats: dict, pack: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(token ids, loss mask) of each sample of pack ``pack`` of a merged dataset."""
        raise NotImplementedError

    def num_packs(self, fs, root: str) -> int:
        raise NotImplementedError

    def unrepresentable(self, p: Placement) -> Counter:
        """What this layout cannot store exactly, counted by kind (warned about and recorded)."""
        return Counter()

    def extra_stats(self, stats: dict) -> dict:
        """Figures the trainer expects beside the dataset (written by ``write_extra``)."""
        return {}

    def write_extra(self, fs, root: str, stats: dict) -> list[str]:
        """Files the trainer expects beside the dataset; returns their names relative to root."""
        return []


# --------------------------------------------------------------------------- MMIDIDX layouts


class IndexedShardWriter(ShardWriter):
    """A shard of ``len(suffixes)`` Megatron datasets side by side; ``encode`` gives each
    one's (values, index) for a slice of packs."""

    def __init__(self, fs, prefix: str, suffixes: tuple[str, ...], encode, token_dtype: str = "int32"):
        self._merge_indexes = merge_indexes
        self.fs, self.prefix, self.suffixes, self.encode = fs, prefix, suffixes, encode
        self.dtype = np.dtype(token_dtype)
        self.files = [fs.open(prefix + s + ".bin", "wb") for s in suffixes]
        self.indexes: list[list[Index]] = [[] for _ in suffixes]

    def write(self, p: Placement) -> None:
        for f, indexes, (values, index) in zip(self.files, self.indexes, self.encode(p)):
            if self.dtype != np.int32:  # plain ids (every token of a text build trains): no sign to keep
                values = np.where(values < 0, ~values, values).astype(self.dtype.newbyteorder("<"))
                index = Index(self.dtype, index.sequence_lengths, index.document_indices)
            f.write(memoryview(np.ascontiguousarray(values, dtype=self.dtype.newbyteorder("<"))).cast("B"))
            indexes.append(index)

    def close(self) -> dict:
        for f in self.files:
            f.close()
        metas = []
        for suffix, indexes in zip(self.suffixes, self.indexes):
            index = self._merge_indexes(indexes) if indexes else Index(self.dtype, np.zeros(0, np.int32),
                                                                       np.zeros(1, np.int64))
            with self.fs.open(self.prefix + suffix + ".idx", "wb") as f:
                f.write(encode_index(index))
            metas.append(shard_meta(self.prefix + suffix, index))
        return metas[0]


class IndexedLayout(Layout):
    """Layouts stored as Megatron ``MMIDIDX`` datasets: ``data{part}.bin/.idx``."""

    def encode(self, p: Placement, seq_length: int, pad_id: int) -> list[tuple[np.ndarray, Index]]:
        raise NotImplementedError

    plain_ids: ClassVar[bool] = False  # may store a plain-text build's ids in Megatron's smallest dtype

    def writer(self, fs, prefix, seq_length, pad_id, token_dtype="int32"):
        return IndexedShardWriter(fs, prefix, self.parts, lambda p: self.encode(p, seq_length, pad_id),
                                  token_dtype if self.plain_ids else "int32")

    def shard_files(self, prefix):
        return [prefix + s + e for s in self.parts for e in (".bin", ".idx")]

    def final_files(self):
        return [f"data{s}.{e}" for s in self.parts for e in ("bin", "idx")]

    def merge(self, fs, shard_prefixes, out_prefix, metas):
        merged = None
        for suffix in self.parts:
            m = merge_index_files(fs, [p + suffix for p in shard_prefixes], out_prefix + suffix)
            merged = merged or m
        return {"packs": merged.num_documents, "samples": merged.sequences, "tokens": merged.num_tokens}

    def readers(self, fs, root: str) -> list[IndexedReader]:
        out = []
        for s in self.parts:
            with fs.open(f"{root}/data{s}.idx", "rb") as f:
                idx = f.read()
            out.append(IndexedReader(idx, fs.open(f"{root}/data{s}.bin", "rb"), f"data{s}"))
        return out

    def num_packs(self, fs, root):
        with fs.open(f"{root}/data{self.parts[0]}.idx", "rb") as f:
            return decode_index(f.read()).num_documents


def fixed_index(packs: int, size: int) -> Index:
    """The index of ``packs`` documents of one sequence of ``size`` values each."""
    return Index(np.dtype(np.int32), np.full(packs, size, dtype=np.int32), np.arange(packs + 1, dtype=np.int64))


__all__ = ["IGNORE", "Placement", "ShardWriter", "Layout", "IndexedLayout", "IndexedShardWriter", "fixed_index",
           "MergeError", "copy_into"]

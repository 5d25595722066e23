"""``--layout llamafactory``: a ``datasets`` ``save_to_disk`` folder in the columns LLaMA-Factory's
trainers read, for its ``tokenized_path`` (which loads a tokenized dataset and skips LLaMA-Factory's
own preprocessing on every node and run).

The output folder is the saved dataset: ``data-00000-of-00001.arrow`` (an Arrow IPC stream, as
``datasets`` writes), ``state.json`` and ``dataset_info.json`` (features inferred from the Arrow
schema, so any ``datasets`` release reads it); raysft's own files sit beside it. Rows, as
LLaMA-Factory's processors make them (labels *unshifted*: the id where the token trains, -100
elsewhere; the model shifts them):

* packed SFT (the default): one row per pack, ``input_ids``, ``attention_mask``, ``position_ids``,
  ``labels``, each ``seq_length + 1`` long as ``packing: true`` writes them (at least one padding
  token: pad id, label -100, position 0). ``attention_mask`` holds each sample's segment number
  (1, 2, ...; 0 on padding), the form of ``neat_packing: true``, whose collator turns it into a
  block-diagonal attention; position ids restart at each sample.
* unpacked SFT (``--no-pack``): one row per sample, ``input_ids``, ``attention_mask`` (ones),
  ``labels``, unpadded.
* every row also has ``images``, ``videos`` and ``audios``, null (the collators read them);
* preference pairs: one row per pair, ``chosen_``/``rejected_`` ``input_ids``, ``attention_mask``,
  ``labels``, unpadded, as its pairwise processor writes them for DPO and reward training (each
  side fits ``seq_length``, LLaMA-Factory's ``cutoff_len`` per side).

Train with ``tokenized_path: OUT`` (and ``neat_packing: true`` for a packed build).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from .base import IGNORE, Layout, Placement, ShardWriter

DATA = "data-00000-of-00001.arrow"
INFO_FILES = ("state.json", "dataset_info.json")
MEDIA = ("images", "videos", "audios")


def _lists(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.asarray(values, np.int32), pa.int32()))


def packed_rows(p: Placement, seq_length: int, pad_id: int) -> dict:
    """Packs as LLaMA-Factory's packed SFT rows (``seq_length + 1`` values each)."""
    width = seq_length + 1
    P = p.num_packs
    shape = (P, width)
    ids, labels = np.full(shape, pad_id, np.int32), np.full(shape, IGNORE, np.int32)
    segments, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    ids[p.token_row, p.token_pos] = p.ids
    labels[p.token_row, p.token_pos] = np.where(p.loss, p.ids, IGNORE)
    segments[p.token_row, p.token_pos] = p.sample_no[p.token_sample] + 1
    positions[p.token_row, p.token_pos] = p.token_pos_in_sample
    n = np.full(P, width, np.int64)
    return {"input_ids": _lists(ids.reshape(-1), n), "attention_mask": _lists(segments.reshape(-1), n),
            "position_ids": _lists(positions.reshape(-1), n), "labels": _lists(labels.reshape(-1), n)}


def sample_rows(p: Placement, take: np.ndarray | None = None, prefix: str = "") -> dict:
    """Samples (all, or those at ``take``) as unpadded rows: ids, ones, labels."""
    take = np.arange(len(p.lengths)) if take is None else take
    lengths = p.lengths[take]
    tokens = p.tokens_of(take)
    ids = p.ids[tokens]
    return {prefix + "input_ids": _lists(ids, lengths), prefix + "attention_mask": _lists(np.ones(len(ids)), lengths),
            prefix + "labels": _lists(np.where(p.loss[tokens], ids, IGNORE), lengths)}


class LlamaFactoryShardWriter(ShardWriter):
    """One Arrow IPC stream per shard, a record batch per slice of packs."""

    def __init__(self, fs, prefix: str, rows):
        self.fs, self.prefix, self.rows = fs, prefix, rows
        self.file = fs.open(prefix + ".arrow", "wb")
        self.stream = None
        self.packs = self.samples = self.tokens = 0

    def write(self, p: Placement) -> None:
        batch = pa.record_batch(self.rows(p))
        if self.stream is None:
            self.stream = pa.ipc.new_stream(self.file, batch.schema)
        self.stream.write_batch(batch)
        self.packs += p.num_packs
        self.samples += len(p.lengths)
        self.tokens += int(p.lengths.sum())

    def close(self) -> dict:
        if self.stream is not None:
            self.stream.close()
        self.file.close()
        return {"prefix": self.prefix, "documents": self.packs, "sequences": self.samples, "tokens": self.tokens}


class LlamaFactory(Layout):
    name = "llamafactory"
    trainer = "LLaMA-Factory (tokenized_path; neat_packing for packed SFT)"
    summary = "LLaMA-Factory: a datasets save_to_disk folder for tokenized_path (SFT packed or not, pairs)"
    keeps_shards = False  # the merged stream holds every row
    pairs = True
    packs_pairs = False  # its pairwise trainer reads one pair per row

    def __init__(self, packed: bool = True, pair_form: bool = False):
        self.packed, self.pair_form = packed, pair_form

    def form(self, pairs: bool, packed: bool) -> Layout:
        return LlamaFactory(packed, pairs)

    def pair_limits(self, seq_length):
        return 2 * seq_length, seq_length

    def stored_per_pack(self, seq_length):
        return 4 * (seq_length + 1) if self.packed and not self.pair_form else None

    def rows(self, p: Placement, seq_length: int, pad_id: int) -> dict:
        rows = self._text_rows(p, seq_length, pad_id)
        n = len(next(iter(rows.values())))
        return rows | {k: pa.nulls(n) for k in MEDIA}  # no media: the collators read these keys

    def _text_rows(self, p: Placement, seq_length: int, pad_id: int) -> dict:
        if self.pair_form:
            chosen, rejected = p.pair_sides()
            return sample_rows(p, chosen, "chosen_") | sample_rows(p, rejected, "rejected_")
        if self.packed:
            p.check_capacity(seq_length)
            return packed_rows(p, seq_length, pad_id)
        return sample_rows(p)

    def writer(self, fs, prefix, seq_length, pad_id, token_dtype="int32"):
        return LlamaFactoryShardWriter(fs, prefix, lambda p: self.rows(p, seq_length, pad_id))

    def shard_files(self, prefix):
        return [prefix + ".arrow"]

    def final_files(self):
        return [DATA, *INFO_FILES]

    def merge(self, fs, shard_prefixes, out_prefix, metas):
        """The shards' record batches, in order, into one stream; the dataset's state and info."""
        root = out_prefix.rsplit("/", 1)[0]
        rows, writer = 0, None
        with fs.open(f"{root}/{DATA}", "wb") as out:
            for prefix in shard_prefixes:
                if not fs.size(prefix + ".arrow"):
                    continue  # a shard with no rows
                with fs.open(prefix + ".arrow", "rb") as f:  # a batch at a time
                    reader = pa.ipc.open_stream(f)
                    if writer is None:
                        writer = pa.ipc.new_stream(out, reader.schema)
                    for batch in reader:
                        writer.write_batch(batch)
                        rows += batch.num_rows
            if writer is not None:
                writer.close()
        import hashlib

        digest = hashlib.blake2b(json.dumps([m.get("prefix", "") for m in metas] + [rows]).encode(),
                                 digest_size=8).hexdigest()
        state = {"_data_files": [{"filename": DATA}], "_fingerprint": digest, "_format_columns": None,
                 "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
        info = {"builder_name": None, "citation": "", "config_name": None, "dataset_name": None,
                "description": "raysft build (see stats.json)", "homepage": "", "license": ""}
        for name, obj in (("state.json", state), ("dataset_info.json", info)):
            with fs.open(f"{root}/{name}", "w") as f:
                json.dump(obj, f, indent=2)
        return {"packs": rows, "samples": sum(m["sequences"] for m in metas),
                "tokens": sum(m["tokens"] for m in metas)}

    def data_order(self, shard_names):
        return [DATA]

    def _row(self, fs, root: str, i: int) -> dict:
        with fs.open(f"{root}/{DATA}", "rb") as f:
            for batch in pa.ipc.open_stream(f):
                if i < batch.num_rows:
                    return {k: np.asarray(v, np.int64) for k, v in batch.slice(i, 1).to_pylist()[0].items()}
                i -= batch.num_rows
        raise IndexError("row out of range")

    def read_pack(self, fs, root, stats, pack):
        row = self._row(fs, root, pack)
        if self.pair_form:
            return [(row[f"{s}_input_ids"], row[f"{s}_labels"] != IGNORE) for s in ("chosen", "rejected")]
        if not self.packed:
            return [(row["input_ids"], row["labels"] != IGNORE)]
        seg = row["attention_mask"]
        return [(row["input_ids"][seg == k], row["labels"][seg == k] != IGNORE) for k in range(1, int(seg.max()) + 1)]

    def num_packs(self, fs, root):
        with fs.open(f"{root}/{DATA}", "rb") as f:
            return sum(batch.num_rows for batch in pa.ipc.open_stream(f))

"""``--layout bridge``: the packed SFT format of Megatron-Bridge (and NeMo 2), the one NVIDIA's
fine-tuning recipes read with ``packed_sequence_specs``.

One row per pack in ``data.idx.parquet`` (``GPTSFTPackedParquetDataset``): ``input_ids``
(list<int32>: the pack's samples back to back, no padding), ``loss_mask`` (list<int8>,
rolled by one inside each sample: ``loss_mask[i]`` says whether the target of position ``i``,
token ``i + 1`` of the same sample, carries loss; 0 on each sample's last position) and
``seq_start_id`` (list<int32>: where each sample starts in the pack). Bridge's collate drops
each sample's last token as input and its first as label, so no target crosses samples.
``data.metadata.json`` is the packing metadata Bridge reads (``pack_metadata_file_path``):
a list of one dict with ``dataset_max_seqlen``, ``max_samples_per_bin``, ``packing_factor``,
``packing_efficiency`` (percent), ``pack_size`` and ``min_packed_seqlen``.

``--layout bridge-npy`` writes the same rows as ``data.npy`` (``numpy.save`` of an object array
of dicts), the format older Megatron-Bridge and NeMo releases read (``GPTSFTPackedDataset``);
it is built in memory at the merge, so keep it for datasets that fit."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from .base import Layout, Placement, ShardWriter

SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8())),
                    ("seq_start_id", pa.list_(pa.int32()))])
ROW_GROUP = 500  # packs per row group, as Bridge writes them


def pack_table(p: Placement) -> pa.Table:
    """The Bridge rows of the packs in ``p``."""
    ids = p.ids.astype(np.int32)
    rolled = np.zeros(len(ids), np.int8)
    if len(ids) > 1:
        rolled[:-1] = p.loss[1:]
    if len(p.ends):
        rolled[p.ends - 1] = 0  # a sample's last position has no target inside the sample
    pack_first = np.flatnonzero(p.new_pack)
    token_offsets = np.concatenate([p.starts[pack_first], [len(ids)]]).astype(np.int32)
    sample_offsets = np.concatenate([pack_first, [len(p.lengths)]]).astype(np.int32)
    starts_in_pack = (p.starts - p.starts[pack_first][p.row]).astype(np.int32)
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(pa.array(token_offsets), pa.array(ids)),
        "loss_mask": pa.ListArray.from_arrays(pa.array(token_offsets), pa.array(rolled)),
        "seq_start_id": pa.ListArray.from_arrays(pa.array(sample_offsets), pa.array(starts_in_pack)),
    }, schema=SCHEMA)


class BridgeShardWriter(ShardWriter):
    def __init__(self, fs, path):
        self.fs, self.path = fs, path
        self.file = fs.open(path, "wb")
        import pyarrow.parquet as pq  # on use: the other layouts do not load parquet
        self.writer = pq.ParquetWriter(self.file, SCHEMA)
        self.packs = self.samples = self.tokens = 0

    def write(self, p: Placement) -> None:
        t = pack_table(p)
        self.writer.write_table(t, row_group_size=ROW_GROUP)
        self.packs += t.num_rows
        self.samples += len(p.lengths)
        self.tokens += len(p.flat)

    def close(self) -> dict:
        self.writer.close()
        self.file.close()
        return {"prefix": self.path, "sequences": self.samples, "documents": self.packs, "tokens": self.tokens,
                "bytes": 0}


def _tables(fs, paths: list[str]):
    for path in paths:
        with fs.open(path, "rb") as f:
            import pyarrow.parquet as pq
            pf = pq.ParquetFile(f)
            for g in range(pf.metadata.num_row_groups):
                yield pf.read_row_group(g)


def packing_metadata(stats: dict) -> dict:
    """Bridge's packing metadata, from a build's statistics, by Bridge's own rule
    (``packing_utils.create_packing_strategy``): a sample counts ``len - 1`` (its last token is
    no input, its first no label), so ``dataset_max_seqlen`` is the longest sample less one,
    ``min_packed_seqlen`` the least-filled pack's tokens less its samples, and
    ``packing_efficiency`` those counts over the packs' capacity. With ``pad_cu_seqlens`` Bridge
    takes ``max(dataset_max_seqlen, pack_size - min_packed_seqlen)`` as every batch's
    ``max_seqlen``: it is at least every real segment only with these counts."""
    packs, S = stats["packs"], stats["seq_length"]
    samples = stats["samples_written"]
    return {
        "dataset_max_seqlen": max(0, int(stats["max_sample_length"]) - 1),
        "max_samples_per_bin": int(stats["max_samples_per_pack"]),
        "packing_factor": round(samples / packs, 2) if packs else 0.0,
        "packing_efficiency": round((stats["tokens"] - samples) / packs / S * 100, 2) if packs else 0.0,
        "pack_size": S,
        "min_packed_seqlen": int(stats["min_pack_targets"]),
    }


class Bridge(Layout):
    name = "bridge"
    label_shift = 1
    trainer = "Megatron-Bridge / NeMo 2 packed SFT (GPTSFTPackedParquetDataset)"
    summary = "Megatron-Bridge: data.idx.parquet (input_ids, rolled loss_mask, seq_start_id) + metadata"

    def writer(self, fs, prefix, seq_length, pad_id, token_dtype="int32"):
        return BridgeShardWriter(fs, prefix + ".idx.parquet")

    def shard_files(self, prefix):
        return [prefix + ".idx.parquet"]

    def final_files(self):
        return ["data.idx.parquet"]

    def merge(self, fs, shard_prefixes, out_prefix, metas):
        packs = samples = tokens = 0
        import pyarrow.parquet as pq
        with fs.open(out_prefix + ".idx.parquet", "wb") as f, pq.ParquetWriter(f, SCHEMA) as w:
            for t in _tables(fs, [p + ".idx.parquet" for p in shard_prefixes]):
                w.write_table(t, row_group_size=ROW_GROUP)
                packs += t.num_rows
                samples += sum(len(s) for s in t.column("seq_start_id").to_pylist())
                tokens += len(t.column("input_ids").combine_chunks().values)
        return {"packs": packs, "samples": samples, "tokens": tokens}

    def data_order(self, shard_names):
        return [f"{n}.idx.parquet" for n in shard_names]

    def rows(self, fs, root: str):
        for t in _tables(fs, [f"{root}/{self.final_files()[0]}"]):
            yield from t.to_pylist()

    def read_pack(self, fs, root, stats, pack):
        row = None
        seen = 0
        for t in _tables(fs, [f"{root}/data.idx.parquet"]):
            if pack < seen + t.num_rows:
                row = t.slice(pack - seen, 1).to_pylist()[0]
                break
            seen += t.num_rows
        return self._samples(row)

    @staticmethod
    def _samples(row: dict) -> list[tuple[np.ndarray, np.ndarray]]:
        ids = np.asarray(row["input_ids"], np.int64)
        rolled = np.asarray(row["loss_mask"], bool)
        bounds = list(row["seq_start_id"]) + [len(ids)]
        out = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            loss = np.zeros(b - a, bool)
            loss[1:] = rolled[a : b - 1]
            out.append((ids[a:b], loss))
        return out

    def num_packs(self, fs, root):
        with fs.open(f"{root}/data.idx.parquet", "rb") as f:
            import pyarrow.parquet as pq
            return pq.ParquetFile(f).metadata.num_rows

    def extra_stats(self, stats):
        return {"bridge_metadata": packing_metadata(stats)}

    def write_extra(self, fs, root, stats):
        with fs.open(f"{root}/data.metadata.json", "w") as f:
            json.dump([packing_metadata(stats)], f, indent=2)
        return ["data.metadata.json"]


class BridgeNpy(Bridge):
    name = "bridge-npy"
    trainer = "older Megatron-Bridge / NeMo packed SFT (GPTSFTPackedDataset, .npy)"
    summary = "Megatron-Bridge/NeMo legacy: data.npy of pack dicts (built in memory at the merge) + metadata"

    def final_files(self):
        return ["data.npy"]

    def merge(self, fs, shard_prefixes, out_prefix, metas):
        rows = []
        for t in _tables(fs, [p + ".idx.parquet" for p in shard_prefixes]):
            rows += t.to_pylist()
        with fs.open(out_prefix + ".npy", "wb") as f:
            np.save(f, np.array(rows, dtype=object), allow_pickle=True)
        return {"packs": len(rows), "samples": sum(len(r["seq_start_id"]) for r in rows),
                "tokens": sum(len(r["input_ids"]) for r in rows)}

    def read_pack(self, fs, root, stats, pack):
        with fs.open(f"{root}/data.npy", "rb") as f:
            rows = np.load(f, allow_pickle=True)
        return self._samples(rows[pack])

    def num_packs(self, fs, root):
        with fs.open(f"{root}/data.npy", "rb") as f:
            return len(np.load(f, allow_pickle=True))

"""``--layout xtuner``: what XTuner's ``load_intern_repo_tokenized_dataset`` reads.

``data.bin`` holds one JSON line per sample, ``{"tokens": [...]}``: the sample's ids, a token
without loss stored as ``-id``; labels are not shifted (XTuner shifts them in the model).
``data.bin.meta`` beside it is ``numpy.save`` of an int64 array (samples, 2): the byte offset
of each line and its token count. ``data_order.txt`` names ``data.bin``; XTuner packs the
samples itself (``PackedDataset``), so raysft's packs only decide the order of the lines.

XTuner reads a line as ``labels = [x if x > 0 else -100]`` and ``input_ids = [abs(x)]``: the
sign cannot mark token id 0, which is always read as carrying no loss. A loss-bearing id 0 is
counted and warned about (``unrepresentable``). The shards are dropped after the merge:
XTuner without ``data_order_path`` reads every ``.bin`` under the folder, and would read the
shards' samples a second time."""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..merge import copy_into
from ..provenance import read_provenance
from .base import Layout, Placement, ShardWriter

try:  # C JSON writer: ~10x the speed of json.dumps on token lists
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency
    orjson = None


def sample_lines(p: Placement) -> tuple[list[bytes], np.ndarray]:
    """One ``{"tokens": [...]}`` line per sample (with its newline), and their lengths in bytes."""
    values = np.where(p.flat >= 0, p.flat, -p.ids).astype(np.int64)
    pieces = np.split(values, p.ends[:-1]) if len(p.lengths) else []
    if orjson is not None:
        lines = [b'{"tokens":' + orjson.dumps(a, option=orjson.OPT_SERIALIZE_NUMPY) + b"}\n" for a in pieces]
    else:
        import json

        lines = [(json.dumps({"tokens": a.tolist()}, separators=(",", ":")) + "\n").encode() for a in pieces]
    return lines, np.fromiter(map(len, lines), np.int64, len(lines))


class XTunerShardWriter(ShardWriter):
    def __init__(self, fs, prefix):
        self.fs, self.prefix = fs, prefix
        self.file = fs.open(prefix + ".bin", "wb")
        self.offset = 0
        self.meta: list[np.ndarray] = []
        self.tokens = 0
        self.packs = 0

    def write(self, p: Placement) -> None:
        lines, sizes = sample_lines(p)
        self.file.write(b"".join(lines))
        starts = self.offset + np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else sizes
        self.meta.append(np.stack([starts, p.lengths], axis=1).astype(np.int64))
        self.offset += int(sizes.sum())
        self.tokens += int(p.lengths.sum())
        self.packs += p.num_packs

    def close(self) -> dict:
        self.file.close()
        meta = np.concatenate(self.meta) if self.meta else np.zeros((0, 2), np.int64)
        with self.fs.open(self.prefix + ".bin.meta", "wb") as f:
            np.save(f, meta)
        return {"prefix": self.prefix, "sequences": len(meta), "documents": self.packs, "tokens": self.tokens,
                "bytes": self.offset}


def _load_meta(fs, path: str) -> np.ndarray:
    with fs.open(path, "rb") as f:
        return np.load(f)


class XTuner(Layout):
    name = "xtuner"
    trainer = "XTuner (load_intern_repo_tokenized_dataset)"
    summary = "XTuner: JSON Lines {\"tokens\": [...]} per sample (-id: no loss) + .bin.meta"
    keeps_shards = False

    def writer(self, fs, prefix, seq_length, pad_id, token_dtype="int32"):
        return XTunerShardWriter(fs, prefix)

    def shard_files(self, prefix):
        return [prefix + ".bin", prefix + ".bin.meta"]

    def final_files(self):
        return ["data.bin", "data.bin.meta"]

    def merge(self, fs, shard_prefixes, out_prefix, metas):
        sizes = copy_into(fs, [p + ".bin" for p in shard_prefixes], out_prefix + ".bin")
        parts, base = [], 0
        for p, size in zip(shard_prefixes, sizes):
            m = _load_meta(fs, p + ".bin.meta").copy()
            if len(m) and (m[-1, 0] >= size or m[0, 0] != 0):
                raise ValueError(f"{p}.bin.meta does not match {p}.bin")
            m[:, 0] += base
            parts.append(m)
            base += size
        meta = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
        with fs.open(out_prefix + ".bin.meta", "wb") as f:
            np.save(f, meta)
        return {"packs": sum(m["documents"] for m in metas), "samples": len(meta), "tokens": int(meta[:, 1].sum())}

    def data_order(self, shard_names):
        return ["data.bin"]

    def unrepresentable(self, p):
        n = int(((p.flat == 0)).sum())  # id 0 with loss (stored 0, read as no loss)
        return Counter({"token id 0 with loss (XTuner reads 0 as carrying no loss)": n} if n else {})

    def _lines(self, fs, root: str, rows: np.ndarray) -> list[np.ndarray]:
        import json

        meta = _load_meta(fs, f"{root}/data.bin.meta")
        out = []
        with fs.open(f"{root}/data.bin", "rb") as f:
            for i in rows.tolist():
                f.seek(int(meta[i, 0]))
                out.append(np.asarray(json.loads(f.readline())["tokens"], dtype=np.int64))
        return out

    def read_pack(self, fs, root, stats, pack):
        prov = read_provenance(fs, root)
        rows = np.flatnonzero(prov["pack"] == pack)
        return [(np.abs(t), t > 0) for t in self._lines(fs, root, rows)]

    def num_packs(self, fs, root):
        import json

        with fs.open(f"{root}/stats.json", "r") as f:
            return int(json.load(f)["packs"])

"""``provenance.bin``: where each written sample came from, one fixed-size record per sample
in output order (written by the shard writers, concatenated by the merge, read by
``raysft.inspect`` and the layouts that need a sample's source).

Fields: ``src`` (index in ``inputs.json``), ``piece`` (part of a record split by ``--overlong
split``), ``row`` (record index, or -1), ``offset`` (byte offset of its JSON line, or -1),
``pack`` (the output pack: a Megatron document).
"""

from __future__ import annotations

import numpy as np

PROVENANCE_DTYPE = np.dtype([("src", "<i4"), ("piece", "<i4"), ("row", "<i8"), ("offset", "<i8"), ("pack", "<i8")])


def provenance_records(src, piece, row, offset, pack) -> np.ndarray:
    out = np.empty(len(src), dtype=PROVENANCE_DTYPE)
    out["src"], out["piece"], out["row"], out["offset"], out["pack"] = src, piece, row, offset, pack
    return out


def read_provenance(fs, root: str) -> np.ndarray:
    with fs.open(f"{root}/provenance.bin", "rb") as f:
        return np.frombuffer(f.read(), dtype=PROVENANCE_DTYPE)

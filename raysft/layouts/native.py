"""``--layout native``: one Megatron sequence per sample, one document per pack, no padding; a
token without loss is stored as its bitwise complement (``~id``), so one int32 file holds
tokens and loss mask. ``raysft.reader`` is its reference consumer (shifted labels, position
ids and ``cu_seqlens`` per pack)."""

from __future__ import annotations

import numpy as np

from ..indexed import Index
from .base import IndexedLayout, Placement


class Native(IndexedLayout):
    name = "native"
    trainer = "Megatron-LM / NeMo-style loaders through raysft.reader (cu_seqlens, position ids per sample)"
    summary = "one sequence per sample, one document per pack, loss in the sign bit (default)"
    plain_ids = True  # a plain-text build: Megatron's preprocess_data.py files, byte for byte (--no-pack)
    # preference pairs: packed by pair, each pair's chosen and rejected samples adjacent (chosen
    # first); raysft.reader gives each segment's pair and side
    pairs = True

    def encode(self, p: Placement, seq_length: int, pad_id: int) -> list[tuple[np.ndarray, Index]]:
        p.check_capacity(seq_length)
        n = len(p.lengths)
        docs = np.concatenate([np.flatnonzero(p.new_pack), [n]]).astype(np.int64) if n else np.zeros(1, np.int64)
        return [(p.flat, Index(np.dtype(np.int32), p.lengths.astype(np.int32), docs))]

    def read_pack(self, fs, root, stats, pack):
        [r] = self.readers(fs, root)
        docs = r.index.document_indices
        out = []
        for i in range(int(docs[pack]), int(docs[pack + 1])):
            signed = r[i]
            out.append((np.where(signed < 0, ~signed, signed), signed >= 0))
        return out

"""``--layout pai``: what Pai-Megatron-Patch's SFT trainer reads with sequence packing
(``--dataset MMAP --train-mode finetune --reset-position-ids``).

One sequence of ``2 * seq_length`` per pack: input ids padded to ``seq_length`` with the pad
id, then labels shifted by one (``label[i]`` is the target of position ``i``; -100 where there
is no loss, across a sample boundary and on padding). The last token of each sample is stored
as ``-1 - id``: Pai finds sample ends by sign and restarts position ids after each.

A pack never fills its last position. Pai builds ``cu_seqlens`` from the positions where the
position ids restart at 0 and takes ``max()`` of the segment lengths between them: a pack of
one sample that fills all ``seq_length`` positions has a single start and no segment, and
``max()`` of the empty tensor fails (``RuntimeError: max(): Expected reduction dim``). With
the last position always padding, every pack ends in a pad segment after its last sample
(Pai's ``has_pad`` then holds too). So packs hold at most ``seq_length - 1`` tokens.

Megatron's ``GPTDataset``, through which Pai reads the file, maps the value -1 (its pad
fallback when the tokenizer names no pad id) to 0: a sample that ends in token id 0 would be
stored as -1 and lose its end mark: ``--overlong truncate/split`` never cut a sample right after
token id 0, and a sample that ends in it by itself is counted and warned about
(``unrepresentable``)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..indexed import Index
from .base import IGNORE, IndexedLayout, Placement, fixed_index


class Pai(IndexedLayout):
    name = "pai"
    counts_samples = False  # its merge counts sequences: one per pack
    trainer = "Pai-Megatron-Patch SFT with sequence packing"
    summary = "Pai-Megatron-Patch: [input ids | shifted labels] per pack, sample ends as -1-id"

    avoid_end_ids = (0,)

    def capacity(self, seq_length):
        return seq_length - 1

    def stored_per_pack(self, seq_length):
        return 2 * seq_length

    def encode(self, p: Placement, seq_length: int, pad_id: int) -> list[tuple[np.ndarray, Index]]:
        S = seq_length
        p.check_capacity(self.capacity(S))
        loss, ids = p.loss, p.ids
        labels = np.full(len(ids), IGNORE, dtype=np.int32)
        if len(ids) > 1:
            nxt_ok = loss[1:].copy()
            nxt_ok[p.ends[:-1] - 1] = False  # never predict across a sample boundary
            labels[:-1] = np.where(nxt_ok, ids[1:], IGNORE)
        marked = ids.copy()
        marked[p.ends - 1] = -1 - ids[p.ends - 1]
        out = np.empty((p.num_packs, 2 * S), dtype=np.int32)
        out[:, :S] = pad_id
        out[:, S:] = IGNORE
        out[p.token_row, p.token_pos] = marked
        out[p.token_row, S + p.token_pos] = labels
        return [(out.reshape(-1), fixed_index(p.num_packs, 2 * S))]

    def unrepresentable(self, p):
        ends = p.ids[p.ends - 1] if len(p.lengths) else np.zeros(0, np.int32)
        n = int((ends == 0).sum())
        return Counter({"sample ends in token id 0 (stored as -1, which Megatron's GPTDataset reads as pad)": n}
                       if n else {})

    def read_pack(self, fs, root, stats, pack):
        S = stats["seq_length"]
        [r] = self.readers(fs, root)
        seq = r[pack]
        inputs, labels = seq[:S], seq[S:]
        out, start = [], 0
        for end in np.nonzero(inputs < 0)[0]:
            ids = inputs[start : end + 1].copy()
            ids[-1] = -1 - ids[-1]
            loss = np.zeros(len(ids), dtype=bool)
            loss[1:] = labels[start:end] != IGNORE  # label i targets token i+1
            out.append((ids, loss))
            start = end + 1
        return out

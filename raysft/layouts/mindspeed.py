"""``--layout mindspeed``: the three datasets MindSpeed-LLM's packed fine-tuning reads,
``data_packed_{input_ids,labels,attention_mask}_document`` (pass ``--data-path OUT/data``).

Each pack is one document of one sequence of exactly ``seq_length`` int32 values: input ids
padded with the pad id; labels *unshifted* (the id where the token carries loss, -100
elsewhere and on padding); per-sample segment ids ``1, 2, 3, ...`` (0 on padding), from
which ``--neat-pack`` derives position ids and the attention segments.

MindSpeed shifts labels inside the model over the whole packed sequence
(``--is-instruction-dataset``): the label of a sample's first token is what the previous
sample's last token is trained to predict. Every sample's first token is therefore stored
without loss (raysft never puts loss on a sample's first token, see ``raysft.tokenize``;
this layout enforces it again). Train with ``--reset-attention-mask --reset-position-ids
--neat-pack --is-instruction-dataset``: without ``--neat-pack`` MindSpeed cuts segments at
every EOS token instead, which splits multi-turn samples at each turn."""

from __future__ import annotations

import numpy as np

from ..indexed import Index
from .base import IGNORE, IndexedLayout, Placement, fixed_index

PARTS = ("packed_input_ids_document", "packed_labels_document", "packed_attention_mask_document")


class MindSpeed(IndexedLayout):
    name = "mindspeed"
    trainer = "MindSpeed-LLM packed fine-tuning"
    summary = "MindSpeed-LLM: input ids, unshifted labels and segment ids per pack (neat pack)"
    parts = tuple("_" + p for p in PARTS)

    def stored_per_pack(self, seq_length):
        return 3 * seq_length

    def encode(self, p: Placement, seq_length: int, pad_id: int) -> list[tuple[np.ndarray, Index]]:
        S = seq_length
        p.check_capacity(S)
        loss, ids = p.loss.copy(), p.ids
        loss[p.starts] = False  # no label on a sample's first token: it would be a cross-sample target
        P = p.num_packs
        out = [np.full((P, S), pad_id, np.int32), np.full((P, S), IGNORE, np.int32), np.zeros((P, S), np.int32)]
        out[0][p.token_row, p.token_pos] = ids
        out[1][p.token_row, p.token_pos] = np.where(loss, ids, IGNORE)
        out[2][p.token_row, p.token_pos] = p.sample_no[p.token_sample] + 1
        index = fixed_index(P, S)
        return [(a.reshape(-1), index) for a in out]

    def read_pack(self, fs, root, stats, pack):
        ids, labels, segments = (r[pack] for r in self.readers(fs, root))
        return [(ids[segments == k], labels[segments == k] != IGNORE) for k in range(1, int(segments.max()) + 1)]

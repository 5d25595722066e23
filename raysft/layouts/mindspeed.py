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

from collections import Counter

import numpy as np

from ..indexed import Index
from .base import IGNORE, IndexedLayout, Placement, fixed_index

PARTS = ("packed_input_ids_document", "packed_labels_document", "packed_attention_mask_document")


class MindSpeed(IndexedLayout):
    name = "mindspeed"
    counts_samples = False  # its merge counts sequences: one per pack
    trainer = "MindSpeed-LLM packed fine-tuning"
    summary = "MindSpeed-LLM: input ids, unshifted labels and segment ids per pack (neat pack)"
    parts = tuple("_" + p for p in PARTS)

    pairs = True

    def for_pairs(self):
        return MindSpeedPairs()

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


PAIR_PARTS = ("packed_chosen_input_ids_document", "packed_chosen_labels_document",
              "packed_rejected_input_ids_document", "packed_rejected_labels_document")


class MindSpeedPairs(IndexedLayout):
    """A preference-pair build in MindSpeed-LLM's pairwise form (what its
    ``AlpacaStylePairwiseHandler`` writes, read with ``--is-pairwise-dataset``):
    ``data_packed_{chosen,rejected}_{input_ids,labels}_document``, one pair per document, one
    sequence each, unpadded; labels *unshifted* (the id where the token trains, -100 on the
    prompt).

    MindSpeed recomputes a pair's labels when it reads it (``_cut_pairwise_token``): the prompt
    is the chosen side's tokens before its first label, and every token after it, on both
    sides, is trained. The labels written are exactly those; where raysft's own mask differs
    (a token after the first trained one that the template marks as untrained, such as the
    newline after a closing marker; a rejected side whose prompt tokenizes to another length)
    the difference is counted in ``unrepresentable``. Each side fits ``seq_length`` (so
    MindSpeed cuts nothing), both together up to twice it."""

    name = "mindspeed"
    counts_samples = False  # its merge counts sequences: one per pack (pair)
    trainer = "MindSpeed-LLM DPO / reward model training (--is-pairwise-dataset)"
    summary = "MindSpeed-LLM pairwise: chosen and rejected input ids and labels, one pair per item"
    parts = tuple("_" + p for p in PAIR_PARTS)
    pairs = True
    packs_pairs = False

    def pair_limits(self, seq_length):
        return 2 * seq_length, seq_length

    @staticmethod
    def _trained(p: Placement, chosen: np.ndarray) -> np.ndarray:
        """Per token: whether MindSpeed trains it (after the pair's prompt, as its chosen side
        gives it)."""
        loss = p.loss
        prompt = np.zeros(len(p.lengths), np.int64)
        for k in chosen.tolist():
            hit = np.flatnonzero(loss[p.starts[k] : p.ends[k]])
            prompt[k] = prompt[k + 1] = hit[0] if len(hit) else p.lengths[k]
        return p.token_pos_in_sample >= np.repeat(prompt, p.lengths)

    def encode(self, p: Placement, seq_length: int, pad_id: int) -> list[tuple[np.ndarray, Index]]:
        chosen, rejected = p.pair_sides()
        ids = p.ids
        labels = np.where(self._trained(p, chosen), ids, IGNORE).astype(np.int32)
        out = []
        for side in (chosen, rejected):
            take = p.tokens_of(side)
            index = Index(np.dtype(np.int32), p.lengths[side].astype(np.int32), np.arange(len(side) + 1, dtype=np.int64))
            out += [(ids[take].astype(np.int32), index), (labels[take], index)]
        return out

    def unrepresentable(self, p: Placement) -> Counter:
        chosen, _ = p.pair_sides()
        differ = int((self._trained(p, chosen) != p.loss).sum())
        return Counter({"a token's loss as raysft's mask has it (MindSpeed trains every token after a pair's "
                        "prompt)": differ} if differ else {})

    def read_pack(self, fs, root, stats, pack):
        c_ids, c_labels, r_ids, r_labels = (r[pack] for r in self.readers(fs, root))
        return [(c_ids, c_labels != IGNORE), (r_ids, r_labels != IGNORE)]

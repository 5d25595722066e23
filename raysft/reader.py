"""The reference consumer of ``--layout native``: per pack, what a packed-sequence trainer needs.

Stock Megatron's ``GPTDataset`` cuts fixed windows across documents and cannot read a packed
SFT dataset; this reader can, in a few lines of numpy (and a ``torch`` Dataset on top)::

    from raysft.reader import PackedReader
    packs = PackedReader("out/")               # a local or s3:// output folder (native layout)
    p = packs[17]
    p["tokens"]        # int64 [n]: the pack's samples back to back (n <= seq_length)
    p["labels"]        # int64 [n]: labels[t] = tokens[t + 1] where that token carries loss and is
                       #            in the same sample, else -100 (so no target crosses samples)
    p["loss_mask"]     # float32 [n]: labels != -100
    p["position_ids"]  # int64 [n]: 0, 1, 2... restarting at each sample
    p["cu_seqlens"]    # int32 [samples + 1]: sample boundaries, for THD / varlen attention
    p["max_seqlen"]    # int: the longest sample

``PackedReader(out, pad_to=seq_length, pad_id=...)`` pads each pack to a fixed length: padding
tokens are ``pad_id``, labels -100, position ids 0.., and ``cu_seqlens`` ends with one padding
segment so its last entry is the padded length (as Megatron's ``PackedSeqParams`` expects).
A preference-pair build (stats.json ``pairs``) packs each pair's chosen and rejected samples
side by side, chosen first; each pack then also gives, per segment (sample)::

    p["pair_index"]    # int32 [samples]: which pair of the pack the segment belongs to (0, 0, 1, 1, ...)
    p["side"]          # int8 [samples]: 0 chosen, 1 rejected

and ``packs.pair_batch(17)`` gives the DPO view of a pack: ``{"chosen": ..., "rejected": ...}``,
each one row of that side's samples (the tensors above), pair ``k`` being segment ``k`` of both
rows: the per-segment sums of log-probabilities (over ``cu_seqlens``) of the two rows, taken
side by side, are each pair's chosen and rejected scores.

``torch_dataset(out, ...)`` wraps it in a ``torch.utils.data.Dataset`` of tensors;
``torch_dataset(out, megatron_sft=True)`` gives Megatron-LM's ``--sft`` batch path its own
``SFTDataset`` item shape (fixed-size ``cu_seqlens``), for any micro-batch size.

Pure numpy + fsspec; torch only for ``torch_dataset``.
"""

from __future__ import annotations

import json

import numpy as np

from .fs import get_fs, join, storage_options
from .indexed import IndexedReader
from .output import MANIFEST, read_json, verified_manifest
from .verify import VerifyError, check_sizes

IGNORE = -100


def pack_tensors(samples: list[np.ndarray], pad_to: int | None = None, pad_id: int = 0) -> dict:
    """The trainer's view of one pack from its samples' signed tokens (``~id``: no loss)."""
    lengths = np.array([len(s) for s in samples], dtype=np.int64)
    flat = np.concatenate(samples).astype(np.int64) if samples else np.zeros(0, np.int64)
    loss = flat >= 0
    tokens = np.where(loss, flat, ~flat)
    n = len(tokens)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    labels = np.full(n, IGNORE, dtype=np.int64)
    if n > 1:
        ok = loss[1:].copy()
        ok[ends[:-1] - 1] = False  # the last position of a sample has no target in the sample
        labels[:-1] = np.where(ok, tokens[1:], IGNORE)
    position_ids = np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)
    cu = np.concatenate([[0], ends]).astype(np.int32)
    if pad_to is not None and pad_to > n:
        pad = pad_to - n
        tokens = np.concatenate([tokens, np.full(pad, pad_id, np.int64)])
        labels = np.concatenate([labels, np.full(pad, IGNORE, np.int64)])
        position_ids = np.concatenate([position_ids, np.arange(pad, dtype=np.int64)])
        cu = np.concatenate([cu, [pad_to]]).astype(np.int32)
    elif pad_to is not None and pad_to < n:
        raise ValueError(f"a pack of {n} tokens does not fit pad_to={pad_to}")
    # the longest segment the attention kernel sees, the padding segment included (a varlen kernel
    # is sized by it: a segment longer than max_seqlen is computed wrong)
    return {"tokens": tokens, "labels": labels, "loss_mask": (labels != IGNORE).astype(np.float32),
            "position_ids": position_ids, "cu_seqlens": cu, "max_seqlen": int(np.diff(cu).max()) if len(cu) > 1 else 0}


class PackedReader:
    """Packs of a native-layout output folder (see module doc)."""

    def __init__(self, out: str, pad_to: int | None = None, pad_id: int | None = None, storage: dict | None = None,
                 s3_endpoint_url: str | None = None):
        storage = storage if storage is not None else storage_options(s3_endpoint_url)
        self.fs, self.root = get_fs(out, storage)
        with self.fs.open(join(self.root, "stats.json"), "r") as f:
            self.stats = json.load(f)
        if self.stats.get("layout", "native") != "native":
            raise ValueError(f"{out} is a {self.stats['layout']} dataset; PackedReader reads the native layout")
        manifest = read_json(self.fs, join(self.root, MANIFEST))
        if verified_manifest(manifest):  # a truncated or swapped file: one line, not padding packs
            bad = check_sizes(self.fs, self.root, manifest, ["data.bin", "data.idx"])
            if bad:
                raise VerifyError(f"{out}: {'; '.join(bad)} (python -m raysft.verify {out} checks every file)")
        with self.fs.open(join(self.root, "data.idx"), "rb") as f:
            idx = f.read()
        self.dataset = IndexedReader(idx, self.fs.open(join(self.root, "data.bin"), "rb"), "data")
        need = int(self.dataset.index.num_tokens) * self.dataset.index.dtype.itemsize
        size = int(self.fs.info(join(self.root, "data.bin"))["size"])
        if size != need:
            raise VerifyError(f"{out}: data.bin has {size:,} bytes, its index needs {need:,} (cut short or replaced)")
        self.docs = self.dataset.index.document_indices
        self.pairs = bool(self.stats.get("pairs"))
        self.pad_to = pad_to
        self.pad_id = self.stats.get("pad_id", 0) if pad_id is None else pad_id

    def __len__(self) -> int:
        return len(self.docs) - 1

    def samples(self, i: int) -> list[np.ndarray]:
        """The signed tokens of each sample of pack ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"pack {i} out of range (0..{len(self) - 1})")
        return [self.dataset[k] for k in range(int(self.docs[i]), int(self.docs[i + 1]))]

    def __getitem__(self, i: int) -> dict:
        samples = self.samples(i)
        out = pack_tensors(samples, self.pad_to, self.pad_id)
        if self.pairs:
            n = len(samples)
            out["pair_index"] = (np.arange(n) // 2).astype(np.int32)
            out["side"] = (np.arange(n) % 2).astype(np.int8)
        return out

    def pair_batch(self, i: int) -> dict:
        """A preference-pair build's pack ``i`` as two rows, ``chosen`` and ``rejected`` (each
        ``pack_tensors`` of that side's samples in pair order, padded to ``pad_to`` if set)."""
        if not self.pairs:
            raise ValueError("pair_batch reads a preference-pair build; this output holds SFT samples")
        samples = self.samples(i)
        return {"chosen": pack_tensors(samples[0::2], self.pad_to, self.pad_id),
                "rejected": pack_tensors(samples[1::2], self.pad_to, self.pad_id)}

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def megatron_sft_item(pack: dict, seq_length: int) -> dict:
    """A pack (``pack_tensors`` padded to ``seq_length``) in the shape Megatron-LM's own
    ``SFTDataset`` hands ``get_batch`` under ``--sft``: ``cu_seqlens`` right-filled with
    ``seq_length`` to ``seq_length + 1`` entries, so ``default_collate`` stacks packs with any
    number of samples into a micro-batch and Megatron's merge (which keeps each row up to its first
    ``seq_length`` and offsets row ``k`` by ``k * seq_length``) recovers every boundary;
    ``max_seqlen`` a 0-d tensor, as there."""
    import torch

    cu = pack["cu_seqlens"]
    if len(pack["tokens"]) != seq_length or cu[-1] != seq_length:
        raise ValueError(f"a pack of {len(pack['tokens'])} tokens is not padded to seq_length={seq_length}")
    fixed = np.full(seq_length + 1, seq_length, np.int32)
    fixed[:len(cu)] = cu
    item = {k: torch.from_numpy(pack[k]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    item["cu_seqlens"] = torch.from_numpy(fixed)
    item["max_seqlen"] = torch.tensor(pack["max_seqlen"], dtype=torch.int32)
    return item


def torch_dataset(out: str, pad_to: int | None = None, pad_id: int | None = None, megatron_sft: bool = False,
                  **kw):
    """A ``torch.utils.data.Dataset`` of packs (tensors). ``megatron_sft=True``: each pack
    padded to the build's pack capacity (or ``pad_to``) and shaped as Megatron-LM's
    ``SFTDataset`` items (``megatron_sft_item``), for a ``train_valid_test_datasets_provider``
    under ``--sft`` at any ``--micro-batch-size``; otherwise the packs as they are (micro-batch 1:
    their ``cu_seqlens`` differ in length)."""
    import torch

    reader = PackedReader(out, pad_to, pad_id, **kw)
    if megatron_sft and reader.pad_to is None:
        reader.pad_to = int(reader.stats["pack_capacity"])
    S = reader.pad_to

    class Packs(torch.utils.data.Dataset):
        def __len__(self):
            return len(reader)

        def __getitem__(self, i):
            if megatron_sft:
                return megatron_sft_item(reader[i], S)
            return {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in reader[i].items()}

    return Packs()

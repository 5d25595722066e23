"""Plan stage: best-fit-decreasing on each split's length histogram (what a pack of this layout
may hold: pai keeps its last position free), the shards each split is cut into, and the plan's
digest (``--resume`` reuses the shards of an interrupted run with the same plan)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np

from ..config import BuildConfig
from ..errors import BuildError
from ..fs import join
from ..output import write_json
from ..pack import PackPlan, plan_bfd, slot_table
from .context import Build
from .measure import Measured
from .mixture import Mix

log = logging.getLogger("raysft")


@dataclass
class Plans:
    train: Packing
    valid: Packing | None
    epochs: int
    digest: str  # of the training plan (recorded in the manifest)


def plan(b: Build, m: Measured, x: Mix) -> Plans:
    cfg = b.cfg
    train = Packing(cfg, b.layout, x.hist_train, x.train_parts, m.pairs)
    valid = Packing(cfg, b.layout, x.hist_valid, x.valid_parts, m.pairs) if int(x.hist_valid.sum()) else None
    epochs = max(1, int(cfg.epochs))
    digest = plan_digest(x.hist_train, cfg, train.num_shards, [x.selection, epochs, int(x.hist_valid.sum())])
    write_json(b.out.fs, join(b.out.tmp, "manifest.json"), b.manifest | {"plan": digest})
    b.timed("plan")
    return Plans(train, valid, epochs, digest)


class Packing:
    """One packed dataset this build writes (the training set, or the validation set): its
    plan and the parts its samples come from. ``pairs``: units are preference pairs (packed by
    pair, or one pair per pack where the layout's trainer reads them unpacked)."""

    def __init__(self, cfg: BuildConfig, layout, hist: np.ndarray, parts: list, pairs: bool = False):
        S = cfg.seq_length
        self.hist = hist
        cap = layout.pair_limits(S)[0] if pairs else layout.capacity(S)
        hist_plan = hist if len(hist) == cap + 1 else _capacity_check(hist, cap, layout)
        pack = cfg.pack and (layout.packs_pairs or not pairs)
        self.plan = plan_bfd(hist_plan, cap) if pack else plan_single(hist_plan, cap)
        self.ordered = not cfg.pack  # --no-pack: samples in input order, as preprocess_data.py writes them
        self.plan.seq_length = cap
        self.cap = cap
        self.packs = self.plan.num_packs
        self.parts = parts
        self.samples = int(hist.sum())
        self.tokens = int(np.dot(np.arange(len(hist)), hist))
        per_pack = layout.stored_per_pack(S)
        stored = per_pack * self.packs if per_pack else self.tokens
        self.num_shards = max(1, min(cfg.num_shards or -(-stored // cfg.shard_tokens), self.packs)) if self.packs else 0

    def plan_ref(self, ex, seed: int, pack_base: int = 0):
        return ex.put({"table": None if self.ordered else slot_table(self.plan), "seed": seed,
                       "num_shards": self.num_shards,
                        "num_packs": self.packs, "pack_base": pack_base, "ordered": self.ordered})


def plan_single(hist: np.ndarray, seq_length: int) -> PackPlan:
    """--no-pack: every sample is its own pack."""
    lengths = np.flatnonzero(hist[1:])[::-1] + 1
    return PackPlan(seq_length, [(int(L),) for L in lengths], hist[lengths].astype(np.int64))


def epoch_seed(seed: int, epoch: int) -> int:
    """The slot and pack-order seed of epoch ``epoch`` (the first epoch's is --seed itself)."""
    if epoch == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}/{epoch}".encode(), digest_size=4).digest(), "little")


def plan_digest(hist: np.ndarray, cfg: BuildConfig, num_shards: int, extra: list | None = None) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(hist, "<i8").tobytes())
    h.update(json.dumps([cfg.seq_length, cfg.seed, cfg.layout, cfg.pack, num_shards, extra]
                        + ([] if cfg.pack else ["input-order"]), default=str).encode())
    return h.hexdigest()


def _capacity_check(hist: np.ndarray, cap: int, layout) -> np.ndarray:
    """Layouts whose packs hold fewer than ``seq_length`` tokens take no sample longer."""
    if hist[cap + 1 :].any():
        raise BuildError(f"internal error: samples of more than {cap} tokens reached layout {layout.name}")
    return hist[: cap + 1]


def pack_shape(p: Packing) -> dict:
    """What a split's packs hold, for the layouts' metadata: the longest sample, the most
    samples in a pack, and the least a pack holds counting each sample one token short (its last
    token is no input, its first no label: Megatron-Bridge's ``min_packed_seqlen``)."""
    plan = p.plan
    return {
        "max_sample_length": int(np.nonzero(p.hist)[0].max()) if p.hist.any() else 0,
        "max_samples_per_pack": max((len(q) for q in plan.patterns), default=0),
        "min_pack_targets": min((sum(q) - len(q) for q, c in zip(plan.patterns, plan.counts) if c), default=0),
    }

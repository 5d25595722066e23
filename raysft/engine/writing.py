"""Write stage: slot assignment (the shuffle's map side, a task per block and packing part) and
one writer task per shard, for every epoch of the training set and for the validation set,
into ``_tmp/shards`` and ``_tmp/valid/shards``."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from ..errors import BuildError
from ..fs import join
from ..pack import RunOffsets
from .context import Build
from .measure import Blocks, Measured
from .plan import Plans, epoch_seed
from .tasks import partition_block, slot_block, write_parts
from .watch import Watchdog

log = logging.getLogger("raysft")


@dataclass
class Written:
    metas: list[dict]  # each training shard's meta (every epoch), in shard order
    valid_metas: list[dict]


def write(b: Build, m: Measured, p: Plans) -> Written:
    cfg, ex, watch, fs, tmp = b.cfg, b.ex, b.watch, b.out.fs, b.out.tmp
    train, valid, epochs, blocks = p.train, p.valid, p.epochs, m.blocks
    reuse = _reusable(fs, tmp, b.old, p.digest, train.num_shards * epochs) if b.old is not None else {}
    write_kw = {"tmp_dir": join(b.tmp_url, "shards"), "storage": b.storage, "layout": cfg.layout, "seq_length": cfg.seq_length,
                "pad_id": b.pad_id, "token_dtype": token_dtype(b.sources, b.info.vocab_size), "pairs": m.pairs,
                "packed": cfg.pack, "cap": train.cap}
    metas = []
    for e in range(epochs):
        metas += shuffle_and_write(blocks, train.parts, train.plan_ref(ex, epoch_seed(cfg.seed, e), e * train.packs),
                                   train.num_shards, write_kw, reuse, watch, e * train.num_shards,
                                   f"epoch {e + 1} shards" if epochs > 1 else "shards", train.ordered)
    valid_metas = []
    if valid is not None:
        fs.makedirs(join(tmp, "valid", "shards"), exist_ok=True)
        valid_metas = shuffle_and_write(blocks, valid.parts, valid.plan_ref(ex, cfg.seed), valid.num_shards,
                                        write_kw | {"tmp_dir": join(b.tmp_url, "valid", "shards")}, {}, watch,
                                        0, "validation shards", valid.ordered)
    blocks.refs.clear()
    if b.old is not None:
        log.info("resume: reused %d of %d shards", sum(bool(m.get("resumed")) for m in metas), len(metas))
    if [m["shard"] for m in metas] != list(range(train.num_shards * epochs)):
        raise BuildError(f"expected {train.num_shards * epochs} shards, got {[m['shard'] for m in metas]}")
    b.timed("assign+write")
    return Written(metas, valid_metas)


def shuffle_and_write(blocks: Blocks, parts: list, plan_ref, num_shards: int, write_kw: dict, reuse: dict,
                      watch: Watchdog, shard_base: int = 0, what: str = "shards", ordered: bool = False) -> list[dict]:
    """Assign pack slots and write one packing's shards: one assignment task per block and
    packing part (with the rank offsets of its own runs), one writer task per shard. On one
    machine every writer reads its rows from the tokenized blocks in place, each with its slots
    (``--engine local``: the driver's memory; Ray on one node: the node's object store); on a
    cluster the assignment is the shuffle's map side, its samples cut by output shard and sent
    to the writers. ``parts``: (pick, runs of block k) in the
    packing's order (the copies of the training set one after the other; one part when nothing
    is copied). Blocks go in input order, so the offsets come from one running count of
    ``seq_length``. ``ordered`` (``--no-pack``): samples keep input order, so a run's offset is
    the count of every earlier run's samples, whatever their lengths (one class)."""
    ex = blocks.ex
    # one machine: every writer reads the blocks in place (the driver's memory, or the node's
    # object store), each with its slots; a cluster: each block's samples cut by shard and sent
    # to their writers
    slotted = ex.one_node
    split = ex.task(slot_block) if slotted else ex.task(partition_block, num_returns=num_shards)
    offsets = RunOffsets(1 if ordered else write_kw.get("cap") or write_kw["seq_length"])
    order = sorted(range(len(blocks.refs)), key=lambda k: blocks.keys[k])
    cut = []
    for pick, runs_of in parts:
        for k in order:
            runs = runs_of(k)
            if not runs:
                continue  # nothing of this part in this block
            if ordered:
                runs = {key: {1: sum(per_length.values())} for key, per_length in runs.items()}
            if slotted:
                cut += [blocks.refs[k], split(blocks.refs[k], plan_ref, offsets.offsets(runs), pick)]
            else:
                p = split(blocks.refs[k], plan_ref, offsets.offsets(runs), num_shards, pick)
                cut.append([p] if num_shards == 1 else p)
    write = ex.task(write_parts)
    pending = [write(shard_base + s, *(cut if slotted else [p[s] for p in cut]), **write_kw,
                     reuse=reuse.get(shard_base + s), rows_of=s, slotted=slotted)
               for s in range(num_shards)]
    del cut
    metas, step, t0 = [], max(1, num_shards // 10), time.time()
    while pending:
        watch.progress("write", f"{len(pending)} shard writer(s)")
        done, pending = ex.wait(pending, num_returns=1)
        metas += ex.get(done)
        if len(metas) % step == 0 or not pending:
            log.info("%s written: %d/%d (%.0f s)", what, len(metas), num_shards, time.time() - t0)
    return sorted(metas, key=lambda m: m["shard"])


def token_dtype(sources: list, vocab_size: int) -> str:
    """What a layout that may (``Layout.plain_ids``) stores ids as: a build of plain text only
    (every token trains) stores them as Megatron-LM's ``preprocess_data.py`` does, in the
    smallest dtype for the vocabulary (uint16 below 65,500 ids, its ``DType.optimal_dtype``);
    anything else int32 with the loss in the sign bit."""
    if sources and all(s.format == "text" for s in sources) and vocab_size < 65500:
        return "uint16"
    return "int32"


def _reusable(fs, tmp: str, old: dict, digest: str, num_shards: int) -> dict:
    """--resume: the shards of the interrupted run that may be kept (same plan; each is kept by
    its writer only if the chunks feeding it have the same content)."""
    if old.get("plan") != digest:
        if old.get("plan"):
            log.info("resume: the inputs' lengths changed since the interrupted run, so did the packing: no shard is "
                     "reused")
        return {}
    out = {}
    for s in range(num_shards):
        p = join(tmp, "shards", f"part-{s:05d}.meta.json")
        try:
            with fs.open(p, "r") as f:
                out[s] = json.load(f)
        except (FileNotFoundError, ValueError):
            pass
    return out

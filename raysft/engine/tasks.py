"""Ray tasks around the pure stages: per-block statistics, per-block slot assignment (cut by
shard on a cluster: the map side of the shuffle) and per-shard writing (its reduce side)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from .. import output
from ..fs import get_fs, join
from ..layouts import get_layout
from ..pack import assign_slots, block_ranks, unique_rows
from ..samples import kept_mask, run_ranks
from ..sources import amounts_by_key, select, valid_key
from ..stats import block_rejects, block_stats, run_counts
from ..write import column_of, shard_rows, write_shard


def measure_block(table: pa.Table, seq_length: int, rejects_dir: str | None, storage: dict) -> tuple[dict, dict]:
    """Stats stage (one task per tokenized block): the block's summary and runs. Its rejected
    and dropped rows are written to ``rejects_dir`` (one JSON Lines file per block, named by
    the block's input position) so they never gather in the driver."""
    summary, runs = block_stats(table, seq_length)
    if rejects_dir and sum(summary["reasons"].values()):
        fs, root = get_fs(rejects_dir, storage)
        c, r = summary["key"]
        with fs.open(join(root, f"{c:08d}-{r:016d}.jsonl"), "wb") as f:
            for e in block_rejects(table):
                f.write(json.dumps(e, ensure_ascii=False).encode("utf-8", "replace") + b"\n")
        summary["rejects_file"] = f"{c:08d}-{r:016d}.jsonl"
    return summary, runs


def _chosen(table: pa.Table, pick: dict | None, ordered: bool = False):
    """The rows a packing takes (``pick``: the selection and which part: copy ``c`` of the
    training set, or the validation set) and their ranks within their runs (``ordered``: among
    all of the run's rows, else among those of the same length); None: every kept row, with the
    ranks the tokenize stage gave (same-length)."""
    if pick is None and not ordered:
        return None, None

    if pick is None:
        rows = kept_mask(table).to_numpy(zero_copy_only=False)
    else:
        m, valid = select(table, pick["selection"])
        rows = valid if pick.get("valid") else (m > pick["copy"])
    n = table.column("n").to_numpy()
    ranks = run_ranks(table.column("chunk").to_numpy(), table.column("run_first").to_numpy(),
                      np.ones_like(n) if ordered else n, rows)
    return rows, ranks


def slot_block(table: pa.Table, plan: dict, run_offsets: dict, pick: dict | None = None) -> pa.Table:
    """Sort+pack stage, per block: each sample the packing takes gets its output pack, its
    position in the pack and the shard that writes it; the block's other rows (rejected, or
    not in this packing) get shard -1. Only those three columns, a row per block row: a writer
    joins them to the block it reads in place (``with_slots``)."""
    rows, ranks = _chosen(table, pick, plan.get("ordered", False))
    if rows is None:
        rows = kept_mask(table).to_numpy(zero_copy_only=False)
        run_rank = table.column("run_rank").to_numpy()[rows]
    else:
        run_rank = ranks[rows]
    n = table.column("n").to_numpy()[rows].astype(np.int64)
    if plan.get("ordered"):  # --no-pack: a sample's pack is its place in input order (see shuffle_and_write)
        out_pack = block_ranks(np.ones_like(n), table.column("chunk").to_numpy()[rows].astype(np.int64),
                               table.column("run_first").to_numpy()[rows], run_rank, run_offsets)
        pos = np.zeros(len(n), np.int64)
    else:
        ranks = block_ranks(n, table.column("chunk").to_numpy()[rows].astype(np.int64),
                            table.column("run_first").to_numpy()[rows], run_rank, run_offsets)
        out_pack, pos = assign_slots(plan["table"], n, ranks, plan["seed"])
    shard = np.full(table.num_rows, -1, np.int64)
    shard[rows] = out_pack * plan["num_shards"] // plan["num_packs"]
    pack = np.full(table.num_rows, -1, np.int64)
    pack[rows] = out_pack + plan.get("pack_base", 0)  # epoch e's packs follow the earlier epochs' in the output
    at = np.zeros(table.num_rows, np.asarray(pos).dtype)
    at[rows] = pos
    return pa.table({"shard": pa.array(shard), "out_pack": pa.array(pack), "pos": pa.array(at)})


WRITTEN_COLUMNS = ("ids", "src", "piece", "row", "offset", "chunk", "chunk_hash", "chosen_n")


def with_slots(table: pa.Table, slots: pa.Table) -> pa.Table:
    """A tokenized block with its pack slots (``slot_block``): what the writers read. The
    tokens are the block's own (no copy)."""
    return pa.table({**dict(zip(slots.column_names, slots.columns)), **{k: table.column(k) for k in WRITTEN_COLUMNS}})


def partition_block(table: pa.Table, plan: dict, run_offsets: dict, num_shards: int,
                    pick: dict | None = None) -> list[pa.Table] | pa.Table:
    """Shuffle, map side (one task per tokenized block and packing part; ``--engine ray``):
    the samples it takes with their pack slots, cut into one table per output shard (empty
    where it has none); the table itself for one shard (a Ray task with one return value
    returns it as is)."""
    t = with_slots(table, slot_block(table, plan, run_offsets, pick))
    shard = t.column("shard").to_numpy()
    taken = np.flatnonzero(shard >= 0)
    if num_shards == 1:
        return t if len(taken) == t.num_rows else t.take(pa.array(taken))
    order = taken[np.argsort(shard[taken], kind="stable")]
    bounds = np.searchsorted(shard[order], np.arange(num_shards + 1))
    # take, not slice: a slice would carry (and serialize) the whole block's buffers
    return [t.take(pa.array(order[bounds[s] : bounds[s + 1]])) for s in range(num_shards)]


def select_block(table: pa.Table, selection) -> tuple[dict, dict]:
    """Mixture and split, per tokenized block: the histograms the plans need (training samples
    with their copies, validation samples), per-source figures as realized, the records the
    mixture left out, and the runs of each packing part (copy ``c`` of the training set,
    ``"valid"``) for the rank offsets."""
    m, valid = select(table, selection)
    n = table.column("n").to_numpy().astype(np.int64)
    loss = table.column("loss_n").to_numpy().astype(np.int64)
    first = table.column("piece").to_numpy() == 0
    src = table.column("source").to_numpy()
    kept = kept_mask(table).to_numpy(zero_copy_only=False)
    chunk, run_first = table.column("chunk").to_numpy(), table.column("run_first").to_numpy()
    per_source = {}
    for s in np.unique(src[kept]).tolist():
        r = kept & (src == s)
        per_source[int(s)] = [int(m[r].sum()), int((m * n)[r].sum()), int((m * loss)[r].sum())]
    train = m > 0
    summary = {
        "hist_train": np.bincount(n[train], weights=m[train], minlength=1).astype(np.int64),
        "hist_valid": np.bincount(n[valid], minlength=1).astype(np.int64),
        "per_source": per_source,
        "valid": [int((first & valid).sum()), int(valid.sum()), int(n[valid].sum()), int(loss[valid].sum())],
        "not_sampled": int((first & kept & ~valid & ~train).sum()),
        "chosen_tokens": int((m * table.column("chosen_n").to_numpy().astype(np.int64))[train].sum()),
        "rows_written": int((first & kept & (valid | train)).sum()),
        "copies": int(m.max()) if len(m) else 0,  # the training copies this block has runs for
    }
    runs = {c: run_counts(chunk, run_first, n, m > c) for c in range(summary["copies"])}
    runs["valid"] = run_counts(chunk, run_first, n, valid)
    return summary, runs


def amounts_task(table: pa.Table, seed: int, valid_below: float | None, unit: str) -> dict:
    """The mixture's first pass, per block: each source's training amounts by copy-key bucket."""
    return amounts_by_key(table, seed, valid_below, unit)


def smallest_keys(table: pa.Table, count: int, seed: int) -> np.ndarray:
    """``--validation COUNT``: the block's ``count + 1`` smallest distinct record keys (kept
    records): one more than asked, so that the driver can tell a block of exactly ``count``
    records from one with more."""
    kept = kept_mask(table).to_numpy(zero_copy_only=False) & (table.column("piece").to_numpy() == 0)
    keys = np.unique(valid_key(table.column("rec_hash").to_numpy()[kept], seed))
    return keys[: count + 1]


def feed_digest(chunk: np.ndarray, chunk_hash: np.ndarray) -> str:
    """Which input chunks (by content) fed a shard: a digest of its sorted (chunk, hash) pairs."""
    import hashlib

    pairs = unique_rows(chunk, chunk_hash)
    return hashlib.blake2b(pairs.astype("<i8").tobytes(), digest_size=16).hexdigest()


def write_parts(shard: int, *parts: pa.Table, tmp_dir: str, storage: dict, layout: str, seq_length: int, pad_id: int,
                reuse: dict | None = None, rows_of: int = 0, token_dtype: str = "int32", pairs: bool = False,
                packed: bool = True, cap: int = 0, slotted: bool = False) -> dict:
    """Shuffle, reduce side (one task per shard): the rows of shard ``rows_of`` of the packing
    (the parts' ``shard`` column) -> shard ``shard`` of the output. The parts: each block's
    cut for this shard (a Ray cluster), or (``slotted``) every block with its slots, read in
    place. ``reuse``: the meta of this shard from an interrupted run, kept when the chunks
    feeding it are the same content (``--resume``). ``pairs``, ``packed``: the layout's form
    (``Layout.form``: a pair build writes each unit as its two samples). ``cap``: the plan's most tokens
    per unit (read by the driver, not here). ``slotted``: the parts are (block, its slots)
    pairs, each block read in place (one machine: no block is cut and copied for the
    writers)."""
    if slotted:
        parts = tuple(with_slots(b, s) for b, s in zip(parts[0::2], parts[1::2]))
    parts = [p for p in parts if p.num_rows]
    rows = shard_rows(parts, rows_of)
    digest = feed_digest(column_of(parts, rows, "chunk"), column_of(parts, rows, "chunk_hash"))
    fs, root = get_fs(tmp_dir, storage)
    prefix = join(root, f"part-{shard:05d}")
    lay = get_layout(layout).form(pairs, packed)
    if reuse is not None and reuse.get("feed") == digest and output.shard_complete(fs, prefix, lay, reuse):
        return reuse | {"shard": shard, "resumed": True}
    meta = write_shard(fs, prefix, lay, seq_length, pad_id, parts, rows_of, token_dtype, pairs)
    meta = meta | {"shard": shard, "feed": digest}
    with fs.open(prefix + ".meta.json", "w") as f:  # written last: the shard is complete
        json.dump(meta, f)
    return meta

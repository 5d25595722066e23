"""The Ray driver: wires the pure stages into Ray Data and runs them.

read+normalize+template+tokenize+mask (actor pool) -> stats (tasks + driver)
-> sort+pack (plan on the driver from histograms, slot assignment in tasks)
-> write shards (one task per pack range) -> merge (driver, streaming).

Everything that decides a byte of output lives in the pure modules; this file only moves
data between them. Output is independent of how many workers, blocks or shards run.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import stats as stats_mod
from .config import BuildConfig
from .fs import get_fs, join, storage_options
from .indexed import decode_index
from .merge import merge_shards
from .pack import PackPlan, assign_slots, plan_bfd, slot_table
from .read import Chunk, check_bucket, describe_position, expand_inputs, plan_chunks, read_chunk, split_tail
from .template import MARKERS
from .tokenize import (
    SampleBuilder,
    TokenizerInfo,
    add_special_tokens,
    fit_overlong,
    load_tokenizer_info,
    loss_counts,
    missing_markers,
    save_tokenizer,
)
from .write import MINDSPEED_PARTS, ShardWriter, layout_parts, order_samples, provenance_records, shard_meta

log = logging.getLogger("raysft")


PIECES = 1 << 16  # record ordinal = idx * PIECES + piece: a split record's pieces stay in order
DROP_REASONS = ("overlong", "overlong_prompt")


class BuildError(RuntimeError):
    """A failure to report as one clear line (bad input, bad settings)."""


# --------------------------------------------------------------------------- stage functions
# Module-level functions and classes so Ray ships them by reference.


def read_records(batch: dict, so: dict) -> pa.Table:
    """Read stage (in the tokenizer actor): chunk descriptions -> their raw records."""
    tables = []
    for i in range(len(batch["chunk"])):
        c = Chunk(**{k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()})
        rows = read_chunk(c, so)
        n = len(rows.idx)
        tables.append(
            pa.table(
                {
                    "chunk": pa.array(np.full(n, c.chunk, np.int32)),
                    "src": pa.array(np.full(n, c.src, np.int32)),
                    "idx": pa.array(np.asarray(rows.idx, np.int64)),
                    "row": pa.array(np.asarray(rows.row, np.int64)),
                    "offset": pa.array(np.asarray(rows.offset, np.int64)),
                    "raw": pa.array(rows.raw, pa.binary()),
                    "error": pa.array(rows.error, pa.string()),
                }
            )
        )
    return pa.concat_tables(tables)


def _runs(chunk: np.ndarray, idx: np.ndarray, piece: np.ndarray) -> np.ndarray:
    """Ordinal (``idx * PIECES + piece``) of the first row of the run each row belongs to.

    A run is a maximal stretch of rows of one chunk in record order with nothing missing (the
    next piece of the same record, or the first piece of the next record). Runs are disjoint
    ranges of one chunk, so ordering them by (chunk, first ordinal) is input order, however Ray
    cut the blocks.
    """
    n = len(idx)
    new = np.ones(n, dtype=bool)
    if n > 1:
        same = (idx[1:] == idx[:-1]) & (piece[1:] == piece[:-1] + 1)
        nxt = (idx[1:] == idx[:-1] + 1) & (piece[1:] == 0)
        new[1:] = (chunk[1:] != chunk[:-1]) | ~(same | nxt)
    first_pos = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    return idx[first_pos] * PIECES + piece[first_pos]


class TokenizeAndMask:
    """Read + tokenize stage (Ray actor): holds one tokenizer for its lifetime.

    Called with chunk descriptions, one at a time: reads the chunk and yields one table per
    ``batch_size`` records. Reading inside the actor keeps raw records out of the object store,
    and one task per chunk spreads the chunks over all actors (Ray would bundle the tiny chunk
    rows of a separate read operator fused into this one up to ``batch_size`` rows per task:
    every chunk in one task, on one actor).

    Emits one row per sample piece (``--overlong split`` may make several of one record) and
    one row per rejected or dropped record, so every record read is accounted for.
    """

    def __init__(self, info: TokenizerInfo, template: str, fmt: str, map_keys: dict, loss: str, seq_length: int,
                 overlong: str = "drop", threads: int = 0, so: dict | None = None, batch_size: int = 16384):
        if threads:
            # the Rust encoder's thread pool starts on first use: size it to this actor's cores
            os.environ["RAYON_NUM_THREADS"] = str(threads)
        # a multi-threaded encoder gets as many lanes, so Python work overlaps its encoding
        self.builder = SampleBuilder(info, template, fmt, map_keys, loss, lanes=max(1, threads))
        self.seq_length = seq_length
        self.overlong = overlong
        self.so = so or {}
        self.batch_size = batch_size
        # what exists now (Ray, Ray Data, the tokenizer) lives as long as the actor: keep it out
        # of the collector's full passes, which the records' many small objects trigger (measured
        # at 100k rows: 0.22 s of collection per actor instead of 0.62 s, of ~28 CPU-s)
        gc.freeze()

    def __call__(self, chunks: dict):
        records = read_records(chunks, self.so)
        for lo in range(0, records.num_rows, self.batch_size):
            yield self.tokenize(records.slice(lo, self.batch_size))

    def tokenize(self, batch: pa.Table) -> pa.Table:
        """Records (the columns of ``read_records``) -> one row per sample piece or rejected record."""
        raws = batch.column("raw").to_pylist()
        errors = batch.column("error").to_pylist()
        e = self.builder.encode(raws, errors)
        S = self.seq_length
        ends = np.cumsum(e.lengths)  # record i's tokens are e.values[ends[i] - lengths[i]:ends[i]]
        rows_of = np.ones(len(raws), dtype=np.int64)  # output rows per record
        fitted: dict[int, tuple[list[np.ndarray], str]] = {}  # overlong records: (pieces, reason)
        for i in np.flatnonzero(e.ok & (e.lengths > S)).tolist():
            arr = e.values[ends[i] - e.lengths[i] : ends[i]]
            unsafe = self.builder.unsafe_cuts(raws[i]) if self.overlong != "drop" and self.builder.markers else None
            fitted[i] = fit_overlong(arr, S, self.overlong, unsafe)
            rows_of[i] = max(1, len(fitted[i][0]))
        take = np.repeat(np.arange(len(raws)), rows_of)
        n = len(take)
        piece = np.arange(n) - np.repeat(np.cumsum(rows_of) - rows_of, rows_of)
        orig_n = np.where(e.ok, e.lengths, -1)[take].astype(np.int32)
        kept = e.ok[take]
        lengths = orig_n.copy()
        records = take.tolist()
        reason = [e.reasons[i] for i in records]
        message = [e.messages[i] for i in records]
        values = e.values
        if fitted:
            segments, done, row = [], 0, np.cumsum(rows_of) - rows_of  # first output row per record
            for i, (pieces, why) in fitted.items():
                segments.append(e.values[done : ends[i] - e.lengths[i]])
                segments += pieces
                done = ends[i]
                if pieces:
                    lengths[row[i] : row[i] + len(pieces)] = [len(p) for p in pieces]
                else:
                    kept[row[i]] = False
                    reason[row[i]] = why
                    message[row[i]] = f"{e.lengths[i]} tokens > seq-length {S}"
            segments.append(e.values[done:])
            values = np.concatenate(segments)
        bad_raw = [b"" if k else raws[i] for i, k in zip(records, kept.tolist())]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.where(kept, lengths, 0), out=offsets[1:])
        if fitted:  # pieces of cut records: count their loss tokens again
            loss_n = loss_counts(values, offsets).astype(np.int32)
        else:
            loss_n = e.loss.astype(np.int32)
        offsets = offsets.astype(np.int32)
        take_a = pa.array(take)
        chunk = batch.column("chunk").to_numpy()[take]
        # rank of each kept sample among same-length kept samples of its run (input order)
        run_first = _runs(chunk, batch.column("idx").to_numpy()[take], piece)
        run_rank = np.zeros(n, dtype=np.int64)
        kpos = np.nonzero(kept)[0]
        if len(kpos):
            key = np.lexsort((kpos, lengths[kpos], run_first[kpos], chunk[kpos]))
            sk = kpos[key]
            run_key = np.stack([chunk[sk], run_first[sk], lengths[sk]], axis=1)
            grp_start = np.ones(len(sk), dtype=bool)
            grp_start[1:] = (run_key[1:] != run_key[:-1]).any(axis=1)
            first = np.maximum.accumulate(np.where(grp_start, np.arange(len(sk)), 0))
            run_rank[sk] = np.arange(len(sk)) - first
        return pa.table(
            {
                "chunk": pa.array(chunk),
                "src": batch.column("src").take(take_a),
                "idx": batch.column("idx").take(take_a),
                "piece": pa.array(piece.astype(np.int32)),
                "row": batch.column("row").take(take_a),
                "offset": batch.column("offset").take(take_a),
                "n": pa.array(lengths),
                "orig_n": pa.array(orig_n),
                "loss_n": pa.array(loss_n),
                "run_first": pa.array(run_first),
                "run_rank": pa.array(run_rank),
                "ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32())),
                "reason": pa.array(reason, pa.string()),
                "message": pa.array(message, pa.string()),
                "bad_raw": pa.array(bad_raw, pa.binary()),
            }
        )


def kept_mask(batch: pa.Table):
    """Rows of a tokenized block that are samples to write (rejected and dropped records carry
    their reason)."""
    return pc.equal(batch.column("reason"), "")


def length_stats(batch: pa.Table, seq_length: int) -> dict:
    """Stats stage (Ray task, one per tokenized block): its histograms and counts."""
    n = batch.column("n").to_numpy()
    orig_n = batch.column("orig_n").to_numpy()
    first = batch.column("piece").to_numpy() == 0  # one row per record read
    src = batch.column("src").to_numpy()
    # pyarrow compute's first call in a process costs ~0.2 s: paid here, during tokenization,
    # by a worker Ray may reuse to partition the blocks
    kept = kept_mask(batch).to_numpy(zero_copy_only=False)
    chunk = batch.column("chunk").to_numpy()[kept]
    run_first = batch.column("run_first").to_numpy()[kept]
    lk = n[kept].astype(np.int64)
    runs: dict[tuple[int, int], Counter] = {}
    if len(lk):
        keys = np.stack([chunk.astype(np.int64), run_first, lk], axis=1)
        uniq, counts = np.unique(keys, axis=0, return_counts=True)
        for (c, r, L), k in zip(uniq.tolist(), counts.tolist()):
            runs.setdefault((c, r), Counter())[L] = k
    errors = []
    bad = np.nonzero(~kept)[0]
    if len(bad):
        cols = {k: batch.column(k).take(pa.array(bad)).to_pylist()
                for k in ("chunk", "idx", "src", "row", "offset", "reason", "message", "bad_raw")}
        for j in range(len(bad)):
            e = {k: v[j] for k, v in cols.items()}
            e["bad_raw"] = (e["bad_raw"] or b"")[:4000].decode("utf-8", errors="replace")
            errors.append(e)
    measured = first & (orig_n >= 0)
    payload = {
        "rows": int(first.sum()),
        "rows_written": int((first & kept).sum()),
        "overlong_kept": int((first & kept & (orig_n > seq_length)).sum()),
        "rows_per_src": Counter(src[first].tolist()),
        "hist_all": np.bincount(orig_n[measured].astype(np.int64)) if measured.any() else np.zeros(1, np.int64),
        "hist_kept": np.bincount(lk) if len(lk) else np.zeros(1, np.int64),
        "loss_tokens": int(batch.column("loss_n").to_numpy()[kept].sum()),
        "runs": runs,
        "errors": errors,
    }
    return payload


def assign_pack_slots(batch: pa.Table, ctx: dict) -> pa.Table:
    """Sort+pack stage, per block: each kept sample gets its output pack, its position in the
    pack and the shard that writes it (``ctx``: the plan as the driver puts it)."""
    kept = kept_mask(batch)
    if not pc.all(kept).as_py():  # filtering copies every column, the token lists included
        batch = batch.filter(kept)
    n = batch.column("n").to_numpy().astype(np.int64)
    chunk = batch.column("chunk").to_numpy().astype(np.int64)
    run_first = batch.column("run_first").to_numpy()
    base = np.zeros(len(n), dtype=np.int64)
    runs = np.stack([chunk, run_first], axis=1)
    keys, inverse = np.unique(runs, axis=0, return_inverse=True)
    for j, (c, r) in enumerate(keys.tolist()):
        lengths, offsets = ctx["run_offsets"][(c, r)]
        rows = inverse.reshape(-1) == j
        base[rows] = offsets[np.searchsorted(lengths, n[rows])]
    ranks = base + batch.column("run_rank").to_numpy()
    out_pack, pos = assign_slots(ctx["table"], n, ranks, ctx["seed"])
    shard = out_pack * ctx["num_shards"] // ctx["num_packs"]
    return pa.table(
        {
            "shard": pa.array(shard),
            "out_pack": pa.array(out_pack),
            "pos": pa.array(pos),
            "ids": batch.column("ids"),
            "src": batch.column("src"),
            "piece": batch.column("piece"),
            "row": batch.column("row"),
            "offset": batch.column("offset"),
        }
    )


def partition_block(batch: pa.Table, plan: dict, num_shards: int) -> list[pa.Table] | pa.Table:
    """Shuffle, map side (Ray task, one per tokenized block): the block's kept samples with
    their pack slots, cut into one table per output shard (empty where it has none); the table
    itself for one shard (a Ray task with one return value returns it as is)."""
    t = assign_pack_slots(batch, plan)
    if num_shards == 1:
        return t
    shard = t.column("shard").to_numpy()
    order = np.argsort(shard, kind="stable")
    bounds = np.searchsorted(shard[order], np.arange(num_shards + 1))
    # take, not slice: a slice would carry (and serialize) the whole block's buffers
    return [t.take(pa.array(order[bounds[s] : bounds[s + 1]])) for s in range(num_shards)]


def write_parts(shard: int, *parts: pa.Table, **kw) -> dict:
    """Shuffle, reduce side (Ray task, one per shard): its parts from every block -> the shard."""
    return write_shards(pa.concat_tables(parts), shard, **kw) | {"shard": shard}


def existing_shard(fs, prefix: str, suffixes: tuple[str, ...] = ("",)) -> dict | None:
    """The meta of a shard an earlier run completed (each .idx, written last, matches its .bin)."""
    metas = []
    for suffix in suffixes:
        p = prefix + suffix
        try:
            with fs.open(p + ".idx", "rb") as f:
                index = decode_index(f.read(), p + ".idx")
            size = fs.size(p + ".bin")
        except (OSError, ValueError):
            return None
        if size != index.num_tokens * index.dtype.itemsize:
            return None
        metas.append(shard_meta(p, index))
    return metas[0] if fs.exists(prefix + ".prov") else None


def write_shards(batch: pa.Table, shard: int, tmp_dir: str, so: dict, layout: str, seq_length: int, pad_id: int,
                 resume: bool = False) -> dict:
    """Write-shards stage: all samples of one pack range -> one .bin/.idx shard; its meta."""
    fs, root = get_fs(tmp_dir, so)
    prefix = join(root, f"part-{shard:05d}")
    if resume:
        done = existing_shard(fs, prefix, layout_parts(layout))
        if done is not None:
            return done | {"resumed": True}
    ids_col = batch.column("ids").combine_chunks()
    offsets = ids_col.offsets.to_numpy()
    values = ids_col.values.to_numpy(zero_copy_only=False)
    samples = [values[offsets[i] : offsets[i + 1]] for i in range(len(ids_col))]
    out_pack, pos = batch.column("out_pack").to_numpy(), batch.column("pos").to_numpy()
    order = order_samples(out_pack, pos)
    prov = provenance_records(*(batch.column(k).to_numpy()[order] for k in ("src", "piece", "row", "offset", "out_pack")))
    with fs.open(prefix + ".prov", "wb") as f:
        f.write(prov.tobytes())
    writer = ShardWriter(fs, prefix, layout, seq_length, pad_id)
    writer.write_all([samples[i] for i in order], out_pack[order])
    return writer.close()


# --------------------------------------------------------------------------- driver


_ray_started: str | None = None  # "local" or "joined" when init_ray started Ray here (stop_ray stops it)


def init_ray(cfg: BuildConfig) -> None:
    global _ray_started
    import ray

    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        _ray_started = "joined"
        return
    system: dict = {}
    if cfg.spill_dir:
        os.makedirs(cfg.spill_dir, exist_ok=True)
        system["object_spilling_config"] = json.dumps(
            {"type": "filesystem", "params": {"directory_path": os.path.abspath(cfg.spill_dir)}})
    ray.init(num_cpus=cfg.num_cpus, object_store_memory=object_store_bytes(cfg), include_dashboard=False,
             log_to_driver=True, _system_config=system or None)
    _ray_started = "local"


def stop_ray() -> None:
    """Stop the local Ray instance ``init_ray`` started, or disconnect from the cluster it
    joined (which stays up); nothing when Ray was up before (a test session's, a caller's).

    The commands call this when their work is done rather than leave it to Ray's exit hook,
    which first sleeps 0.5 s for late log lines. ``ray.shutdown()`` also stops the GCS before
    the autoscaler monitor, whose SIGTERM handler then blocks on the dead GCS until Ray kills it
    a second later (1.0 s of a 1.4 s shutdown, measured). The monitor holds nothing of this
    job, so it is killed first, through a private handle of Ray's (skipped where a Ray version
    lacks it)."""
    global _ray_started
    import ray

    started, _ray_started = _ray_started, None
    if started is None or not ray.is_initialized():
        return
    if started == "local":
        from ray._private import worker

        kill = getattr(getattr(worker, "_global_node", None), "_kill_process_type", None)
        if kill is not None:
            try:
                kill("monitor", allow_graceful=False, check_alive=False)
            except Exception as e:  # never fail a finished job over its clean-up
                log.debug("could not stop Ray's autoscaler monitor first: %s", e)
    ray.shutdown()


OBJECT_STORE_BYTES = 1 << 30


def object_store_bytes(cfg: BuildConfig) -> int:
    """Object store of an in-process Ray instance: --object-store-memory, else 1 GiB (at most
    30% of RAM). The job's blocks stream through it; the tokenized dataset, held until the
    plan is made, spills to local disk beyond it, so memory does not grow with the input."""
    if cfg.object_store_memory:
        return cfg.object_store_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(OBJECT_STORE_BYTES, 0.3 * ram))


def _plan_single(hist: np.ndarray, seq_length: int) -> PackPlan:
    """--no-pack: every sample is its own pack."""
    lengths = [L for L in range(len(hist) - 1, 0, -1) if hist[L]]
    return PackPlan(seq_length, [(L,) for L in lengths], np.array([hist[L] for L in lengths], dtype=np.int64))


FINAL_NAMES = (
    "data.bin", "data.idx", *(f"data_{p}.{e}" for p in MINDSPEED_PARTS for e in ("bin", "idx")), "data_order.txt",
    "stats.json", "rejects.jsonl", "shards", "provenance.bin", "inputs.json", "report.html", "tokenizer",
)
TMP = "_tmp"


def out_path(root: str, rel: str) -> str:
    """``root/rel``, refusing anything that would land outside ``root``."""
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith("/") or any(p in ("..", "") for p in parts):
        raise BuildError(f"refusing to write {rel!r}: outside the output folder")
    return join(root, rel)


def _collect(parts: list[dict]) -> dict:
    """Sum the per-block payloads of ``length_stats``."""
    agg = {"rows": 0, "rows_written": 0, "overlong_kept": 0, "loss_tokens": 0, "errors": [],
           "rows_per_src": Counter(), "runs": {}, "hist_all": None, "hist_kept": None}
    for p in parts:
        for k in ("rows", "rows_written", "overlong_kept", "loss_tokens"):
            agg[k] += p[k]
        agg["hist_all"] = stats_mod.add_hist(agg["hist_all"], p["hist_all"])
        agg["hist_kept"] = stats_mod.add_hist(agg["hist_kept"], p["hist_kept"])
        for key, cnt in p["runs"].items():
            agg["runs"].setdefault(key, Counter()).update(cnt)
        agg["errors"] += p["errors"]
        agg["rows_per_src"].update(p["rows_per_src"])
    agg["errors"].sort(key=lambda e: (e["chunk"], e["idx"]))
    return agg


def _run_offsets(runs: dict) -> dict:
    """Per run (in input order): its lengths, and how many same-length samples come before it."""
    out: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    running: Counter = Counter()
    for key in sorted(runs):
        lengths = np.array(sorted(runs[key]), dtype=np.int64)
        out[key] = (lengths, np.array([running[L] for L in lengths.tolist()], dtype=np.int64))
        running.update(runs[key])
    return out


# Settings that change output bytes; execution knobs (workers, batch size, shards...) do not.
FINGERPRINT_FLAGS = ("template", "format", "map_keys", "loss", "seq_length", "pack", "layout", "seed",
                     "on_bad_record", "overlong", "num_shards", "shard_tokens", "add_special_tokens")


def fingerprint(cfg: BuildConfig, files, info: TokenizerInfo, so: dict) -> dict:
    """What an output depends on: input files (path, size, modification stamp), the tokenizer's
    files and the output-affecting flags. ``--resume`` only continues a run whose parts match."""
    import hashlib

    inputs = []
    for f in files:
        fs, path = get_fs(f.url, so)
        meta = fs.info(path)
        stamp = meta.get("ETag") or meta.get("mtime") or meta.get("LastModified") or meta.get("created")
        inputs.append([f.url, f.size, str(stamp)])
    tok = hashlib.sha256(info.tokenizer_json.encode())
    tok.update(json.dumps([info.bos, info.eos, info.pad, info.chat_template]).encode())

    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

    flags = {k: getattr(cfg, k) for k in FINGERPRINT_FLAGS}
    return {"inputs": digest(inputs), "tokenizer": tok.hexdigest(), "flags": flags, "version": 1}


def _prepare_tmp(fs, tmp_root: str, manifest: dict, resume: bool) -> bool:
    """Clear the leftovers of an interrupted run, or keep them for --resume when they match."""
    path = join(tmp_root, "manifest.json")
    if not fs.exists(tmp_root):
        if resume:
            log.info("resume: no interrupted run found, starting from scratch")
        return False
    if resume:
        try:
            with fs.open(path, "r") as f:
                old = json.load(f)
        except (OSError, ValueError):
            raise BuildError("cannot resume: the interrupted run left no readable manifest; rerun without --resume") from None
        if old != manifest:
            diff = [k for k in ("inputs", "tokenizer") if old.get(k) != manifest[k]]
            diff += [f"--{k.replace('_', '-')}" for k in FINGERPRINT_FLAGS
                     if (old.get("flags") or {}).get(k) != manifest["flags"][k]]
            raise BuildError(
                f"cannot resume: {', '.join(diff) or 'the manifest'} changed since the interrupted run; "
                "rerun without --resume to start over"
            )
        log.info("resume: continuing the interrupted run in %s", tmp_root)
        return True
    fs.rm(tmp_root, recursive=True)
    return False


def _commit(fs, root: str, present: list[str]) -> None:
    """Move the finished files from _tmp/ to their final names, then write _SUCCESS.

    Until this point nothing exists at a final name (an interrupted job leaves only _tmp/)."""
    tmp = out_path(root, TMP)
    fs.invalidate_cache()  # object-store listings are cached: shard .prov objects were just removed
    for name in FINAL_NAMES:
        final = out_path(root, name)
        if fs.exists(final):
            fs.rm(final, recursive=True)
    local = fs.protocol in ("file", ("file", "local"))
    for name in present:
        src, dst = join(tmp, name), out_path(root, name)
        if local:
            os.replace(src, dst)
            continue
        # object stores have no rename: copy each object (server side), then delete the originals
        objects = [src] if fs.isfile(src) else sorted(fs.find(src))
        for obj in objects:
            fs.copy(obj, dst + obj[len(src):])
        fs.rm(objects)
    fs.rm(tmp, recursive=True)
    with fs.open(out_path(root, "_SUCCESS"), "w") as f:
        f.write("")


def _tokenize_dataset(cfg: BuildConfig, chunks, info: TokenizerInfo, so: dict, pool: TokenizePool):
    """read -> normalize+template+tokenize+mask, as a lazy Ray dataset: one actor task per chunk."""
    import ray.data

    chunks = split_tail(chunks, 2 * pool.workers)
    ds = ray.data.from_items([asdict(c) for c in chunks], override_num_blocks=max(1, len(chunks)))
    ds = ds.map_batches(
        TokenizeAndMask,
        fn_constructor_kwargs={
            "info": info,
            "template": cfg.template,
            "fmt": cfg.format,
            "map_keys": cfg.map_keys,
            "loss": cfg.loss,
            "seq_length": cfg.seq_length,
            "overlong": cfg.overlong,
            "threads": pool.threads,
            "so": so,
            "batch_size": cfg.batch_size,
        },
        batch_size=1,
        batch_format="numpy",
        # a second chunk queued per actor, so it starts the moment the first ends (with one, an
        # actor idled ~0.15 s per chunk waiting for the next); the last chunks are cut small
        # (split_tail), so a queued chunk delays the end by little
        compute=ray.data.ActorPoolStrategy(size=pool.workers, max_tasks_in_flight_per_actor=2),
        num_cpus=pool.actor_cpus,
    )
    return ds


def _prepare(cfg: BuildConfig):
    """What every command that reads inputs needs first: storage options, the tokenizer (checked
    against the template), the input files and their read chunks. Fails before Ray starts."""
    so = storage_options(cfg.s3_endpoint_url, cfg.s3_addressing_style)
    info = load_tokenizer_info(cfg.tokenizer, cfg.trust_remote_code)
    from .template import Template

    Template(cfg.template, info.specials, info.chat_template, info.special_strings, cfg.loss)  # fail early
    files = expand_inputs(cfg.inputs, so)
    chunks = plan_chunks(files, so, cfg.chunk_bytes)
    return so, info, files, chunks


@dataclass(frozen=True)
class TokenizePool:
    """How the tokenizer actors are sized."""

    workers: int  # actors
    threads: int  # encoder threads per actor
    actor_cpus: float  # logical CPUs each actor (and the read fused into it) asks Ray for
    stats_cpus: float  # what a statistics task asks for: the CPU the actors leave, at most one


def size_pool(cpus: int, workers: int | None = None, chunks: int | None = None) -> TokenizePool:
    """One single-threaded tokenizer actor per CPU by default, and no more actors than chunks
    (an actor takes a whole chunk at a time: extra ones would only start up and sit idle).

    Each actor alternates between Python (JSON, normalize, template, masks) and the Rust
    encoder, and the actors are not in step, so every core stays busy: measured on 2 cores, two
    one-thread actors beat one two-thread actor, whose cores idle while it is in Python. With
    fewer actors than CPUs, each encodes with its share of the cores.

    The actors ask Ray for at most ``cpus - 1`` CPUs in all (half a CPU on a one-CPU machine):
    an actor pool holding every logical CPU would starve any task scheduled beside it.
    """
    cpus = max(1, int(cpus))
    workers = workers or cpus
    workers = max(1, min(workers, chunks or workers))
    threads = max(1, round(cpus / workers))
    spare = max(cpus - 1, cpus / 2) / workers
    actor_cpus = math.floor(min(float(threads), spare) * 1e4) / 1e4
    # one statistics task at a time beside the actors: a second would only make Ray start
    # (and import into) another worker process for a task of milliseconds
    stats_cpus = math.floor(min(1.0, cpus - workers * actor_cpus) * 1e4) / 1e4
    return TokenizePool(workers, threads, actor_cpus, stats_cpus)


def _start_ray(cfg: BuildConfig, chunks: int) -> TokenizePool:
    """Start or join Ray, set up Ray Data, and size the tokenizer pool from the cluster's CPUs."""
    init_ray(cfg)
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.execution_options.verbose_progress = False  # progress bars, not per-operator metric dumps
    # Ray Data reads every map task's memory map (/proc smaps, ~5 ms for a 1 GB tokenizer actor)
    # once a second for its own metrics; nothing here uses them
    ctx.memory_usage_poll_interval_s = None
    pool = size_pool(int(ray.cluster_resources().get("CPU", 1)), cfg.tokenize_workers, chunks)
    log.info("tokenizer actors: %d, %d encoder thread(s) each", pool.workers, pool.threads)
    return pool


def _split_reasons(errors: list[dict]) -> tuple[Counter, Counter]:
    """(rejected, dropped) counts by reason."""
    rejected = Counter(e["reason"] for e in errors if e["reason"] not in DROP_REASONS)
    dropped = Counter(e["reason"] for e in errors if e["reason"] in DROP_REASONS)
    return rejected, dropped


def measure_inputs(cfg: BuildConfig) -> tuple[dict, dict]:
    """Read and tokenize the inputs and return their length statistics (no output written)."""
    so, info, files, chunks = _prepare(cfg)
    pool = _start_ray(cfg, len(chunks))
    _, parts = _tokenize_and_measure(_tokenize_dataset(cfg, chunks, info, so, pool), cfg.seq_length,
                                     pool.stats_cpus)
    import ray

    agg = _collect(ray.get(parts))
    return agg, dict(_split_reasons(agg["errors"])[0])


def _tokenize_and_measure(ds, seq_length: int, stats_cpus: float) -> tuple[list, list]:
    """Run the read+tokenize dataset to its end, keeping its blocks in the object store, and
    start the statistics of each block as soon as it exists (a small task, on the CPU the
    actors leave, where the block is): they are ready when tokenization ends, with no second
    pass over the data. Returns the block refs and the refs of their statistics."""
    import ray

    measure = ray.remote(length_stats).options(num_cpus=stats_cpus)
    blocks, parts = [], []
    for bundle in ds.iter_internal_ref_bundles():
        if any(sl is not None for sl in getattr(bundle, "slices", None) or ()):
            raise BuildError("internal error: Ray Data returned a partial block")  # never for map outputs
        for ref, meta in zip(bundle.block_refs, bundle.metadata):
            if meta.num_rows == 0:
                continue  # an empty block (it may lack the schema): nothing to count or write
            blocks.append(ref)
            parts.append(measure.remote(ref, seq_length))
    return blocks, parts


def _shuffle_and_write(blocks: list, plan_ref, num_shards: int, write_kw: dict) -> list[dict]:
    """Assign pack slots and write the shards: one partition task per block (its samples cut by
    output shard), one writer task per shard (its parts from every block). A block is read once
    and each sample crosses the object store once; Ray retries a task that dies. Empties
    ``blocks``, so that each block is freed once its partition task has run."""
    import ray

    split = ray.remote(partition_block).options(num_returns=num_shards)
    parts = [split.remote(b, plan_ref, num_shards) for b in blocks]
    if num_shards == 1:
        parts = [[p] for p in parts]
    blocks.clear()
    write = ray.remote(write_parts)
    pending = [write.remote(s, *(p[s] for p in parts), **write_kw) for s in range(num_shards)]
    del parts
    metas, step, t0 = [], max(1, num_shards // 10), time.time()
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        metas += ray.get(done)
        if len(metas) % step == 0 or not pending:
            log.info("shards written: %d/%d (%.0f s)", len(metas), num_shards, time.time() - t0)
    return sorted(metas, key=lambda m: m["shard"])


def run(cfg: BuildConfig) -> dict:
    t0 = time.time()
    so, info, files, chunks = _prepare(cfg)
    added: list[str] = []
    markers = MARKERS.get(cfg.template, ())
    if cfg.add_special_tokens:
        info, added = add_special_tokens(info, markers)
        if added:
            log.info("added special tokens %s; vocabulary is now %d", ", ".join(added), info.vocab_size)
    elif missing := missing_markers(info, markers):
        log.warning("template %s writes %s, which this tokenizer has no single token for: they are split into "
                    "ordinary tokens. Pass --add-special-tokens to add them (the extended tokenizer is saved "
                    "in OUTPUT/tokenizer/)", cfg.template, ", ".join(missing))
    pad_id = info.pad_id()
    out_fs, out_root = get_fs(cfg.output, so)
    check_bucket(out_fs, out_root, cfg.output, "--output")
    if (out_fs.exists(out_path(out_root, "_SUCCESS")) or out_fs.exists(out_path(out_root, "data.idx"))) and not cfg.overwrite:
        raise BuildError(f"{cfg.output} already holds a dataset; pass --overwrite to replace it")
    log.info("inputs: %d files, %d chunks", len(files), len(chunks))
    tmp_root = out_path(out_root, TMP)
    manifest = fingerprint(cfg, files, info, so)
    resuming = _prepare_tmp(out_fs, tmp_root, manifest, cfg.resume)
    if out_fs.exists(out_path(out_root, "_SUCCESS")):
        out_fs.rm(out_path(out_root, "_SUCCESS"))  # the old dataset is being replaced
    out_fs.makedirs(join(tmp_root, "shards"), exist_ok=True)
    with out_fs.open(join(tmp_root, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)

    pool = _start_ray(cfg, len(chunks))
    import ray

    ds = _tokenize_dataset(cfg, chunks, info, so, pool)
    S = cfg.seq_length
    t_stage = time.time()
    blocks, parts = _tokenize_and_measure(ds, S, pool.stats_cpus)
    timings = {"start": round(t_stage - t0, 2), "read+tokenize": round(time.time() - t_stage, 2)}
    t_stage = time.time()

    # ---- stats (computed per block while tokenizing: this waits for the last ones)
    agg = _collect(ray.get(parts))
    errors = agg["errors"]
    hist_kept = stats_mod.add_hist(np.zeros(S + 1, dtype=np.int64), agg["hist_kept"])  # kept lengths are <= S
    rejected, dropped = _split_reasons(errors)
    if rejected and cfg.on_bad_record == "fail":
        first = next(e for e in errors if e["reason"] not in DROP_REASONS)
        where = describe_position(files[first["src"]].url, first["row"], first["offset"], so)
        more = sum(rejected.values()) - 1
        raise BuildError(
            f"{where}: {first['reason']}: {first['message']}"
            + (f" (and {more} more bad records)" if more else "")
            + "; pass --on-bad-record skip to skip bad records and list them in rejects.jsonl"
        )
    samples = int(hist_kept.sum())
    if samples == 0:
        raise BuildError("no sample left to write: every record was rejected or dropped")
    timings["stats"] = round(time.time() - t_stage, 2)
    t_stage = time.time()

    # ---- plan
    plan = plan_bfd(hist_kept, S) if cfg.pack else _plan_single(hist_kept, S)
    P = plan.num_packs
    stored = {"pai": 2 * S * P, "mindspeed": 3 * S * P}.get(cfg.layout) or int(np.dot(np.arange(S + 1), hist_kept))
    num_shards = max(1, min(cfg.num_shards or -(-stored // cfg.shard_tokens), P))
    plan_ref = ray.put(
        {"table": slot_table(plan), "run_offsets": _run_offsets(agg["runs"]), "seed": cfg.seed,
         "num_shards": num_shards, "num_packs": P}
    )
    timings["plan"] = round(time.time() - t_stage, 2)
    t_stage = time.time()

    # ---- assign + write shards (into _tmp/shards)
    write_kw = {"tmp_dir": join(cfg.output, TMP, "shards"), "so": so, "layout": cfg.layout, "seq_length": S,
                "pad_id": pad_id, "resume": resuming}
    metas = _shuffle_and_write(blocks, plan_ref, num_shards, write_kw)
    if resuming:
        log.info("resume: reused %d of %d shards", sum(bool(m.get("resumed")) for m in metas), len(metas))
    if [m["shard"] for m in metas] != list(range(num_shards)):
        raise BuildError(f"expected {num_shards} shards, got {[m['shard'] for m in metas]}")
    timings["assign+write"] = round(time.time() - t_stage, 2)
    t_stage = time.time()

    # ---- merge (into _tmp), check, commit
    names = [f"shards/part-{m['shard']:05d}" for m in metas]
    suffixes = layout_parts(cfg.layout)
    merged = None
    for suffix in suffixes:
        m = merge_shards(out_fs, [join(tmp_root, n + suffix) for n in names], join(tmp_root, "data" + suffix))
        merged = merged or m
    with out_fs.open(join(tmp_root, "provenance.bin"), "wb") as out:
        for n in names:
            with out_fs.open(join(tmp_root, n + ".prov"), "rb") as f:
                out.write(f.read())
            out_fs.rm(join(tmp_root, n + ".prov"))
    with out_fs.open(join(tmp_root, "inputs.json"), "w") as f:
        json.dump([fi.url for fi in files], f, indent=1)
    with out_fs.open(join(tmp_root, "data_order.txt"), "w") as f:
        f.write("".join(f"{n}{s}.bin\n" for n in names for s in suffixes))
    present = [f"data{s}.{e}" for s in suffixes for e in ("bin", "idx")]
    if added:
        out_fs.makedirs(join(tmp_root, "tokenizer"), exist_ok=True)
        save_tokenizer(out_fs, join(tmp_root, "tokenizer"), info)
        present.append("tokenizer")
    present += ["data_order.txt", "shards", "stats.json", "provenance.bin", "inputs.json"]
    if errors:
        present.append("rejects.jsonl")
        with out_fs.open(join(tmp_root, "rejects.jsonl"), "w") as f:
            for e in errors:
                where = describe_position(files[e["src"]].url, e["row"], e["offset"], so)
                f.write(json.dumps({"source": files[e["src"]].url, "position": where, "reason": e["reason"],
                                    "message": e["message"], "record": e["bad_raw"]}, ensure_ascii=False) + "\n")
    timings["merge"] = round(time.time() - t_stage, 2)
    log.info("stage seconds: %s", ", ".join(f"{k} {v}" for k, v in timings.items()))

    tokens = int(np.dot(np.arange(S + 1), hist_kept))
    if cfg.layout == "native" and len(merged.sequence_lengths) != samples:
        raise BuildError(f"internal check failed: {len(merged.sequence_lengths)} sequences written for {samples} samples")
    if merged.num_documents != P:
        raise BuildError(f"internal check failed: {merged.num_documents} packs written, plan has {P}")
    rej_n, drop_n = sum(rejected.values()), sum(dropped.values())
    if agg["rows"] != agg["rows_written"] + rej_n + drop_n:
        raise BuildError(
            f"internal check failed: rows read {agg['rows']} != written {agg['rows_written']} + rejected {rej_n} "
            f"+ dropped {drop_n}"
        )
    result = {
        "rows_read": agg["rows"],
        "rows_written": agg["rows_written"],
        "samples_written": samples,
        "rejected": dict(sorted(rejected.items())),
        "dropped": dict(sorted(dropped.items())),
        "overlong": {"policy": cfg.overlong, "rows_kept": agg["overlong_kept"]},
        "tokens": tokens,
        "loss_tokens": agg["loss_tokens"],
        **stats_mod.packing_figures(tokens, P, S),
        "length": stats_mod.length_summary(agg["hist_all"] if agg["hist_all"] is not None else np.zeros(1)),
        "layout": cfg.layout,
        "tokenizer": cfg.tokenizer,
        "template": cfg.template,
        "loss_policy": cfg.loss,
        "packed": cfg.pack,
        "seed": cfg.seed,
        "shards": len(metas),
        "vocab_size": info.vocab_size,
        "added_special_tokens": added,
        "pad_id": pad_id,
        "rows_per_file": {files[s].url: int(c) for s, c in sorted(agg["rows_per_src"].items())},
        "pack_fill": {str(t): int(c) for t, c in enumerate(plan.pack_fill()) if c},
        "sample_lengths": {str(L): int(c) for L, c in enumerate(agg["hist_all"]) if c},
    }
    with out_fs.open(join(tmp_root, "stats.json"), "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    from .report import render_report

    with out_fs.open(join(tmp_root, "report.html"), "w") as f:
        f.write(render_report(result))
    present.append("report.html")
    _commit(out_fs, out_root, present)
    print(stats_mod.format_summary(result), file=sys.stderr)
    print(f"output           {cfg.output}  ({time.time() - t0:.1f} s)", file=sys.stderr)
    return result

"""The Ray driver: wires the pure stages into Ray Data and runs them.

read (tasks) -> normalize+template+tokenize+mask (actor pool) -> stats (tasks + driver)
-> sort+pack (plan on the driver from histograms, slot assignment in tasks)
-> write shards (one task per pack range) -> merge (driver, streaming).

Everything that decides a byte of output lives in the pure modules; this file only moves
data between them. Output is independent of how many workers, blocks or shards run.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import time
from collections import Counter
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import stats as stats_mod
from .config import BuildConfig
from .fs import get_fs, join, storage_options
from .merge import merge_shards
from .pack import PackPlan, assign_slots, plan_bfd, slot_table
from .read import Chunk, check_bucket, describe_position, expand_inputs, plan_chunks, read_chunk
from .tokenize import SampleBuilder, TokenizerInfo, load_tokenizer_info
from .write import encode_shard, write_shard

log = logging.getLogger("raysft")


class BuildError(RuntimeError):
    """A failure to report as one clear line (bad input, bad settings)."""


# --------------------------------------------------------------------------- stage functions
# Module-level functions and classes so Ray ships them by reference.


def read_inputs(batch: dict, so: dict) -> pa.Table:
    """Read stage (Ray task): one chunk description -> its raw records."""
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


def _runs(chunk: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Start of the run each row belongs to: a run is a maximal stretch of rows of one chunk
    with consecutive record numbers. Runs are disjoint ranges of one chunk, so ordering them
    by (chunk, first idx) is input order, however Ray cut the blocks."""
    n = len(idx)
    new = np.ones(n, dtype=bool)
    if n > 1:
        new[1:] = (chunk[1:] != chunk[:-1]) | (idx[1:] != idx[:-1] + 1)
    first_pos = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    return idx[first_pos]


class Tokenize:
    """Tokenize stage (Ray actor): holds one tokenizer for its lifetime."""

    def __init__(self, info: TokenizerInfo, template: str, fmt: str, map_keys: dict, loss: str, seq_length: int):
        self.builder = SampleBuilder(info, template, fmt, map_keys, loss)
        self.seq_length = seq_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        raws = batch.column("raw").to_pylist()
        errors = batch.column("error").to_pylist()
        ids, reasons, messages = self.builder(raws, errors)
        n = len(raws)
        lengths = np.array([-1 if a is None else len(a) for a in ids], dtype=np.int32)
        loss_n = np.array([0 if a is None else int((a >= 0).sum()) for a in ids], dtype=np.int32)
        over = lengths > self.seq_length
        for i in np.nonzero(over)[0]:
            reasons[i], messages[i] = "overlong", f"{lengths[i]} tokens > seq-length {self.seq_length}"
        keep = [a for a, o in zip(ids, over) if a is not None and not o]
        kept = (lengths >= 0) & ~over
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(np.where(kept, lengths, 0), out=offsets[1:])
        values = np.concatenate(keep) if keep else np.zeros(0, np.int32)
        chunk = batch.column("chunk").to_numpy()
        idx = batch.column("idx").to_numpy()
        # rank of each kept sample among same-length kept samples of its run (input order)
        run_first = _runs(chunk, idx)
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
                "chunk": batch.column("chunk"),
                "src": batch.column("src"),
                "idx": batch.column("idx"),
                "row": batch.column("row"),
                "offset": batch.column("offset"),
                "n": pa.array(lengths),
                "loss_n": pa.array(loss_n),
                "run_first": pa.array(run_first),
                "run_rank": pa.array(run_rank),
                "ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32())),
                "reason": pa.array(reasons, pa.string()),
                "message": pa.array(messages, pa.string()),
            }
        )


def block_stats(batch: pa.Table, seq_length: int) -> pa.Table:
    """Stats stage (Ray task): histograms and counts of one block, pickled into one row."""
    n = batch.column("n").to_numpy()
    reason = np.asarray(batch.column("reason").to_pylist(), dtype=object)
    src = batch.column("src").to_numpy()
    kept = reason == ""
    chunk = batch.column("chunk").to_numpy()[kept]
    run_first = batch.column("run_first").to_numpy()[kept]
    lk = n[kept].astype(np.int64)
    runs: dict[tuple[int, int], Counter] = {}
    if len(lk):
        keys = np.stack([chunk.astype(np.int64), run_first, lk], axis=1)
        uniq, counts = np.unique(keys, axis=0, return_counts=True)
        for (c, r, L), k in zip(uniq.tolist(), counts.tolist()):
            runs.setdefault((c, r), Counter())[L] = k
    bad = ~kept
    errors = []
    if bad.any():
        cols = {k: batch.column(k).to_pylist() for k in ("chunk", "idx", "src", "row", "offset", "reason", "message")}
        for i in np.nonzero(bad)[0].tolist():
            errors.append({k: cols[k][i] for k in cols})
    payload = {
        "rows": len(n),
        "rows_per_src": Counter(src.tolist()),
        "hist_all": np.bincount(n[n >= 0].astype(np.int64)) if (n >= 0).any() else np.zeros(1, np.int64),
        "hist_kept": np.bincount(lk, minlength=seq_length + 1),
        "loss_tokens": int(batch.column("loss_n").to_numpy()[kept].sum()),
        "runs": runs,
        "errors": errors,
    }
    return pa.table({"payload": pa.array([pickle.dumps(payload)], pa.binary())})


_CACHE: dict = {}


def _cached_get(ref):
    import ray

    key = ref.hex()
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]


def assign(batch: pa.Table, plan_ref) -> pa.Table:
    """Sort+pack stage, per block (Ray task): each kept sample gets its output pack, its
    position in the pack and the shard that writes it."""
    ctx = _cached_get(plan_ref)
    keep = pc.equal(batch.column("reason"), "")
    batch = batch.filter(keep)
    n = batch.column("n").to_numpy().astype(np.int64)
    chunk = batch.column("chunk").to_numpy().astype(np.int64)
    run_first = batch.column("run_first").to_numpy()
    base = np.zeros(len(n), dtype=np.int64)
    for i, (c, r, L) in enumerate(zip(chunk.tolist(), run_first.tolist(), n.tolist())):
        base[i] = ctx["run_offsets"][(c, r)][L]
    ranks = base + batch.column("run_rank").to_numpy()
    out_pack, pos = assign_slots(ctx["table"], n, ranks, ctx["seed"])
    shard = out_pack * ctx["num_shards"] // ctx["num_packs"]
    return pa.table(
        {
            "shard": pa.array(shard),
            "out_pack": pa.array(out_pack),
            "pos": pa.array(pos),
            "ids": batch.column("ids"),
        }
    )


def write_group(batch: pa.Table, tmp_dir: str, so: dict, layout: str, seq_length: int, pad_id: int) -> pa.Table:
    """Write-shards stage (Ray task): all samples of one pack range -> one .bin/.idx shard."""
    shard = int(batch.column("shard")[0].as_py())
    ids_col = batch.column("ids").combine_chunks()
    offsets = ids_col.offsets.to_numpy()
    values = ids_col.values.to_numpy(zero_copy_only=False)
    samples = [values[offsets[i] : offsets[i + 1]] for i in range(len(ids_col))]
    tokens, index = encode_shard(
        samples, batch.column("out_pack").to_numpy(), batch.column("pos").to_numpy(), layout, seq_length, pad_id
    )
    fs, root = get_fs(tmp_dir, so)
    meta = write_shard(fs, join(root, f"part-{shard:05d}"), tokens, index)
    return pa.table({"shard": [shard], "meta": [json.dumps(meta)]})


# --------------------------------------------------------------------------- driver


def init_ray(cfg: BuildConfig) -> None:
    import ray

    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True)


def _plan_single(hist: np.ndarray, seq_length: int) -> PackPlan:
    """--no-pack: every sample is its own pack."""
    lengths = [L for L in range(len(hist) - 1, 0, -1) if hist[L]]
    return PackPlan(seq_length, [(L,) for L in lengths], np.array([hist[L] for L in lengths], dtype=np.int64))


def run(cfg: BuildConfig) -> dict:
    t0 = time.time()
    so = storage_options(cfg.s3_endpoint_url, cfg.s3_addressing_style)
    info = load_tokenizer_info(cfg.tokenizer, cfg.trust_remote_code)
    from .template import Template

    Template(cfg.template, info.specials, info.chat_template, info.special_strings, cfg.loss)  # fail early
    pad_id = info.pad_id()
    out_fs, out_root = get_fs(cfg.output, so)
    check_bucket(out_fs, out_root, cfg.output, "--output")
    if out_fs.exists(join(out_root, "data.idx")) and not cfg.overwrite:
        raise BuildError(f"{cfg.output} already holds a dataset (data.idx); pass --overwrite to replace it")
    files = expand_inputs(cfg.inputs, so)
    chunks = plan_chunks(files, so, cfg.chunk_bytes)
    log.info("inputs: %d files, %d chunks", len(files), len(chunks))

    init_ray(cfg)
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = cfg.tokenize_workers or max(1, cpus - 1)

    ds = ray.data.from_items([asdict(c) for c in chunks], override_num_blocks=max(1, len(chunks)))
    ds = ds.map_batches(read_inputs, fn_kwargs={"so": so}, batch_size=1, batch_format="numpy")
    ds = ds.map_batches(
        Tokenize,
        fn_constructor_kwargs={
            "info": info,
            "template": cfg.template,
            "fmt": cfg.format,
            "map_keys": cfg.map_keys,
            "loss": cfg.loss,
            "seq_length": cfg.seq_length,
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
    )
    tokenized = ds.materialize()

    # ---- stats
    S = cfg.seq_length
    parts = [
        pickle.loads(b)
        for b in tokenized.map_batches(
            block_stats, fn_kwargs={"seq_length": S}, batch_size=None, batch_format="pyarrow"
        ).to_pandas()["payload"]
    ]
    rows_read = sum(p["rows"] for p in parts)
    hist_all = None
    hist_kept = np.zeros(S + 1, dtype=np.int64)
    runs: dict[tuple[int, int], Counter] = {}
    errors = []
    rows_per_src: Counter = Counter()
    loss_tokens = 0
    for p in parts:
        hist_all = stats_mod.add_hist(hist_all, p["hist_all"])
        hist_kept += p["hist_kept"]
        for k, cnt in p["runs"].items():
            runs.setdefault(k, Counter()).update(cnt)
        errors += p["errors"]
        rows_per_src.update(p["rows_per_src"])
        loss_tokens += p["loss_tokens"]
    errors.sort(key=lambda e: (e["chunk"], e["idx"]))
    rejected = Counter(e["reason"] for e in errors if e["reason"] != "overlong")
    dropped = Counter(e["reason"] for e in errors if e["reason"] == "overlong")
    if rejected and cfg.on_bad_record == "fail":
        first = next(e for e in errors if e["reason"] != "overlong")
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

    # ---- plan
    plan = plan_bfd(hist_kept, S) if cfg.pack else _plan_single(hist_kept, S)
    table = slot_table(plan)
    run_offsets: dict[tuple[int, int], dict[int, int]] = {}
    running: Counter = Counter()
    for key in sorted(runs):
        run_offsets[key] = {L: running[L] for L in runs[key]}
        running.update(runs[key])
    P = plan.num_packs
    stored = P * 2 * S if cfg.layout == "pai" else int(np.dot(np.arange(S + 1), hist_kept))
    num_shards = cfg.num_shards or max(1, -(-stored // cfg.shard_tokens))
    num_shards = max(1, min(num_shards, P))
    plan_ref = ray.put(
        {"table": table, "run_offsets": run_offsets, "seed": cfg.seed, "num_shards": num_shards, "num_packs": P}
    )

    # ---- assign + write shards
    shard_dir = join(cfg.output, "shards")
    if out_fs.exists(join(out_root, "shards")):
        out_fs.rm(join(out_root, "shards"), recursive=True)
    if not cfg.output.startswith(("s3://", "s3a://")):
        os.makedirs(shard_dir, exist_ok=True)
    metas = (
        tokenized.map_batches(assign, fn_kwargs={"plan_ref": plan_ref}, batch_format="pyarrow")
        .groupby("shard")
        .map_groups(
            write_group,
            fn_kwargs={"tmp_dir": shard_dir, "so": so, "layout": cfg.layout, "seq_length": S, "pad_id": pad_id},
            batch_format="pyarrow",
        )
        .take_all()
    )
    metas = sorted((json.loads(m["meta"]) | {"shard": m["shard"]} for m in metas), key=lambda m: m["shard"])
    if [m["shard"] for m in metas] != list(range(num_shards)):
        raise BuildError(f"expected {num_shards} shards, got {[m['shard'] for m in metas]}")

    # ---- merge
    prefixes = [join(out_root, "shards", f"part-{m['shard']:05d}") for m in metas]
    merged = merge_shards(out_fs, prefixes, join(out_root, "data"))
    with out_fs.open(join(out_root, "data_order.txt"), "w") as f:
        f.write("".join(f"shards/part-{m['shard']:05d}.bin\n" for m in metas))
    if cfg.on_bad_record == "skip" or errors:
        with out_fs.open(join(out_root, "rejects.jsonl"), "w") as f:
            for e in errors:
                where = describe_position(files[e["src"]].url, e["row"], e["offset"], so)
                f.write(
                    json.dumps(
                        {
                            "source": files[e["src"]].url,
                            "position": where,
                            "reason": e["reason"],
                            "message": e["message"],
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )

    tokens = int(np.dot(np.arange(S + 1), hist_kept))
    written = int(merged.num_documents if cfg.layout == "pai" else len(merged.sequence_lengths))
    samples_written = samples
    if cfg.layout == "native" and written != samples:
        raise BuildError(f"internal check failed: {written} sequences written for {samples} samples")
    rej_n, drop_n = sum(rejected.values()), sum(dropped.values())
    if rows_read != samples_written + rej_n + drop_n:
        raise BuildError(
            f"internal check failed: rows read {rows_read} != written {samples_written} + rejected {rej_n} "
            f"+ dropped {drop_n}"
        )
    result = {
        "rows_read": rows_read,
        "samples_written": samples_written,
        "rejected": dict(sorted(rejected.items())),
        "dropped": dict(sorted(dropped.items())),
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        **stats_mod.packing_figures(tokens, P, S),
        "length": stats_mod.length_summary(hist_all if hist_all is not None else np.zeros(1)),
        "layout": cfg.layout,
        "tokenizer": cfg.tokenizer,
        "template": cfg.template,
        "packed": cfg.pack,
        "seed": cfg.seed,
        "shards": len(metas),
        "vocab_size": info.vocab_size,
        "pad_id": pad_id,
        "rows_per_file": {files[s].url: int(c) for s, c in sorted(rows_per_src.items())},
        "pack_fill": {str(t): int(c) for t, c in enumerate(plan.pack_fill()) if c},
    }
    with out_fs.open(join(out_root, "stats.json"), "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    with out_fs.open(join(out_root, "_SUCCESS"), "w") as f:
        f.write("")
    print(stats_mod.format_summary(result), file=sys.stderr)
    print(f"output           {cfg.output}  ({time.time() - t0:.1f} s)", file=sys.stderr)
    return result

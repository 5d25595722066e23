"""The driver's paths at scale, simulated: what the driver holds and what each task is sent
when a build has ``--samples`` samples in ``--blocks`` tokenized blocks (default 1e9 and 1e5).

    python benchmarks/driver_scale.py --samples 1e9 --blocks 1e5

No Ray and no data: synthetic per-block summaries (what ``raysft.stats.block_stats`` returns:
histograms, reason counts, run keys with their per-length counts) go through the driver's
own code in the order the build uses it:

1. ``Totals.add`` for every block summary (the statistics stage's reduce);
2. ``plan_bfd`` on the total histogram and ``slot_table`` (the plan every partition task gets);
3. ``RunOffsets.offsets`` for every block in input order (the rank offsets each partition
   task gets: its own runs only);
4. the merged index, written streaming from shard indexes (``merge_index_files``) for a
   scaled-down count of samples, to show its memory does not grow with them.

Prints and writes (``--out``) the driver's peak RSS after each step, the plan's pickled size
and the largest per-task offsets payload.
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysft.pack import RunOffsets, plan_bfd, slot_table  # noqa: E402
from raysft.stats import Totals  # noqa: E402


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lengths_pmf(S: int) -> np.ndarray:
    """A long-tailed SFT length distribution (log-normal around 300 tokens), capped at S."""
    rng = np.random.default_rng(0)
    x = np.clip(rng.lognormal(np.log(300), 0.8, 200_000).astype(np.int64), 8, S)
    pmf = np.bincount(x, minlength=S + 1).astype(np.float64)
    return pmf / pmf.sum()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=float, default=1e9)
    p.add_argument("--blocks", type=float, default=1e5)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--runs-per-block", type=int, default=2, help="runs a block holds (chunk boundaries inside it)")
    p.add_argument("--merge-samples", type=float, default=2e7, help="samples of the streaming index merge")
    p.add_argument("--out", default="driver-scale.json")
    a = p.parse_args()
    S, B, N = a.seq_length, int(a.blocks), int(a.samples)
    per_block = N // B
    pmf = lengths_pmf(S)
    rng = np.random.default_rng(1)
    result: dict = {"samples": N, "blocks": B, "seq_length": S, "rss_start_mib": round(rss_mib())}

    # 1. statistics: one summary per block, added up as they arrive
    t0 = time.time()
    tot = Totals()
    block_hists = rng.multinomial(per_block, pmf, size=min(B, 256))  # reused: the driver keeps none of them
    for b in range(B):
        h = block_hists[b % len(block_hists)]
        s = {"key": (b, 0), "rows": per_block, "rows_written": per_block, "samples": per_block, "overlong_kept": 0,
             "rows_per_src": Counter({b % 64: per_block}), "hist_all": h, "hist_kept": h,
             "loss_tokens": int(np.dot(np.arange(S + 1), h)) // 2, "reasons": Counter({"invalid_json": 1}),
             "first_bad": None, "encoder": [per_block // 100, 0, 0], "chunks": {b: b * 7919},
             "parity": [1, 0, 0], "parity_bad": []}
        tot.add(s)
    result["stats"] = {"seconds": round(time.time() - t0, 1), "rss_mib": round(rss_mib()),
                       "samples": int(tot.hist_kept.sum())}
    print("stats", result["stats"], flush=True)

    # 2. the plan, on the histogram of all samples
    t0 = time.time()
    hist = tot.hist_kept.astype(np.int64)
    plan = plan_bfd(hist, S)
    table = slot_table(plan)
    blob = pickle.dumps({"table": table, "seed": 1, "num_shards": 1000, "num_packs": plan.num_packs})
    result["plan"] = {"seconds": round(time.time() - t0, 1), "packs": int(plan.num_packs),
                      "patterns": len(plan.patterns), "pickled_bytes": len(blob), "rss_mib": round(rss_mib())}
    print("plan", result["plan"], flush=True)
    del blob

    # 3. rank offsets, block by block in input order: each task gets its own runs' offsets
    t0 = time.time()
    offsets = RunOffsets(S)
    largest = 0
    for b in range(B):
        h = block_hists[b % len(block_hists)]
        Ls = np.flatnonzero(h)
        runs = {}
        for r in range(a.runs_per_block):  # the block's samples split between its runs
            part = Ls[r:: a.runs_per_block]
            runs[(b, r * per_block)] = dict(zip(part.tolist(), h[part].tolist()))
        payload = offsets.offsets(runs)
        if b % 997 == 0:
            largest = max(largest, len(pickle.dumps(payload)))
    result["offsets"] = {"seconds": round(time.time() - t0, 1), "largest_task_payload_bytes": largest,
                         "distinct_lengths_per_block": int((block_hists[0] > 0).sum()), "rss_mib": round(rss_mib())}
    print("offsets", result["offsets"], flush=True)

    # 4. the merged index, streamed from shard indexes
    from raysft.indexed import Index, encode_index
    from raysft.merge import merge_index_files

    M, shards = int(a.merge_samples), 50
    import fsspec

    fs = fsspec.filesystem("file")
    with tempfile.TemporaryDirectory() as d:
        prefixes = []
        for s in range(shards):
            n = M // shards
            sizes = np.ones(n, np.int32)  # one token each: the index is what is measured, not the copy
            docs = np.unique(np.concatenate([np.arange(0, n, 64), [n]])).astype(np.int64)
            idx = Index(np.dtype(np.int32), sizes, docs)
            with open(f"{d}/p{s}.idx", "wb") as f:
                f.write(encode_index(idx))
            with open(f"{d}/p{s}.bin", "wb") as f:
                f.truncate(n * 4)
            prefixes.append(f"{d}/p{s}")
        before = rss_mib()
        t0 = time.time()
        merged = merge_index_files(fs, prefixes, f"{d}/merged")
        result["merge"] = {"samples": M, "shards": shards, "seconds": round(time.time() - t0, 1),
                           "index_bytes": Path(f"{d}/merged.idx").stat().st_size,
                           "rss_before_mib": round(before), "rss_after_mib": round(rss_mib()),
                           "merged": {k: v for k, v in vars(merged).items() if isinstance(v, int)}}
    print("merge", result["merge"], flush=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

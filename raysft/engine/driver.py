"""The driver: wires the pure stages into the engine's actors and tasks (Ray's, or the local
engine's processes and threads) and runs them.

read+normalize+template+tokenize+mask (actor pool) -> stats (a task per block, reduced as it
arrives) -> plan (driver, from histograms) -> slot assignment cut by shard (a task per block)
-> write shards (a task per shard) -> merge (driver, streaming) -> commit.

Nothing here decides a byte of output: that is the pure modules' work. The driver's memory
does not grow with the rows: it holds object references per block, histograms of
``seq_length`` and counters; rejects and provenance are written by workers and concatenated
in bounded buffers, and the merged index is streamed from the shard indexes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time

import numpy as np

from .. import __version__ as RAYSFT_VERSION
from .. import stats as stats_mod
from ..config import BuildConfig
from ..encode import EncoderStats, choose
from ..errors import BuildError
from ..fs import absolute, get_fs, join, storage_options
from ..layouts import get_layout
from ..merge import copy_into
from ..output import MANIFEST, TMP, Output, OutputError, OutputLock, write_json
from ..pack import PackPlan, RunOffsets, plan_bfd, slot_table
from ..read import LineCounter, check_bucket, describe_position, expand_inputs, plan_chunks, split_tail
from ..samples import Align
from ..templates import MARKERS, Template, TemplateError
from ..tokenize import add_special_tokens, load_tokenizer_info, missing_markers, save_tokenizer
from .executor import LocalExecutor, make_executor
from .session import TokenizePool
from .watch import Watchdog

log = logging.getLogger("raysft")

VERSION = 2  # of the manifest and of what output bytes depend on
OUTPUT_FILES = ("data_order.txt", "stats.json", "provenance.bin", "inputs.json", "report.html")  # beside the layout's


# --------------------------------------------------------------------------- preparation


def prepare(cfg: BuildConfig):
    """What every command that reads inputs needs first: storage options, the tokenizer
    (checked against the template), the input files and their read chunks. Fails before Ray
    starts."""
    so = storage_options(cfg.s3_endpoint_url, cfg.s3_addressing_style)
    info = load_tokenizer_info(cfg.tokenizer, cfg.trust_remote_code)
    sources = build_sources(cfg, so)
    if any(s.format != "text" for s in sources):  # fail early (plain text needs no chat template)
        try:
            Template(cfg.template, info.specials, info.chat_template, info.special_strings, cfg.loss,
                     cfg.template_kwargs, info.special_map, cfg.template_date, cfg.think_loss)
        except TemplateError as e:
            raise TemplateError(f"{e} (plain-text data needs no template: --format text)") \
                if info.chat_template is None else e from None
    files, file_source = expand_sources(sources, so)
    chunks = plan_chunks(files, so, cfg.chunk_bytes, file_source)
    return so, info, files, chunks, sources, file_source


def build_sources(cfg: BuildConfig, so: dict | None = None) -> list:
    """The build's sources: ``cfg.sources`` (a job file's ``sources:``, ``--source``), or one
    made of ``--input``, ``--format``, ``--map-keys`` and the loss policy, and one per entry of
    each LLaMA-Factory data folder among the inputs (``raysft.read.registry``)."""
    from ..read.registry import read_registry, registry_sources
    from ..sources import Source, SourceError, parse_sources

    defaults = {"format": cfg.format, "map_keys": cfg.map_keys, "loss": cfg.loss}
    if cfg.sources:
        if cfg.inputs:
            raise SourceError("give the inputs as --input or as sources, not both")
        return parse_sources(cfg.sources, defaults)
    out, plain = [], []
    for path in cfg.inputs:
        registry = read_registry(path, so)
        if registry is None:
            plain.append(path)
        else:
            out += registry_sources(path, registry, cfg.dataset, defaults, so)
    if cfg.dataset and not out:
        raise SourceError("--dataset picks entries of a LLaMA-Factory data folder: give its folder (with its "
                          "dataset_info.json) as --input")
    if plain:
        out.insert(0, Source("input", plain, cfg.format, dict(cfg.map_keys or {}), cfg.loss))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise SourceError(f"two data folders define the same entry: {', '.join(n for n in names if names.count(n) > 1)}")
    return out


def expand_sources(sources: list, so: dict):
    """All input files, source by source (each source's files in path order), and the source of
    each file; a file may belong to one source only."""
    from ..read import InputError

    files, file_source, owner = [], [], {}
    for k, src in enumerate(sources):
        for f in expand_inputs(src.inputs, so):
            if f.url in owner:
                raise InputError(f"{f.url} is an input of two sources ({owner[f.url]!r} and {src.name!r})")
            owner[f.url] = src.name
            files.append(f)
            file_source.append(k)
    return files, file_source


def pick_encoder(cfg: BuildConfig, info, files, so) -> tuple[str, EncoderStats]:
    """Run the encoder choice (and its canary) once, on the driver; the actors get the result.
    With --cache, a verdict reached before on the same tokenizer, encoders and canary texts is
    taken from the cache (raysft.cache), as the chunks are."""
    texts = _sample_texts(files, so)
    cache = key = None
    if cfg.cache:
        from ..cache import Cache, verdict_key

        cache, key = Cache(cfg.cache, so), verdict_key(info, cfg.encoder, texts, f"{VERSION}-{RAYSFT_VERSION}")
        v = cache.verdict(key)
        if v is not None:
            log.info("encoder: %s %s (the verdict of an earlier build, from the cache)", v["name"], v["version"])
            return v["name"], EncoderStats(v["name"], v["version"], why=v["why"])
    enc, why = choose(cfg.encoder, info, texts, parity=False)
    if why:
        log.info("encoder: hf (%s)", why)
    else:
        log.info("encoder: %s %s", enc.name, enc.version)
    if cache is not None:
        cache.save_verdict(key, {"name": enc.name, "version": enc.version, "why": why})
    return enc.name, EncoderStats(enc.name, enc.version, why=why)


def input_bytes(files) -> int:
    """About how many bytes the inputs hold once decompressed (``COMPRESSED_RATIO`` a
    compressed byte): what the object store and the parity sample are sized from."""
    from .session import COMPRESSED_RATIO

    return sum(f.size * (COMPRESSED_RATIO if f.compression else 1) for f in files)


def start_with_encoder(cfg: BuildConfig, ex, info, files, so, chunks: int):
    """The engine's start (Ray's: mostly waiting for its processes) and the encoder's choice
    (~2 s to load fastokens and run the canary) at the same time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="encoder") as th:
        chosen = th.submit(pick_encoder, cfg, info, files, so)
        pool = ex.start(chunks, input_bytes(files))
        encoder, enc_stats = chosen.result()
    return encoder, enc_stats, pool


def _sample_texts(files, so, limit: int = 64) -> list[str]:
    """The start of the first input, as text lines, for the encoder canary."""
    if not files:
        return []
    try:
        fs, path = get_fs(files[0].url, so)
        with fs.open(path, "rb") as f:
            head = f.read(64 << 10)
        return [t for t in head.decode("utf-8", "ignore").splitlines() if t.strip()][:limit]
    except Exception:  # noqa: BLE001 - the canary has enough without these
        return []


def parity_rate(cfg: BuildConfig, info, files, chunks, so) -> int:
    """``every`` of the chat-template parity sample (raysft.parity): about --parity-rows records
    of the input, judged by the size of the first records; 0 when there is nothing to compare
    with (no chat template in the tokenizer) or --parity off."""
    if cfg.parity == "off" or not info.chat_template or not chunks:
        return 0
    from ..parity import sample_rate
    from ..read import read_chunk

    try:
        rows = next(iter(read_chunk(chunks[0], so, 256)))
        offsets = [int(o) for o in rows.offset]
        if len(offsets) > 1 and offsets[-1] > offsets[0]:
            # the file bytes a record takes, separators and indentation included (a pretty-printed
            # JSON array takes two to three times its records' compact length)
            row_bytes = (offsets[-1] - offsets[0]) / (len(offsets) - 1)
        else:
            row_bytes = sum(len(r) for r in rows.raw) / max(1, len(rows.raw))
    except Exception:  # noqa: BLE001 - a bad first chunk fails the build in its own stage
        row_bytes = 1024.0
    return sample_rate(input_bytes(files), row_bytes, cfg.parity_rows)


def parity_result(cfg: BuildConfig, tot, every: int, files) -> dict | None:
    """stats.json's ``parity``; with --parity strict, a difference fails the build here, before
    anything is written."""
    from ..parity import summary

    if not every:
        return {"mode": cfg.parity, "checked": 0, "why": "off" if cfg.parity == "off" else
                "the tokenizer has no chat template to compare with"}
    checked, mismatched, refused = tot.parity
    examples = [{"file": files[src].url, "row": row, "outcome": what} for _, _, src, row, what in tot.parity_bad]
    res = summary(checked, mismatched, refused, examples, cfg.parity, cfg.template)
    res["sample_every"] = every
    bad = mismatched + (refused if cfg.template == "auto" else 0)
    if bad:
        first = examples[0] if examples else {"file": "?", "row": "?", "outcome": "mismatch"}
        where = f"{first['file']} row {first['row']}"
        msg = (f"chat-template parity: {bad} of {checked} checked record(s) differ from apply_chat_template "
               f"(first: {where}, {first['outcome']})")
        if cfg.parity == "strict":
            raise BuildError(msg + "; --parity strict")
        log.warning("%s; see stats.json parity", msg)
    elif checked:
        log.info("chat-template parity: %d record(s) checked, all token-identical to apply_chat_template", checked)
    return res


def source_settings(cfg: BuildConfig, info, sources: list) -> list[dict]:
    """What the tokenizer actors need of each source: its format, keys and loss policy, and
    the cache context (raysft.cache) its encoded rows are filed under."""
    from ..cache import context_digest

    return [{"format": s.format, "map_keys": s.map_keys, "loss": s.loss, "think_loss": cfg.think_loss,
             "context": context_digest(info, cfg.template, cfg.template_kwargs, cfg.template_date, s.format,
                                       s.map_keys, s.loss, f"raysft-{VERSION}-{RAYSFT_VERSION}", cfg.think_loss)}
            for s in sources]


def actor_kwargs(cfg: BuildConfig, info, so: dict, encoder: str, parity_every: int, sources: list,
                 file_source: list[int]) -> dict:
    """What each tokenizer actor (``raysft.engine.actors.TokenizeAndMask``) is made with."""
    layout = get_layout(cfg.layout)
    return {
        "info": info, "template": cfg.template, "sources": source_settings(cfg, info, sources),
        "file_source": file_source, "cache": cfg.cache, "seq_length": layout.capacity(cfg.seq_length),
        "overlong": cfg.overlong, "so": so, "batch_size": cfg.batch_size, "encoder": encoder,
        "template_kwargs": cfg.template_kwargs, "max_chars": max_chars(cfg), "avoid_end": layout.avoid_end_ids,
        "template_date": cfg.template_date, "parity_every": parity_every, "align": alignment(cfg, info),
        "pair_limits": layout.pair_limits(cfg.seq_length),
    }


def alignment(cfg: BuildConfig, info) -> tuple | None:
    """``--pad-to-multiple``'s (multiple, the layout's label shift, the EOS id it pads with), or
    None; one line where it cannot be met."""
    m = int(cfg.pad_to_multiple or 1)
    if m <= 1:
        return None
    layout = get_layout(cfg.layout)
    eos = info.token_to_id(info.eos) if info.eos is not None else None
    if eos is None:
        raise BuildError("--pad-to-multiple pads with the tokenizer's EOS token, and this tokenizer has none")
    if Align(m, layout.label_shift, eos).fit(layout.capacity(cfg.seq_length)) < 1:
        raise BuildError(f"--pad-to-multiple {m} leaves no room in a pack of --seq-length {cfg.seq_length}")
    return m, layout.label_shift, eos


def max_chars(cfg: BuildConfig) -> int | None:
    """Rendered texts longer than this cannot fit ``--seq-length`` under ``--overlong drop``
    (no token of a byte-level tokenizer stands for more than ``MAX_TOKEN_CHARS`` characters):
    they are dropped before they are encoded."""
    layout = get_layout(cfg.layout)
    most = max(layout.capacity(cfg.seq_length), layout.pair_limits(cfg.seq_length)[0])
    return most * MAX_TOKEN_CHARS if cfg.overlong == "drop" else None


MAX_TOKEN_CHARS = 1024


class Blocks:
    """The tokenized blocks, their statistics as they arrive, and the build's totals."""

    def __init__(self, ex, seq_length: int, fail_fast: bool, files, so):
        self.refs: list = []  # block refs
        self.summaries: list = []  # refs of each block's summary
        self.runs: list = []  # refs of each block's runs
        self.keys: list = []  # each block's input position, once its summary is in
        self.rejects: list = []  # (key, file) of each block that had rejects
        self.totals = stats_mod.Totals()
        self.pending: dict = {}  # summary ref -> block number
        self.fail_fast, self.files, self.so, self.S, self.ex = fail_fast, files, so, seq_length, ex

    def add(self, ref, measure, rejects_dir) -> None:
        summary, runs = measure(ref, self.S, rejects_dir, self.so)
        self.pending[summary] = len(self.refs)
        self.refs.append(ref)
        self.summaries.append(summary)
        self.runs.append(runs)
        self.keys.append(None)

    def collect(self, wait: bool) -> None:
        while self.pending:
            ready, _ = self.ex.wait(list(self.pending), num_returns=len(self.pending) if wait else 1,
                                    timeout=None if wait else 0)
            if not ready:
                return
            for ref, s in zip(ready, self.ex.get(ready)):
                k = self.pending.pop(ref)
                self.keys[k] = tuple(s["key"])
                self.totals.add(s)
                if s.get("rejects_file"):
                    self.rejects.append((tuple(s["key"]), s["rejects_file"]))
                if self.fail_fast and self.totals.rejected:
                    raise bad_record_error(self.totals, self.files, self.so)
            if not wait:
                return


def bad_record_error(t: stats_mod.Totals, files, so) -> BuildError:
    fb = t.first_bad
    where = describe_position(files[fb["src"]].url, fb["row"], fb["offset"], so)
    return BuildError(f"{where}: {fb['reason']}: {fb['message']}; pass --on-bad-record skip to skip bad records and "
                      "list them in rejects.jsonl")


def tokenize_and_measure(blocks: Blocks, chunks: list, kwargs: dict, pool: TokenizePool, rejects_dir: str | None,
                         watch: Watchdog) -> None:
    """Run the tokenizer actors over the chunks (as cut for this run: ``split_tail``) to their
    end, keeping the blocks (in Ray's object store, or the local engine's memory-mapped files), and start the statistics of each block as
    soon as it exists (a small task, on the CPU the actors leave): they are ready when
    tokenization ends, with no second pass over the data."""
    from .tasks import measure_block

    ex = blocks.ex
    measure = ex.task(measure_block, num_cpus=pool.stats_cpus, num_returns=2)
    watch.progress("tokenize", "the first tokenized block: its chunk being read and tokenized")
    progress = Progress(len(chunks))
    for refs in ex.tokenized(chunks, kwargs, pool):
        if refs is not None:  # None: the engine's timer tick (for the progress line), no sign of life
            for ref in refs:
                blocks.add(ref, measure, rejects_dir)
            watch.progress("tokenize", f"tokenized blocks after {len(blocks.refs)}")
        blocks.collect(wait=False)
        progress.report(blocks.totals)
    watch.progress("stats", "the statistics of the last blocks")
    blocks.collect(wait=True)
    progress.report(blocks.totals, done=True)


class Progress:
    """The tokenize stage's progress, one log line every ``every_s`` seconds (both engines;
    with no terminal the lines are what a log shows): chunks done of all, rows read, rows a
    second, and the time left at that pace."""

    def __init__(self, chunks: int, every_s: float = 15.0):
        self.chunks, self.every_s = max(1, chunks), every_s
        self.t0 = self.last = time.time()

    def report(self, totals, done: bool = False) -> None:
        now = time.time()
        if not done and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = max(now - self.t0, 1e-6)
        finished = min(len(totals.chunks), self.chunks)
        rate = totals.rows / elapsed
        left = elapsed * (self.chunks / finished - 1) if finished and not done else 0.0
        log.info("tokenize: %d of %d chunks, %s rows read (%s rows/s)%s", finished if not done else self.chunks,
                 self.chunks, f"{totals.rows:,}", f"{rate:,.0f}", f", about {left:.0f} s left" if left else
                 (f" in {elapsed:.0f} s" if done else ""))


def shuffle_and_write(blocks: Blocks, parts: list, plan_ref, num_shards: int, write_kw: dict, reuse: dict,
                      watch: Watchdog, shard_base: int = 0, what: str = "shards", ordered: bool = False) -> list[dict]:
    """Assign pack slots and write one packing's shards: one assignment task per block and
    packing part (with the rank offsets of its own runs), one writer task per shard. With Ray
    the assignment is the shuffle's map side, its samples cut by output shard and sent to the
    writers; where tasks share the driver's memory (``--engine local``) every writer reads its
    rows from the assigned blocks in place. ``parts``: (pick, runs of block k) in the
    packing's order (the copies of the training set one after the other; one part when nothing
    is copied). Blocks go in input order, so the offsets come from one running count of
    ``seq_length``. ``ordered`` (``--no-pack``): samples keep input order, so a run's offset is
    the count of every earlier run's samples, whatever their lengths (one class)."""
    from .tasks import assign_block, partition_block, write_parts

    ex = blocks.ex
    shared = getattr(ex, "shared_memory", False)
    split = ex.task(assign_block) if shared else ex.task(partition_block, num_returns=num_shards)
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
            if shared:
                cut.append(split(blocks.refs[k], plan_ref, offsets.offsets(runs), pick))
            else:
                p = split(blocks.refs[k], plan_ref, offsets.offsets(runs), num_shards, pick)
                cut.append([p] if num_shards == 1 else p)
    write = ex.task(write_parts)
    pending = [write(shard_base + s, *(cut if shared else [p[s] for p in cut]), **write_kw,
                     reuse=reuse.get(shard_base + s), rows_of=s)
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


def epoch_seed(seed: int, epoch: int) -> int:
    """The slot and pack-order seed of epoch ``epoch`` (the first epoch's is --seed itself)."""
    if epoch == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}/{epoch}".encode(), digest_size=4).digest(), "little")


def token_dtype(sources: list, vocab_size: int) -> str:
    """What a layout that may (``Layout.plain_ids``) stores ids as: a build of plain text only
    (every token trains) stores them as Megatron-LM's ``preprocess_data.py`` does, in the
    smallest dtype for the vocabulary (uint16 below 65,500 ids, its ``DType.optimal_dtype``);
    anything else int32 with the loss in the sign bit."""
    if sources and all(s.format == "text" for s in sources) and vocab_size < 65500:
        return "uint16"
    return "int32"


def plan_single(hist: np.ndarray, seq_length: int) -> PackPlan:
    """--no-pack: every sample is its own pack."""
    lengths = np.flatnonzero(hist[1:])[::-1] + 1
    return PackPlan(seq_length, [(int(L),) for L in lengths], hist[lengths].astype(np.int64))


# Settings that change output bytes; execution knobs (workers, batch size, shards...) do not.
FINGERPRINT_FLAGS = ("template", "format", "map_keys", "loss", "seq_length", "pack", "layout", "seed",
                     "on_bad_record", "overlong", "num_shards", "shard_tokens", "add_special_tokens", "template_kwargs",
                     "template_date", "think_loss", "dataset", "chunk_bytes", "sources", "mix_unit", "epochs", "validation",
                     "pad_to_multiple")


def fingerprint(cfg: BuildConfig, files, info) -> dict:
    """What an output depends on besides input content: the input list, the tokenizer's files
    and the output-affecting flags. Input content is compared chunk by chunk (their hashes,
    recorded per shard) when a run resumes."""
    tok = hashlib.sha256(info.tokenizer_json.encode())
    tok.update(json.dumps([info.bos, info.eos, info.pad, info.chat_template]).encode())
    flags = {k: getattr(cfg, k) for k in FINGERPRINT_FLAGS}
    return {"inputs": [f.url for f in files], "tokenizer": tok.hexdigest(), "flags": flags, "version": VERSION}


def plan_digest(hist: np.ndarray, cfg: BuildConfig, num_shards: int, extra: list | None = None) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(hist, "<i8").tobytes())
    h.update(json.dumps([cfg.seq_length, cfg.seed, cfg.layout, cfg.pack, num_shards, extra]
                        + ([] if cfg.pack else ["input-order"]), default=str).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- merge


def write_rejects(fs, tmp: str, blocks: Blocks, files, so) -> int:
    """rejects.jsonl from the blocks' reject files, in input order, each with its file
    position (JSON Lines: the line, counted in one pass per file as far as its last reject)."""
    counters: dict[int, LineCounter] = {}
    n = 0
    with fs.open(join(tmp, "rejects.jsonl"), "wb") as out:
        for _, name in sorted(blocks.rejects):
            path = join(tmp, "rejects", name)
            with fs.open(path, "rb") as f:
                for line in f:
                    e = json.loads(line)
                    url = files[e["src"]].url
                    if e["offset"] >= 0:
                        counter = counters.setdefault(e["src"], LineCounter(url, so))
                        where = f"{url} line {counter.line(e['offset'])}"
                    else:
                        where = f"{url} record {e['row']} (0-based)"
                    out.write(json.dumps({"source": url, "position": where, "reason": e["reason"],
                                          "message": e["message"], "record": e["bad_raw"]},
                                         ensure_ascii=False).encode("utf-8", "replace") + b"\n")
                    n += 1
    for c in counters.values():
        c.close()
    fs.rm(join(tmp, "rejects"), recursive=True)
    return n


def with_absolute_paths(cfg: BuildConfig) -> BuildConfig:
    """The build's local paths made absolute here, on the driver, before any reaches a worker
    (whose working folder is a raylet's or the job's unpacked working_dir): a relative --output
    or --cache names one folder for every process."""
    import dataclasses

    def source(spec):
        if not isinstance(spec, dict):
            return spec
        spec = dict(spec)
        for k in ("input", "inputs"):
            if isinstance(spec.get(k), str):
                spec[k] = absolute(spec[k])
            elif isinstance(spec.get(k), list):
                spec[k] = [absolute(i) if isinstance(i, str) else i for i in spec[k]]
        return spec

    return dataclasses.replace(
        cfg, inputs=[absolute(i) for i in cfg.inputs], output=absolute(cfg.output), cache=absolute(cfg.cache),
        tokenizer=absolute(cfg.tokenizer) if os.path.exists(cfg.tokenizer) else cfg.tokenizer,
        spill_dir=absolute(cfg.spill_dir), sources=[source(s) for s in cfg.sources])


def run(cfg: BuildConfig) -> dict:
    """Build the dataset ``cfg`` asks for, under one watchdog from the first storage call to
    the commit: any stage (listing inputs, probing the output, hashing for the cache, starting
    the engine, tokenizing, writing, merging, committing) that shows no sign of life for
    ``--stall-timeout`` seconds fails with one line naming it."""
    t0 = time.time()
    cfg = with_absolute_paths(cfg.check())  # a program's config is checked as the CLI's is
    return watched(cfg, lambda watch: _run(cfg, t0, watch))


def watched(cfg: BuildConfig, work):
    """``work(watch)`` under the build's watchdog: a stall interrupts it and is raised as
    :class:`Stalled` (one line, exit 4) instead of the interrupt."""
    with Watchdog(cfg.stall_timeout) as watch:
        try:
            return work(watch)
        except KeyboardInterrupt:
            watch.check()
            raise


def _run(cfg: BuildConfig, t0: float, watch: Watchdog) -> dict:
    watch.progress("prepare", "the tokenizer, the inputs' listing")
    so, info, files, chunks, sources, file_source = prepare(cfg)
    layout = get_layout(cfg.layout)
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
    watch.progress("prepare", "the output's storage: its bucket, its state and its lock")
    out_fs, out_root = get_fs(cfg.output, so)
    check_bucket(out_fs, out_root, cfg.output, "--output")
    check_output_outside_inputs(cfg.output, [i for src in sources for i in src.inputs], files)
    out = Output(out_fs, out_root, cfg.output)
    out.state()  # a regular file at --output: one line, before anything is created
    lock = OutputLock(out_fs, out_root, cfg.output)
    lock.acquire()
    try:
        manifest = fingerprint(cfg, files, info)
        if out.recover():
            m = out.manifest() or {}
            if {k: m.get(k) for k in manifest} == manifest:
                log.info("%s now holds the dataset of that run, which is this build's: nothing left to do", cfg.output)
                with out_fs.open(join(out_root, "stats.json"), "r") as f:
                    return json.load(f)
        out.check_writable(cfg.overwrite)
        out.check_names([*layout.final_files(), *OUTPUT_FILES, MANIFEST])
        log.info("inputs: %d files, %d chunks", len(files), len(chunks))
        old = out.prepare_tmp(manifest, cfg.resume)
        return _build(cfg, t0, so, info, files, chunks, layout, added, pad_id, out, lock, manifest, old, sources,
                      file_source, watch)
    finally:
        watch.bounded(lock.release, "releasing the output's lock")


def check_output_outside_inputs(output: str, inputs: list[str], files) -> None:
    """An output inside an input folder would be read back as input by the next run (and one
    that holds an input file would be replaced under it)."""
    import os

    from ..fs import is_remote
    from ..read import _static_prefix, check_url

    check_url(output, "--output")

    def norm(p: str) -> str:
        return (p if is_remote(p) else os.path.abspath(p)).rstrip("/") + "/"

    o = norm(output)
    for f in files:
        if f.url.startswith(o) or norm(f.url) == o:
            raise BuildError(f"--output {output} holds input {f.url}: write the output outside the input folders")
    for pat in inputs:
        root = _static_prefix(pat) if any(ch in pat for ch in "*?[") else pat
        if root and (is_remote(pat) or os.path.isdir(root)) and o.startswith(norm(root)):
            raise BuildError(f"--output {output} is inside input folder {root}: the next run would read its files "
                             "as input; write the output elsewhere")


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


def mixture(cfg: BuildConfig, tot, blocks: Blocks, sources: list, watch: Watchdog):
    """What the sources' amounts and ``--validation`` make of the tokenized samples: the
    selection (None when every sample is taken once and nothing is held out), each source's
    own amount in the mix unit (its training records), the per-block summaries of the
    selection added up, and the refs of each block's per-part runs."""
    from ..sources import Selection, Validation, count_threshold, cut_for, mix_factors
    from ..stats import SOURCE_FIGURES
    from .tasks import amounts_task, select_block, smallest_keys

    col = SOURCE_FIGURES.index(cfg.mix_unit)
    natural = [float(tot.per_source.get(k, [0, 0, 0, 0])[col]) for k in range(len(sources))]
    val = Validation.parse(cfg.validation)
    if val is None and all(s.share is None and s.budget is None and s.repeat in (None, 1.0) for s in sources):
        return None, natural, None, None
    below = None
    if val is not None and val.fraction is not None:
        below = val.fraction
    elif val is not None:
        task = blocks.ex.task(smallest_keys, num_cpus=0.5)
        watch.progress("validation", "the smallest record keys of each block")
        below = count_threshold(blocks.ex.get([task(r, val.count, cfg.seed) for r in blocks.refs]), val.count)
    task = blocks.ex.task(amounts_task, num_cpus=0.5)
    amounts: dict[int, np.ndarray] = {}
    pending = [task(r, cfg.seed, below, cfg.mix_unit) for r in blocks.refs]
    while pending:
        watch.progress("mixture", f"the amounts of {len(pending)} block(s)")
        done, pending = blocks.ex.wait(pending, num_returns=min(len(pending), 16))
        for part in blocks.ex.get(done):
            for k, a in part.items():
                amounts[k] = amounts[k] + a if k in amounts else a
    natural = [float(amounts[k].sum()) if k in amounts else 0.0 for k in range(len(sources))]
    factors = mix_factors(sources, natural)
    whole = tuple(int(np.floor(f)) for f in factors)
    cut = tuple(cut_for(amounts[k], (f - w) * natural[k]) if k in amounts else 0.0
                for k, (f, w) in enumerate(zip(factors, whole)))
    sel = Selection(whole, cut, cfg.seed, below)
    if sel.trivial:
        return None, natural, None, None
    task = blocks.ex.task(select_block, num_cpus=0.5, num_returns=2)
    refs = [task(r, sel) for r in blocks.refs]
    summaries, runs = [], []
    for i, (sref, rref) in enumerate(refs):
        watch.progress("mixture", f"block {i + 1} of {len(refs)}")
        summaries.append(blocks.ex.get(sref))
        runs.append(rref)
    return sel, natural, summaries, runs


def cached_chunks(cfg: BuildConfig, so: dict, info, chunks: list, sources: list, file_source: list[int],
                  threads: int, tail: int, stop_at_miss: bool = True,
                  watch: Watchdog | None = None) -> tuple[list, dict, bool] | None:
    """With --cache: the chunks to run, each one's content digest, and whether every one has an
    entry in the cache (by name: an entry that then fails its checksum is tokenized again, as
    always). A chunk counts as cached whole or as its parts (``split_parts``), whichever is
    there, so entries made by a run that cut the last chunks for another worker count are found;
    a chunk with neither is cut as this run cuts its last ``tail`` chunks. ``stop_at_miss``:
    None at the first chunk with no entry (the Ray engine then hashes and tokenizes in its actors)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..cache import Cache, chunk_key
    from ..read import Chunk, chunk_digest, split_parts

    cache = Cache(cfg.cache, so)
    contexts = [s["context"] for s in source_settings(cfg, info, sources)]

    def entry(pieces: tuple) -> tuple:
        digest = chunk_digest(Chunk(0, pieces), so, keep=False)[0]
        key = chunk_key(digest, [(p.kind, p.start, p.end, p.compression) for p in pieces],
                        contexts[file_source[pieces[0].src]])
        return pieces, digest, cache.exists(key)

    def forms(i: int, c) -> tuple[list, bool] | None:
        parts = split_parts(c)
        cut = parts is not None and i >= len(chunks) - tail
        first = None
        for form in ([parts, [c.pieces]] if cut else [[c.pieces], parts]):
            if form is None:
                continue
            found = [entry(pieces) for pieces in form]
            if all(hit for _, _, hit in found):
                return found, True
            first = first or found  # this run's own cut, where nothing is cached
        return None if stop_at_miss else (first, False)

    th = ThreadPoolExecutor(max(1, threads), thread_name_prefix="cache-check")
    try:
        run, digests, complete = [], {}, True
        for i, got in enumerate(th.map(forms, range(len(chunks)), chunks)):
            if watch is not None:
                watch.progress("cache", f"the inputs hashed for the cache: chunk {i + 1} of {len(chunks)}")
            if got is None:
                return None  # the rest need not be hashed: Ray's actors tokenize this one
            found, hit = got
            complete = complete and hit
            for pieces, d, _ in found:
                digests[len(run)] = d
                run.append(Chunk(len(run), pieces))
        return run, digests, complete
    finally:
        th.shutdown(wait=True, cancel_futures=True)


def _build(cfg, t0, so, info, files, chunks, layout, added, pad_id, out: Output, lock: OutputLock, manifest: dict,
           old: dict | None, sources: list, file_source: list[int], watch: Watchdog) -> dict:
    from .session import starts_ray

    digests = run = None
    complete = False
    if cfg.cache and chunks and (cfg.engine == "local" or starts_ray(cfg)):
        # every entry there: nothing is tokenized, so no tokenizer is built and, with the Ray
        # engine, no Ray instance started that would only serve cache entries
        local = LocalExecutor(cfg)
        workers = local.workers_for(len(chunks))
        local.close()
        # the local engine hashes every chunk here once (its driver threads look entries up with
        # these digests); the Ray engine stops at the first miss, its actors hash the chunks
        found = cached_chunks(cfg, so, info, chunks, sources, file_source, local.cpus, 2 * workers,
                              stop_at_miss=cfg.engine != "local", watch=watch)
        if found is not None:
            run, digests, complete = found
        if complete and cfg.engine == "ray":
            log.info("every chunk is in the tokenized cache (%s): nothing to tokenize, so no Ray instance is "
                     "started; this process does the work (--engine local's path, same bytes)", cfg.cache)
    watch.progress("start", "the tokenizer and the engine")
    if not complete:
        info.shared()  # the tokenizer, built (and checked: one line if it is not valid) before any work
    ex = make_executor(cfg, "local" if digests is not None else None, digests)
    try:
        return _build_with(ex, cfg, t0, so, info, files, chunks, layout, added, pad_id, out, lock, manifest, old,
                           sources, file_source, watch, run)
    finally:
        ex.close()


def _build_with(ex, cfg, t0, so, info, files, chunks, layout, added, pad_id, out: Output, lock: OutputLock,
                manifest: dict, old: dict | None, sources: list, file_source: list[int], watch: Watchdog,
                run: list | None = None) -> dict:
    out_fs, tmp = out.fs, out.tmp
    tmp_url = join(cfg.output, TMP)
    with watch.held("start", "the engine's start"):
        encoder, enc_stats, pool = start_with_encoder(cfg, ex, info, files, so, len(chunks))
    out_fs.makedirs(join(tmp, "shards"), exist_ok=True)
    out_fs.makedirs(join(tmp, "rejects"), exist_ok=True)
    ex.check_storage(cfg, files, so, tmp_url)
    S = cfg.seq_length
    parity_every = parity_rate(cfg, info, files, chunks, so)
    kwargs = actor_kwargs(cfg, info, so, encoder, parity_every, sources, file_source)
    if not ex.shared_memory:  # actors on other processes and nodes: the tokenizer by reference
        kwargs["info"] = info.save(join(tmp_url, "tokenizer-info.json"), so)
    blocks = Blocks(ex, S, cfg.on_bad_record == "fail", files, so)
    t_stage = time.time()
    tokenize_and_measure(blocks, run or split_tail(chunks, 2 * pool.workers), kwargs, pool,
                         join(tmp_url, "rejects"), watch)
    timings = {"start": round(t_stage - t0, 2), "read+tokenize": round(time.time() - t_stage, 2)}
    t_stage = time.time()
    tot = blocks.totals
    if tot.rejected and cfg.on_bad_record == "fail":
        raise bad_record_error(tot, files, so)
    pairs = pair_build(cfg, layout, tot)
    layout = layout.form(pairs, cfg.pack)
    most = layout.pair_limits(S)[0] if pairs else S  # the longest unit kept
    hist_kept = stats_mod.add_hist(np.zeros(most + 1, dtype=np.int64),
                                   tot.hist_kept if tot.hist_kept is not None else np.zeros(1, np.int64))
    enc_stats.rows_checked, enc_stats.mismatches, enc_stats.fallbacks = tot.encoder
    parity = parity_result(cfg, tot, parity_every, files)
    if int(hist_kept.sum()) == 0:
        raise nothing_to_write(out, blocks, files, so, cfg, tot, manifest, lock)
    timings["stats"] = round(time.time() - t_stage, 2)
    t_stage = time.time()

    # ---- mixture and split (a pass over the blocks when anything is copied, sampled or held out)
    sel, natural, sel_summaries, sel_runs = mixture(cfg, tot, blocks, sources, watch)
    zeros = np.zeros(most + 1, dtype=np.int64)
    if sel is None:
        hist_train, hist_valid = hist_kept, zeros
        train_parts = [(None, lambda k: ex.get(blocks.runs[k]))]
        valid_parts: list = []
        copies = 1
    else:
        hist_train = hist_valid = zeros
        for sm in sel_summaries:
            hist_train = stats_mod.add_hist(hist_train, sm["hist_train"])
            hist_valid = stats_mod.add_hist(hist_valid, sm["hist_valid"])
        copies = max(sm["copies"] for sm in sel_summaries)  # not every block's runs at once
        train_parts = [({"selection": sel, "copy": c}, lambda k, c=c: ex.get(sel_runs[k]).get(c))
                       for c in range(copies)]
        valid_parts = [({"selection": sel, "valid": True}, lambda k: ex.get(sel_runs[k]).get("valid"))]
    if int(hist_train.sum()) == 0:
        raise BuildError("the mixture leaves no training sample (every source's amount is 0, or "
                         "--validation holds out every record)")
    timings["mixture"] = round(time.time() - t_stage, 2)
    t_stage = time.time()

    # ---- plan (on what a pack of this layout may hold: pai keeps its last position free)
    train = Packing(cfg, layout, hist_train, train_parts, pairs)
    valid = Packing(cfg, layout, hist_valid, valid_parts, pairs) if int(hist_valid.sum()) else None
    epochs = max(1, int(cfg.epochs))
    digest = plan_digest(hist_train, cfg, train.num_shards, [sel, epochs, int(hist_valid.sum())])
    reuse = _reusable(out_fs, tmp, old, digest, train.num_shards * epochs) if old is not None else {}
    write_json(out_fs, join(tmp, "manifest.json"), manifest | {"plan": digest})
    timings["plan"] = round(time.time() - t_stage, 2)
    t_stage = time.time()

    # ---- assign + write shards (into _tmp/shards; the validation set into _tmp/valid/shards)
    write_kw = {"tmp_dir": join(tmp_url, "shards"), "so": so, "layout": cfg.layout, "seq_length": S,
                "pad_id": pad_id, "token_dtype": token_dtype(sources, info.vocab_size), "pairs": pairs,
                "packed": cfg.pack, "cap": train.cap}
    metas = []
    for e in range(epochs):
        metas += shuffle_and_write(blocks, train.parts, train.plan_ref(ex, epoch_seed(cfg.seed, e), e * train.packs),
                                   train.num_shards, write_kw, reuse, watch, e * train.num_shards,
                                   f"epoch {e + 1} shards" if epochs > 1 else "shards", train.ordered)
    valid_metas = []
    if valid is not None:
        out_fs.makedirs(join(tmp, "valid", "shards"), exist_ok=True)
        valid_metas = shuffle_and_write(blocks, valid.parts, valid.plan_ref(ex, cfg.seed), valid.num_shards,
                                        write_kw | {"tmp_dir": join(tmp_url, "valid", "shards")}, {}, watch,
                                        0, "validation shards", valid.ordered)
    blocks.refs.clear()
    if old is not None:
        log.info("resume: reused %d of %d shards", sum(bool(m.get("resumed")) for m in metas), len(metas))
    if [m["shard"] for m in metas] != list(range(train.num_shards * epochs)):
        raise BuildError(f"expected {train.num_shards * epochs} shards, got {[m['shard'] for m in metas]}")
    timings["assign+write"] = round(time.time() - t_stage, 2)
    t_stage = time.time()

    # ---- merge (into _tmp), check, commit
    keeps_shards = layout.keeps_shards and not cfg.drop_shards
    present = layout.final_files() + list(OUTPUT_FILES)
    watch.progress("merge", f"{len(metas)} shard(s) into one dataset")
    merged = _merge(out_fs, tmp, "", layout, metas, keeps_shards)
    if keeps_shards:
        present.append("shards")
    valid_stats = None
    if valid is not None:
        watch.progress("merge", f"{len(valid_metas)} validation shard(s) into one dataset")
        vmerged = _merge(out_fs, tmp, "valid", layout, valid_metas, keeps_shards)
        if vmerged["packs"] != valid.packs:
            raise BuildError(f"internal check failed: {vmerged['packs']} validation packs written, plan has "
                             f"{valid.packs}")
        present.append("valid")
    with out_fs.open(join(tmp, "inputs.json"), "w") as f:
        json.dump([fi.url for fi in files], f, indent=1)
    if added:
        out_fs.makedirs(join(tmp, "tokenizer"), exist_ok=True)
        save_tokenizer(out_fs, join(tmp, "tokenizer"), info)
        present.append("tokenizer")
    if blocks.rejects:
        watch.progress("merge", "rejects.jsonl")
        write_rejects(out_fs, tmp, blocks, files, so)
        present.append("rejects.jsonl")
    timings["merge"] = round(time.time() - t_stage, 2)
    log.info("stage seconds: %s", ", ".join(f"{k} {v}" for k, v in timings.items()))

    P = train.packs
    tokens = train.tokens * epochs
    samples = train.samples * epochs * (2 if pairs else 1)  # a pair is two samples (its sides)
    if merged["packs"] != P * epochs:
        raise BuildError(f"internal check failed: {merged['packs']} packs written, plan has {P * epochs}")
    if merged.get("samples") is not None and merged["samples"] != samples and layout.counts_samples:
        raise BuildError(f"internal check failed: {merged['samples']} samples written for {samples}")
    rejected, dropped = tot.rejected, dict(tot.dropped)
    rows_written = tot.rows_written
    if sel is not None:
        rows_written = sum(sm["rows_written"] for sm in sel_summaries)
        left_out = sum(sm["not_sampled"] for sm in sel_summaries)
        if left_out:
            dropped["not_sampled"] = left_out
    rej_n, drop_n = sum(rejected.values()), sum(dropped.values())
    if tot.rows != rows_written + rej_n + drop_n:
        raise BuildError(f"internal check failed: rows read {tot.rows} != written {rows_written} + rejected "
                         f"{rej_n} + dropped {drop_n}")
    lossy: dict = {}
    for m in metas + valid_metas:
        for k, v in (m.get("unrepresentable") or {}).items():
            lossy[k] = lossy.get(k, 0) + v
    for k, v in lossy.items():
        log.warning("layout %s cannot represent %s: %d time(s)", layout.name, k, v)
    if valid is not None:
        vs = [sum(x) for x in zip(*(sm["valid"] for sm in sel_summaries))]
        valid_stats = {"spec": cfg.validation, "rows": vs[0], "samples": vs[1], "tokens": vs[2], "loss_tokens": vs[3],
                       "packs": valid.packs, **stats_mod.packing_figures(valid.tokens, valid.packs, S),
                       "path": "valid/"}
    loss_tokens = (sum(v[2] for sm in sel_summaries for v in sm["per_source"].values()) * epochs
                   if sel is not None else tot.loss_tokens * epochs)
    result = {
        "rows_read": tot.rows,
        "rows_written": rows_written,
        "samples_written": samples,
        "rejected": rejected,
        "dropped": dropped,
        "overlong": {"policy": cfg.overlong, "rows_kept": tot.overlong_kept},
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        **({"pairs": pair_figures(train.samples * epochs, tokens, tot, sel_summaries, epochs)
                     | {"packed": bool(cfg.pack and layout.packs_pairs)}} if pairs else {}),
        # what was written, all epochs (each epoch packed on its own: its bound is per epoch)
        **stats_mod.packing_figures(train.tokens, P, S, epochs),
        "epochs": epochs,
        "tokens_per_epoch": train.tokens,
        "packs_per_epoch": P,
        "length": stats_mod.length_summary(tot.hist_all if tot.hist_all is not None else np.zeros(1)),
        "layout": cfg.layout,
        "pack_capacity": train.cap,
        "pad_to_multiple": int(cfg.pad_to_multiple or 1),
        "tokenizer": cfg.tokenizer,
        "template": cfg.template,
        "template_kwargs": cfg.template_kwargs,
        "template_date": cfg.template_date,
        "think_loss": cfg.think_loss,
        **({"template_render": {"replayed_from_plans": tot.template_paths[0], "rendered": tot.template_paths[1]}}
           if cfg.template == "auto" else {}),
        "encoder": {"name": enc_stats.name, "version": enc_stats.version, "rows_checked": enc_stats.rows_checked,
                    "mismatches": enc_stats.mismatches, "fallbacks": enc_stats.fallbacks,
                    **({"why": enc_stats.why} if enc_stats.why else {})},
        "parity": parity,
        "loss_policy": cfg.loss,
        "packed": cfg.pack,
        "seed": cfg.seed,
        "shards": len(metas),
        "vocab_size": info.vocab_size,
        "added_special_tokens": added,
        "pad_id": pad_id,
        **pack_shape(train),  # (max_sample_length, max_samples_per_pack, min_pack_targets)
        "unrepresentable": lossy,
        "rows_per_file": {files[s].url: int(c) for s, c in sorted(tot.rows_per_src.items())},
        "pack_fill": {str(t): int(c) * epochs for t, c in enumerate(train.plan.pack_fill()) if c},
        "sample_lengths": {str(L): int(c) for L, c in enumerate(tot.hist_all) if c},
        "mix_unit": cfg.mix_unit,
        "sources": source_stats(sources, tot, natural, sel, sel_summaries, cfg.mix_unit),
        **({"validation": valid_stats} if valid_stats else {}),
        **({"cache": {"dir": cfg.cache, "rows_from_cache": tot.cached_rows,
                      "rows_tokenized": tot.rows - tot.cached_rows}} if cfg.cache else {}),
    }
    result.update(layout.extra_stats(result))
    present += layout.write_extra(out_fs, tmp, result)
    watch.progress("merge", "stats.json, the report and the layout's metadata")
    with out_fs.open(join(tmp, "stats.json"), "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    if valid is not None:
        write_split(out_fs, join(tmp, "valid"), layout, result, valid, valid_stats, files)
    from ..report import render_report

    with out_fs.open(join(tmp, "report.html"), "w") as f:
        f.write(render_report(result))
    watch.progress("commit", "the files moved to their final names")
    out.commit(present, manifest | {"plan": digest}, lock)
    print(stats_mod.format_summary(result), file=sys.stderr)
    print(f"output           {cfg.output}  ({time.time() - t0:.1f} s)", file=sys.stderr)
    return result


def pair_build(cfg: BuildConfig, layout, tot) -> bool:
    """Whether this build writes preference pairs (every kept record is a pair); one line where
    its records mix pairs and SFT samples, or its settings cannot hold pairs."""
    if not tot.pairs:
        return False
    if tot.pairs != tot.samples:
        raise BuildError(f"the inputs hold {tot.pairs:,} preference pairs and {tot.samples - tot.pairs:,} SFT samples: "
                         "build them as two datasets (a pair build writes every record as a chosen and a rejected "
                         "sample)")
    if not layout.pairs:
        from ..layouts import PAIR_LAYOUTS

        raise BuildError(f"--layout {layout.name} has no form for preference pairs; use one of "
                         f"{', '.join(PAIR_LAYOUTS)}")
    if int(cfg.pad_to_multiple or 1) > 1:
        raise BuildError("--pad-to-multiple is for SFT samples; a preference-pair build takes none")
    return True


def pair_figures(pairs: int, tokens: int, tot, sel_summaries, epochs: int) -> dict:
    """stats.json's ``pairs``: pairs written (all epochs) and their tokens per side."""
    chosen = (sum(sm.get("chosen_tokens", 0) for sm in sel_summaries) if sel_summaries is not None
              else tot.chosen_tokens) * epochs
    return {"written": pairs, "chosen_tokens": chosen, "rejected_tokens": tokens - chosen}


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


# what a split's own stats.json repeats of the build's: how it was made and how to read it
SPLIT_KEYS = ("layout", "seq_length", "pack_capacity", "tokenizer", "template", "template_kwargs", "template_date",
              "think_loss", "loss_policy", "packed", "seed", "vocab_size", "added_special_tokens", "pad_id",
              "mix_unit", "pad_to_multiple")


def write_split(fs, root: str, layout, result: dict, split: Packing, figures: dict, files) -> None:
    """``valid/`` as a dataset of its own (readers and ``raysft.inspect`` open it like the
    main one): its stats.json (its own counts, and how the build made it), inputs.json and the
    layout's metadata, by the same rules as the training split's."""
    stats = {k: result[k] for k in SPLIT_KEYS if k in result}
    stats.update({
        "split": "valid", "validation": figures.get("spec"),
        "rows_written": figures["rows"], "samples_written": split.samples, "tokens": split.tokens,
        "loss_tokens": figures["loss_tokens"], "epochs": 1, "tokens_per_epoch": split.tokens,
        "packs_per_epoch": split.packs,
        **stats_mod.packing_figures(split.tokens, split.packs, result["seq_length"]),
        "pack_fill": {str(t): int(c) for t, c in enumerate(split.plan.pack_fill()) if c},
        "sample_lengths": {str(n): int(c) for n, c in enumerate(split.hist) if c},
        **pack_shape(split),
    })
    stats.update(layout.extra_stats(stats))
    layout.write_extra(fs, root, stats)
    with fs.open(join(root, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
        f.write("\n")
    with fs.open(join(root, "inputs.json"), "w") as f:
        json.dump([fi.url for fi in files], f, indent=1)


def _merge(fs, tmp: str, sub: str, layout, metas: list[dict], keeps_shards: bool) -> dict:
    """Merge one packed dataset's shards (in ``tmp/sub``) into ``tmp/sub/data``, with its
    provenance and its data_order.txt; the shards stay (their listing is data_order.txt) or go."""
    base = join(tmp, sub) if sub else tmp
    names = [f"shards/part-{m['shard']:05d}" for m in metas]
    merged = layout.merge(fs, [join(base, n) for n in names], join(base, "data"), metas)
    copy_into(fs, [join(base, n + ".prov") for n in names], join(base, "provenance.bin"))
    for n in names:
        for extra in (".prov", ".meta.json"):
            if fs.exists(join(base, n + extra)):
                fs.rm(join(base, n + extra))
    if not keeps_shards:
        fs.rm(join(base, "shards"), recursive=True)
    with fs.open(join(base, "data_order.txt"), "w") as f:
        f.write("".join(line + "\n" for line in (layout.data_order(names) if keeps_shards
                                                   else layout.final_files()[:1])))
    return merged


def source_stats(sources: list, tot, natural: list[float], sel, summaries, unit: str) -> list[dict]:
    """stats.json's ``sources``: per source, what was read and tokenized, what it was asked to
    give and what it gave (per epoch), in samples, tokens and loss tokens, and its share of
    the output in the mix unit, asked and realized."""
    k_unit = stats_mod.SOURCE_FIGURES.index(unit) - 1  # written[k] holds the figures after "rows"
    written = {}
    for k in range(len(sources)):
        fig = tot.per_source.get(k, [0, 0, 0, 0])
        if sel is None:
            written[k] = fig[1:]
        else:
            written[k] = [sum(sm["per_source"].get(k, [0, 0, 0])[j] for sm in summaries) for j in range(3)]
    total = sum(w[k_unit] for w in written.values()) or 1
    out = []
    for k, s in enumerate(sources):
        fig = tot.per_source.get(k, [0, 0, 0, 0])
        asked = {x: getattr(s, x) for x in ("share", "budget", "repeat") if getattr(s, x) is not None}
        out.append({
            "name": s.name, "inputs": s.inputs, "format": s.format, "map_keys": s.map_keys, "loss": s.loss,
            "asked": asked or {"repeat": 1.0},
            "rows": fig[0], "samples": fig[1], "tokens": fig[2], "loss_tokens": fig[3],
            "factor": round(written[k][k_unit] / natural[k], 6) if natural[k] else 0.0,
            "written": {"samples": written[k][0], "tokens": written[k][1], "loss_tokens": written[k][2]},
            "share": round(written[k][k_unit] / total, 6),
        })
    return out


def nothing_to_write(out: Output, blocks: Blocks, files, so, cfg, tot, manifest: dict, lock) -> BuildError:
    """Every record was rejected or dropped (or there were none): the output gets the reasons
    (rejects.jsonl, stats.json) without a dataset or _SUCCESS, and the build fails."""
    if not tot.rows:
        return BuildError(f"the inputs hold no records ({len(files)} file(s), {', '.join(f.url for f in files[:3])}"
                          + (" ..." if len(files) > 3 else "") + ")")
    present = ["stats.json"]
    if blocks.rejects:
        write_rejects(out.fs, out.tmp, blocks, files, so)
        present.append("rejects.jsonl")
    with out.fs.open(join(out.tmp, "stats.json"), "w") as f:
        json.dump({"rows_read": tot.rows, "samples_written": 0, "rejected": tot.rejected, "dropped": tot.dropped,
                   "failed": "every record was rejected or dropped", "tokenizer": cfg.tokenizer,
                   "template": cfg.template, "layout": cfg.layout, "seq_length": cfg.seq_length}, f, indent=2)
    out.commit(present, manifest, lock, success=False)
    return BuildError(f"no sample left to write: every record was rejected or dropped "
                      f"({stats_mod.format_reasons(tot.reasons)}); "
                      f"see {join(cfg.output, 'rejects.jsonl')}")


def _capacity_check(hist: np.ndarray, cap: int, layout) -> np.ndarray:
    """Layouts whose packs hold fewer than ``seq_length`` tokens take no sample longer."""
    if hist[cap + 1 :].any():
        raise BuildError(f"internal error: samples of more than {cap} tokens reached layout {layout.name}")
    return hist[: cap + 1]


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


def measure_inputs(cfg: BuildConfig) -> stats_mod.Totals:
    """Read and tokenize the inputs and return their statistics (no output written)."""
    cfg = with_absolute_paths(cfg)
    return watched(cfg, lambda watch: _measure(cfg, watch))


def _measure(cfg: BuildConfig, watch: Watchdog) -> stats_mod.Totals:
    watch.progress("prepare", "the tokenizer, the inputs' listing")
    so, info, files, chunks, sources, file_source = prepare(cfg)
    watch.progress("start", "the tokenizer and the engine")
    ex = make_executor(cfg)
    try:
        with watch.held("start", "the engine's start"):
            encoder, _, pool = start_with_encoder(cfg, ex, info, files, so, len(chunks))
        blocks = Blocks(ex, cfg.seq_length, False, files, so)
        tokenize_and_measure(blocks, split_tail(chunks, 2 * pool.workers),
                             actor_kwargs(cfg, info, so, encoder, 0, sources, file_source), pool, None, watch)
        return blocks.totals
    finally:
        ex.close()


__all__ = ["BuildError", "OutputError", "run", "measure_inputs", "prepare"]

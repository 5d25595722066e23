"""Tokenize+measure stage: the engine's start with the encoder's choice, the tokenizer actors
over the chunks, each block's statistics as it arrives (a small task), and what they add up to:
the totals, the chat-template parity, whether the build writes preference pairs, the histogram
of the lengths kept."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from .. import __version__ as RAYSFT_VERSION
from .. import stats as stats_mod
from ..cache import Cache, verdict_key
from ..config import BuildConfig
from ..encode import EncoderStats, choose
from ..errors import BuildError
from ..fs import get_fs, join
from ..layouts import PAIR_LAYOUTS, get_layout
from ..parity import sample_rate, summary
from ..read import describe_position, read_chunk, split_tail
from ..samples import Align
from .context import Build
from .prepare import VERSION, source_settings
from .session import COMPRESSED_RATIO, TokenizePool
from .tasks import measure_block
from .watch import Watchdog

log = logging.getLogger("raysft")


@dataclass
class Measured:
    """What tokenizing and measuring the inputs gave."""

    blocks: Blocks
    totals: stats_mod.Totals
    enc_stats: EncoderStats
    parity: dict | None  # stats.json's parity
    pairs: bool  # every kept record is a preference pair
    hist_kept: np.ndarray  # kept lengths (units: a pair's two sides together)


def measure(b: Build) -> Measured:
    """Start the engine, tokenize every chunk and add up the blocks' statistics."""
    cfg, ex, watch = b.cfg, b.ex, b.watch
    with watch.held("start", "the engine's start"):
        encoder, enc_stats, pool = start_with_encoder(cfg, ex, b.info, b.files, b.storage, len(b.chunks))
    b.out.fs.makedirs(join(b.out.tmp, "shards"), exist_ok=True)
    b.out.fs.makedirs(join(b.out.tmp, "rejects"), exist_ok=True)
    ex.check_storage(cfg, b.files, b.storage, b.tmp_url)
    parity_every = parity_rate(cfg, b.info, b.files, b.chunks, b.storage)
    kwargs = actor_kwargs(cfg, b.info, b.storage, encoder, parity_every, b.sources, b.file_source)
    if not ex.shared_memory:  # actors on other processes and nodes: the tokenizer by reference
        kwargs["info"] = b.info.save(join(b.tmp_url, "tokenizer-info.json"), b.storage)
    blocks = Blocks(ex, cfg.seq_length, cfg.on_bad_record == "fail", b.files, b.storage)
    b.timed("start")
    tokenize_and_measure(blocks, b.run or split_tail(b.chunks, 2 * pool.workers), kwargs, pool,
                         join(b.tmp_url, "rejects"), watch)
    b.timed("read+tokenize")
    totals = blocks.totals
    if totals.rejected and cfg.on_bad_record == "fail":
        raise bad_record_error(totals, b.files, b.storage)
    pairs = pair_build(cfg, b.layout, totals)
    b.layout = b.layout.form(pairs, cfg.pack)
    most = b.layout.pair_limits(cfg.seq_length)[0] if pairs else cfg.seq_length  # the longest unit kept
    hist_kept = stats_mod.add_hist(np.zeros(most + 1, dtype=np.int64),
                                   totals.hist_kept if totals.hist_kept is not None else np.zeros(1, np.int64))
    enc_stats.rows_checked, enc_stats.mismatches, enc_stats.fallbacks = totals.encoder
    parity = parity_result(cfg, totals, parity_every, b.files)
    b.timed("stats")
    return Measured(blocks, totals, enc_stats, parity, pairs, hist_kept)


def pick_encoder(cfg: BuildConfig, info, files, storage) -> tuple[str, EncoderStats]:
    """Run the encoder choice (and its canary) once, on the driver; the actors get the result.
    With --cache, a verdict reached before on the same tokenizer, encoders and canary texts is
    taken from the cache (raysft.cache), as the chunks are."""
    texts = _sample_texts(files, storage)
    cache = key = None
    if cfg.cache:
        cache, key = Cache(cfg.cache, storage), verdict_key(info, cfg.encoder, texts, f"{VERSION}-{RAYSFT_VERSION}")
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
    return sum(f.size * (COMPRESSED_RATIO if f.compression else 1) for f in files)


def start_with_encoder(cfg: BuildConfig, ex, info, files, storage, chunks: int):
    """The engine's start (Ray's: mostly waiting for its processes) and the encoder's choice
    (~2 s to load fastokens and run the canary) at the same time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="encoder") as th:
        chosen = th.submit(pick_encoder, cfg, info, files, storage)
        pool = ex.start(chunks, input_bytes(files))
        encoder, enc_stats = chosen.result()
    return encoder, enc_stats, pool


def _sample_texts(files, storage, limit: int = 64) -> list[str]:
    """The start of the first input, as text lines, for the encoder canary."""
    if not files:
        return []
    try:
        fs, path = get_fs(files[0].url, storage)
        with fs.open(path, "rb") as f:
            head = f.read(64 << 10)
        return [t for t in head.decode("utf-8", "ignore").splitlines() if t.strip()][:limit]
    except Exception:  # noqa: BLE001 - the canary has enough without these
        return []


def parity_rate(cfg: BuildConfig, info, files, chunks, storage) -> int:
    """``every`` of the chat-template parity sample (raysft.parity): about --parity-rows records
    of the input, judged by the size of the first records; 0 when there is nothing to compare
    with (no chat template in the tokenizer) or --parity off."""
    if cfg.parity == "off" or not info.chat_template or not chunks:
        return 0

    try:
        rows = next(iter(read_chunk(chunks[0], storage, 256)))
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


def parity_result(cfg: BuildConfig, totals, every: int, files) -> dict | None:
    """stats.json's ``parity``; with --parity strict, a difference fails the build here, before
    anything is written."""
    if not every:
        return {"mode": cfg.parity, "checked": 0, "why": "off" if cfg.parity == "off" else
                "the tokenizer has no chat template to compare with"}
    checked, mismatched, refused = totals.parity
    examples = [{"file": files[src].url, "row": row, "outcome": what} for _, _, src, row, what in totals.parity_bad]
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


def actor_kwargs(cfg: BuildConfig, info, storage: dict, encoder: str, parity_every: int, sources: list,
                 file_source: list[int]) -> dict:
    """What each tokenizer actor (``raysft.engine.actors.TokenizeAndMask``) is made with."""
    layout = get_layout(cfg.layout)
    return {
        "info": info, "template": cfg.template, "sources": source_settings(cfg, info, sources),
        "file_source": file_source, "cache": cfg.cache, "seq_length": layout.capacity(cfg.seq_length),
        "overlong": cfg.overlong, "storage": storage, "batch_size": cfg.batch_size, "encoder": encoder,
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

    def __init__(self, ex, seq_length: int, fail_fast: bool, files, storage):
        self.refs: list = []  # block refs
        self.summaries: list = []  # refs of each block's summary
        self.runs: list = []  # refs of each block's runs
        self.keys: list = []  # each block's input position, once its summary is in
        self.rejects: list = []  # (key, file) of each block that had rejects
        self.totals = stats_mod.Totals()
        self.pending: dict = {}  # summary ref -> block number
        self.fail_fast, self.files, self.storage, self.S, self.ex = fail_fast, files, storage, seq_length, ex

    def add(self, ref, measure, rejects_dir) -> None:
        summary, runs = measure(ref, self.S, rejects_dir, self.storage)
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
                    raise bad_record_error(self.totals, self.files, self.storage)
            if not wait:
                return


def bad_record_error(t: stats_mod.Totals, files, storage) -> BuildError:
    first_bad = t.first_bad
    where = describe_position(files[first_bad["src"]].url, first_bad["row"], first_bad["offset"], storage)
    return BuildError(f"{where}: {first_bad['reason']}: {first_bad['message']}; pass --on-bad-record skip to skip bad records and "
                      "list them in rejects.jsonl")


def tokenize_and_measure(blocks: Blocks, chunks: list, kwargs: dict, pool: TokenizePool, rejects_dir: str | None,
                         watch: Watchdog) -> None:
    """Run the tokenizer actors over the chunks (as cut for this run: ``split_tail``) to their
    end, keeping the blocks (in Ray's object store, or the local engine's memory-mapped files), and start the statistics of each block as
    soon as it exists (a small task, on the CPU the actors leave): they are ready when
    tokenization ends, with no second pass over the data."""
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


def pair_build(cfg: BuildConfig, layout, totals) -> bool:
    """Whether this build writes preference pairs (every kept record is a pair); one line where
    its records mix pairs and SFT samples, or its settings cannot hold pairs."""
    if not totals.pairs:
        return False
    if totals.pairs != totals.samples:
        raise BuildError(f"the inputs hold {totals.pairs:,} preference pairs and {totals.samples - totals.pairs:,} SFT samples: "
                         "build them as two datasets (a pair build writes every record as a chosen and a rejected "
                         "sample)")
    if not layout.pairs:
        raise BuildError(f"--layout {layout.name} has no form for preference pairs; use one of "
                         f"{', '.join(PAIR_LAYOUTS)}")
    if int(cfg.pad_to_multiple or 1) > 1:
        raise BuildError("--pad-to-multiple is for SFT samples; a preference-pair build takes none")
    return True

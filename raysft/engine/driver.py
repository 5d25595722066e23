"""The driver: one build as a short list of stages over its context (``raysft.engine.context``),
each stage a module of its own that wires the pure modules into the engine's actors and tasks
(Ray's, or the local engine's processes and threads):

prepare (inputs, tokenizer, output lock) -> measure (read+normalize+template+tokenize+mask in
the actors, statistics per block) -> mixture -> plan (driver, from histograms) -> write (slot
assignment cut by shard, a writer task per shard) -> finish (merge, checks, stats, commit).

Nothing here decides a byte of output: that is the pure modules' work. The driver's memory
does not grow with the rows: it holds object references per block, histograms of
``seq_length`` and counters; rejects and provenance are written by workers and concatenated
in bounded buffers, and the merged index is streamed from the shard indexes.
"""

from __future__ import annotations

import json
import logging
import time

from .. import stats as stats_mod
from ..config import BuildConfig
from ..errors import BuildError
from ..fs import get_fs, join
from ..layouts import get_layout
from ..output import MANIFEST, Output, OutputError, OutputLock
from ..read import check_bucket, split_tail
from ..templates import MARKERS
from ..tokenize import add_special_tokens, missing_markers
from .context import Build
from .executor import LocalExecutor, make_executor
from .finish import finish, nothing_to_write
from .measure import Blocks, actor_kwargs, measure, start_with_encoder, tokenize_and_measure
from .mixture import mix
from .plan import plan
from .prepare import OUTPUT_FILES, cached_chunks, check_output_outside_inputs, fingerprint, prepare, with_absolute_paths
from .session import starts_ray
from .watch import Watchdog
from .writing import write

log = logging.getLogger("raysft")


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
    storage, info, files, chunks, sources, file_source = prepare(cfg)
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
    out_fs, out_root = get_fs(cfg.output, storage)
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
        return _build(Build(cfg, t0, watch, storage, info, files, chunks, sources, file_source, layout, added, pad_id,
                            out, lock, manifest, old))
    finally:
        watch.bounded(lock.release, "releasing the output's lock")


def _build(b: Build) -> dict:
    """Choose the engine (none, where the tokenized cache holds every chunk), then the stages."""
    cfg, digests, complete = b.cfg, None, False
    if cfg.cache and b.chunks and (cfg.engine == "local" or starts_ray(cfg)):
        # every entry there: nothing is tokenized, so no tokenizer is built and, with the Ray
        # engine, no Ray instance started that would only serve cache entries
        local = LocalExecutor(cfg)
        workers = local.workers_for(len(b.chunks))
        local.close()
        # the local engine hashes every chunk here once (its driver threads look entries up with
        # these digests); the Ray engine stops at the first miss, its actors hash the chunks
        found = cached_chunks(cfg, b.storage, b.info, b.chunks, b.sources, b.file_source, local.cpus, 2 * workers,
                              stop_at_miss=cfg.engine != "local", watch=b.watch)
        if found is not None:
            b.run, digests, complete = found
        if complete and cfg.engine == "ray":
            log.info("every chunk is in the tokenized cache (%s): nothing to tokenize, so no Ray instance is "
                     "started; this process does the work (--engine local's path, same bytes)", cfg.cache)
    b.watch.progress("start", "the tokenizer and the engine")
    if not complete:
        b.info.shared()  # the tokenizer, built (and checked: one line if it is not valid) before any work
    b.ex = make_executor(cfg, "local" if digests is not None else None, digests)
    try:
        return stages(b)
    finally:
        b.ex.close()


def stages(b: Build) -> dict:
    """The build, stage by stage (each a module of its own)."""
    m = measure(b)  # start the engine; read, tokenize and measure every chunk
    if int(m.hist_kept.sum()) == 0:
        raise nothing_to_write(b, m)
    x = mix(b, m)  # sources' amounts, the validation split
    p = plan(b, m, x)  # best-fit-decreasing packs per split
    w = write(b, m, p)  # slot assignment and the shard writers
    return finish(b, m, x, p, w)  # merge, check, stats.json, commit



def measure_inputs(cfg: BuildConfig) -> stats_mod.Totals:
    """Read and tokenize the inputs and return their statistics (no output written)."""
    cfg = with_absolute_paths(cfg)
    return watched(cfg, lambda watch: _measure(cfg, watch))


def _measure(cfg: BuildConfig, watch: Watchdog) -> stats_mod.Totals:
    watch.progress("prepare", "the tokenizer, the inputs' listing")
    storage, info, files, chunks, sources, file_source = prepare(cfg)
    watch.progress("start", "the tokenizer and the engine")
    ex = make_executor(cfg)
    try:
        with watch.held("start", "the engine's start"):
            encoder, _, pool = start_with_encoder(cfg, ex, info, files, storage, len(chunks))
        blocks = Blocks(ex, cfg.seq_length, False, files, storage)
        tokenize_and_measure(blocks, split_tail(chunks, 2 * pool.workers),
                             actor_kwargs(cfg, info, storage, encoder, 0, sources, file_source), pool, None, watch)
        return blocks.totals
    finally:
        ex.close()


__all__ = ["BuildError", "OutputError", "run", "measure_inputs", "prepare", "stages"]

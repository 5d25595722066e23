"""Prepare stage: the inputs (sources, files, read chunks), the tokenizer checked against the
template, the output's fingerprint, and what the tokenized cache already holds. Runs on the
driver before any engine starts."""

from __future__ import annotations

import hashlib
import json
import logging
import os

from .. import __version__ as RAYSFT_VERSION
from ..cache import Cache, chunk_key, context_digest
from ..config import BuildConfig
from ..errors import BuildError
from ..fs import absolute, is_remote, storage_options
from ..read import Chunk, InputError, _static_prefix, check_url, chunk_digest, expand_inputs, plan_chunks, split_parts
from ..read.registry import read_registry, registry_sources
from ..sources import Source, SourceError, parse_sources
from ..templates import Template, TemplateError
from ..tokenize import load_tokenizer_info
from .watch import Watchdog

log = logging.getLogger("raysft")

VERSION = 2  # of the manifest and of what output bytes depend on


OUTPUT_FILES = ("data_order.txt", "stats.json", "provenance.bin", "inputs.json", "report.html")  # beside the layout's


def prepare(cfg: BuildConfig):
    """What every command that reads inputs needs first: storage options, the tokenizer
    (checked against the template), the input files and their read chunks. Fails before Ray
    starts."""
    storage = storage_options(cfg.s3_endpoint_url, cfg.s3_addressing_style)
    info = load_tokenizer_info(cfg.tokenizer, cfg.trust_remote_code)
    sources = build_sources(cfg, storage)
    if any(s.format != "text" for s in sources):  # fail early (plain text needs no chat template)
        try:
            Template(cfg.template, info.specials, info.chat_template, info.special_strings, cfg.loss,
                     cfg.template_kwargs, info.special_map, cfg.template_date, cfg.think_loss)
        except TemplateError as e:
            raise TemplateError(f"{e} (plain-text data needs no template: --format text)") \
                if info.chat_template is None else e from None
    files, file_source = expand_sources(sources, storage)
    chunks = plan_chunks(files, storage, cfg.chunk_bytes, file_source)
    return storage, info, files, chunks, sources, file_source


def build_sources(cfg: BuildConfig, storage: dict | None = None) -> list:
    """The build's sources: ``cfg.sources`` (a job file's ``sources:``, ``--source``), or one
    made of ``--input``, ``--format``, ``--map-keys`` and the loss policy, and one per entry of
    each LLaMA-Factory data folder among the inputs (``raysft.read.registry``)."""
    defaults = {"format": cfg.format, "map_keys": cfg.map_keys, "loss": cfg.loss}
    if cfg.sources:
        if cfg.inputs:
            raise SourceError("give the inputs as --input or as sources, not both")
        return parse_sources(cfg.sources, defaults)
    out, plain = [], []
    for path in cfg.inputs:
        registry = read_registry(path, storage)
        if registry is None:
            plain.append(path)
        else:
            out += registry_sources(path, registry, cfg.dataset, defaults, storage)
    if cfg.dataset and not out:
        raise SourceError("--dataset picks entries of a LLaMA-Factory data folder: give its folder (with its "
                          "dataset_info.json) as --input")
    if plain:
        out.insert(0, Source("input", plain, cfg.format, dict(cfg.map_keys or {}), cfg.loss))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise SourceError(f"two data folders define the same entry: {', '.join(n for n in names if names.count(n) > 1)}")
    return out


def expand_sources(sources: list, storage: dict):
    """All input files, source by source (each source's files in path order), and the source of
    each file; a file may belong to one source only."""
    files, file_source, owner = [], [], {}
    for k, src in enumerate(sources):
        for f in expand_inputs(src.inputs, storage):
            if f.url in owner:
                raise InputError(f"{f.url} is an input of two sources ({owner[f.url]!r} and {src.name!r})")
            owner[f.url] = src.name
            files.append(f)
            file_source.append(k)
    return files, file_source


def source_settings(cfg: BuildConfig, info, sources: list) -> list[dict]:
    """What the tokenizer actors need of each source: its format, keys and loss policy, and
    the cache context (raysft.cache) its encoded rows are filed under."""
    return [{"format": s.format, "map_keys": s.map_keys, "loss": s.loss, "think_loss": cfg.think_loss,
             "context": context_digest(info, cfg.template, cfg.template_kwargs, cfg.template_date, s.format,
                                       s.map_keys, s.loss, f"raysft-{VERSION}-{RAYSFT_VERSION}", cfg.think_loss)}
            for s in sources]


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


def check_output_outside_inputs(output: str, inputs: list[str], files) -> None:
    """An output inside an input folder would be read back as input by the next run (and one
    that holds an input file would be replaced under it)."""
    import os

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


def cached_chunks(cfg: BuildConfig, storage: dict, info, chunks: list, sources: list, file_source: list[int],
                  threads: int, tail: int, stop_at_miss: bool = True,
                  watch: Watchdog | None = None) -> tuple[list, dict, bool] | None:
    """With --cache: the chunks to run, each one's content digest, and whether every one has an
    entry in the cache (by name: an entry that then fails its checksum is tokenized again, as
    always). A chunk counts as cached whole or as its parts (``split_parts``), whichever is
    there, so entries made by a run that cut the last chunks for another worker count are found;
    a chunk with neither is cut as this run cuts its last ``tail`` chunks. ``stop_at_miss``:
    None at the first chunk with no entry (the Ray engine then hashes and tokenizes in its actors)."""
    from concurrent.futures import ThreadPoolExecutor

    cache = Cache(cfg.cache, storage)
    contexts = [s["context"] for s in source_settings(cfg, info, sources)]

    def entry(pieces: tuple) -> tuple:
        digest = chunk_digest(Chunk(0, pieces), storage, keep=False)[0]
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

"""The tokenizer actor: reads its chunks and runs the pure tokenize stage on them."""

from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pyarrow as pa

from ..cache import Cache, chunk_key
from ..encode import Loading
from ..parity import TemplateParity
from ..read import Chunk, chunk_digest, read_chunk
from ..samples import Align, encode_records, fit_records
from ..tokenize import SampleBuilder, TokenizerFile


class TokenizeAndMask:
    """Read + tokenize stage (Ray actor): holds one tokenizer (and encoder) for its lifetime,
    and one sample builder per source (its format, keys and loss policy).

    Called with chunk descriptions, one at a time: reads the chunk and yields one table per
    ``batch_size`` records (``raysft.samples``). Reading inside the actor keeps raw records out
    of the object store, and one task per chunk spreads the chunks over all actors. With a
    tokenized cache (``raysft.cache``), a chunk whose entry exists is not parsed or tokenized:
    its encoded rows are read and cut at this build's ``--seq-length``; a chunk without one is
    tokenized and its entry written.
    """

    def __init__(self, info, template: str, sources: list[dict], file_source: list[int], seq_length: int,
                 overlong: str = "drop", threads: int = 1, storage: dict | None = None, batch_size: int = 16384,
                 encoder: str = "auto", template_kwargs: dict | None = None, max_chars: int | None = None,
                 avoid_end: tuple[int, ...] = (), template_date: str | None = None, parity_every: int = 0,
                 cache: str | None = None, process: bool = True, align: tuple | None = None,
                 pair_limits: tuple[int, int] | None = None):
        """``process``: this object has a process to itself (an actor, a tokenizer process);
        False for the local engine's cache lookups in the driver's threads."""
        if process:
            # the encoders' thread pools start on first use: size them to this actor's cores
            os.environ["RAYON_NUM_THREADS"] = str(max(1, threads))
            os.environ["FASTOKENS_BPE_THREADS"] = str(max(1, threads))

        if isinstance(info, TokenizerFile):  # the Ray engine's actors read the build's tokenizer from the output
            info = info.load(storage)

        self.info, self.template, self.sources, self.file_source = info, template, sources, file_source
        # the driver ran the canary and logged its verdict; with a cache, the encoder loads
        # (~2 CPU-s) only once a chunk misses it
        self.encoder = Loading(encoder, info, parity=True, start=not cache)
        self.encoder_mode = encoder
        self.parity = TemplateParity(info, parity_every, template_kwargs, template_date) if parity_every else None
        self.template_kwargs, self.max_chars, self.template_date = template_kwargs, max_chars, template_date
        self.builders: dict = {}
        self.seq_length = seq_length
        self.overlong = overlong
        self.storage = storage or {}
        self.batch_size = batch_size
        self.avoid_end = tuple(avoid_end)
        self.align = Align(*align) if align else None  # --pad-to-multiple: (multiple, shift, pad id)
        self.pair_limits = tuple(pair_limits) if pair_limits else None  # a preference pair's most tokens
        self.cache = Cache(cache, self.storage) if cache else None
        self._lock = threading.Lock()
        if not cache:
            self.builder_for(0)  # with a cache, made (loading the tokenizer) only when needed
        if process:
            # what exists now (Ray, the tokenizer) lives as long as the actor: keep it
            # out of the collector's full passes, which the records' many small objects trigger
            gc.freeze()

    def builder_for(self, source: int):
        with self._lock:
            if source not in self.builders:
                s = self.sources[source]
                self.builders[source] = SampleBuilder(self.info, self.template, s["format"], s["map_keys"], s["loss"],
                                                      self.encoder, self.template_kwargs, self.max_chars,
                                                      self.template_date, self.parity, s.get("think_loss", "auto"))
            return self.builders[source]

    def release(self) -> None:
        """Tokenizing is over (the actor stays up only so lineage can re-run a lost chunk here):
        free the encoder, the builders and their template plans, made again on first use as at
        the start, so the actor's memory does not sit beside the writers'."""
        with self._lock:
            self.builders.clear()
            self.encoder = Loading(self.encoder_mode, self.info, parity=True, start=False)
        gc.unfreeze()
        gc.collect()
        try:  # hand the freed heap back to the system (glibc); elsewhere it is reused later
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def blocks(self, item: dict):
        """One chunk's non-empty blocks (the Ray engine's actor task: a streaming generator)."""
        for table in self.tokenize_chunk(Chunk.from_item(item)):
            if table.num_rows:
                yield table

    def tokenize_chunk(self, c: Chunk):
        looked = self.lookup(c)
        if looked is not None and looked[0] is not None:
            yield from looked[0]
            return
        yield from self.tokenize(c, looked)

    def lookup(self, c: Chunk, digest: int | None = None):
        """With a cache: the chunk's tables from its entry (None where it has no usable one),
        its key and content digest; None without a cache. Loads no tokenizer: a process that
        only serves entries (``--engine local`` serves them in the driver) never loads one.
        ``digest``: the chunk's content digest, where it was computed already."""
        if self.cache is None:
            return None

        source = self.file_source[c.pieces[0].src]
        S = self.seq_length
        digested = chunk_digest(c, self.storage) if digest is None else (digest, {})
        key = chunk_key(digested[0], [(p.kind, p.start, p.end, p.compression) for p in c.pieces],
                        self.sources[source]["context"])
        enc = self.cache.load(key, self.info.vocab_size)
        # an entry keeps the text of records longer than its keep_over, for cuts inside
        # markers; a shorter seq-length needs it only when it cuts records at such markers
        if enc is None or not (int((enc.schema.metadata or {}).get(b"keep_over", b"0")) <= S
                               or self.overlong == "drop" or not self.builder_for(source).markers):
            return None, key, digested
        # a cut of an overlong record needs the builder (its markers); a drop does not
        builder = self.builder_for(source) if self.overlong != "drop" else None
        srcs = self._srcs(c)
        enc = enc.set_column(0, "src", pa.array(srcs[enc.column("src").to_numpy()]))
        return [fit_records(enc.slice(start, self.batch_size), c.chunk, S, self.overlong, digested[0],
                            self.avoid_end, source, builder, cached=True, align=self.align,
                            pair_limits=self.pair_limits)
                for start in range(0, max(enc.num_rows, 1), self.batch_size)], key, digested

    @staticmethod
    def _srcs(c: Chunk) -> np.ndarray:
        return np.array(sorted({p.src for p in c.pieces}), np.int32)  # an entry numbers its files 0, 1, ...

    def tokenize(self, c: Chunk, looked: tuple | None = None):
        """Read, parse and tokenize the chunk (``looked``: ``lookup``'s miss, whose entry is
        written from what this tokenizes)."""
        source = self.file_source[c.pieces[0].src]
        S = self.seq_length
        _, key, digested = looked if looked is not None else (None, None, None)
        builder = self.builder_for(source)
        self.encoder.start()  # loads while the chunk is read, parsed and rendered
        parts = []
        for rows in read_chunk(c, self.storage, self.batch_size, digested):
            pos = {"src": rows.src, "idx": rows.idx, "row": rows.row, "offset": rows.offset}
            enc = encode_records(builder, rows.raw, rows.error, pos, S)
            if key is not None:
                parts.append(enc)
            yield fit_records(enc, c.chunk, S, self.overlong, rows.digest, self.avoid_end, source, builder,
                              align=self.align, pair_limits=self.pair_limits)
        if key is not None and parts:
            enc = pa.concat_tables(parts)
            local = np.searchsorted(self._srcs(c), enc.column("src").to_numpy()).astype(np.int32)
            self.cache.save(key, enc.set_column(0, "src", pa.array(local)))

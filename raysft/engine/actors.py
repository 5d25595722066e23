"""The tokenizer actor: reads its chunks and runs the pure tokenize stage on them."""

from __future__ import annotations

import gc
import os

import pyarrow as pa

from ..read import Chunk, read_chunk
from ..samples import tokenize_batch


class TokenizeAndMask:
    """Read + tokenize stage (Ray actor): holds one tokenizer (and encoder) for its lifetime.

    Called with chunk descriptions, one at a time: reads the chunk and yields one table per
    ``batch_size`` records (``raysft.samples``). Reading inside the actor keeps raw records out
    of the object store, and one task per chunk spreads the chunks over all actors.
    """

    def __init__(self, info, template: str, fmt: str, map_keys: dict, loss: str, seq_length: int,
                 overlong: str = "drop", threads: int = 1, so: dict | None = None, batch_size: int = 16384,
                 encoder: str = "auto", template_kwargs: dict | None = None, max_chars: int | None = None,
                 avoid_end: tuple[int, ...] = (), template_date: str | None = None, parity_every: int = 0):
        # the encoders' thread pools start on first use: size them to this actor's cores
        os.environ["RAYON_NUM_THREADS"] = str(max(1, threads))
        os.environ["FASTOKENS_BPE_THREADS"] = str(max(1, threads))
        from ..encode import Loading
        from ..parity import TemplateParity
        from ..tokenize import SampleBuilder

        enc = Loading(encoder, info, parity=True)  # the driver ran the canary and logged its verdict
        parity = TemplateParity(info, parity_every, template_kwargs, template_date) if parity_every else None
        self.builder = SampleBuilder(info, template, fmt, map_keys, loss, enc, template_kwargs, max_chars, template_date,
                                     parity)
        self.seq_length = seq_length
        self.overlong = overlong
        self.so = so or {}
        self.batch_size = batch_size
        self.avoid_end = tuple(avoid_end)
        # what exists now (Ray, Ray Data, the tokenizer) lives as long as the actor: keep it out
        # of the collector's full passes, which the records' many small objects trigger
        gc.freeze()

    def __call__(self, chunks: dict):
        for i in range(len(chunks["chunk"])):
            c = Chunk.from_item({k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in chunks.items()})
            yield from self.tokenize_chunk(c)

    def tokenize_chunk(self, c: Chunk):
        for rows in read_chunk(c, self.so, self.batch_size):
            n = len(rows.idx)
            pos = {"chunk": [c.chunk] * n, "src": rows.src, "idx": rows.idx, "row": rows.row, "offset": rows.offset}
            table: pa.Table = tokenize_batch(self.builder, rows.raw, rows.error, pos, self.seq_length, self.overlong,
                                             rows.digest, self.avoid_end)
            yield table

"""The build's context: what every stage of one build shares (settings, the watchdog, the
tokenizer, the inputs, the output and its lock, the engine), made once by the driver and handed
to each stage in turn (``raysft.engine.driver``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..config import BuildConfig
from ..fs import join
from ..output import TMP, Output, OutputLock
from .executor import Executor
from .watch import Watchdog


@dataclass
class Build:
    cfg: BuildConfig
    t0: float  # when the build started (stage timings are logged from it)
    watch: Watchdog
    storage: dict  # storage options (fsspec), for every file system call
    info: object  # the tokenizer (raysft.tokenize.TokenizerInfo), special tokens added where asked
    files: list  # every input file, source by source
    chunks: list  # their read chunks
    sources: list
    file_source: list[int]  # the source of each file
    layout: object  # raysft.layouts.Layout; a pair build's becomes the layout's pair form
    added: list[str]  # special tokens added to the tokenizer
    pad_id: int
    out: Output
    lock: OutputLock
    manifest: dict
    old: dict | None  # an interrupted run's manifest (--resume)
    ex: Executor | None = None  # where the work runs: Ray, or the local engine
    run: list | None = None  # the chunks as this run cuts them (a cached run's own cut)
    timings: dict = field(default_factory=dict)
    _mark: float = 0.0

    @property
    def tmp_url(self) -> str:
        """The work folder under the output, as a URL workers reach."""
        return join(self.cfg.output, TMP)

    def timed(self, stage: str) -> None:
        """Record the seconds since the last stage ended (the first: since the build began)."""
        now = time.time()
        self.timings[stage] = round(now - (self._mark or self.t0), 2)
        self._mark = now

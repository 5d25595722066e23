"""Mixture stage: what the sources' amounts and ``--validation`` make of the tokenized samples
(a pass over the blocks when anything is copied, sampled or held out): the histograms the plans
need and, per packing part, where each block's runs come from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import stats as stats_mod
from ..config import BuildConfig
from ..errors import BuildError
from ..sources import Selection, Validation, count_threshold, cut_for, mix_factors
from ..stats import SOURCE_FIGURES
from .context import Build
from .measure import Blocks, Measured
from .tasks import amounts_task, select_block, smallest_keys
from .watch import Watchdog


@dataclass
class Mix:
    selection: object  # the raysft.sources.Selection, or None when every sample is taken once
    natural: list[float]  # each source's own amount in the mix unit
    summaries: list | None  # the per-block summaries of the selection
    hist_train: np.ndarray
    hist_valid: np.ndarray
    train_parts: list  # (pick, runs of block k) per copy of the training set
    valid_parts: list


def mix(b: Build, m: Measured) -> Mix:
    cfg, ex, blocks = b.cfg, b.ex, m.blocks
    selection, natural, summaries, sel_runs = mixture(cfg, m.totals, blocks, b.sources, b.watch)
    zeros = np.zeros(len(m.hist_kept), dtype=np.int64)
    if selection is None:
        hist_train, hist_valid = m.hist_kept, zeros
        train_parts = [(None, lambda k: ex.get(blocks.runs[k]))]
        valid_parts: list = []
    else:
        hist_train = hist_valid = zeros
        for sm in summaries:
            hist_train = stats_mod.add_hist(hist_train, sm["hist_train"])
            hist_valid = stats_mod.add_hist(hist_valid, sm["hist_valid"])
        copies = max(sm["copies"] for sm in summaries)  # not every block's runs at once
        train_parts = [({"selection": selection, "copy": c}, lambda k, c=c: ex.get(sel_runs[k]).get(c))
                       for c in range(copies)]
        valid_parts = [({"selection": selection, "valid": True}, lambda k: ex.get(sel_runs[k]).get("valid"))]
    if int(hist_train.sum()) == 0:
        raise BuildError("the mixture leaves no training sample (every source's amount is 0, or "
                         "--validation holds out every record)")
    b.timed("mixture")
    return Mix(selection, natural, summaries, hist_train, hist_valid, train_parts, valid_parts)


def mixture(cfg: BuildConfig, totals, blocks: Blocks, sources: list, watch: Watchdog):
    """What the sources' amounts and ``--validation`` make of the tokenized samples: the
    selection (None when every sample is taken once and nothing is held out), each source's
    own amount in the mix unit (its training records), the per-block summaries of the
    selection added up, and the refs of each block's per-part runs."""
    col = SOURCE_FIGURES.index(cfg.mix_unit)
    natural = [float(totals.per_source.get(k, [0, 0, 0, 0])[col]) for k in range(len(sources))]
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
    selection = Selection(whole, cut, cfg.seed, below)
    if selection.trivial:
        return None, natural, None, None
    task = blocks.ex.task(select_block, num_cpus=0.5, num_returns=2)
    refs = [task(r, selection) for r in blocks.refs]
    summaries, runs = [], []
    for i, (sref, rref) in enumerate(refs):
        watch.progress("mixture", f"block {i + 1} of {len(refs)}")
        summaries.append(blocks.ex.get(sref))
        runs.append(rref)
    return selection, natural, summaries, runs

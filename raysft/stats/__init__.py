"""Stats stage: length histograms and the figures users read, in pure numpy.

Histograms merge by addition, so every worker reports ``hist[L] = samples of length L`` and
the driver adds them up; the summary (count, mean, std, min, percentiles, max) is computed
exactly from the histogram, with numpy's default (linear) percentile interpolation, i.e. the
same figures ``numpy.percentile`` gives on the list of lengths.
"""

from __future__ import annotations

import numpy as np

from ..pack import unique_rows
from ..parity import MISMATCH, REFUSED, UNCHECKED
from ..samples import TEMPLATE_PATHS, kept_mask

PERCENTILES = {"p25": 25, "p50": 50, "p75": 75, "p99": 99}


def histogram(lengths: np.ndarray, size: int = 0) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.bincount(lengths, minlength=size).astype(np.int64)


def add_hist(a: np.ndarray | None, b: np.ndarray) -> np.ndarray:
    if a is None:
        return b.astype(np.int64, copy=True)
    if len(a) < len(b):
        a, b = b, a
    out = a.astype(np.int64, copy=True)
    out[: len(b)] += b
    return out


def percentile_from_hist(hist: np.ndarray, q: float) -> float:
    n = int(hist.sum())
    if n == 0:
        return 0.0
    cum = np.cumsum(hist)
    pos = (n - 1) * q / 100.0
    lo, hi = int(np.floor(pos)), int(np.ceil(pos))
    v_lo = int(np.searchsorted(cum, lo + 1))
    v_hi = int(np.searchsorted(cum, hi + 1))
    return float(v_lo + (v_hi - v_lo) * (pos - lo))


def length_summary(hist: np.ndarray) -> dict:
    """count, mean, std (population), min, p25, p50, p75, p99, max of a length histogram."""
    hist = np.asarray(hist, dtype=np.int64)
    n = int(hist.sum())
    if n == 0:
        return {"count": 0, "mean": 0.0, "std": 0.0, "min": 0, **{k: 0.0 for k in PERCENTILES}, "max": 0}
    values = np.arange(len(hist), dtype=np.float64)
    mean = float((values * hist).sum() / n)
    var = float(((values - mean) ** 2 * hist).sum() / n)
    nz = np.nonzero(hist)[0]
    out = {"count": n, "mean": round(mean, 4), "std": round(var**0.5, 4), "min": int(nz[0])}
    for k, q in PERCENTILES.items():
        out[k] = round(percentile_from_hist(hist, q), 4)
    out["max"] = int(nz[-1])
    return out


def packing_figures(tokens: int, packs: int, seq_length: int, epochs: int = 1) -> dict:
    """Packs and their bound for ``epochs`` packings of ``packs`` packs holding ``tokens``
    tokens each (the counts of what was written, every epoch)."""
    lb = -(-tokens // seq_length) if seq_length else 0
    return {
        "packs": packs * epochs,
        "seq_length": seq_length,
        "packing_efficiency": round(tokens / (packs * seq_length), 6) if packs else 0.0,
        "lower_bound_packs": lb * epochs,
    }


def format_summary(stats: dict) -> str:
    """The short human summary printed at the end of a build."""
    L = stats["length"]
    rej = sum(stats["rejected"].values())
    drop = sum(stats["dropped"].values())
    lines = [
        f"rows read        {stats['rows_read']:>12,}",
        f"samples written  {stats['samples_written']:>12,}"
        + (f"  (from {stats['rows_written']:,} rows; {_why_more(stats)})"
           if stats.get("rows_written", stats["samples_written"]) != stats["samples_written"] else ""),
        f"rows rejected    {rej:>12,}" + (f"  {_reasons(stats['rejected'])}" if rej else ""),
        f"samples dropped  {drop:>12,}" + (f"  {_reasons(stats['dropped'])}" if drop else ""),
        f"  check: {stats['rows_read']:,} read = {stats.get('rows_written', stats['samples_written']):,} written "
        f"+ {rej:,} rejected "
        f"+ {drop:,} dropped",
        f"tokens           {stats['tokens']:>12,}  (loss-bearing {stats['loss_tokens']:,})",
    ]
    pairs = stats.get("pairs")
    if pairs:
        lines.insert(2, f"pairs written    {pairs['written']:>12,}  (chosen side {pairs['chosen_tokens']:,} tokens, "
                        f"rejected side {pairs['rejected_tokens']:,}; a pair's two samples side by side in one pack)")
    if pairs and not pairs.get("packed", True):
        lines.append(f"packs            {stats['packs']:>12,}  one pair each (the trainer reads pairs unpacked)")
    elif stats.get("packs"):
        lines.append(
            f"packs            {stats['packs']:>12,}  of {stats['seq_length']} tokens, lower bound "
            f"{stats['lower_bound_packs']:,}, efficiency {stats['packing_efficiency']:.2%}"
        )
    lines.append(
        f"{'pair length   ' if pairs else 'sample length '}   mean {L['mean']:.1f}  std {L['std']:.1f}  min {L['min']}  p50 {L['p50']:g}  "
        f"p99 {L['p99']:g}  max {L['max']}"
    )
    if stats.get("epochs", 1) > 1:
        lines.append(f"epochs           {stats['epochs']:>12,}  (independently shuffled packings; packs above are per "
                     "epoch)")
    unit = stats.get("mix_unit", "loss_tokens")
    srcs = stats.get("sources") or []
    if len(srcs) > 1 or (srcs and srcs[0].get("factor", 1) != 1):
        width = max(10, *(len(s["name"]) for s in srcs))  # names in full: registry entries are long
        for s in srcs:
            asked = ", ".join(f"{k} {v:g}" for k, v in s["asked"].items())
            lines.append(f"source {s['name']:<{width}}{s['written'][unit]:>12,} {unit} written ({s['share']:.1%}; "
                         f"asked {asked}; x{s['factor']:.3g} of {s[unit]:,})")
    v = stats.get("validation")
    if v:
        lines.append(f"validation       {v['rows']:>12,} records held out: {v['samples']:,} samples, {v['packs']:,} "
                     "packs in valid/")
    par = stats.get("parity") or {}
    if par.get("checked"):
        lines.append(f"template parity  {par['matched']:>12,} of {par['checked']:,} sampled records token-identical "
                     f"to apply_chat_template" + (f"  ({par['mismatched']:,} differ, {par['refused_by_template']:,} "
                                                  "refused by the template)"
                                                  if par['matched'] != par['checked'] else ""))
    return "\n".join(lines)


def _why_more(stats: dict) -> str:
    """Why samples and rows written differ: split records, copies of the mixture, epochs, the
    validation set (its records are written, to valid/)."""
    why = []
    if stats["overlong"]["policy"] == "split" and stats["overlong"].get("rows_kept"):
        why.append("--overlong split")
    if any(s.get("factor", 1) != 1 for s in stats.get("sources") or []):
        why.append("the mixture's copies and samples")
    if stats.get("epochs", 1) > 1:
        why.append(f"{stats['epochs']} epochs")
    if stats.get("validation"):
        why.append(f"{stats['validation']['rows']:,} of them in valid/")
    return ", ".join(why) or f"--overlong {stats['overlong']['policy']}"


def format_reasons(d: dict) -> str:
    """Counts by reason, one line: ``overlong: 3, role_order: 1``."""
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(d.items()))


def _reasons(d: dict) -> str:
    return f"({format_reasons(d)})"


# --------------------------------------------------------------------------- per block


def run_counts(chunk: np.ndarray, run_first: np.ndarray, n: np.ndarray, rows: np.ndarray) -> dict:
    """The runs of ``rows`` (a mask): run key (chunk, run_first) -> {length: samples}, what
    slot assignment's rank offsets are counted from."""
    runs: dict[tuple[int, int], dict[int, int]] = {}
    if rows.any():
        uniq, counts = unique_rows(chunk[rows], run_first[rows], n[rows], return_counts=True)
        for (c, r, L), k in zip(uniq.tolist(), counts.tolist()):
            runs.setdefault((c, r), {})[L] = k
    return runs


def block_stats(table, seq_length: int) -> tuple[dict, dict]:
    """Statistics of one tokenized block (``raysft.samples`` rows): a small summary the driver
    adds up, and the block's runs (run key -> {length: kept samples}) that slot assignment
    needs later. Rejected and dropped rows are counted by reason; their details stay with
    the block (``block_rejects``)."""
    from collections import Counter

    n = table.column("n").to_numpy()
    orig_n = table.column("orig_n").to_numpy()
    first = table.column("piece").to_numpy() == 0  # one row per record read
    src = table.column("src").to_numpy()
    kept = kept_mask(table).to_numpy(zero_copy_only=False)
    chunk = table.column("chunk").to_numpy()
    run_first = table.column("run_first").to_numpy()
    lk = n[kept].astype(np.int64)
    runs = run_counts(chunk, run_first, n, kept)
    reasons = Counter()
    first_bad = None
    bad = np.flatnonzero(~kept)
    if len(bad):
        why = table.column("reason").take(bad).to_pylist()
        reasons.update(why)
        j = int(bad[0])
        first_bad = {k: table.column(k)[j].as_py() for k in ("chunk", "idx", "src", "row", "offset", "reason",
                                                              "message")}
    measured = first & (orig_n >= 0)
    key = (int(chunk[0]), int(run_first[0])) if len(chunk) else (0, 0)
    summary = {
        "key": key,
        "rows": int(first.sum()),
        "rows_written": int((first & kept).sum()),
        "samples": int(kept.sum()),
        "overlong_kept": int((first & kept & (orig_n > seq_length)).sum()),
        "rows_per_src": Counter(src[first].tolist()),
        "hist_all": np.bincount(orig_n[measured].astype(np.int64)) if measured.any() else np.zeros(1, np.int64),
        "hist_kept": np.bincount(lk) if len(lk) else np.zeros(1, np.int64),
        "loss_tokens": int(table.column("loss_n").to_numpy()[kept].sum()),
        # preference pairs kept (one row each) and their chosen sides' tokens
        "pairs": int((table.column("chosen_n").to_numpy()[kept] > 0).sum()),
        "chosen_tokens": int(table.column("chosen_n").to_numpy()[kept].astype(np.int64).sum()),
        "reasons": reasons,
        "first_bad": first_bad,
        "encoder": [int(table.column(k).to_numpy().sum()) for k in ("enc_checked", "enc_mismatch", "enc_fallback")],
        "template_paths": [int(table.column(k).to_numpy().sum()) if k in table.column_names else 0
                           for k in TEMPLATE_PATHS],
        **_parity_stats(table),
        "per_source": _per_source(table, first, kept),
        "cached_rows": int((first & table.column("cached").to_numpy(zero_copy_only=False)).sum())
        if "cached" in table.column_names else 0,
        "chunks": {c: h for c, h in unique_rows(chunk, table.column("chunk_hash").to_numpy()).tolist()},
    }
    return summary, runs


SOURCE_FIGURES = ("rows", "samples", "tokens", "loss_tokens")


def _per_source(table, first: np.ndarray, kept: np.ndarray) -> dict:
    """Per source: records read, and the samples, tokens and loss tokens kept."""
    if "source" not in table.column_names or not table.num_rows:
        return {}
    src = table.column("source").to_numpy()
    n = np.where(kept, table.column("n").to_numpy(), 0).astype(np.int64)
    loss = np.where(kept, table.column("loss_n").to_numpy(), 0).astype(np.int64)
    out = {}
    for s in np.unique(src).tolist():
        m = src == s
        out[int(s)] = [int((first & m).sum()), int((kept & m).sum()), int(n[m].sum()), int(loss[m].sum())]
    return out


def _parity_stats(table) -> dict:
    """Chat-template parity outcomes of a block (raysft.parity) and its first failures."""
    if "tpl_parity" not in table.column_names:
        return {}
    p = table.column("tpl_parity").to_numpy()
    bad = np.flatnonzero((p == MISMATCH) | (p == REFUSED))[:5]
    src, row = table.column("src").to_numpy(), table.column("row").to_numpy()
    return {"parity": [int((p != UNCHECKED).sum()), int((p == MISMATCH).sum()), int((p == REFUSED).sum())],
            "parity_bad": [(int(table.column("chunk")[j].as_py()), int(table.column("idx")[j].as_py()), int(src[j]),
                            int(row[j]), "mismatch" if p[j] == MISMATCH else "refused") for j in bad.tolist()]}


def block_rejects(table) -> list[dict]:
    """The rejected and dropped rows of a block, as ``rejects.jsonl`` wants them (the record
    cut to 4 KB), in input order."""
    bad = np.flatnonzero(~kept_mask(table).to_numpy(zero_copy_only=False))
    if not len(bad):
        return []
    cols = {k: table.column(k).take(bad).to_pylist()
            for k in ("chunk", "idx", "src", "row", "offset", "reason", "message", "bad_raw")}
    out = []
    for j in range(len(bad)):
        e = {k: v[j] for k, v in cols.items()}
        e["bad_raw"] = (e["bad_raw"] or b"")[:4000].decode("utf-8", errors="replace")
        out.append(e)
    return out


DROP_REASONS = ("overlong", "overlong_prompt", "empty_text")  # counted as dropped: never a bad record


class Totals:
    """The build's statistics, added up one block summary at a time (bounded memory: the
    histograms are ``seq_length`` long, the rest counters)."""

    def __init__(self):
        from collections import Counter

        self.rows = self.rows_written = self.samples = self.overlong_kept = self.loss_tokens = 0
        self.pairs = self.chosen_tokens = 0
        self.rows_per_src: Counter = Counter()
        self.hist_all: np.ndarray | None = None
        self.hist_kept: np.ndarray | None = None
        self.reasons: Counter = Counter()
        self.first_bad: dict | None = None
        self.chunks: dict[int, int] = {}
        self.encoder = [0, 0, 0]  # rows checked against hf, batches that disagreed, rows hf encoded
        self.template_paths = [0, 0]  # --template auto: conversations replayed from render plans, rendered
        self.parity = [0, 0, 0]  # chat-template parity: records checked, mismatched, refused by the template
        self.parity_bad: list[tuple] = []  # (chunk, idx, src, row, outcome), the first in input order
        self.per_source: dict[int, list[int]] = {}  # source -> rows, samples, tokens, loss tokens
        self.cached_rows = 0

    def add(self, s: dict) -> None:
        for k in ("rows", "rows_written", "samples", "overlong_kept", "loss_tokens", "pairs", "chosen_tokens"):
            setattr(self, k, getattr(self, k) + s.get(k, 0))
        self.rows_per_src.update(s["rows_per_src"])
        self.hist_all = add_hist(self.hist_all, s["hist_all"])
        self.hist_kept = add_hist(self.hist_kept, s["hist_kept"])
        self.reasons.update(s["reasons"])
        first_bad = s.get("first_bad")
        if first_bad is not None and first_bad["reason"] not in DROP_REASONS and (
                self.first_bad is None or (first_bad["chunk"], first_bad["idx"]) < (self.first_bad["chunk"], self.first_bad["idx"])):
            self.first_bad = first_bad
        self.chunks.update(s.get("chunks", {}))
        self.encoder = [a + b for a, b in zip(self.encoder, s.get("encoder", [0, 0, 0]))]
        self.parity = [a + b for a, b in zip(self.parity, s.get("parity", [0, 0, 0]))]
        self.template_paths = [a + b for a, b in zip(self.template_paths, s.get("template_paths", [0, 0]))]
        if s.get("parity_bad"):
            self.parity_bad = sorted(self.parity_bad + s["parity_bad"])[:5]
        for k, v in (s.get("per_source") or {}).items():
            self.per_source[k] = [a + b for a, b in zip(self.per_source.get(k, [0, 0, 0, 0]), v)]
        self.cached_rows += s.get("cached_rows", 0)

    @property
    def rejected(self) -> dict:
        return {k: v for k, v in sorted(self.reasons.items()) if k not in DROP_REASONS}

    @property
    def dropped(self) -> dict:
        return {k: v for k, v in sorted(self.reasons.items()) if k in DROP_REASONS}

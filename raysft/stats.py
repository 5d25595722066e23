"""Stats stage: length histograms and the figures users read, in pure numpy.

Histograms merge by addition, so every worker reports ``hist[L] = samples of length L`` and
the driver adds them up; the summary (count, mean, std, min, percentiles, max) is computed
exactly from the histogram, with numpy's default (linear) percentile interpolation, i.e. the
same figures ``numpy.percentile`` gives on the list of lengths.
"""

from __future__ import annotations

import numpy as np

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


def packing_figures(tokens: int, packs: int, seq_length: int) -> dict:
    lb = -(-tokens // seq_length) if seq_length else 0
    return {
        "packs": packs,
        "seq_length": seq_length,
        "packing_efficiency": round(tokens / (packs * seq_length), 6) if packs else 0.0,
        "lower_bound_packs": lb,
    }


def format_summary(stats: dict) -> str:
    """The short human summary printed at the end of a build."""
    L = stats["length"]
    rej = sum(stats["rejected"].values())
    drop = sum(stats["dropped"].values())
    lines = [
        f"rows read        {stats['rows_read']:>12,}",
        f"samples written  {stats['samples_written']:>12,}"
        + (f"  (from {stats['rows_written']:,} rows; --overlong {stats['overlong']['policy']})"
           if stats.get("rows_written", stats["samples_written"]) != stats["samples_written"] else ""),
        f"rows rejected    {rej:>12,}" + (f"  {_reasons(stats['rejected'])}" if rej else ""),
        f"samples dropped  {drop:>12,}" + (f"  {_reasons(stats['dropped'])}" if drop else ""),
        f"  check: {stats['rows_read']:,} read = {stats.get('rows_written', stats['samples_written']):,} written "
        f"+ {rej:,} rejected "
        f"+ {drop:,} dropped",
        f"tokens           {stats['tokens']:>12,}  (loss-bearing {stats['loss_tokens']:,})",
    ]
    if stats.get("packs"):
        lines.append(
            f"packs            {stats['packs']:>12,}  of {stats['seq_length']} tokens, lower bound "
            f"{stats['lower_bound_packs']:,}, efficiency {stats['packing_efficiency']:.2%}"
        )
    lines.append(
        f"sample length    mean {L['mean']:.1f}  std {L['std']:.1f}  min {L['min']}  p50 {L['p50']:g}  "
        f"p99 {L['p99']:g}  max {L['max']}"
    )
    return "\n".join(lines)


def _reasons(d: dict) -> str:
    return "(" + ", ".join(f"{k}: {v:,}" for k, v in sorted(d.items())) + ")"


if __name__ == "__main__":  # python -m raysft.stats: the input-statistics command
    from .build import exit_now
    from .inputstats import main

    exit_now(main())

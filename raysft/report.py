"""report.html: a self-contained page of what a build did, from its stats.json.

Pure (no engine). Plots are PNGs drawn with matplotlib and embedded as data URIs, so the page
opens from disk or from a bucket with nothing beside it; without matplotlib (the optional
``report`` extra) the page has the same tables and no plots.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

try:  # optional dependency
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # pragma: no cover - exercised when the extra is not installed
    plt = None


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _hist_plot(counts: dict, title: str, xlabel: str, marker: int | None = None, bins: int = 60) -> str | None:
    if plt is None or not counts:
        return None
    values = np.array([int(k) for k in counts], dtype=np.int64)
    weights = np.array(list(counts.values()), dtype=np.int64)
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    ax.hist(values, bins=min(bins, max(1, len(values))), weights=weights, color="#3b7dd8")
    if marker:
        ax.axvline(marker, color="#d8503b", linestyle="--", label=f"seq-length {marker}")
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return _png(fig)


def _bar_plot(items: dict, title: str) -> str | None:
    if plt is None or not items:
        return None
    labels = [str(k) for k in items]
    short = [lab if len(lab) <= 40 else "…" + lab[-39:] for lab in labels]
    fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(labels) + 1.2))
    ax.barh(short, list(items.values()), color="#3b7dd8")
    ax.invert_yaxis()
    ax.set_title(title)
    return _png(fig)


def _table(rows: list[tuple], head: tuple) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>"


def _figure(src: str | None, alt: str) -> str:
    if src is None:
        return f'<p class="noplot">({html.escape(alt)}: install matplotlib, e.g. pip install "raysft[report]", for plots)</p>'
    return f'<figure><img class="plot" alt="{html.escape(alt)}" src="{src}"></figure>'


def render_report(stats: dict) -> str:
    S = stats["seq_length"]
    L = stats["length"]
    reasons = {f"rejected: {k}": v for k, v in stats["rejected"].items()}
    reasons |= {f"dropped: {k}": v for k, v in stats["dropped"].items()}
    summary = [
        ("rows read", f"{stats['rows_read']:,}"),
        ("rows written", f"{stats.get('rows_written', stats['samples_written']):,}"),
        ("samples written", f"{stats['samples_written']:,}"),
        ("rows rejected", f"{sum(stats['rejected'].values()):,}"),
        ("samples dropped", f"{sum(stats['dropped'].values()):,}"),
        ("tokens (loss-bearing)", f"{stats['tokens']:,} ({stats['loss_tokens']:,})"),
        ("packs of seq-length", f"{stats['packs']:,} × {S}"),
        ("lower bound ceil(tokens / seq-length)", f"{stats['lower_bound_packs']:,}"),
        ("packs over lower bound", f"{stats['packs'] - stats['lower_bound_packs']:,} "
                                   f"({stats['packs'] / max(1, stats['lower_bound_packs']) - 1:.3%})"),
        ("packing efficiency", f"{stats['packing_efficiency']:.3%}"),
        ("layout / template / tokenizer", f"{stats['layout']} / {stats['template']} / {stats['tokenizer']}"),
    ]
    length_row = [tuple(L.values())]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>raysft build report</title>",
        "<style>body{font:14px system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;"
        "text-align:left}th{background:#f3f3f3}h2{margin-top:1.6em}img.plot{max-width:100%}"
        ".noplot{color:#888}</style></head><body>",
        "<h1>raysft build report</h1>",
        _table(summary, ("figure", "value")),
        "<h2>Sample length before packing</h2>",
        _table(length_row, tuple(L.keys())),
        _figure(_hist_plot(stats.get("sample_lengths", {}), "Sample length (tokens)", "tokens", S), "sample length histogram"),
        "<h2>Pack fill after packing</h2>",
        _figure(_hist_plot(stats.get("pack_fill", {}), "Tokens per pack", "tokens in pack", S), "pack fill histogram"),
        "<h2>Rows per input file</h2>",
        _table(sorted(stats.get("rows_per_file", {}).items()), ("file", "rows")),
        _figure(_bar_plot(stats.get("rows_per_file", {}), "Rows per input file"), "rows per input file"),
        "<h2>Rejects and drops by reason</h2>",
        _table(sorted(reasons.items()), ("reason", "rows")) if reasons else "<p>none</p>",
        _figure(_bar_plot(reasons, "Rejected and dropped rows"), "rejects by reason") if reasons else "",
        # lets a headless browser report how many plots it decoded
        "<script>window.addEventListener('load',()=>{document.body.dataset.plotsLoaded="
        "[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length});</script>",
        "</body></html>",
    ]
    return "\n".join(parts)

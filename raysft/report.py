"""report.html: a self-contained page of what a build did, from its stats.json.

Pure (no engine, no plotting library). Plots are small SVG drawings made here and embedded as
data URIs, so the page opens from disk or from a bucket with nothing beside it, and writing it
costs milliseconds at the end of a build (matplotlib took ~1.6 s: its import and three PNGs).
"""

from __future__ import annotations

import base64
import html
import math

import numpy as np

W = 720  # drawing width in px; the page scales it down on narrow screens
BAR = "#3b7dd8"
MARK = "#d8503b"
FONT = "font-family='system-ui,sans-serif' font-size='12'"


def _tick_step(span: int, n: int = 5) -> int:
    """A whole round step (1, 2 or 5 times a power of ten) that cuts ``span`` into about ``n``
    parts: axes here count rows or tokens."""
    if span <= 0:
        return 1
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    return max(1, int(next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)))


def _nice_ticks(hi: int) -> list[int]:
    """0 and round steps up to ``hi``."""
    return list(range(0, max(0, hi) + 1, _tick_step(hi)))


def _num(v: int) -> str:
    """Axis label: 12,500 or 1.5M."""
    return f"{v / 1e6:g}M" if v >= 1e6 else f"{v:,}"


def _text(x: float, y: float, s: str, anchor: str = "middle", extra: str = "") -> str:
    return f"<text x='{x:.1f}' y='{y:.1f}' text-anchor='{anchor}' {FONT}{extra}>{html.escape(s)}</text>"


def _svg(body: list[str], height: float) -> str:
    svg = (f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{height:.0f}' "
           f"viewBox='0 0 {W} {height:.0f}'><rect width='100%' height='100%' fill='white'/>"
           + "".join(body) + "</svg>")
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


def _hist_plot(counts: dict, title: str, xlabel: str, marker: int | None = None, bins: int = 60) -> str | None:
    """Histogram of ``{value: count}`` in up to ``bins`` equal bins, with a dashed line at ``marker``."""
    if not counts:
        return None
    values = np.array([int(k) for k in counts], dtype=np.int64)
    weights = np.array(list(counts.values()), dtype=np.int64)
    lo, hi = int(values.min()), int(values.max())
    if marker:
        hi = max(hi, marker)
    edges = np.linspace(lo, hi + 1, min(bins, hi + 1 - lo) + 1)
    height, _ = np.histogram(values, bins=edges, weights=weights)
    left, right, top, bottom = 70, W - 20, 30, 230
    ymax = max(1, int(height.max()))
    yticks = _nice_ticks(ymax)
    ytop = max(ymax, yticks[-1])

    def x(v: float) -> float:
        return left + (v - lo) / (hi + 1 - lo) * (right - left)

    def y(c: float) -> float:
        return bottom - c / ytop * (bottom - top)

    body = [_text(W / 2, 18, title, extra=" font-weight='bold'")]
    for t in yticks:
        body.append(f"<line x1='{left}' x2='{right}' y1='{y(t):.1f}' y2='{y(t):.1f}' stroke='#e5e5e5'/>")
        body.append(_text(left - 6, y(t) + 4, _num(t), "end"))
    for c, a, b in zip(height.tolist(), edges[:-1].tolist(), edges[1:].tolist()):
        if c:
            body.append(f"<rect x='{x(a):.1f}' y='{y(c):.1f}' width='{max(0.5, x(b) - x(a) - 0.5):.1f}' "
                        f"height='{bottom - y(c):.1f}' fill='{BAR}'><title>{math.ceil(a)}-{math.ceil(b) - 1}: "
                        f"{int(c):,}</title></rect>")
    step = _tick_step(hi - lo)
    for t in range(math.ceil(lo / step) * step, hi + 1, step):
        body.append(_text(x(t), bottom + 16, _num(t)))
    body.append(f"<line x1='{left}' x2='{right}' y1='{bottom}' y2='{bottom}' stroke='#444'/>")
    if marker:
        body.append(f"<line x1='{x(marker):.1f}' x2='{x(marker):.1f}' y1='{top}' y2='{bottom}' stroke='{MARK}' "
                    "stroke-dasharray='5,4' stroke-width='1.5'/>")
        body.append(_text(x(marker) - 4, top + 12, f"seq-length {marker}", "end", f" fill='{MARK}'"))
    body.append(_text((left + right) / 2, bottom + 34, xlabel))
    body.append(_text(16, (top + bottom) / 2, "count", extra=f" transform='rotate(-90 16 {(top + bottom) / 2})'"))
    return _svg(body, bottom + 44)


def _bar_plot(items: dict, title: str) -> str | None:
    """Horizontal bars of ``{label: count}``, in the given order, each with its count."""
    if not items:
        return None
    labels = [str(k) for k in items]
    short = [lab if len(lab) <= 40 else "…" + lab[-39:] for lab in labels]
    counts = [int(v) for v in items.values()]
    left, right, top, row = 290, W - 70, 32, 22
    cmax = max(1, max(counts))
    body = [_text(W / 2, 18, title, extra=" font-weight='bold'")]
    for i, (lab, c) in enumerate(zip(short, counts)):
        yy = top + i * row
        w = c / cmax * (right - left)
        body.append(_text(left - 6, yy + 15, lab, "end"))
        body.append(f"<rect x='{left}' y='{yy + 3}' width='{max(0.5, w):.1f}' height='{row - 6}' fill='{BAR}'/>")
        body.append(_text(left + w + 4, yy + 15, f"{c:,}", "start"))
    return _svg(body, top + len(counts) * row + 10)


def _table(rows: list[tuple], head: tuple) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>"


def _figure(src: str | None, alt: str) -> str:
    if src is None:
        return f'<p class="noplot">({html.escape(alt)}: nothing to plot)</p>'
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
    pairs = stats.get("pairs")
    if pairs:
        summary.insert(3, ("preference pairs written (two samples each)",
                           f"{pairs['written']:,}: chosen side {pairs['chosen_tokens']:,} tokens, rejected side "
                           f"{pairs['rejected_tokens']:,}" + ("" if pairs.get("packed", True) else "; one pair a pack")))
    if stats.get("epochs", 1) > 1:
        summary.append(("epochs (packs and tokens above are per epoch)", f"{stats['epochs']}"))
    v = stats.get("validation")
    if v:
        summary.append(("validation set (valid/)", f"{v['rows']:,} records, {v['samples']:,} samples, "
                                                   f"{v['tokens']:,} tokens, {v['packs']:,} packs"))
    unit = stats.get("mix_unit", "loss_tokens")
    source_rows = [(s["name"], f"{s['rows']:,}", f"{s['samples']:,}", f"{s['tokens']:,}", f"{s['loss_tokens']:,}",
                    ", ".join(f"{k} {x:g}" for k, x in s["asked"].items()), f"{s['factor']:g}",
                    f"{s['written'][unit]:,}", f"{s['share']:.2%}") for s in stats.get("sources", [])]
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
        *(["<h2>Sources</h2>", _table(source_rows, ("source", "rows", "samples", "tokens", "loss tokens", "asked",
                                                     "factor", f"written ({unit}, per epoch)", "share"))]
          if len(source_rows) > 1 or (source_rows and stats["sources"][0]["factor"] != 1) else []),
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

"""``python -m raysft.stats INPUT... --tokenizer T``: token lengths of raw inputs, no build.

What Pai-Megatron-Patch's sample_stats prints, but in tokens after templating, and with the
packs a build would make at each candidate ``--seq-length`` (the build's own planner, run on
the length histogram), so you can pick it before running the job. Runs the read and tokenize
stages of the build on Ray; writes nothing.
"""

from __future__ import annotations

import argparse

import numpy as np

from .build import guarded
from .config import BuildConfig
from .engine.driver import measure_inputs
from .engine.session import stop_ray
from .errors import OneLineParser
from .normalize import FORMATS, parse_map_keys
from .pack import plan_bfd
from .stats import length_summary, percentile_from_hist
from .templates import TEMPLATE_NAMES

EXAMPLE = """\
example:
  python -m raysft.stats 'data/*.jsonl' --tokenizer /models/llama3 --template llama3
"""
CANDIDATES = (1024, 2048, 4096, 8192, 16384, 32768)


def pack_table(hist: np.ndarray, candidates=CANDIDATES, capacity=lambda S: S) -> list[dict]:
    """Per candidate seq-length: the samples and tokens that fit (``--overlong drop``), the
    packs best-fit-decreasing makes of them (the build's planner, on the histogram: no
    writing) and the lower bound."""
    hist = np.asarray(hist, dtype=np.int64)
    lengths = np.arange(len(hist))
    total = int(np.dot(lengths, hist)) or 1
    count = int(hist.sum()) or 1
    out = []
    for S in candidates:
        cap = capacity(S)
        h = hist[: cap + 1].copy()
        if len(h):
            h[0] = 0
        kept = int(np.dot(lengths[: len(h)], h))
        packs = plan_bfd(h, cap).num_packs if h.any() else 0
        out.append({"seq_length": S, "samples": int(h.sum()), "share_samples": h.sum() / count,
                    "share_tokens": kept / total, "packs": packs, "lower_bound": -(-kept // cap),
                    "efficiency": kept / (packs * S) if packs else 0.0})
    return out


def report(t, candidates=CANDIDATES) -> str:
    hist = t.hist_all if t.hist_all is not None else np.zeros(1, np.int64)
    rejected = t.rejected
    s = length_summary(hist)
    lines = [f"rows read {t.rows:,}; tokenized {s['count']:,}; rejected {sum(rejected.values()):,}"
             + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(rejected.items()))})" if rejected else "")]
    lines.append("length (tokens): " + "  ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    lines.append("\nseq-length   samples that fit   tokens kept   packs (best-fit-decreasing)   lower bound   efficiency")
    for r in pack_table(hist, candidates):
        lines.append(f"{r['seq_length']:>10}   {r['share_samples']:>15.2%}   {r['share_tokens']:>11.2%}   "
                     f"{r['packs']:>27,}   {r['lower_bound']:>11,}   {r['efficiency']:>10.2%}")
    if s["count"]:
        lines.append("\nhistogram:")
        # as many equal-width bins as there are distinct deciles, computed on the histogram
        # itself (no per-sample array: inputs may hold billions of samples)
        deciles = np.unique([int(percentile_from_hist(hist, q)) for q in np.linspace(0, 100, 11)])
        present = np.nonzero(hist)[0]
        counts, edges = np.histogram(present, bins=max(1, len(deciles) - 1), range=(present[0], present[-1]),
                                     weights=hist[present])
        width = max(counts.max(), 1)
        for c, a, b in zip(counts, edges[:-1], edges[1:]):
            lines.append(f"{int(a):>7}-{int(b):<7} {'#' * int(40 * c / width):<40} {int(c):,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m raysft.stats", description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs (local or s3://)")
    g = p.add_argument_group("tokenizer and template")
    g.add_argument("--tokenizer", required=True)
    g.add_argument("--template", default="auto", metavar="NAME", help="auto, a built-in or a peer's name for one "
                   f"({', '.join(TEMPLATE_NAMES)})")
    g.add_argument("--format", choices=FORMATS, default="auto")
    g.add_argument("--map-keys", metavar="JSON")
    g.add_argument("--seq-lengths", metavar="N,N,...", help="candidate seq-lengths (default: "
                   + ",".join(map(str, CANDIDATES)) + ")")
    g = p.add_argument_group("object storage and execution")
    g.add_argument("--s3-endpoint-url", metavar="URL")
    g.add_argument("--s3-addressing-style", choices=("auto", "virtual", "path"))
    g.add_argument("--num-cpus", type=int)
    args = p.parse_args(argv)
    cfg = BuildConfig(inputs=args.inputs, tokenizer=args.tokenizer, template=args.template, format=args.format,
                      map_keys=parse_map_keys(args.map_keys), seq_length=1 << 30, s3_endpoint_url=args.s3_endpoint_url,
                      s3_addressing_style=args.s3_addressing_style, num_cpus=args.num_cpus, output="-")
    try:
        candidates = tuple(int(x) for x in args.seq_lengths.split(",")) if args.seq_lengths else CANDIDATES
    except ValueError:
        p.error("--seq-lengths takes integers separated by commas")

    def work():
        print(report(measure_inputs(cfg), candidates))

    return guarded("raysft.stats", work, stop_ray)

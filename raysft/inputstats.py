"""``python -m raysft.stats INPUT... --tokenizer T``: token lengths of raw inputs, no build.

What Pai-Megatron-Patch's sample_stats prints, but in tokens after templating, so you can pick
``--seq-length`` before running the job. Runs the read and tokenize stages of the build on Ray.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .config import BuildConfig
from .normalize import FORMATS, parse_map_keys
from .stats import length_summary, percentile_from_hist
from .template import TEMPLATE_NAMES

EXAMPLE = """\
example:
  python -m raysft.stats 'data/*.jsonl' --tokenizer /models/llama3 --template llama3
"""
CANDIDATES = (1024, 2048, 4096, 8192, 16384, 32768)


def report(agg: dict, rejected: dict) -> str:
    hist = agg["hist_all"] if agg["hist_all"] is not None else np.zeros(1, np.int64)
    s = length_summary(hist)
    lines = [f"rows read {agg['rows']:,}; tokenized {s['count']:,}; rejected {sum(rejected.values()):,}"
             + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(rejected.items()))})" if rejected else "")]
    lines.append("length (tokens): " + "  ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    lengths = np.arange(len(hist))
    total = int(np.dot(lengths, hist)) or 1
    lines.append("\nseq-length   samples that fit   tokens kept   lower-bound packs")
    for S in CANDIDATES:
        fit = hist[: S + 1].sum() if len(hist) > S else hist.sum()
        kept = int(np.dot(lengths[: S + 1], hist[: S + 1]))
        lines.append(f"{S:>10}   {fit / max(1, s['count']):>15.2%}   {kept / total:>11.2%}   {-(-kept // S):>17,}")
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
    p = argparse.ArgumentParser(prog="python -m raysft.stats", description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs (local or s3://)")
    g = p.add_argument_group("tokenizer and template")
    g.add_argument("--tokenizer", required=True)
    g.add_argument("--template", choices=TEMPLATE_NAMES, default="auto")
    g.add_argument("--format", choices=FORMATS, default="auto")
    g.add_argument("--map-keys", metavar="JSON")
    g = p.add_argument_group("object storage and execution")
    g.add_argument("--s3-endpoint-url", metavar="URL")
    g.add_argument("--s3-addressing-style", choices=("auto", "virtual", "path"))
    g.add_argument("--num-cpus", type=int)
    args = p.parse_args(argv)
    cfg = BuildConfig(inputs=args.inputs, tokenizer=args.tokenizer, template=args.template, format=args.format,
                      map_keys=parse_map_keys(args.map_keys), seq_length=1 << 30, s3_endpoint_url=args.s3_endpoint_url,
                      s3_addressing_style=args.s3_addressing_style, num_cpus=args.num_cpus, output="-")
    from .pipeline import BuildError, measure_inputs, stop_ray
    from .read import InputError
    from .template import TemplateError
    from .tokenize import TokenizerError

    try:
        agg, rejected = measure_inputs(cfg)
    except (BuildError, InputError, TemplateError, TokenizerError) as e:
        print(f"raysft.stats: error: {e}", file=sys.stderr)
        return 1
    finally:
        stop_ray()
    print(report(agg, rejected))
    return 0

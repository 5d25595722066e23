"""``python -m raysft.inspect OUT``: look at packs of a built dataset.

Prints a pack's samples decoded, with the tokens that carry loss marked (green on a terminal,
``[[...]]`` when piped), each sample's length and source, and where position ids restart.
A preference-pair build shows each pair: its prompt once, then the chosen and the rejected
response one under the other. Works on every layout and on s3:// outputs.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .errors import OneLineParser
from .fs import get_fs, join, storage_options
from .layouts import layout_of
from .provenance import read_provenance
from .read import line_number
from .tokenize import load_tokenizer_info

EXAMPLE = """\
examples:
  python -m raysft.inspect out/ --pack 17
  python -m raysft.inspect out/ --sample data/train.jsonl:42      # line 42 of a JSON Lines file
  python -m raysft.inspect out/ --sample data/train.json:5        # record 5 (0-based) of a JSON array
  python -m raysft.inspect s3://bucket/packed/ --pack 0 --s3-endpoint-url http://127.0.0.1:9000
"""


class Dataset:
    def __init__(self, out: str, storage: dict, tokenizer: str | None = None):
        self.fs, self.root = get_fs(out, storage)
        with self.fs.open(join(self.root, "stats.json"), "r") as f:
            self.stats = json.load(f)
        self.layout = layout_of(self.stats)
        self.pairs = bool(self.stats.get("pairs"))
        self.num_packs = self.layout.num_packs(self.fs, self.root)
        self.prov = read_provenance(self.fs, self.root)
        with self.fs.open(join(self.root, "inputs.json"), "r") as f:
            self.inputs = json.load(f)

        self.tok = load_tokenizer_info(tokenizer or self.stats["tokenizer"]).load()
        self.storage = storage

    def pack_samples(self, pack: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(token ids, loss mask) of each sample of a pack."""
        if not 0 <= pack < self.num_packs:
            raise SystemExit(f"pack {pack} out of range: the dataset has {self.num_packs} packs (0..{self.num_packs - 1})")
        return self.layout.read_pack(self.fs, self.root, self.stats, pack)

    def provenance(self, pack: int) -> np.ndarray:
        return self.prov[self.prov["pack"] == pack]

    def describe(self, p) -> str:
        url = self.inputs[int(p["src"])]
        if p["offset"] >= 0:
            where = f"line {line_number(url, int(p['offset']), self.storage)}"
        else:
            where = f"record {int(p['row'])}"
        return f"{url} {where}" + (f" (piece {int(p['piece'])})" if p["piece"] else "")

    def find_sample(self, spec: str) -> tuple[int, int]:
        """(pack, index of the sample in the pack) of the sample from FILE:ROW."""
        path, _, row = spec.rpartition(":")
        if not path or not row.isdigit():
            raise SystemExit("--sample takes FILE:ROW (line number for .jsonl, 0-based record index otherwise)")
        matches = [i for i, u in enumerate(self.inputs) if u == path or u.endswith("/" + path.lstrip("./"))]
        if not matches:
            raise SystemExit(f"--sample: {path} is not one of this dataset's inputs (see inputs.json)")
        src, n = matches[0], int(row)
        from_src = self.prov["src"] == src
        if from_src.any() and self.prov["offset"][from_src][0] >= 0:  # JSON Lines: byte offset of line n
            fs, p = get_fs(self.inputs[src], self.storage)
            offset = 0
            with fs.open(p, "rb") as f:  # stops at the file's end: a line past it is named as such
                for _ in range(n - 1):
                    line = f.readline()
                    if not line:
                        raise SystemExit(f"--sample {spec}: {path} has fewer than {n} lines")
                    offset += len(line)
            hits = np.nonzero(from_src & (self.prov["offset"] == offset))[0]
        else:
            hits = np.nonzero(from_src & (self.prov["row"] == n))[0]
        if not len(hits):
            raise SystemExit(f"--sample {spec}: no written sample comes from there (rejected or dropped? see rejects.jsonl)")
        # provenance is in output order, pack by pack: the sample's index in its pack follows
        first = int(hits[0])
        pack = int(self.prov["pack"][first])
        unit = first - int(np.searchsorted(self.prov["pack"], pack))
        return pack, 2 * unit if self.pairs else unit  # a pair's provenance is one entry, its samples two


def render_tokens(tok, ids: np.ndarray, loss: np.ndarray, color: bool) -> str:
    out = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or loss[i] != loss[start]:
            text = tok.decode(ids[start:i].tolist(), skip_special_tokens=False)
            if loss[start]:
                text = f"\x1b[32m{text}\x1b[0m" if color else f"[[{text}]]"
            out.append(text)
            start = i
    return "".join(out)


def show_pack(ds: Dataset, pack: int, color: bool, file=None, mark: int | None = None) -> None:
    file = file or sys.stdout
    samples = ds.pack_samples(pack)
    prov = ds.provenance(pack)
    total = sum(len(s[0]) for s in samples)
    S = ds.stats["seq_length"]
    print(f"pack {pack} of {ds.num_packs}: {len(samples)} samples, {total} tokens of {S} "
          f"({total / S:.1%} full), layout {ds.stats['layout']}", file=file)
    if ds.pairs:
        show_pairs(ds, samples, prov, color, file, mark)
        return
    pos = 0
    for k, (ids, loss) in enumerate(samples):
        src = ds.describe(prov[k]) if k < len(prov) else "?"
        print(f"\n── sample {k}: {len(ids)} tokens ({int(loss.sum())} with loss), tokens {pos}..{pos + len(ids) - 1} "
              f"of the pack, position ids restart at 0 here — {src}" + ("   <== requested" if k == mark else ""),
              file=file)
        print(render_tokens(ds.tok, ids, loss, color), file=file)
        pos += len(ids)


def show_pairs(ds: Dataset, samples: list, prov, color: bool, file, mark: int | None) -> None:
    """A pair build's pack: per pair, the shared prompt once, then each side's response."""
    pos = 0
    for k in range(0, len(samples), 2):
        (c_ids, c_loss), (r_ids, r_loss) = samples[k], samples[k + 1]
        src = ds.describe(prov[k // 2]) if k // 2 < len(prov) else "?"
        starts = [int(np.argmax(loss)) if loss.any() else len(ids) for ids, loss in samples[k : k + 2]]
        same = starts[0] == starts[1] and np.array_equal(c_ids[: starts[0]], r_ids[: starts[1]])
        print(f"\n══ pair {k // 2}: chosen {len(c_ids)} tokens ({int(c_loss.sum())} with loss), rejected {len(r_ids)} "
              f"({int(r_loss.sum())}), tokens {pos}..{pos + len(c_ids) + len(r_ids) - 1} of the pack — {src}"
              + ("   <== requested" if mark == k else ""), file=file)
        if same:
            print(f"── prompt ({starts[0]} tokens, the same on both sides, no loss)", file=file)
            print(render_tokens(ds.tok, c_ids[: starts[0]], c_loss[: starts[0]], color), file=file)
        for name, (ids, loss), at in (("chosen", samples[k], starts[0]), ("rejected", samples[k + 1], starts[1])):
            cut = at if same else 0
            print(f"── {name}" + (" (after the prompt)" if same else " (whole sample)"), file=file)
            print(render_tokens(ds.tok, ids[cut:], loss[cut:], color), file=file)
        pos += len(c_ids) + len(r_ids)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m raysft.inspect", description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="a raysft output folder (local or s3://)")
    g = p.add_argument_group("what to show (one of)")
    g.add_argument("--pack", type=int, help="pack (Megatron document) number")
    g.add_argument("--sample", metavar="FILE:ROW", help="the pack holding the sample from this source row")
    g = p.add_argument_group("options")
    g.add_argument("--tokenizer", help="tokenizer to decode with (default: the one in stats.json)")
    g.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour loss tokens (auto: when stdout is a terminal; otherwise [[...]])")
    g.add_argument("--s3-endpoint-url", metavar="URL")
    g.add_argument("--s3-addressing-style", choices=("auto", "virtual", "path"))
    args = p.parse_args(argv)
    if (args.pack is None) == (args.sample is None):
        p.error("give exactly one of --pack N or --sample FILE:ROW")
    storage = storage_options(args.s3_endpoint_url, args.s3_addressing_style)
    try:
        ds = Dataset(args.output, storage, args.tokenizer)
    except FileNotFoundError as e:
        print(f"raysft.inspect: error: {args.output} is not a finished raysft output ({e})", file=sys.stderr)
        return 1
    pack, mark = (args.pack, None) if args.pack is not None else ds.find_sample(args.sample)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    try:
        show_pack(ds, pack, color, mark=mark)
    except BrokenPipeError:  # piped into head & co.
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

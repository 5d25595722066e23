"""``python -m raysft.verify OUT``: check a dataset against its ``manifest.json``.

Every file the manifest lists must exist with the size and XXH3-128 it recorded when the dataset
was committed (``raysft.output``), so a copy, a sync to object storage or a disk that lost data
is caught before a trainer reads it. One line per bad file and a summary; exit 0 when every file
is whole, 1 when one is missing or differs, 3 when the folder holds no verifiable dataset.
"""

from __future__ import annotations

import argparse
import sys

from .errors import OneLineParser
from .fs import get_fs, join, storage_options
from .output import MANIFEST, SUCCESS, file_checksum, read_json, verified_manifest


class VerifyError(ValueError):
    """A dataset whose files do not match its manifest."""


def check_sizes(fs, root: str, manifest: dict, names: list[str] | None = None) -> list[str]:
    """Files (of ``names``, default all) whose size differs from the manifest's: cheap, no
    reading (what a reader checks when it opens a dataset)."""
    sums = manifest.get("checksums") or {}
    bad = []
    for rel in names or list(sums):
        want = sums.get(rel)
        if want is None:
            continue
        try:
            size = int(fs.info(join(root, rel))["size"])
        except FileNotFoundError:
            bad.append(f"{rel}: missing")
            continue
        if size != want["size"]:
            bad.append(f"{rel}: {size:,} bytes, the manifest says {want['size']:,}")
    return bad


def verify(out: str, storage: dict | None = None, progress=None) -> list[str]:
    """The problems of the dataset at ``out`` (empty: every file whole)."""
    fs, root = get_fs(out, storage)
    manifest = read_json(fs, join(root, MANIFEST))
    if not verified_manifest(manifest):
        raise VerifyError(f"{out}: no raysft manifest.json to verify against")
    sums = manifest.get("checksums")
    if not sums:
        raise VerifyError(f"{out}: its manifest records no checksums (written by an older raysft); nothing to verify")
    bad = check_sizes(fs, root, manifest)
    sized = {b.split(":", 1)[0] for b in bad}
    for k, (rel, want) in enumerate(sorted(sums.items())):
        if rel in sized:
            continue
        if progress:
            progress(k, len(sums), rel)
        got = file_checksum(fs, join(root, rel))
        if got["xxh3_128"] != want["xxh3_128"]:
            bad.append(f"{rel}: its content differs from the manifest's checksum")
    if not fs.exists(join(root, SUCCESS)) and not manifest.get("failed"):
        bad.append(f"{SUCCESS}: missing (the dataset was not committed)")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m raysft.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="the dataset folder (local or s3://)")
    p.add_argument("--s3-endpoint-url", metavar="URL", help="an S3-compatible endpoint (MinIO, OSS)")
    args = p.parse_args(argv)
    try:
        bad = verify(args.output, storage_options(args.s3_endpoint_url))
    except VerifyError as e:
        print(f"raysft.verify: error: {e}", file=sys.stderr)
        return 3
    except OSError as e:
        print(f"raysft.verify: error: {args.output}: {e}", file=sys.stderr)
        return 3
    for line in bad:
        print(f"raysft.verify: {line}", file=sys.stderr)
    if bad:
        print(f"raysft.verify: {args.output}: {len(bad)} file(s) do not match the manifest", file=sys.stderr)
        return 1
    print(f"{args.output}: every file matches its manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())

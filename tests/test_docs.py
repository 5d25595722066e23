"""The docs that are generated stay equal to what they are generated from."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_flags_reference_is_the_help_text():
    spec = importlib.util.spec_from_file_location("flags_doc", ROOT / "scripts" / "flags_doc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (ROOT / "docs" / "flags.md").read_text() == mod.flags_doc(), \
        "docs/flags.md is stale: python scripts/flags_doc.py > docs/flags.md"


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for doc in ("docs/inputs.md", "docs/pairs.md", "docs/output.md", "docs/mixtures.md", "docs/cluster.md",
                "docs/design.md", "docs/flags.md", "benchmarks/README.md"):
        assert (ROOT / doc).exists() and doc in text, doc

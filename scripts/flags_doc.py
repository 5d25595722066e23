"""Write docs/flags.md from ``python -m raysft.build --help`` (tests/test_docs.py keeps them equal).

    python scripts/flags_doc.py > docs/flags.md
"""

from __future__ import annotations

import os
import subprocess
import sys

HEADER = """# Flags of `python -m raysft.build`

Generated from `--help` by `python scripts/flags_doc.py > docs/flags.md`; `tests/test_docs.py`
fails when they differ. Any flag can also be a key of a job file (`--config FILE`).

```
"""


def flags_doc() -> str:
    env = dict(os.environ, COLUMNS="100")
    text = subprocess.run([sys.executable, "-m", "raysft.build", "--help"], capture_output=True, text=True,
                          env=env, check=True).stdout
    return HEADER + text.rstrip() + "\n```\n"


if __name__ == "__main__":
    sys.stdout.write(flags_doc())

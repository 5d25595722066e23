"""``python -m raysft.stats``: the input-statistics command (``raysft.inputstats``); the package
itself is the build's statistics library."""

from ..build import exit_now
from ..inputstats import main

exit_now(main())

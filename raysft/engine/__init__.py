"""Where the work runs: Ray (the session: start, join, stop, pool sizing; the actors and tasks
that run the pure stages), or this machine without Ray (``executor``: ``--engine local``), the
progress watchdog and the driver that orchestrates either. This package decides no byte of
output: it moves data between the pure modules."""

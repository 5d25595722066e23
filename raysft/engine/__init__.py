"""Everything that talks to Ray: the session (start, join, stop, pool sizing), the actors and
tasks that run the pure stages, the progress watchdog and the driver that orchestrates them.
This package decides no byte of output: it moves data between the pure modules."""

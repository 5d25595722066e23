"""A watchdog for the driver: a stage that makes no progress for ``stall_s`` seconds fails with
one line naming the stage and what it waits for, instead of hanging (a request no node can
satisfy, a lost node whose work Ray cannot place)."""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import threading
import time

from ..errors import CLUSTER
from ..fs import call_within


class Stalled(RuntimeError):
    exit_code = CLUSTER


def _cluster_state() -> str:
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return ""  # the local engine: no cluster to describe
    total, free = ray.cluster_resources(), ray.available_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    have = ", ".join(f"{int(n['Resources'].get('CPU', 0))} CPU" for n in nodes)
    return (f"cluster: {len(nodes)} node(s) ({have}); CPUs free {free.get('CPU', 0):g} of "
            f"{total.get('CPU', 0):g}")


def waiting_for(timeout_s: float = 5.0) -> str:
    """What the cluster is short of: pending resource demands against what the nodes have.
    Asked in a thread of its own and given ``timeout_s``: a stalled cluster may not answer (a
    dead or overloaded GCS), and the diagnosis must never hold the stall's error back."""
    answer: list[str] = []

    def ask() -> None:
        try:
            answer.append(_cluster_state())
        except Exception as e:  # noqa: BLE001 - a diagnosis must not fail
            answer.append(f"cluster state unavailable ({e})")

    t = threading.Thread(target=ask, name="raysft-watchdog-diagnosis", daemon=True)
    t.start()
    t.join(timeout_s)
    return answer[0] if answer else f"cluster state unavailable (no answer in {timeout_s:g} s)"


class Watchdog:
    """``progress(stage)`` on every sign of life; after ``stall_s`` without one, the main
    thread is interrupted and ``check()`` raises :class:`Stalled` with the diagnosis."""

    def __init__(self, stall_s: float | None):
        self.stall_s = stall_s
        self.stage = "start"
        self.detail = ""
        self.last = time.monotonic()
        self.fired: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prev_handler = None  # SIGINT's handler before _catch_interrupts, to put back

    def __enter__(self):
        if self.stall_s:
            self._catch_interrupts()
            self._thread = threading.Thread(target=self._run, name="raysft-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._prev_handler is not None:
            signal.signal(signal.SIGINT, self._prev_handler)
            self._prev_handler = None
        return False

    def _catch_interrupts(self) -> None:
        """A process started in the background (``nohup``, ``&``, some cron and CI runners)
        inherits SIGINT ignored, and ``interrupt_main`` then does nothing: the stall would never
        be raised. While the watchdog runs, SIGINT gets a handler that raises for the watchdog
        and otherwise keeps what was there (ignored stays ignored; the default still stops)."""
        if threading.current_thread() is not threading.main_thread():
            return
        prev = signal.getsignal(signal.SIGINT)
        if prev not in (signal.SIG_IGN, signal.SIG_DFL, None):
            return  # Python's own handler (or a caller's) raises already

        def handler(signum, frame):
            if self.fired or prev == signal.SIG_DFL:
                raise KeyboardInterrupt

        self._prev_handler = prev if prev is not None else signal.SIG_DFL
        signal.signal(signal.SIGINT, handler)

    def progress(self, stage: str, detail: str = "") -> None:
        self.stage, self.detail, self.last = stage, detail, time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(min(5.0, self.stall_s / 4)):
            idle = time.monotonic() - self.last
            if idle > self.stall_s and not self.holding:
                self.fired = (f"the {self.stage} stage made no progress for {idle:.0f} s"
                              + (f" (waiting for {self.detail})" if self.detail else "")
                              + "".join(f"; {d}" for d in [waiting_for()] if d))
                # a real signal, not interrupt_main's flag: it also wakes a main thread blocked
                # in a wait (the local engine's futures, a storage call), where a flag is never read
                if threading.main_thread().is_alive():
                    os.kill(os.getpid(), signal.SIGINT)
                else:
                    _thread.interrupt_main()
                return

    @contextlib.contextmanager
    def held(self, stage: str, detail: str = ""):
        """A stage the watchdog does not time: one with its own bounds (Ray's start, retried
        once and then failed by ``init_ray``; the head probed first), whose length depends on the
        host's load rather than on progress. The clock restarts when it ends."""
        self.progress(stage, detail)
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            self.progress(stage, detail)

    holding = False

    def bounded(self, fn, what: str, limit_s: float = 10.0):
        """``fn()``; after a stall, in a thread given ``limit_s`` (cleanup such as releasing a
        lock talks to the storage that may be what stalled: it must not hold the error back)."""
        if not self.fired:
            return fn()

        if not call_within(fn, limit_s, f"raysft-cleanup: {what}"):
            import logging

            logging.getLogger("raysft").warning("%s did not finish in %g s; left as it is", what, limit_s)
        return None

    def check(self) -> None:
        """Raise the stall, if the watchdog fired (call where KeyboardInterrupt is caught)."""
        if self.fired:
            raise Stalled(self.fired)


def answers(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """Whether anything accepts a TCP connection at ``host:port``."""
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def head_answers(address: str, tries: int = 4, every_s: float = 2.5) -> str | None:
    """A cluster address (``host:port`` or ``ray://host:port``) probed before Ray is asked to
    join it (Ray's own client waits ~10 minutes for a GCS that is not there): ``None`` when it
    answers within ``tries`` probes, else the one line saying it does not. ``auto`` and forms
    this cannot parse are left to Ray."""
    rest = address.split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    for k in range(tries):
        if answers(host.strip("[]"), int(port)):
            return None
        if k + 1 < tries:
            time.sleep(every_s)
    return (f"nothing answers at {host}:{port} (tried for {(tries - 1) * every_s:.0f} s): is the head running "
            "(`ray start --head`) and its port open from here?")


HEAD_PROBE_S = 5.0  # how often the head is probed
HEAD_LOST_AFTER = 3  # probes in a row without an answer: the head is gone


class HeadMonitor:
    """The Ray cluster's head probed from a thread (a TCP connection to its GCS every
    ``HEAD_PROBE_S`` seconds). When it stops answering ``HEAD_LOST_AFTER`` times in a row, the
    build ends with one line and exit 4 (cluster): left to itself, Ray's core worker gives up
    after a minute and ends the process with exit 1 and a C++ log line, which reads as "bad
    input". Nothing is committed to the output; ``--resume`` continues once the cluster is back."""

    def __init__(self, gcs_address: str, line_prefix: str = "raysft.build: error: "):
        host, _, port = gcs_address.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self.address = gcs_address
        self.prefix = line_prefix
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raysft-head-monitor", daemon=True)

    running: set = set()

    def start(self) -> HeadMonitor:
        HeadMonitor.running.add(self)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        HeadMonitor.running.discard(self)

    @classmethod
    def stop_all(cls) -> None:
        for m in list(cls.running):
            m.stop()

    def answers(self) -> bool:
        return answers(self.host, self.port)

    def _run(self) -> None:
        misses = 0
        while not self._stop.wait(HEAD_PROBE_S):
            misses = 0 if self.answers() else misses + 1
            if misses >= HEAD_LOST_AFTER and not self._stop.is_set():
                import sys

                sys.stderr.write(f"{self.prefix}lost the Ray cluster's head: its GCS at {self.address} has not "
                                 f"answered for {HEAD_PROBE_S * HEAD_LOST_AFTER:g} s; nothing was committed to the "
                                 "output: rerun with --resume once the cluster is back\n")
                sys.stderr.flush()
                os._exit(CLUSTER)

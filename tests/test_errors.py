"""Infrastructure faults are one line with a documented exit code (raysft.errors.classify),
also when they arrive wrapped in Ray's exceptions from a worker."""

import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raysft import errors

ROOT = Path(__file__).resolve().parents[1]


def _ray_wrapped(e: BaseException) -> BaseException:
    from ray.exceptions import RayTaskError

    tb = "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n" + f"{type(e).__name__}: {e}"
    return RayTaskError("write_parts", tb, e)


def _ray_error(name: str) -> BaseException:
    import ray.exceptions

    return getattr(ray.exceptions, name)("ab" * 14, "", "")


def _cases():
    import botocore.exceptions as bx

    return [
        (OSError(errno.ENOSPC, "No space left on device", "/data/out/_tmp/shards/part-00003.bin"), errors.STORAGE,
         "no space left on the device on /data/out/_tmp/shards/part-00003.bin"),
        (PermissionError(errno.EACCES, "Permission denied", "/data/out"), errors.STORAGE, "permission denied"),
        (bx.NoCredentialsError(), errors.STORAGE, "no storage credentials on a worker or the driver"),
        (bx.EndpointConnectionError(endpoint_url="http://minio:9000/b"), errors.STORAGE, "object storage error"),
        (MemoryError(), errors.CLUSTER, "out of memory"),
        (_ray_error("ObjectReconstructionFailedError"), errors.CLUSTER, "lost data it could not make again"),
        (_ray_error("OwnerDiedError"), errors.CLUSTER, "rerun with --resume"),
        (KeyboardInterrupt(), errors.INTERRUPTED, "interrupted"),
        (ZeroDivisionError("division by zero"), errors.INTERNAL, "internal error (ZeroDivisionError)"),
    ]


@pytest.mark.parametrize("k", range(9))
@pytest.mark.parametrize("wrapped", [False, True])
def test_faults_are_one_line_with_their_exit_code(k, wrapped):
    e, code, text = _cases()[k]
    if wrapped and not isinstance(e, KeyboardInterrupt):
        e = _ray_wrapped(e)
    got, line = errors.classify(e)
    assert got == code and text in line, line
    assert "\n" not in line and "Traceback" not in line


def test_an_unreachable_s3_endpoint_is_one_line_and_exit_3(tmp_path, shared_data, llama3_dir):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run(
        [sys.executable, "-m", "raysft.build", "--input", str(shared_data / "alpaca_en_demo.json"), "--tokenizer",
         llama3_dir, "--template", "llama3", "--output", "s3://nowhere-bucket/out", "--s3-endpoint-url",
         f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_MAX_ATTEMPTS": "1",
             "AWS_RETRY_MODE": "standard"})
    lines = [x for x in r.stderr.splitlines() if x.startswith("raysft.build: error")]
    assert r.returncode == errors.STORAGE and len(lines) == 1, r.stderr[-2000:]
    assert f"cannot reach http://127.0.0.1:{port}" in lines[0] and "does not exist" not in lines[0]
    assert "Traceback" not in r.stderr


def test_a_lost_head_is_one_line_and_exit_4():
    """The head's GCS stops answering: the monitor ends the build with one line and exit 4, in
    seconds (Ray's own core worker would exit 1 a minute later)."""
    code = (
        "import socket, time\n"
        "from raysft.engine import watch\n"
        "watch.HEAD_PROBE_S = 0.2\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(8)\n"
        "m = watch.HeadMonitor('127.0.0.1:%d' % s.getsockname()[1]).start()\n"
        "time.sleep(1.0)\n"  # answering: nothing happens
        "s.close()\n"
        "time.sleep(30)\n"
        "print('still running')\n"
    )
    t0 = __import__("time").monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == errors.CLUSTER, r.stderr
    assert "still running" not in r.stdout
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "lost the Ray cluster's head" in lines[0] and "--resume" in lines[0]
    assert __import__("time").monotonic() - t0 < 20


def test_a_stopped_head_monitor_never_fires():
    from raysft.engine import watch

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    m = watch.HeadMonitor(f"127.0.0.1:{port}")
    assert not m.answers()
    m.start()
    watch.HeadMonitor.stop_all()
    assert m not in watch.HeadMonitor.running and m._stop.is_set()


def test_an_engines_idle_ticks_are_no_sign_of_life():
    """The local engine yields on a timer while no chunk ends (for the progress line): a read
    that hangs in every tokenizer process (a frozen endpoint, a stuck mount) must still stall
    the tokenize stage, not be kept alive by the ticks."""
    import types

    from raysft.engine.measure import tokenize_and_measure
    from raysft.engine.watch import Stalled, Watchdog

    class Idle:
        def task(self, fn, **kw):
            return fn

        def tokenized(self, chunks, kwargs, pool):
            while True:
                time.sleep(0.05)
                yield None

    totals = types.SimpleNamespace(chunks=[], rows=0)
    blocks = types.SimpleNamespace(ex=Idle(), totals=totals, refs=[], add=None, collect=lambda wait: None)
    t0 = time.time()
    with pytest.raises(Stalled, match="the tokenize stage made no progress"):
        with Watchdog(1.0) as w:
            try:
                tokenize_and_measure(blocks, [1, 2], {}, types.SimpleNamespace(stats_cpus=1), None, w)
            except KeyboardInterrupt:
                w.check()
                raise
    assert time.time() - t0 < 10

"""Object storage through a real S3 endpoint (moto server) reached by the driver and the workers."""

import subprocess
import sys
import time

import boto3
import pytest
from helpers import build, file_bytes

from raysft.engine.driver import BuildError
from raysft.read import InputError

BUCKET = "raysft-data"


@pytest.fixture(scope="module")
def bucket(s3_endpoint, shared_data):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    for name in ("alpaca_zh_demo.json", "glaive_toolcall_en_demo.json"):
        s3.upload_file(str(shared_data / name), BUCKET, f"raw/{name}")
    return s3


def test_s3_in_and_out_byte_identical_to_local(tmp_path, ray_session, bucket, s3_endpoint, shared_data, llama3_dir,
                                                capsys):
    local = tmp_path / "local"
    flags = dict(template="llama3", seq_length=2048, num_shards=2)
    build(local, [shared_data / "alpaca_zh_demo.json", shared_data / "glaive_toolcall_en_demo.json"], llama3_dir,
          **flags)
    out = f"s3://{BUCKET}/packed/run1"
    stats = build(out, [f"s3://{BUCKET}/raw/*.json"], llama3_dir, s3_endpoint_url=s3_endpoint, **flags)
    assert stats["rows_read"] == 1300
    remote = {}
    for name in ("data.bin", "data.idx", "data_order.txt", "stats.json", "_SUCCESS"):
        remote[name] = bucket.get_object(Bucket=BUCKET, Key=f"packed/run1/{name}")["Body"].read()
    for name, data in file_bytes(local).items():
        assert remote[name] == data, name
    for line in remote["data_order.txt"].decode().split():
        bucket.head_object(Bucket=BUCKET, Key=f"packed/run1/{line}")
    assert "testing" not in remote["stats.json"].decode()  # no credentials in outputs

    # inspect reads the S3 output directly
    from raysft import inspect as insp

    assert insp.main([out, "--pack", "0", "--color", "never", "--s3-endpoint-url", s3_endpoint]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("pack 0 of ") and "[[" in shown and "s3://raysft-data/raw/" in shown


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("s3://no-such-bucket/raw/*.jsonl", "bucket 'no-such-bucket' does not exist"),
        (f"s3://{BUCKET}/raw/missing.jsonl", "no such file or folder"),
        (f"s3://{BUCKET}/empty-prefix/*.jsonl", "matches no input file"),
    ],
)
def test_s3_input_errors_are_one_line(tmp_path, bucket, s3_endpoint, llama3_dir, pattern, message):
    with pytest.raises(InputError, match=message) as e:
        build(tmp_path, [pattern], llama3_dir, template="llama3", s3_endpoint_url=s3_endpoint)
    assert "\n" not in str(e.value)


def test_s3_missing_output_bucket(tmp_path, bucket, s3_endpoint, llama3_dir):
    with pytest.raises((InputError, BuildError), match="bucket 'no-out-bucket' does not exist"):
        build("s3://no-out-bucket/x", [f"s3://{BUCKET}/raw/*.json"], llama3_dir, template="llama3",
              s3_endpoint_url=s3_endpoint)


# --------------------------------------------------------------------------- lock and commit on S3


def _s3fs(endpoint):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, use_listings_cache=False)


def test_s3_lock_is_a_conditional_put_and_a_dead_remote_owner_is_taken_over(bucket, s3_endpoint):
    import json

    from raysft.output import LOCK, OutputError, OutputLock

    fs, root = _s3fs(s3_endpoint), f"{BUCKET}/locked"
    a, b = OutputLock(fs, root, f"s3://{root}"), OutputLock(fs, root, f"s3://{root}")
    a.acquire()
    with pytest.raises(OutputError, match="is being written by another build"):
        b.acquire()  # the store refused b's put (If-None-Match), and a's owner is alive
    assert json.loads(fs.cat(f"{root}/{LOCK}"))["token"] == a.token
    a.release()
    b.acquire()
    b.verify()
    b._stop.set()  # b "dies" on another host: its heartbeat stops
    stale = json.loads(fs.cat(f"{root}/{LOCK}"))
    stale.update(host="elsewhere", heartbeat=0, since=0)
    fs.pipe(f"{root}/{LOCK}", json.dumps(stale).encode())
    c = OutputLock(fs, root, f"s3://{root}")
    c.acquire()  # not refreshed for LEASE_S: taken over
    with pytest.raises(OutputError, match="took over the output lock"):
        b.verify()  # b's commit would refuse
    c.release()
    assert not fs.exists(f"{root}/{LOCK}")


def test_s3_commit_cut_at_any_step_is_finished_by_the_next_run(bucket, s3_endpoint):
    """A lost connection at each server-side copy or delete of an S3 commit: the old dataset
    stays marked until the journal exists, and the next run finishes the new one from it."""
    from raysft.output import SUCCESS, TMP, Output

    fs = _s3fs(s3_endpoint)
    old, new = ["data.bin", "data.idx", "stats.json", "old_only.txt"], ["data.bin", "data.idx", "stats.json"]

    def commit(root, tag, names, fail_after=None):
        o = Output(fs, root, f"s3://{root}")
        o.prepare_tmp({"tokenizer": "t", "flags": {}, "version": 2}, resume=False)
        for n in names:
            fs.pipe(f"{root}/{TMP}/{n}", f"{tag}:{n}".encode())
        calls = [0]
        real_copy, real_rm = fs.copy, fs.rm

        def cut(real):
            def f(*a, **k):
                calls[0] += 1
                if fail_after is not None and calls[0] > fail_after:
                    raise ConnectionError("endpoint went away")
                return real(*a, **k)
            return f

        fs.copy, fs.rm = cut(real_copy), cut(real_rm)
        try:
            o.commit(names, {"tokenizer": "t", "flags": {}, "version": 2})
        finally:
            fs.copy, fs.rm = real_copy, real_rm
        return calls[0]

    def state(root):
        return {p[len(root) + 1:]: fs.cat(p).decode() for p in fs.find(root) if f"/{TMP}/" not in p}

    commit(f"{BUCKET}/ref", "old", old)
    steps = commit(f"{BUCKET}/ref", "new", new)
    want = state(f"{BUCKET}/ref")
    assert SUCCESS in want and "old_only.txt" not in want and want["data.bin"] == "new:data.bin"
    for k in range(steps):
        root = f"{BUCKET}/cut{k}"
        commit(root, "old", old)
        before = state(root)
        with pytest.raises(ConnectionError):
            commit(root, "new", new, fail_after=k)
        now = state(root)
        if SUCCESS in now:
            assert now in (before, want), f"step {k}: a marked mix"
        assert Output(fs, root, f"s3://{root}").recover()
        assert state(root) == want, f"step {k}"


# --------------------------------------------------------------------------- a frozen endpoint


class FreezingProxy:
    """A TCP proxy in front of the S3 endpoint that freezes (holds every connection open and
    forwards nothing more, as a hung load balancer or a stopped MinIO does) at the first request
    naming ``trigger``, or at once with ``trigger=""``."""

    def __init__(self, endpoint: str, trigger: str):
        import socket
        import threading

        host, port = endpoint.rsplit("/", 1)[-1].split(":")
        self.target, self.trigger = (host, int(port)), trigger.encode()
        self.frozen = threading.Event()
        if not trigger:
            self.frozen.set()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while True:
            try:
                c, _ = self.sock.accept()
                u = socket.create_connection(self.target)
            except OSError:
                return
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a, b):
        try:
            while d := a.recv(65536):
                if self.trigger and self.trigger in d:
                    self.frozen.set()
                while self.frozen.is_set():
                    time.sleep(0.2)
                b.sendall(d)
        except OSError:
            pass

    def close(self):
        self.sock.close()


def _frozen_build(tmp_path, s3_endpoint, llama3_dir, trigger: str, engine: str, output: str):
    proxy = FreezingProxy(s3_endpoint, trigger)
    cmd = [sys.executable, "-m", "raysft.build", "--input", f"s3://{BUCKET}/raw/*.json", "--output", output,
           "--tokenizer", llama3_dir, "--template", "llama3", "--engine", engine, "--stall-timeout", "6",
           "--s3-endpoint-url", proxy.url, "--overwrite"]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=150, start_new_session=True)
    finally:
        froze = proxy.frozen.is_set()
        proxy.frozen.clear()
        proxy.close()
    return p, time.time() - t0, froze


@pytest.mark.parametrize("trigger, stage, engine", [
    ("shards/part-", "write", "local"),  # a shard writer's upload (in the driver's thread pool)
    pytest.param("", "prepare", "local", marks=pytest.mark.slow),  # the first listing of the inputs
    pytest.param("shards/part-", "write", "ray", marks=pytest.mark.slow),  # a Ray task's upload
])
def test_a_frozen_endpoint_fails_on_time_with_one_line(tmp_path, bucket, s3_endpoint, llama3_dir, trigger, stage,
                                                       engine):
    """An endpoint that stops answering (connections held open, no bytes: botocore would wait
    out 60 s read timeouts with retries, ~5 min) stops the build within the stall timeout and
    the cleanup's bound: one line naming the stage, exit 4, nothing committed."""
    out = f"s3://{BUCKET}/frozen/{stage}-{engine}"
    p, took, froze = _frozen_build(tmp_path, s3_endpoint, llama3_dir, trigger, engine, out)
    assert froze, (p.returncode, p.stderr[-3000:])
    errors = [line for line in p.stderr.splitlines() if "error" in line.lower()]
    assert p.returncode == 4, p.stderr[-2000:]
    assert errors == [errors[0]] and f"the {stage} stage made no progress" in errors[0], errors
    assert "Traceback" not in p.stderr
    assert took < 6 + 15 + 10 + 20, took  # the timeout, the watchdog's tick and the bounded cleanup, start-up
    listed = bucket.list_objects_v2(Bucket=BUCKET, Prefix=f"frozen/{stage}-{engine}/").get("Contents", [])
    assert not [o["Key"] for o in listed if o["Key"].endswith("_SUCCESS")]

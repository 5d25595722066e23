"""`ray start --head` + `ray job submit -- python -m raysft.build`, end to end.

Starts a dedicated head on free ports with its own temp dir, submits the build, waits, checks
the output and stops only the processes of that cluster (never `ray stop`, which would kill
every Ray instance on the host, the test session's included).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT

from raysft.example import write_example

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(marker: str, ports: list[int]) -> None:
    keys = [marker, *(f":{p}" for p in ports), *(f"={p}" for p in ports)]
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(k in cmd for k in keys):
            roots.append(p)
    procs = set(roots)
    for p in roots:
        try:
            procs.update(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs), timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture()
def head(tmp_path_factory):
    temp = Path("/tmp") / f"raysft-head-{os.getpid()}-{free_port()}"
    ports = [free_port() for _ in range(4)]
    gcs, dash, client, agent = ports
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    cmd = [
        RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats",
        "--include-dashboard=true",
    ]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_cluster(str(temp), ports)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_end_to_end(head, tmp_path):
    address, env = head
    ex = write_example(str(tmp_path / "ex"), rows=80)
    out = tmp_path / "out"
    entry = [
        sys.executable, "-m", "raysft.build", "--input", os.path.join(ex["data"], "*.jsonl"),
        "--tokenizer", ex["tokenizer"], "--template", "llama3", "--seq-length", "1024", "--output", str(out),
    ]
    submit = [
        RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
        "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "example", "*.bin"]}), "--", *entry,
    ]
    t0 = time.time()
    r = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_read"] == 80 + 20 + 40 == stats["samples_written"]
    assert (out / "data.bin").stat().st_size == stats["tokens"] * 4
    assert time.time() - t0 < 400

    # a failing job makes `ray job submit` exit non-zero, with our one-line error in the log
    bad = [*submit[: submit.index("--") + 1], sys.executable, "-m", "raysft.build", "--input", "/nonexistent/*.jsonl",
           "--tokenizer", ex["tokenizer"], "--template", "llama3", "--output", str(tmp_path / "bad")]
    r = subprocess.run(bad, env=env, capture_output=True, text=True, timeout=200)
    assert r.returncode != 0
    assert "raysft.build: error: --input /nonexistent/*.jsonl" in r.stdout + r.stderr


STOP_SCRIPT = r"""
import json, sys, psutil, ray
from ray._private import worker
from raysft.config import BuildConfig
from raysft.engine.session import init_ray, stop_ray

init_ray(BuildConfig(inputs=["-"], output="-", tokenizer="-", num_cpus=1))
node = worker._global_node
pids = {t: [p.process.pid for p in ps] for t, ps in node.all_processes.items()}
order, kill = [], node._kill_process_type
node._kill_process_type = lambda t, **kw: (order.append(t), kill(t, **kw))[1]
stop_ray()
print(json.dumps({"order": order, "pids": pids, "initialized": ray.is_initialized(),
                  "alive": [p for ps in pids.values() for p in ps if psutil.pid_exists(p)]}))
"""


def test_stop_ray_kills_the_monitor_first_and_leaves_nothing_running(tmp_path):
    """The Ray a command started is stopped when its work is done, the autoscaler monitor before
    the GCS (its SIGTERM handler would wait on the dead GCS), and none of its processes is left."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", STOP_SCRIPT], env=env, capture_output=True, text=True, timeout=180,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["order"][0] == "monitor" and {"raylet", "gcs_server"} <= set(got["order"])
    assert "monitor" in got["pids"] and not got["initialized"] and got["alive"] == []


def test_stop_ray_leaves_a_ray_it_did_not_start_running(ray_session):
    from raysft.engine.session import stop_ray

    stop_ray()
    assert ray_session.is_initialized()
    assert ray_session.get(ray_session.put(7)) == 7

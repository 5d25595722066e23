"""`ray start --head` + `ray job submit -- python -m raysft.build`, end to end.

Starts a dedicated head on free ports with its own temp dir, submits the build, waits, checks
the output and stops only the processes of that cluster (never `ray stop`, which would kill
every Ray instance on the host, the test session's included).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT
from helpers import free_port, free_ports

from raysft.example import write_example

RAY = str(Path(sys.executable).parent / "ray")


def cluster_processes(keys: list[str]) -> set:
    """Processes whose command line holds one of ``keys``, and all their children."""
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
    return procs


def stop_cluster(marker: str, ports: list[int]) -> None:
    procs = cluster_processes([marker, *(f":{p}" for p in ports), *(f"={p}" for p in ports)])
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
    """A two-node `ray start` cluster with its dashboard (the job API): a head and a second
    node, 2 CPUs each, on this machine, with their own temp dir and ports, stopped by PID."""
    temp = Path("/tmp") / f"raysft-head-{os.getpid()}-{free_port()}"
    ports = free_ports(7)
    gcs, dash, client, agent, mgr2, om2, agent2 = ports
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    cmd = [
        RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats",
        "--include-dashboard=true",
    ]
    # the second node's own temp dir, as a real node's own disk: its runtime-env agent unpacks
    # (and removes) the job's working_dir there, not under the head's job driver
    worker = [RAY, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2", f"--node-manager-port={mgr2}",
              f"--object-manager-port={om2}", f"--dashboard-agent-listen-port={agent2}", "--disable-usage-stats",
              f"--temp-dir={temp}-node2"]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
        subprocess.run(worker, env=env, check=True, capture_output=True, timeout=120)
        deadline = time.time() + 60
        while _nodes_alive(f"127.0.0.1:{gcs}", env) < 2 and time.time() < deadline:
            time.sleep(1)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_cluster(str(temp), ports)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(f"{temp}-node2", ignore_errors=True)


@pytest.mark.slow  # a `ray start` cluster of its own: the cluster tests run in CI's slow run
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
    assert "(2 node(s), 4 CPUs)" in r.stdout + r.stderr  # the job ran on both nodes
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


@pytest.mark.slow  # a `ray start` cluster of its own: the cluster tests run in CI's slow run
def test_the_cron_script_exits_with_the_jobs_own_code(head, tmp_path):
    """jobs/cron_submit.sh reads the job's state from Ray's job API (Ray 2.60 prints "Job ...
    succeeded", which a grep for SUCCEEDED missed: every nightly run reported failure), uploads
    the paths its job file names, and exits with the build's own exit code."""
    address, env = head
    work = tmp_path / "work"
    shutil.copytree(ROOT / "raysft", work / "raysft")
    ex = write_example(str(work / "example"), rows=40)  # under example/: left out of uploads unless named
    job = tmp_path / "job.yaml"
    job.write_text(f"input: example/data/*.jsonl\ntokenizer: example/tokenizer\ntemplate: llama3\n"
                   f"seq_length: 1024\noutput: {tmp_path / 'out'}\n")
    cron = [str(ROOT / "jobs" / "cron_submit.sh"), str(job)]
    run_env = dict(env, RAY_ADDRESS=address, WORKING_DIR=str(work), PYTHON=sys.executable, RAYSFT_POLL_S="1")
    r = subprocess.run(cron, env=run_env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED (exit 0)" in r.stdout and (tmp_path / "out" / "_SUCCESS").exists()
    assert "(2 node(s), 4 CPUs)" in r.stdout  # on both nodes
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["rows_read"] == 40 + 10 + 20 and ex
    # a build that fails on bad input: the job's own exit code 1, with its one line in the log
    r = subprocess.run([*cron, "--input", "/nonexistent/*.jsonl"], env=run_env, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "raysft.build: error: --input /nonexistent/*.jsonl" in r.stdout and "FAILED (exit 1)" in r.stdout


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
    """The Ray a command started runs no autoscaler monitor and no API server (a fixed node of
    its own), is stopped when its work is done (a monitor, where a Ray version starts one anyway,
    before the GCS: its SIGTERM handler would wait on the dead GCS), and none of its processes is
    left."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", STOP_SCRIPT], env=env, capture_output=True, text=True, timeout=180,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["order"][0] == "monitor" and {"raylet", "gcs_server"} <= set(got["order"])
    assert "monitor" not in got["pids"] and "dashboard" not in got["pids"] and "raylet" in got["pids"]
    assert not got["initialized"] and got["alive"] == []


def test_stop_ray_leaves_a_ray_it_did_not_start_running(ray_session):
    from raysft.engine.session import stop_ray

    stop_ray()
    assert ray_session.is_initialized()
    assert ray_session.get(ray_session.put(7)) == 7


@pytest.fixture()
def two_nodes(tmp_path_factory):
    """A head and a second node (`ray start --address`), 2 CPUs each, on this machine: the
    head with its own temp dir and ports, both stopped by PID."""
    temp = Path("/tmp") / f"raysft-2n-{os.getpid()}-{free_port()}"
    ports = free_ports(9)
    gcs, dash, client, agent, mgr, om, mgr2, om2, agent2 = ports
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    head = [RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}", f"--node-manager-port={mgr}", f"--object-manager-port={om}",
            "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats", "--include-dashboard=false",
            "--object-store-memory=300000000"]
    worker = [RAY, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2", f"--node-manager-port={mgr2}",
              f"--object-manager-port={om2}", f"--dashboard-agent-listen-port={agent2}", "--disable-usage-stats",
              "--object-store-memory=300000000"]
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
        subprocess.run(worker, env=env, check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{gcs}", env, mgr2
    finally:
        stop_cluster(str(temp), ports)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_node_that_does_not_see_a_probe_says_which_folder():
    from raysft.engine.storage import _look

    seen = _look({"--output": "/nonexistent/probe", "--cache": __file__}, open(__file__).read(), [__file__])
    assert seen["probes"] == {"--output": False, "--cache": True} and seen["inputs"][__file__].count(":") == 1


def _nodes_alive(address: str, env: dict) -> int:
    code = (f"import ray; ray.init(address={address!r}, log_to_driver=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return int(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_node_cluster_one_chunk_input_and_s3_output(two_nodes, tmp_path, s3_endpoint, shared_data, llama3_dir):
    address, env, _ = two_nodes
    deadline = time.time() + 60
    while _nodes_alive(address, env) < 2 and time.time() < deadline:
        time.sleep(1)
    assert _nodes_alive(address, env) == 2
    base = [sys.executable, "-m", "raysft.build", "--tokenizer", llama3_dir, "--template", "llama3",
            "--seq-length", "1024", "--ray-address", address, "--stall-timeout", "120"]
    # one small file, one chunk: one actor, sized for one node (it once asked for 3 CPUs no node had)
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(50)))
    r = subprocess.run([*base, "--input", str(one), "--output", str(tmp_path / "local"), "--cache",
                        str(tmp_path / "cache")], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "local" / "stats.json").read_text())["samples_written"] == 50
    assert "2 node(s), 4 CPUs" in r.stderr
    assert "sees the output, the cache and the same inputs" in r.stderr  # both probed on both nodes

    # S3 output on moto, the shared data as input: the writers on both nodes reach the endpoint
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="twonode")
    inputs = [str(shared_data / "alpaca_en_demo.json"), str(shared_data / "glaive_toolcall_en_demo.json")]
    s3 = [*base, *sum((["--input", i] for i in inputs), []), "--output", "s3://twonode/out",
          "--s3-endpoint-url", s3_endpoint, "--tokenize-workers", "4"]
    r = subprocess.run(s3, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    stats = json.loads(fs.cat("twonode/out/stats.json"))
    assert stats["rows_read"] == 999 + 300 and fs.exists("twonode/out/_SUCCESS")
    # the same dataset as a one-process build of the same inputs
    local = tmp_path / "ref"
    r = subprocess.run([sys.executable, "-m", "raysft.build", "--tokenizer", llama3_dir, "--template", "llama3",
                        "--seq-length", "1024", *sum((["--input", i] for i in inputs), []), "--output", str(local)],
                       env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert fs.cat("twonode/out/data.bin") == (local / "data.bin").read_bytes()
    assert fs.cat("twonode/out/data.idx") == (local / "data.idx").read_bytes()


@pytest.mark.slow  # a `ray start` cluster of its own: the cluster tests run in CI's slow run
def test_a_stale_cluster_pointer_is_never_joined(tmp_path, llama3_dir):
    """No --ray-address and no RAY_ADDRESS: an in-process Ray, even with /tmp/ray/ray_current_cluster
    naming a head that is gone."""
    pointer = Path("/tmp/ray/ray_current_cluster")
    saved = pointer.read_bytes() if pointer.exists() else None
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        ex = write_example(str(tmp_path / "ex"), rows=20)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        r = subprocess.run([sys.executable, "-m", "raysft.build", "--input", os.path.join(ex["data"], "*.jsonl"),
                            "--tokenizer", ex["tokenizer"], "--template", "llama3", "--seq-length", "512",
                            "--output", str(tmp_path / "out"), "--num-cpus", "1"], env=env, capture_output=True,
                           text=True, timeout=300, cwd=ROOT)
    finally:
        if saved is None:
            pointer.unlink(missing_ok=True)
        else:
            pointer.write_bytes(saved)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "_SUCCESS").exists()


def _stall(detail: str = "", limit_s: float = 30) -> float:
    """A stage that makes no progress under a 1 s watchdog, as the driver waits on one (the
    watchdog's interrupt turned into its error); the seconds until it was raised."""
    from raysft.engine.watch import Watchdog

    t0 = time.time()
    with Watchdog(1.0) as w:
        w.progress("tokenize", detail)
        try:
            while time.time() - t0 < limit_s:
                time.sleep(0.1)
        except KeyboardInterrupt:
            w.check()
            raise
    return time.time() - t0


def test_watchdog_fails_a_stalled_stage_with_one_line():
    from raysft.engine.watch import Stalled, Watchdog

    t0 = time.time()
    with pytest.raises(Stalled, match=r"the tokenize stage made no progress for \d+ s \(waiting for chunk 3\)"):
        _stall("chunk 3")
    assert time.time() - t0 < 10
    with Watchdog(1.0) as w:  # progress keeps it quiet
        for _ in range(30):
            w.progress("write")
            time.sleep(0.1)
    assert w.fired is None


def test_watchdog_fires_even_when_the_cluster_does_not_answer(monkeypatch):
    """A stalled cluster may not answer the diagnosis (a dead or overloaded GCS): the stall is
    still raised, within the diagnosis' time bound, saying so."""
    from raysft.engine import watch

    monkeypatch.setattr(watch, "_cluster_state", lambda: time.sleep(120) or "never")
    t0 = time.time()
    assert watch.waiting_for(0.5) == "cluster state unavailable (no answer in 0.5 s)"
    with pytest.raises(watch.Stalled, match=r"no progress for \d+ s.*no answer in 5 s"):
        _stall(limit_s=60)
    assert time.time() - t0 < 15


def test_watchdog_fires_in_a_process_that_ignores_sigint():
    """Started in the background (nohup, &, cron), a process inherits SIGINT ignored: the stall
    is still raised, and SIGINT is ignored again afterwards."""
    import signal

    from raysft.engine.watch import Stalled

    prev = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        t0 = time.time()
        with pytest.raises(Stalled, match="made no progress"):
            _stall()
        assert time.time() - t0 < 15
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, prev)


def test_watchdog_wakes_a_driver_blocked_in_a_wait():
    """The local engine's driver waits on futures (a lock, no bytecode runs): the watchdog's
    interrupt is a real signal, so the stall is raised on time there too."""
    import concurrent.futures

    from raysft.engine.watch import Stalled, Watchdog

    t0 = time.time()
    never = concurrent.futures.Future()
    with pytest.raises(Stalled, match="made no progress"):
        with Watchdog(1.0) as w:
            w.progress("tokenize", "a tokenizer process")
            try:
                never.result()  # blocks until the watchdog's signal
            except KeyboardInterrupt:
                w.check()
                raise
    assert time.time() - t0 < 15


@pytest.mark.slow  # a `ray start` cluster of its own, killed under a build: CI's slow run
def test_a_build_whose_head_dies_exits_4_with_one_line(tmp_path):
    temp = Path("/tmp") / f"raysft-head-{os.getpid()}-{free_port()}"
    ports = free_ports(4)
    gcs, dash, client, agent = ports
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    cmd = [RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats",
           "--include-dashboard=false"]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
        ex = write_example(str(tmp_path / "ex"), rows=20000)
        build = subprocess.Popen(
            [sys.executable, "-m", "raysft.build", "--input", os.path.join(ex["data"], "*.jsonl"), "--tokenizer",
             ex["tokenizer"], "--template", "llama3", "--seq-length", "1024", "--output", str(tmp_path / "out"),
             "--ray-address", f"127.0.0.1:{gcs}"], env=env, stderr=subprocess.PIPE, text=True)
        lines = []
        for line in build.stderr:  # the build has joined and started its actors: now the head goes
            lines.append(line)
            if "tokenizer actors" in line:
                break
        for p in psutil.process_iter(["cmdline"]):
            if "gcs_server" in " ".join(p.info["cmdline"] or []) and str(temp) in " ".join(p.info["cmdline"] or []):
                p.kill()
        t0 = time.time()
        _, rest = build.communicate(timeout=120)
        ours = [x for x in (lines + rest.splitlines()) if x.startswith("raysft.build: error")]
        assert build.returncode == 4, rest[-3000:]
        assert len(ours) == 1 and "lost the Ray cluster's head" in ours[0] and "--resume" in ours[0], ours
        assert time.time() - t0 < 60
        assert not (tmp_path / "out" / "_SUCCESS").exists()
    finally:
        stop_cluster(str(temp), ports)
        shutil.rmtree(temp, ignore_errors=True)


def _kill_node(node_manager_port: int) -> int:
    """SIGKILL the raylet of the node started with ``node_manager_port`` and every process it
    started (a node lost as a preempted VM is); the number of processes killed."""
    killed = 0
    for p in cluster_processes([f"--node_manager_port={node_manager_port}",
                                f"--node-manager-port={node_manager_port}"]):
        try:
            p.kill()
            killed += 1
        except psutil.NoSuchProcess:
            pass
    return killed


@pytest.mark.slow  # a `ray start` two-node cluster, one node killed under a build: CI's slow run
def test_a_node_lost_while_the_writers_run_is_survived(two_nodes, tmp_path, shared_data, llama3_dir):
    """The second node is killed the moment tokenizing ends, while the writers read the blocks
    its actors made: the build finishes (lineage makes the lost blocks again on a restarted
    actor) and writes the bytes a one-process build writes."""
    address, env, worker_port = two_nodes
    deadline = time.time() + 60
    while _nodes_alive(address, env) < 2 and time.time() < deadline:
        time.sleep(1)
    inputs = sum((["--input", str(shared_data / n)] for n in ("alpaca_en_demo.json", "glaive_toolcall_en_demo.json",
                                                             "alpaca_zh_demo.json")), [])
    flags = ["--tokenizer", llama3_dir, "--template", "llama3", "--seq-length", "2048",
             "--batch-size", "256", *inputs]
    cmd = [sys.executable, "-m", "raysft.build", *flags, "--output", str(tmp_path / "out"), "--ray-address", address,
           "--tokenize-workers", "4", "--stall-timeout", "240"]
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    lines, killed = [], 0
    for line in p.stderr:
        lines.append(line)
        if not killed and "raysft: tokenize:" in line and " in " in line.split("rows/s")[-1]:
            killed = _kill_node(worker_port)  # tokenizing is over: the write stage starts now
    p.wait(timeout=600)
    err = "".join(lines)
    assert killed, "the second node was never killed: " + err[-2000:]
    assert p.returncode == 0, err[-3000:]
    deadline = time.time() + 90
    while _nodes_alive(address, env) > 1 and time.time() < deadline:
        time.sleep(2)
    assert _nodes_alive(address, env) == 1  # the node was really lost (Ray marks it dead within ~30 s)
    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, "-m", "raysft.build", *flags, "--output", str(ref), "--engine", "local"],
                       env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("data.bin", "data.idx"):
        assert (tmp_path / "out" / name).read_bytes() == (ref / name).read_bytes(), name

"""Starting, joining and stopping Ray, and sizing the tokenizer pool from the nodes."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass

from ..errors import CLUSTER
from .watch import HeadMonitor, head_answers

log = logging.getLogger("raysft")

OBJECT_STORE_BYTES = 1 << 30
_ray_started: str | None = None  # "local" or "joined" when init_ray started Ray here (stop_ray stops it)


class ClusterError(RuntimeError):
    """Ray could not be started or joined, or the cluster cannot run the job."""

    exit_code = CLUSTER


def init_ray(cfg, input_bytes: int = 0) -> None:
    """Join ``--ray-address`` / ``$RAY_ADDRESS``, else start a Ray instance in this process
    (``address="local"``: a cluster that happens to run on the host, or a stale
    ``/tmp/ray/ray_current_cluster`` pointer left by a dead one, is never joined)."""
    global _ray_started
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    with _keep_sigterm():
        if address:
            if (silent := head_answers(address)) is not None:
                raise ClusterError(f"cannot join the Ray cluster at {address}: {silent}")
            try:
                ray.init(address=address, log_to_driver=True)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ClusterError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0][:300]}") \
                    from None
            _ray_started = "joined"
            return
        _start_local(cfg, ray, input_bytes)


@contextlib.contextmanager
def _keep_sigterm():
    """Ray's core worker installs a SIGTERM handler of its own (it dumps a C++ stack and exits
    15); the command's handler (SIGTERM as an interrupt: exit 130, one line, ``--resume``
    continues) is put back once Ray is up."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and callable(before):
            signal.signal(signal.SIGTERM, before)


RETRY_AFTER_S = 5  # a Ray start that timed out (its node waits 30 s for the raylet) is tried once more after this


def _start_local(cfg, ray, input_bytes: int = 0) -> None:
    global _ray_started
    system: dict = {}
    if cfg.spill_dir:
        os.makedirs(cfg.spill_dir, exist_ok=True)
        system["object_spilling_config"] = json.dumps(
            {"type": "filesystem", "params": {"directory_path": os.path.abspath(cfg.spill_dir)}})
    # one node of this build's own: its small tasks run in the driver's threads
    # (executor.RayExecutor), so Ray's idle workers started ahead for tasks would only cost
    # their start-up (imports: ~1.2 CPU-s and ~120 MB each, one per CPU, and one more when the
    # driver connects) beside the actors'
    system["enable_worker_prestart"] = False
    system["prestart_worker_first_driver"] = False
    # a Ray only this process uses and stops: no token authentication to set up (Ray 2.5x warns
    # that it is on otherwise); a cluster's own setting is never changed (joining returns above)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for attempt in (1, 2):
        try:
            with _lean_head():
                # Ray's own INFO lines ("Started a local Ray instance") are not the build's news
                ray.init(address="local", num_cpus=cfg.num_cpus,
                         object_store_memory=object_store_bytes(cfg, input_bytes), include_dashboard=False,
                         log_to_driver=True, logging_level=logging.WARNING, _system_config=system or None)
            break
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"cannot start Ray on this machine: {str(e).splitlines()[0][:300]}") from None
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception when its node times out starting
            if "timed out" not in str(e) or attempt == 2:
                raise ClusterError(f"cannot start Ray on this machine ({'twice, ' if attempt == 2 else ''}"
                                   f"{str(e).splitlines()[0][:300]}); the host may be too busy: retry, or use "
                                   "--engine local") from None
            log.warning("Ray's start timed out (a busy host?): trying once more")
            ray.shutdown()
            time.sleep(RETRY_AFTER_S)
    _ray_started = "local"


@contextlib.contextmanager
def _lean_head():
    """While ``ray.init`` starts this process's own one-node Ray: no autoscaler monitor (a
    fixed node has nothing to scale) and no API server (with ``include_dashboard=False`` Ray
    still starts a dashboard process for usage statistics, and ``ray.init`` waits until it
    answers: ~1 s of the start and a Python process importing Ray beside the job). Nothing of a
    job this process runs on its own node uses either. And the node's dashboard agent runs as
    it does where Ray is installed without its dashboard (``--minimal``: no HTTP server, no
    metrics exporter): Ray decides that by importing the dashboard's dependencies in this
    process (aiohttp and more: ~0.8 s of the start), and the full agent spends ~1 CPU-s more.
    Private hooks of Ray's ``Node`` and ``utils``, left alone where a version lacks them; a
    cluster that is joined is never touched."""
    try:
        import ray._private.utils as ray_utils
        from ray._private.node import Node
    except ImportError:
        yield
        return
    saved = {name: Node.__dict__.get(name) for name in ("start_api_server", "start_monitor")}
    deps = getattr(ray_utils, "get_dashboard_dependency_error", None)
    if any(v is None for v in saved.values()) or deps is None:
        yield
        return
    Node.start_api_server = lambda self, **kwargs: None
    Node.start_monitor = lambda self: None
    ray_utils.get_dashboard_dependency_error = lambda: ImportError("a build's own Ray: its minimal dashboard agent")
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(Node, name, method)
        ray_utils.get_dashboard_dependency_error = deps


def starts_ray(cfg) -> bool:
    """Whether ``init_ray`` would start a Ray instance in this process (no cluster to join, and
    none up already), without importing Ray."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return False
    return not (cfg.ray_address or os.environ.get("RAY_ADDRESS"))


def stop_ray() -> None:
    """Stop the local Ray instance ``init_ray`` started, or disconnect from the cluster it
    joined (which stays up); nothing when Ray was up before (a test session's, a caller's).

    The commands call this when their work is done rather than leave it to Ray's exit hook,
    which first sleeps 0.5 s for late log lines. ``ray.shutdown()`` also stops the GCS before
    the autoscaler monitor, whose SIGTERM handler then blocks on the dead GCS until Ray kills it
    a second later (1.0 s of a 1.4 s shutdown, measured). The monitor holds nothing of this
    job, so it is killed first, through a private handle of Ray's (skipped where a Ray version
    lacks it)."""
    global _ray_started

    HeadMonitor.stop_all()  # Ray going down is not the head lost
    started, _ray_started = _ray_started, None
    if started is None:
        return  # never started here (--engine local imports no Ray at all)
    import ray

    if not ray.is_initialized():
        return
    if started == "local":
        from ray._private import worker

        kill = getattr(getattr(worker, "_global_node", None), "_kill_process_type", None)
        if kill is not None:
            try:
                kill("monitor", allow_graceful=False, check_alive=False)
            except Exception as e:  # never fail a finished job over its clean-up
                log.debug("could not stop Ray's autoscaler monitor first: %s", e)
    ray.shutdown()


# tokenized blocks (int32 ids and ~20 columns a row: ~1.6 bytes a byte of JSON input, measured on
# 2M distinct Alpaca rows) over Ray's spill threshold (it spills once the store is 80% full)
STORE_PER_INPUT_BYTE = 2.0
COMPRESSED_RATIO = 4  # what a compressed input's bytes stand for
STORE_SHARE = 0.45  # of the memory available now: what the store may take


def object_store_bytes(cfg, input_bytes: int = 0) -> int:
    """Object store of an in-process Ray instance: --object-store-memory, else what the
    tokenized input needs (``STORE_PER_INPUT_BYTE`` a byte of input, plus room for the blocks
    in flight), at least 1 GiB and at most ``STORE_SHARE`` of the memory available now and of
    /dev/shm's free space (where Ray keeps it). The tokenized dataset is held until the plan is
    made: sized so, it spills to disk only where memory does not allow it."""
    if cfg.object_store_memory:
        return cfg.object_store_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    floor = int(min(OBJECT_STORE_BYTES, 0.3 * ram))
    want = int(STORE_PER_INPUT_BYTE * input_bytes) + (256 << 20)
    room = min(_available_memory(ram), _shm_free())
    return max(floor, min(want, int(STORE_SHARE * room)))


def _available_memory(default: int) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return default


def _shm_free() -> int:
    try:
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize
    except OSError:
        return 1 << 62  # no /dev/shm: Ray uses /tmp


@dataclass(frozen=True)
class TokenizePool:
    """How the tokenizer actors are sized."""

    workers: int  # actors
    threads: int  # encoder threads per actor
    actor_cpus: float  # logical CPUs each actor (and the read fused into it) asks Ray for
    stats_cpus: float  # what a statistics task asks for: the CPU the actors leave, at most one


def _floor4(x: float) -> float:
    return math.floor(x * 1e4) / 1e4  # Ray takes resource amounts to 4 decimals


def size_pool(nodes: int | list[int], workers: int | None = None, chunks: int | None = None) -> TokenizePool:
    """Actors for the CPUs of ``nodes`` (CPUs per node; an int is one node).

    One single-threaded tokenizer actor per CPU by default, and no more actors than chunks
    (an actor takes a whole chunk at a time: extra ones would only start up and sit idle).
    Each alternates between Python (JSON, normalize, template, masks) and the encoder, and
    the actors are not in step, so every core stays busy; with fewer actors than CPUs each
    encodes with its share of the cores, never more than one node has.

    The actors ask for at most ``cpus - 1`` CPUs in all (half a CPU on a one-CPU cluster): an
    actor pool holding every logical CPU would starve any task scheduled beside it. An actor
    never asks for more CPUs than a single node has, and the request shrinks until all of the
    actors fit on the nodes, so the pool can always start."""
    nodes = [int(nodes)] if isinstance(nodes, (int, float)) else [int(c) for c in nodes if c >= 1]
    nodes = nodes or [1]
    cpus = sum(nodes)
    workers = workers or cpus
    workers = max(1, min(workers, chunks or workers))
    threads = max(1, min(max(nodes), round(cpus / workers)))
    spare = max(cpus - 1, cpus / 2) / workers
    actor_cpus = _floor4(min(float(threads), spare, float(max(nodes))))

    def fits(a: float) -> bool:  # the actors must fit node by node, not just in the cluster's sum
        return sum(int((c + 1e-9) // a) for c in nodes) >= workers

    if not fits(actor_cpus):
        candidates = sorted({_floor4(c / k) for c in nodes for k in range(1, workers + 1)}, reverse=True)
        actor_cpus = next(a for a in candidates if a <= actor_cpus and a > 0 and fits(a))
    stats_cpus = _floor4(min(1.0, cpus - workers * actor_cpus)) or 0.0001
    return TokenizePool(workers, threads, actor_cpus, stats_cpus)


def place_actors(nodes: dict, workers: int, actor_cpus: float) -> list:
    """The node of each of ``workers`` actors: one at a time to the node with the most CPUs
    left (in units of ``actor_cpus``), so each node gets its share by its CPUs."""
    left = dict(nodes)
    out = []
    for _ in range(workers):
        node = max(left, key=lambda n: (left[n], str(n)))
        out.append(node)
        left[node] -= actor_cpus
    return out


def node_cpus() -> dict:
    """CPUs of each alive node of the cluster Ray is connected to, by node id."""
    import ray

    return {n["NodeID"]: int(n["Resources"]["CPU"]) for n in ray.nodes()
            if n.get("Alive") and n["Resources"].get("CPU")}

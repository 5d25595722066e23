"""Where the driver's work runs: a Ray cluster (``--engine ray``, the default) or this machine
without Ray (``--engine local``).

The driver (``raysft.engine.driver``) is written once against this small interface:
``tokenized(...)`` runs the tokenizer actors' code over the read chunks and yields the
non-empty tokenized blocks (refs) as they come, or ``None`` for a tick in which none did (so the
driver can log progress while nothing moves, without taking the tick for a sign of life), ``task(fn)`` makes a function remote, and ``get``, ``wait``
and ``put`` move results, with Ray's meaning (a task's top-level arguments that are refs are
resolved before it runs; ``num_returns=k`` gives k refs). Nothing here decides a byte of output:
both engines run the same pure stages in the same order of blocks, so they write the same bytes.

The local engine is for one machine, where Ray's fixed costs (starting Ray and its workers,
the object store and its spill) are a large part of a job: tokenizer processes (one per CPU,
spawned when the first chunk needs tokenizing) hand their blocks to the driver, whose threads
run the statistics, slot assignment and writer tasks (``one_node``: the writers read their
rows from the blocks in place, with their slots, and no shuffle copies). The tokenized blocks live in
memory-mapped Arrow files in a temporary folder (``--spill-dir``, else the system's), so the
page cache holds them and the kernel may write them out: about 4.5 bytes a token, removed as
the build ends. With ``--cache``, the driver's threads serve each chunk's entry (memory-mapped
from the cache) and only chunks without one reach a tokenizer process.

The Ray engine on one node runs the same small tasks in the driver's threads too (``one_node``),
reading the actors' blocks in place from the node's object store; on several nodes they are Ray
tasks placed by Ray.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

from ..config import ENGINES
from ..read import Chunk
from .actors import TokenizeAndMask
from .session import ClusterError, TokenizePool, init_ray, node_cpus, place_actors, size_pool
from .storage import check_shared_storage
from .watch import HeadMonitor

log = logging.getLogger("raysft")

ACTOR_RETRIES = 3  # restarts of a tokenizer actor, and retries of its tasks (lineage included)


@runtime_checkable
class Executor(Protocol):
    """What the stages ask of an engine (module doc); ``RayExecutor`` and ``LocalExecutor``."""

    shared_memory: bool  # tasks share the driver's memory: writers read blocks in place
    one_node: bool  # every task runs on one machine: writers may read every block without moving it

    def start(self, chunks: int, input_bytes: int = 0): ...  # the tokenizer pool's size (TokenizePool)

    def tokenized(self, chunks: list, actor_kwargs: dict, pool) -> Iterator[list | None]: ...

    def task(self, fn, num_cpus: float = 1, num_returns: int = 1) -> Callable: ...

    def get(self, refs): ...

    def wait(self, refs: list, num_returns: int = 1, timeout: float | None = None) -> tuple[list, list]: ...

    def put(self, obj): ...

    def check_storage(self, cfg, files, storage, tmp_url) -> None: ...

    def close(self) -> None: ...


class RayExecutor:
    def __init__(self, cfg):
        self.cfg = cfg

    threads: cf.ThreadPoolExecutor | None = None  # one node: the driver's threads run the small tasks

    def start(self, chunks: int, input_bytes: int = 0):
        init_ray(self.cfg, input_bytes)
        self._watch_head()
        self.nodes = node_cpus()  # what the actors are sized for and placed on
        self.one_node = len(self.nodes) == 1
        if self.one_node:
            # the statistics, slot and writer tasks read the blocks in place from the node's
            # object store: run in the driver's threads (as --engine local's), not in Ray worker
            # processes that each import Ray, pyarrow and raysft (~1.2 CPU-s and ~120 MB apiece)
            self.threads = cf.ThreadPoolExecutor(max(1, int(sum(self.nodes.values()))), thread_name_prefix="raysft-task")
        pool = size_pool(list(self.nodes.values()), self.cfg.tokenize_workers, chunks)
        log.info("tokenizer actors: %d, %d encoder thread(s) each (%d node(s), %d CPUs)", pool.workers,
                 pool.threads, len(self.nodes), sum(self.nodes.values()))
        return pool

    actors: list = []  # the tokenizer actors, alive until close(): what lineage re-runs lost blocks on
    released: list = []  # their release() tasks

    def tokenized(self, chunks: list, actor_kwargs: dict, pool):
        """The tokenizer actors over ``chunks``, two chunks queued per actor (the second starts
        the moment the first ends; the last chunks are cut small by ``split_tail``): each
        actor task is a streaming generator of the chunk's non-empty blocks, yielded as they
        are made. The actors are plain Ray actors whose constructor arguments are a few small
        values passed inline (the tokenizer by its file under the output), restartable with
        their tasks retried (``ACTOR_RETRIES`` times: a node lost, not a chunk that kills its
        actor every time): a block lost with its node later (while writers read it) is made
        again by lineage, on an actor Ray restarts elsewhere; they live until ``close()``."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # no CPUs reserved: the actors stay up (for lineage) while the writers run, and a
        # reservation would hold the CPUs the writers need; how many run where is decided here
        # instead (each node its share by CPUs, soft: a restarted actor may go to another node)
        Actor = ray.remote(TokenizeAndMask)
        kwargs = actor_kwargs | {"threads": pool.threads}
        self.actors = [Actor.options(num_cpus=0, max_restarts=ACTOR_RETRIES, max_task_retries=ACTOR_RETRIES,
                                     scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True))
                       .remote(**kwargs) for node in place_actors(self.nodes, pool.workers, pool.actor_cpus)]
        items = iter([c.to_item() for c in chunks])
        running: dict = {}  # generator -> its actor

        def submit(actor) -> None:
            item = next(items, None)
            if item is not None:
                running[actor.blocks.options(num_returns="streaming").remote(item)] = actor

        for actor in self.actors:
            submit(actor)
            submit(actor)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            if not ready:
                yield None  # a tick: the driver may log progress, but nothing moved
                continue
            refs = []
            for gen in ready:
                try:
                    refs.append(next(gen))
                except StopIteration:
                    submit(running.pop(gen))
            yield refs
        # their tokenizers' memory back before the writers start (awaited in close(): an actor
        # killed in the middle of it would have Ray log the task's failure)
        self.released = [actor.release.options(max_task_retries=0).remote() for actor in self.actors]

    shared_memory = False  # tasks run in other processes, on other machines
    one_node = False  # known once started: one node's object store holds every block

    def task(self, fn, num_cpus: float = 1, num_returns: int = 1):
        import ray

        if self.threads is not None:
            return _thread_task(self.threads, fn, num_returns, _ray_resolve)
        return ray.remote(fn).options(num_cpus=num_cpus, num_returns=num_returns).remote

    def get(self, refs):
        import ray

        if self.threads is not None:
            return [_ray_resolve(r) for r in refs] if isinstance(refs, list) else _ray_resolve(refs)
        return ray.get(refs)

    def wait(self, refs: list, num_returns: int = 1, timeout: float | None = None):
        import ray

        if self.threads is not None and all(isinstance(r, Ref) for r in refs):
            return _wait_local(refs, num_returns, timeout)
        return ray.wait(refs, num_returns=num_returns, timeout=timeout)

    def put(self, obj):
        import ray

        return _done(obj) if self.threads is not None else ray.put(obj)

    def check_storage(self, cfg, files, storage, tmp_url) -> None:
        check_shared_storage(cfg, files, storage, tmp_url)

    head = None  # the HeadMonitor while Ray is up

    def _watch_head(self) -> None:
        import ray

        try:
            address = ray.get_runtime_context().gcs_address
        except Exception:  # noqa: BLE001 - an older Ray: no probe, Ray's own timeout stays the guard
            return
        if address and ":" in address:
            self.head = HeadMonitor(address).start()

    def close(self) -> None:
        if self.threads is not None:
            # as --engine local's: a stalled task (a frozen upload) is not waited for
            self.threads.shutdown(wait=False, cancel_futures=True)
            self.threads = None
        if self.actors:
            import ray

            if self.released:
                ray.wait(self.released, num_returns=len(self.released), timeout=10)
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            self.actors, self.released = [], []
        if self.head is not None:
            self.head.stop()
            self.head = None


# --------------------------------------------------------------------------- local


class Ref:
    """A local result: a future, or item ``index`` of a future's list."""

    __slots__ = ("future", "index")

    def __init__(self, future: cf.Future, index: int | None = None):
        self.future, self.index = future, index

    def value(self):
        v = self.future.result()
        return v if self.index is None else v[self.index]


def _resolve(x):
    return x.value() if isinstance(x, Ref) else x


def _ray_resolve(x):
    """A local result's value, or a Ray object's (a block in the node's object store, read in
    place: Arrow tables are not copied)."""
    if isinstance(x, Ref):
        return x.value()
    import ray

    return ray.get(x) if isinstance(x, ray.ObjectRef) else x


def _thread_task(threads: cf.ThreadPoolExecutor, fn, num_returns: int, resolve):
    """``fn`` as a task of the driver's threads: its arguments resolved (``resolve``), its
    result a ``Ref`` (``num_returns`` of them for a list)."""
    def call(*args, **kwargs):
        return fn(*[resolve(a) for a in args], **{k: resolve(v) for k, v in kwargs.items()})

    def remote(*args, **kwargs):
        fut = threads.submit(call, *args, **kwargs)
        return Ref(fut) if num_returns == 1 else [Ref(fut, i) for i in range(num_returns)]

    return remote


def _wait_local(refs: list, num_returns: int = 1, timeout: float | None = None):
    """``ray.wait`` for local results."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        ready = [r for r in refs if r.future.done()]
        if len(ready) >= num_returns:
            break
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        cf.wait({r.future for r in refs if not r.future.done()}, timeout=left, return_when=cf.FIRST_COMPLETED)
    ready = set(map(id, ready[:num_returns]))
    return [r for r in refs if id(r) in ready], [r for r in refs if id(r) not in ready]


def _done(obj) -> Ref:
    fut = cf.Future()
    fut.set_result(obj)
    return Ref(fut)


_ACTOR = None  # the tokenizer of one local tokenizer process
_SPILL = ""  # where it writes its blocks


def _start_actor(kwargs: dict, spill: str) -> None:
    global _ACTOR, _SPILL
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles ^C and stops the pool

    _ACTOR, _SPILL = TokenizeAndMask(**kwargs), spill


def _tokenize_chunk(item: dict, key: str | None = None) -> list[str]:
    """One chunk's blocks, each written to an Arrow IPC file the driver maps (no copy through
    a pipe, and the page cache, not the driver's heap, holds them). ``key``: its cache entry
    is known to be missing (the driver looked): the chunk is tokenized and the entry written."""
    c = Chunk.from_item(item)
    tables = _ACTOR.tokenize(c, (None, key, None)) if key else _ACTOR.tokenize_chunk(c)
    return [_write_table(t, _SPILL) for t in tables if t.num_rows]


def _lookup(lookups, item: dict, digests: dict) -> tuple:
    """A chunk's tables from the cache (None: no usable entry), the chunk and its entry's key."""
    c = Chunk.from_item(item)
    tables, key, _ = lookups.lookup(c, digests.get(c.chunk))
    return tables, item, key


def _write_table(table, folder: str) -> str:
    """``table`` as an Arrow IPC file of its own in ``folder``; its path."""
    import secrets

    import pyarrow as pa

    path = os.path.join(folder, f"{os.getpid()}-{secrets.token_hex(8)}.arrow")
    with pa.OSFile(path, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    return path


def _map_table(path: str):
    """The table of ``_write_table``'s file, memory-mapped (the page cache, which the kernel can
    write out, holds it instead of the heap); the name is removed, the map keeps its pages."""
    import pyarrow as pa

    with pa.memory_map(path, "r") as f:
        table = pa.ipc.open_file(f).read_all()
    os.unlink(path)
    return table


class LocalExecutor:
    """This machine, no Ray: tokenizer processes and a thread pool of the driver."""

    def __init__(self, cfg, digests: dict | None = None):
        self.cfg = cfg
        self.digests = digests or {}  # chunk -> content digest, where the driver hashed it already
        self.cpus = max(1, cfg.num_cpus or len(os.sched_getaffinity(0)))
        self.threads = cf.ThreadPoolExecutor(self.cpus, thread_name_prefix="raysft-task")
        self.procs: cf.ProcessPoolExecutor | None = None
        self.spill: str | None = None

    def workers_for(self, chunks: int) -> int:
        return max(1, min(self.cfg.tokenize_workers or self.cpus, chunks or 1))

    def start(self, chunks: int, input_bytes: int = 0):
        workers = self.workers_for(chunks)
        threads = max(1, round(self.cpus / workers))
        log.info("local engine: %d tokenizer process(es), %d encoder thread(s) each, %d CPUs", workers, threads,
                 self.cpus)
        return TokenizePool(workers, threads, float(threads), 1.0)

    def tokenized(self, chunks: list, actor_kwargs: dict, pool):
        """The tokenizer processes over ``chunks``, one chunk at a time each (two queued per
        process): each chunk's blocks, as the chunks end. With a cache, the driver's threads
        look each chunk up first and serve its entry (memory-mapped, no copy); only a chunk
        with none goes to a tokenizer process, and the processes start with the first such."""
        import tempfile

        base = self.cfg.spill_dir or None
        if base:
            os.makedirs(base, exist_ok=True)
        self.spill = tempfile.mkdtemp(prefix="raysft-blocks-", dir=base)
        kwargs = actor_kwargs | {"threads": pool.threads}
        lookups = None
        if actor_kwargs.get("cache"):
            lookups = TokenizeAndMask(**kwargs, process=False)
        items = [c.to_item() for c in chunks]
        pending: dict = {}  # future -> "lookup" or "tokenize"
        nxt = 0
        while nxt < len(items) or pending:
            while nxt < len(items) and len(pending) < 2 * pool.workers:
                if lookups is not None:
                    pending[self.threads.submit(_lookup, lookups, items[nxt], self.digests)] = "lookup"
                else:
                    pending[self._pool(pool, kwargs).submit(_tokenize_chunk, items[nxt])] = "tokenize"
                nxt += 1
            done, _ = cf.wait(list(pending), timeout=1.0, return_when=cf.FIRST_COMPLETED)
            if not done:
                yield None  # a tick: the driver may log progress, but nothing moved
                continue
            refs = []
            for f in done:
                kind = pending.pop(f)
                if kind == "lookup":
                    tables, item, key = f.result()
                    if tables is None:  # no usable entry: tokenize it (and write its entry)
                        pending[self._pool(pool, kwargs).submit(_tokenize_chunk, item, key)] = "tokenize"
                    else:
                        refs += [self.put(t) for t in tables if t.num_rows]
                    continue
                try:
                    paths = f.result()
                except cf.process.BrokenProcessPool:
                    raise ClusterError("a tokenizer process of --engine local died (killed, or out of memory: "
                                       "try fewer --tokenize-workers or a smaller --batch-size); nothing was "
                                       "committed") from None
                refs += [self.put(_map_table(path)) for path in paths]
            yield refs
        if self.procs is not None:
            self.procs.shutdown(wait=True)
            self.procs = None

    def _pool(self, pool, kwargs: dict) -> cf.ProcessPoolExecutor:
        """The tokenizer processes, started on first use."""
        import multiprocessing as mp

        if self.procs is None:
            # spawn: a fork would copy the driver's threads (its encoder loader, Arrow's pools)
            self.procs = cf.ProcessPoolExecutor(pool.workers, mp.get_context("spawn"), initializer=_start_actor,
                                                initargs=(kwargs, self.spill))
        return self.procs

    shared_memory = True  # tasks run in the driver's threads: a task's tables are read in place
    one_node = True

    def task(self, fn, num_cpus: float = 1, num_returns: int = 1):
        return _thread_task(self.threads, fn, num_returns, _resolve)

    def get(self, refs):
        return [_resolve(r) for r in refs] if isinstance(refs, list) else _resolve(refs)

    def wait(self, refs: list, num_returns: int = 1, timeout: float | None = None):
        return _wait_local(refs, num_returns, timeout)

    def put(self, obj):
        return _done(obj)

    def check_storage(self, cfg, files, storage, tmp_url) -> None:
        pass  # one machine: the driver's and the workers' view of storage is the same

    def close(self) -> None:
        if self.procs is not None:
            procs = list(getattr(self.procs, "_processes", {}).values())
            for p in procs:
                p.kill()  # an interrupted build: do not wait for chunks being tokenized
            for p in procs:
                p.join(5)
            # dead processes: the pool's manager ends at once, and frees its queues' semaphores
            # (else the resource tracker warns of "leaked semaphore objects" at exit)
            self.procs.shutdown(wait=all(not p.is_alive() for p in procs), cancel_futures=True)
            self.procs = None
        self.threads.shutdown(wait=False, cancel_futures=True)
        if self.spill is not None:
            import shutil

            shutil.rmtree(self.spill, ignore_errors=True)
            self.spill = None


def make_executor(cfg, engine: str | None = None, digests: dict | None = None):
    """The executor of ``engine`` (default ``cfg.engine``; checked here too: a BuildConfig need
    not come from the CLI). ``digests``: chunks' content digests already computed."""
    engine = engine or cfg.engine
    if engine not in ENGINES:
        raise ValueError(f"unknown --engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if cfg.engine == "local" and cfg.ray_address:
        raise ValueError("--engine local runs without Ray: drop --ray-address")
    return LocalExecutor(cfg, digests) if engine == "local" else RayExecutor(cfg)

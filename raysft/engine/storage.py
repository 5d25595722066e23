"""Storage rules on a cluster: local paths must be the same files on every node.

With more than one node, writers run anywhere and tokenizer actors read anywhere: a local
``--output`` must be a file system every node mounts (NFS, a shared volume), and a local
``--input`` must hold the same bytes everywhere. Object storage (``s3://``) is shared by
construction. The driver writes a probe under the output's ``_tmp/`` (and in a local
``--cache``) and, on every node, a task reads it back and measures the local inputs (size and a hash of their first and last
MiB); any node that sees no probe or other input bytes stops the build with one line."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets

from ..errors import STORAGE
from ..fs import get_fs, is_remote, join

log = logging.getLogger("raysft")


class StorageRuleError(RuntimeError):
    exit_code = STORAGE


def file_signature(path: str) -> str:
    """Size and a hash of the first and last MiB of a local file."""
    size = os.path.getsize(path)
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read())
    return f"{size}:{h.hexdigest()}"


def _look(probes: dict, token: str, inputs: list[str]) -> dict:
    import socket

    seen = {}
    for flag, path in probes.items():
        try:
            with open(path) as f:
                seen[flag] = f.read() == token
        except OSError:
            seen[flag] = False
    sigs = {}
    for p in inputs:
        try:
            sigs[p] = file_signature(p)
        except OSError as e:
            sigs[p] = f"unreadable ({e.strerror})"
    return {"host": socket.gethostname(), "probes": seen, "inputs": sigs}


def check_shared_storage(cfg, files, storage: dict, tmp_url: str) -> None:
    """Every node sees the local folders the build writes (``--output``; ``--cache``, whose
    entries one node writes and another reads) and the same bytes of each local input."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    if len(nodes) <= 1:
        return
    local_inputs = [f.url for f in files if not is_remote(f.url)]
    token = secrets.token_hex(8)
    probes = {}
    for flag, url, folder in (("--output", cfg.output, tmp_url), ("--cache", cfg.cache, cfg.cache)):
        if url and not is_remote(url):
            _, root = get_fs(folder, storage)
            os.makedirs(root, exist_ok=True)
            probes[flag] = join(root, f"probe-{token}")
            with open(probes[flag], "w") as f:
                f.write(token)
    if not probes and not local_inputs:
        return
    look = ray.remote(num_cpus=0)(_look)
    mine = _look(probes, token, local_inputs)
    refs = [look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        probes, token, local_inputs) for n in nodes]
    try:
        seen = ray.get(refs, timeout=120)
    finally:
        for path in probes.values():
            try:
                os.remove(path)
            except OSError:
                pass
    for n, s in zip(nodes, seen):
        where = f"node {n.get('NodeManagerAddress')} ({s['host']})"
        for flag, ok in s["probes"].items():
            if not ok:
                url = cfg.output if flag == "--output" else cfg.cache
                raise StorageRuleError(
                    f"{flag} {url} is a local folder that {where} does not see: on a cluster of {len(nodes)} "
                    "nodes, use s3:// or a file system every node mounts")
        for p in local_inputs:
            if s["inputs"].get(p) != mine["inputs"][p]:
                raise StorageRuleError(
                    f"--input {p} is not the same file on {where} ({s['inputs'].get(p)} there, {mine['inputs'][p]} "
                    f"on the driver): on a cluster, read inputs from s3:// or a file system every node mounts")
    log.info("storage: every one of the %d nodes sees the output%s and the same inputs", len(nodes),
             ", the cache" if "--cache" in probes else "")

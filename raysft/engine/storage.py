"""Storage rules on a cluster: local paths must be the same files on every node.

With more than one node, writers run anywhere and tokenizer actors read anywhere: a local
``--output`` must be a file system every node mounts (NFS, a shared volume), and a local
``--input`` must hold the same bytes everywhere. Object storage (``s3://``) is shared by
construction. The driver writes a probe under the output's ``_tmp/`` and, on every node, a
task reads it back and measures the local inputs (size and a hash of their first and last
MiB); any node that sees no probe or other input bytes stops the build with one line."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets

from ..fs import get_fs, is_remote, join

log = logging.getLogger("raysft")


class StorageRuleError(RuntimeError):
    pass


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


def _look(probe: str | None, token: str, inputs: list[str]) -> dict:
    import socket

    seen = None
    if probe is not None:
        try:
            with open(probe) as f:
                seen = f.read()
        except OSError:
            seen = None
    sigs = {}
    for p in inputs:
        try:
            sigs[p] = file_signature(p)
        except OSError as e:
            sigs[p] = f"unreadable ({e.strerror})"
    return {"host": socket.gethostname(), "probe": seen == token, "inputs": sigs}


def check_shared_storage(cfg, files, so: dict, tmp_url: str) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    if len(nodes) <= 1:
        return
    local_inputs = [f.url for f in files if not is_remote(f.url)]
    probe = None
    token = secrets.token_hex(8)
    if not is_remote(cfg.output):
        fs, root = get_fs(tmp_url, so)
        probe = join(root, f"probe-{token}")
        with open(probe, "w") as f:
            f.write(token)
    if probe is None and not local_inputs:
        return
    look = ray.remote(num_cpus=0)(_look)
    mine = _look(probe, token, local_inputs)
    refs = [look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        probe, token, local_inputs) for n in nodes]
    try:
        seen = ray.get(refs, timeout=120)
    finally:
        if probe is not None:
            try:
                os.remove(probe)
            except OSError:
                pass
    for n, s in zip(nodes, seen):
        where = f"node {n.get('NodeManagerAddress')} ({s['host']})"
        if probe is not None and not s["probe"]:
            raise StorageRuleError(
                f"--output {cfg.output} is a local folder that {where} does not see: on a cluster of {len(nodes)} "
                "nodes, write to s3:// or to a file system every node mounts")
        for p in local_inputs:
            if s["inputs"].get(p) != mine["inputs"][p]:
                raise StorageRuleError(
                    f"--input {p} is not the same file on {where} ({s['inputs'].get(p)} there, {mine['inputs'][p]} "
                    f"on the driver): on a cluster, read inputs from s3:// or a file system every node mounts")
    log.info("storage: every one of the %d nodes sees the output and the same inputs", len(nodes))

"""Filesystem helpers over fsspec: local paths and s3:// (AWS, MinIO, OSS, ...) alike.

``storage_options`` is a plain dict so it can travel to Ray workers; it never holds secrets
unless the user passed them: credentials come from the standard AWS environment variables,
profiles or instance roles, which s3fs/botocore read in each process.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec


def storage_options(endpoint_url: str | None = None, addressing_style: str | None = None, anon: bool = False) -> dict:
    storage: dict[str, Any] = {}
    if endpoint_url:
        storage["endpoint_url"] = endpoint_url
    if addressing_style:
        storage["config_kwargs"] = {"s3": {"addressing_style": addressing_style}}
    if anon:
        storage["anon"] = True
    return storage


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def get_fs(url: str, storage: dict | None = None):
    """(filesystem, path without protocol) for ``url``."""
    if is_remote(url):
        proto = url.split("://", 1)[0]
        fs, path = fsspec.core.url_to_fs(url, **(storage or {}) if proto in ("s3", "s3a") else {})
        return fs, path
    return fsspec.filesystem("file"), os.path.abspath(url.removeprefix("file://"))


def absolute(url: str | None) -> str | None:
    """A local path made absolute against this process's working folder (URLs as they are):
    what reaches a worker must not be resolved against the worker's own folder."""
    if not url or is_remote(url):
        return url
    return os.path.abspath(url.removeprefix("file://"))


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


def full_url(fs, path: str, like: str) -> str:
    """Re-attach the protocol of ``like`` to a path returned by ``fs``."""
    if is_remote(like):
        proto = like.split("://", 1)[0]
        return f"{proto}://{path}"
    return path


def call_within(fn, limit_s: float, name: str) -> bool:
    """``fn()`` in a daemon thread given ``limit_s`` seconds; whether it finished. For the
    clean-up storage calls an error path makes (a lock's release, an upload's abort): the storage
    may be what failed or froze, and the error must not wait on it."""
    import threading

    t = threading.Thread(target=fn, name=name, daemon=True)
    t.start()
    t.join(limit_s)
    return not t.is_alive()

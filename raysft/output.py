"""The output folder: what may be written there, the lock, and an all-or-nothing commit.

Pure fsspec (local disk and S3 alike), no engine.

* **Lock**: one build per output at a time. ``_LOCK`` is created atomically (local: exclusive
  create; S3: a conditional put, ``If-None-Match: *``) and names its owner (host, pid, start
  time, a random token). The owner refreshes it (``heartbeat``) while it runs; a lock whose
  owner is gone (same host: the pid is dead or is another process; another host: no heartbeat
  for ``LEASE_S``) is taken over, by one process only (local: an atomic rename; S3: a delete
  and a conditional put). Before committing, the owner checks the lock still holds its token.
* **Ownership**: a raysft dataset lists every file it wrote in ``manifest.json``. The folder is
  touched only through such a manifest, once it is verified (a raysft manifest: its version,
  flags and a list of plain relative paths inside the folder): a build removes or replaces
  only the files it lists, never follows a symbolic link out of the folder, and refuses to
  put a file where a file it does not own stands (no list of "usual names" for folders
  without a manifest). A folder that holds files but no raysft dataset needs ``--overwrite``,
  and even then only files this build creates are added. ``_tmp/`` is cleared only when it is
  raysft's (its ``manifest.json``); a journal is checked whole before anything is moved.
* **Commit**: everything is written under ``_tmp/`` first. The commit writes a journal
  (``_tmp/_COMMIT.json``: the files to move into place and the old ones to remove), removes
  ``_SUCCESS``, moves the new files into place, removes the old dataset's other files and
  writes ``_SUCCESS`` last. The old dataset stays complete and marked until the commit starts.
  A commit cut short (``kill -9``, a lost connection) is finished from the journal by the next
  run on that output, whatever its flags, so nothing at a final name is ever a mix without
  the journal that completes it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time

from .errors import STORAGE
from .fs import join

log = logging.getLogger("raysft")

TMP = "_tmp"
LOCK = "_LOCK"
SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
JOURNAL = "_COMMIT.json"
LEASE_S = 600.0  # a lock not refreshed for this long, by an owner on another host, is stale
HEARTBEAT_S = 30.0


class OutputError(RuntimeError):
    """The output folder cannot be written as asked (one clear line)."""

    exit_code = STORAGE


def safe_rel(rel) -> bool:
    """A plain relative path inside the folder (no absolute path, ``..``, empty part)."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\x00" in rel:
        return False
    return not any(p in ("..", "", ".") for p in rel.replace("\\", "/").split("/"))


def out_path(root: str, rel: str) -> str:
    """``root/rel``, refusing anything that would land outside ``root``."""
    if not safe_rel(rel):
        raise OutputError(f"refusing to write {rel!r}: outside the output folder")
    return join(root, rel)


def verified_manifest(m) -> bool:
    """A manifest raysft wrote: its version and flags, and only plain relative file paths."""
    return (isinstance(m, dict) and not m.get("unreadable") and isinstance(m.get("version"), int)
            and isinstance(m.get("flags"), dict) and isinstance(m.get("files"), list)
            and all(safe_rel(f) and not f.startswith(TMP + "/") for f in m["files"]))


def file_checksum(fs, path: str) -> dict:
    """What ``manifest.json`` records of a file, and ``raysft.verify`` checks: its size and its
    XXH3-128 (read once, in 8 MiB blocks)."""
    import xxhash

    h = xxhash.xxh3_128()
    size = 0
    with fs.open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
            size += len(block)
    return {"size": size, "xxh3_128": h.hexdigest()}


def verified_journal(j) -> bool:
    return (isinstance(j, dict) and not j.get("unreadable") and isinstance(j.get("new"), list)
            and isinstance(j.get("remove"), list) and all(safe_rel(f) for f in j["new"] + j["remove"]))


def is_local(fs) -> bool:
    return fs.protocol in ("file", ("file", "local"))


def _is_s3(fs) -> bool:
    return getattr(fs, "protocol", None) in ("s3", ("s3", "s3a")) and hasattr(fs, "call_s3")


def write_json(fs, path: str, obj) -> None:
    """Write JSON whole: local files through a temporary name and a rename; an object store
    put is atomic already."""
    data = json.dumps(obj, indent=2, sort_keys=True)
    if is_local(fs):
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open(path, "w") as f:
            f.write(data)


def read_json(fs, path: str):
    """A JSON object raysft wrote, None where there is no file, ``{"unreadable": True}`` for
    anything else (not JSON, not UTF-8, not an object: a lock or manifest a user wrote)."""
    try:
        with fs.open(path, "r") as f:
            value = json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {"unreadable": True}
    return value if isinstance(value, dict) else {"unreadable": True}


def _exists(fs, path: str) -> bool:
    fs.invalidate_cache(path)
    return fs.exists(path)


# --------------------------------------------------------------------------- lock


def _pid_alive(pid: int, started: float | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if started is None:
        return True
    try:  # the same pid may belong to a new process: compare start times
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        return abs(boot + ticks / os.sysconf("SC_CLK_TCK") - started) < 2.0
    except (OSError, StopIteration, ValueError, IndexError):
        return True


def _process_start() -> float | None:
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return None


class OutputLock:
    """The exclusive lock of one output folder (see module doc)."""

    def __init__(self, fs, root: str, url: str):
        self.fs, self.root, self.url = fs, root, url
        self.path = join(root, LOCK)
        self.token = secrets.token_hex(8)
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(),
                     "since": time.time(), "heartbeat": time.time(), "token": self.token}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _create(self) -> bool:
        """Create the lock if nobody holds it; True on success."""
        data = json.dumps(self.info).encode()
        if is_local(self.fs):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if _is_s3(self.fs):
            bucket, _, key = self.path.partition("/")
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                self.fs.invalidate_cache(self.path)
                return True
            except FileExistsError:  # s3fs's name for 412 PreconditionFailed: someone holds it
                return False
            except Exception as e:  # noqa: BLE001 - s3fs maps the precondition failure to OSError-like errors
                text = f"{type(e).__name__} {e}"
                if "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text:
                    return False
                if "NotImplemented" not in text and "InvalidArgument" not in text:
                    raise
                # a store without conditional puts: a lease checked by reading it back
        if _exists(self.fs, self.path):
            return False
        with self.fs.open(self.path, "wb") as f:
            f.write(data)
        time.sleep(0.5)
        return (read_json(self.fs, self.path) or {}).get("token") == self.token

    def _stale(self, other: dict) -> str:
        """Why the lock ``other`` is stale, or "" when its owner may be alive."""
        if not other or other.get("unreadable"):
            age = time.time() - self._mtime()
            return "an unreadable lock file" if age > LEASE_S else ""
        if other.get("host") == self.info["host"]:
            if not _pid_alive(int(other.get("pid", -1)), other.get("started")):
                return f"its owner (pid {other.get('pid')} on this host) is gone"
            return ""
        beat = float(other.get("heartbeat") or other.get("since") or 0)
        if time.time() - beat > LEASE_S:
            return f"its owner on {other.get('host')} has not refreshed it for {time.time() - beat:.0f} s"
        return ""

    def _mtime(self) -> float:
        try:
            m = self.fs.info(self.path)
            t = m.get("mtime") or m.get("LastModified")
            return t.timestamp() if hasattr(t, "timestamp") else float(t or 0)
        except (OSError, ValueError, TypeError):
            return 0.0

    def acquire(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                self._start_heartbeat()
                return
            other = read_json(self.fs, self.path)
            if other is None:
                continue  # released meanwhile: try again
            why = self._stale(other)
            if not why:
                raise OutputError(
                    f"{self.url} is being written by another build (pid {other.get('pid')} on {other.get('host')}, "
                    f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(other.get('since', 0)))}); "
                    f"wait for it, or remove {join(self.url, LOCK)} if that build is gone")
            log.warning("taking over the lock of %s: %s", self.url, why)
            self._take_over(other)
        raise OutputError(f"{self.url}: could not take the output lock (another build keeps taking it)")

    def _take_over(self, other: dict) -> None:
        if is_local(self.fs):
            try:  # one taker wins the rename; the others find no lock to rename
                os.rename(self.path, f"{self.path}.stale-{self.token}")
                os.remove(f"{self.path}.stale-{self.token}")
            except FileNotFoundError:
                pass
        else:
            if (read_json(self.fs, self.path) or {}).get("token") == other.get("token"):
                try:
                    self.fs.rm(self.path)
                except FileNotFoundError:
                    pass

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    self.refresh()
                except Exception as e:  # noqa: BLE001 - a missed beat is retried; the commit verifies
                    log.debug("lock heartbeat failed: %s", e)

        self._thread = threading.Thread(target=beat, name="raysft-lock", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        if not self.held:
            return
        current = read_json(self.fs, self.path) or {}
        if current.get("token") != self.token:
            return
        self.info["heartbeat"] = time.time()
        if is_local(self.fs):
            write_json(self.fs, self.path, self.info)
        else:
            with self.fs.open(self.path, "wb") as f:
                f.write(json.dumps(self.info).encode())

    def verify(self) -> None:
        """The lock is still ours (nobody took it over while we ran)."""
        current = read_json(self.fs, self.path) or {}
        if current.get("token") != self.token:
            raise OutputError(f"{self.url}: another build took over the output lock while this one ran "
                              f"(pid {current.get('pid')} on {current.get('host')}); nothing was committed")

    def release(self) -> None:
        self._stop.set()
        if not self.held:
            return
        self.held = False
        try:
            if (read_json(self.fs, self.path) or {}).get("token") == self.token:
                self.fs.rm(self.path)
        except Exception as e:  # noqa: BLE001 - never mask the build's own outcome
            log.debug("could not remove the output lock: %s", e)


# --------------------------------------------------------------------------- the folder


def expand_files(fs, root: str, names: list[str]) -> list[str]:
    """Files (relative to ``root``) for names that may be folders."""
    out = []
    for name in names:
        path = join(root, name)
        if fs.isdir(path):
            out += sorted(p[len(root.rstrip("/")) + 1 :] for p in fs.find(path))
        else:
            out.append(name)
    return out


class Output:
    """One output folder (local or object storage)."""

    def __init__(self, fs, root: str, url: str):
        self.fs, self.root, self.url = fs, root.rstrip("/"), url.rstrip("/")
        self.tmp = join(self.root, TMP)

    def path(self, rel: str) -> str:
        return out_path(self.root, rel)

    def manifest(self) -> dict | None:
        """The verified manifest of the dataset here, or None (none, or not raysft's)."""
        m = read_json(self.fs, self.path(MANIFEST))
        return m if verified_manifest(m) else None

    def inside(self, rel: str) -> bool:
        """``rel``'s folder is inside the output folder (local: no symbolic link on the way
        leads out of it; object stores have no links)."""
        if not is_local(self.fs):
            return True
        root = os.path.realpath(self.root)
        parent = os.path.realpath(os.path.dirname(self.path(rel)))
        return parent == root or parent.startswith(root + os.sep)

    def state(self) -> str:
        """``empty``, ``dataset`` (a committed raysft dataset), ``unmarked`` (a raysft dataset
        without ``_SUCCESS``), ``foreign`` (files, but no verified raysft manifest)."""
        fs = self.fs
        if _exists(fs, self.root) and not fs.isdir(self.root):
            raise OutputError(f"--output {self.url} is a file, not a folder")
        if not _exists(fs, self.root):
            return "empty"
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(self.root, detail=False)}
        names -= {TMP, LOCK}
        if not names:
            return "empty"
        if MANIFEST in names and self.manifest() is not None:
            return "dataset" if SUCCESS in names else "unmarked"
        return "foreign"

    def owned_files(self) -> list[str]:
        """Files the dataset here wrote, per its verified manifest (nothing without one)."""
        m = self.manifest()
        return [*m["files"], MANIFEST] if m else []

    def check_writable(self, overwrite: bool) -> None:
        """Refuse what this build may not replace (one line each)."""
        st = self.state()
        if st == "dataset" and not overwrite:
            raise OutputError(f"{self.url} already holds a dataset; pass --overwrite to replace it")
        if st == "unmarked" and not overwrite and not (self.manifest() or {}).get("failed"):
            raise OutputError(f"{self.url} holds an unfinished raysft dataset (no _SUCCESS); pass --overwrite to "
                              "replace it")
        if st == "foreign" and not overwrite:
            raise OutputError(f"{self.url} is not empty and holds no raysft dataset; choose an empty folder or pass "
                              "--overwrite (files raysft does not write are left as they are)")
        tmp = read_json(self.fs, join(self.tmp, MANIFEST)) if _exists(self.fs, self.tmp) else {}
        if _exists(self.fs, self.tmp) and self.fs.ls(self.tmp) and not (
                isinstance(tmp, dict) and isinstance(tmp.get("flags"), dict)):
            raise OutputError(f"{join(self.url, TMP)} exists and is not a raysft build's work folder (no manifest of "
                              "one): raysft writes there; move it away or choose another --output")

    def check_names(self, names: list[str], owned: set | None = None) -> None:
        """None of the files this build puts in place stands here unless a verified raysft
        manifest lists it (``owned``): checked before anything is built, and by ``commit``
        for every file again."""
        owned = set(self.owned_files()) if owned is None else owned
        for rel in names:
            p = self.path(rel)
            if rel not in owned and _exists(self.fs, p) and not self.fs.isdir(p):
                raise OutputError(f"refusing to replace {join(self.url, rel)}: raysft did not write it (it is in no "
                                  "raysft manifest here); move it away or choose another --output")

    # ---- commit

    def recover(self) -> bool:
        """Finish a commit an earlier run was cut off in; True when there was one. A journal
        that is not raysft's (a path outside the folder) is never applied: nothing moves."""
        journal = read_json(self.fs, join(self.tmp, JOURNAL))
        if not journal or journal.get("unreadable"):
            return False
        if not verified_journal(journal):
            log.warning("%s holds a commit journal raysft did not write (a path outside the folder): ignored",
                        join(self.url, TMP, JOURNAL))
            return False
        log.warning("finishing the commit an earlier run of %s was interrupted in", self.url)
        self._apply(journal)
        return True

    def commit(self, new_files: list[str], manifest: dict, lock: OutputLock | None = None,
               success: bool = True) -> None:
        """Move ``new_files`` (relative, all under ``_tmp/``) into place, replacing the old
        dataset's files, with ``manifest.json`` and ``_SUCCESS`` last (see module doc).
        ``success=False``: a build that wrote no dataset leaves its report (rejects, stats)
        without ``_SUCCESS``; the next build replaces it without ``--overwrite``."""
        new = expand_files(self.fs, self.tmp, new_files)
        manifest = dict(manifest, files=sorted(new), checksums={rel: file_checksum(self.fs, join(self.tmp, rel))
                                                                  for rel in sorted(new)},
                        **({} if success else {"failed": True}))
        owned = set(self.owned_files())
        for rel in [*new, MANIFEST]:  # checked before anything is touched
            if not self.inside(rel):
                raise OutputError(f"refusing to write {join(self.url, rel)}: a symbolic link on its way leads out of "
                                  "the output folder")
        self.check_names([*new, MANIFEST], owned)
        write_json(self.fs, join(self.tmp, MANIFEST), manifest)
        old = owned - set(new) - {MANIFEST}
        journal = {"new": sorted(new) + [MANIFEST], "remove": sorted(old), "success": success}
        if lock is not None:
            lock.verify()
        write_json(self.fs, join(self.tmp, JOURNAL), journal)
        self._apply(journal)

    def _apply(self, journal: dict) -> None:
        fs = self.fs
        if not verified_journal(journal):  # before anything is removed or moved
            raise OutputError(f"{join(self.url, TMP, JOURNAL)} names a path outside the output folder; nothing moved")
        if _exists(fs, self.path(SUCCESS)):
            fs.rm(self.path(SUCCESS))
        for rel in journal["new"]:
            src, dst = join(self.tmp, rel), self.path(rel)
            if not _exists(fs, src):
                continue  # moved before the interruption
            if is_local(fs):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(src, dst)
            else:
                fs.copy(src, dst)  # object stores have no rename: a server-side copy, then delete
                fs.rm(src)
        for rel in journal["remove"]:
            p = self.path(rel)
            if not self.inside(rel):  # never through a link out of the folder
                log.warning("not removing %s: a symbolic link on its way leads out of the output folder", rel)
            elif is_local(fs) and os.path.islink(p):
                os.remove(p)  # the link itself, not what it points to
            elif _exists(fs, p) and not fs.isdir(p):
                fs.rm(p)
        if is_local(fs):  # folders the old dataset emptied (never one holding a user's file)
            for rel in sorted({r.rsplit("/", 1)[0] for r in journal["remove"] if "/" in r}, reverse=True):
                try:
                    os.rmdir(self.path(rel))
                except OSError:
                    pass
        if journal.get("success", True):
            with fs.open(self.path(SUCCESS), "w") as f:
                f.write("")
        fs.rm(self.tmp, recursive=True)
        fs.invalidate_cache(self.root)

    def prepare_tmp(self, manifest: dict, resume: bool) -> dict | None:
        """Clear an interrupted run's leftovers, or keep them for --resume: returns the old
        run's manifest when resuming (its flags and tokenizer must match), else None."""
        path = join(self.tmp, "manifest.json")
        if not _exists(self.fs, self.tmp):
            if resume:
                log.info("resume: no interrupted run found, starting from scratch")
            self.fs.makedirs(self.tmp, exist_ok=True)
            write_json(self.fs, path, manifest)
            return None
        if resume:
            old = read_json(self.fs, path)
            if not old or old.get("unreadable"):
                raise OutputError("cannot resume: the interrupted run left no readable manifest; rerun without --resume")
            diff = ["the tokenizer"] if old.get("tokenizer") != manifest["tokenizer"] else []
            diff += [f"--{k.replace('_', '-')}" for k in manifest["flags"]
                     if (old.get("flags") or {}).get(k) != manifest["flags"][k]]
            if old.get("version") != manifest.get("version"):
                diff.append("the raysft version")
            if diff:
                raise OutputError(f"cannot resume: {', '.join(diff)} changed since the interrupted run; rerun "
                                  "without --resume to start over")
            log.info("resume: continuing the interrupted run in %s", join(self.url, TMP))
            write_json(self.fs, path, manifest)
            return old
        self.fs.rm(self.tmp, recursive=True)  # raysft's own (check_writable refused any other)
        self.fs.makedirs(self.tmp, exist_ok=True)
        write_json(self.fs, path, manifest)
        return None


def shard_complete(fs, prefix: str, layout, meta: dict) -> bool:
    """A shard an earlier run finished: its ``.meta.json`` (written last) and every file the
    layout writes for it exist, with the sizes the meta recorded where it has them."""
    try:
        for p in layout.shard_files(prefix):
            fs.invalidate_cache(p)
            if not fs.exists(p):
                return False
        if meta.get("bytes") and layout.shard_files(prefix)[0].endswith(".bin"):
            if int(fs.info(layout.shard_files(prefix)[0])["size"]) != int(meta["bytes"]):
                return False
        return fs.exists(prefix + ".prov")
    except (OSError, ValueError):
        return False

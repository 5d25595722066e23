"""How the commands fail: one line naming what failed and where, and a documented exit code.

| code | meaning |
| --- | --- |
| 0 | success |
| 1 | bad input: records (under ``--on-bad-record fail``), files, tokenizer, template, settings' content |
| 2 | usage: unknown flag, missing flag, bad flag value, bad job file |
| 3 | storage: the output folder (exists, locked, is a file, not writable), disk full, S3 endpoint, bucket, credentials |
| 4 | cluster: Ray cannot start or be joined, a stage stalled, a node or worker was lost for good |
| 70 | internal error: a bug (the line says what; ``--debug`` shows the traceback) |
| 130 | interrupted (Ctrl-C, SIGTERM): the output is untouched; ``--resume`` continues |

Errors raised inside Ray workers arrive wrapped (``RayTaskError``); ``classify`` unwraps them
to the original exception, so a worker that cannot reach S3 reads like the driver failing
to, not like a 300-line traceback.
"""

from __future__ import annotations

import argparse
import errno

OK, BAD_INPUT, USAGE, STORAGE, CLUSTER, INTERNAL, INTERRUPTED = 0, 1, 2, 3, 4, 70, 130


class BuildError(RuntimeError):
    """A failure to report as one clear line (bad input, bad settings): exit 1."""

    exit_code = BAD_INPUT


def _unwrap(e: BaseException) -> BaseException:
    seen = 0
    while seen < 10:
        seen += 1
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException) and cause is not e:
            e = cause
            continue
        nxt = e.__cause__
        if nxt is not None and type(e).__name__ in ("RayTaskError", "UserCodeException", "RayActorError") or (
                nxt is not None and type(e).__name__.startswith("RayTaskError")):
            e = nxt
            continue
        break
    return e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    if not text:
        return type(e).__name__
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    # Ray's wrappers put the worker's traceback in the message: keep the exception's own line
    for line in reversed(lines):
        if ":" in line and not line.startswith(("File ", "Traceback", "^", "~")):
            return line[:400]
    return lines[0][:400]


def classify(e: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an exception that ended a command. raysft's own errors say their
    code (``exit_code``, declared beside each in its module); the rest are classed here."""
    if isinstance(e, KeyboardInterrupt):
        return INTERRUPTED, "interrupted: nothing was committed to the output; rerun with --resume to continue"
    inner = _unwrap(e)
    name = type(inner).__name__
    msg = _first_line(inner)
    code = getattr(inner, "exit_code", None)
    if isinstance(code, int):
        return code, msg
    if isinstance(inner, OSError):
        if inner.errno == errno.ENOSPC:
            return STORAGE, f"no space left on the device{_where(inner)}"
        if isinstance(inner, PermissionError):
            return STORAGE, f"permission denied{_where(inner)}: {msg}"
        if isinstance(inner, FileNotFoundError):
            return STORAGE, f"not found{_where(inner)}: {msg}"
        return STORAGE, f"storage error ({name}){_where(inner)}: {msg}"
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return STORAGE, f"no storage credentials on a worker or the driver ({msg}); set AWS_ACCESS_KEY_ID/" \
                        "AWS_SECRET_ACCESS_KEY (or a profile or role) on every node"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                "ClientError", "NoSuchBucket", "ClientConnectorError", "ServerDisconnectedError"):
        return STORAGE, f"object storage error: {msg}"
    if name.startswith(("ObjectLost", "OwnerDied", "ObjectReconstructionFailed", "ObjectFetchTimedOut",
                        "ReferenceCountingAssertion")):
        # Ray's own text here is about Ray's internals (and asks to file an issue with Ray)
        return CLUSTER, (f"the cluster lost data it could not make again ({name}): a node or process holding "
                         "tokenized blocks was lost and Ray could not re-run what made them; nothing was "
                         "committed to the output: rerun with --resume")
    if name in ("ActorDiedError", "RayActorError", "WorkerCrashedError", "NodeDiedError",
                "RaySystemError", "GetTimeoutError",
                "ActorUnavailableError", "OutOfMemoryError"):
        return CLUSTER, f"the cluster lost work it could not redo ({name}): {msg}"
    if isinstance(inner, MemoryError):
        return CLUSTER, "out of memory"
    return INTERNAL, f"internal error ({name}): {msg} (rerun with --debug for the traceback)"


class OneLineParser(argparse.ArgumentParser):
    """The commands' argument parser: a usage error is one line (what is wrong, and where
    ``--help`` is), exit 2, not argparse's usage block of every flag above it."""

    def error(self, message: str):
        name = self.prog.removeprefix("python -m ")
        self.exit(USAGE, f"{name}: error: {message} (see: {self.prog} --help)\n")


def _where(e: OSError) -> str:
    return f" on {e.filename}" if getattr(e, "filename", None) else ""

"""``python -m raysft.submit JOB.yaml [raysft.build flags...]``: submit a build to a Ray cluster,
wait for it, print its log, and exit with the build's own exit code (what ``jobs/cron_submit.sh``
runs from cron).

The job's state comes from Ray's job API (``JobSubmissionClient``), never from the wording of
``ray job status``. The working folder (``$WORKING_DIR``, default this repository) is uploaded
with the job, without ``.venv``, ``.git``, ``bench-out`` and ``example`` unless the job file
names a relative path under one of them (``--tokenizer example/tokenizer``): what the job needs
goes with it. Exit codes: the build's (0, 1, 2, 3, 4, 130; see ``raysft.errors``); a job stopped
by someone else 130; a cluster that cannot be reached, or a job that ends without an exit code,
4; bad arguments 2.

Environment: ``RAY_ADDRESS`` (the dashboard, default ``http://127.0.0.1:8265``),
``RAY_AUTH_MODE`` as the cluster has it, ``WORKING_DIR``, ``RAYSFT_POLL_S`` (default 5).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXCLUDES = (".venv", ".git", "bench-out", "example")
JOB_FILE = ".raysft-job.yaml"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def named_paths(job: dict, read_only: bool = False) -> list[str]:
    """The relative local paths a job file names: what it reads (tokenizer, inputs, sources'
    inputs) and, unless ``read_only``, where it writes (output, cache)."""
    values: list = [job.get(k) for k in ("tokenizer", "input", "inputs")]
    values += [] if read_only else [job.get("cache"), job.get("output")]
    for s in job.get("sources") or []:
        if isinstance(s, dict):
            values += [s.get("input"), s.get("inputs")]
    out = []
    for v in values:
        for p in v if isinstance(v, list) else [v]:
            if isinstance(p, str) and p and "://" not in p and not os.path.isabs(p):
                out.append(p)
    return out


def excludes_for(job: dict) -> list[str]:
    """The folders left out of the upload: the usual ones, less any the job names a path in."""
    needed = {Path(p).parts[0] for p in named_paths(job) if Path(p).parts}
    return [e for e in EXCLUDES if e not in needed]


def exit_code(details) -> int:
    status = str(getattr(details.status, "value", details.status))
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return 130
    code = getattr(details, "driver_exit_code", None)
    return int(code) if isinstance(code, int) and code > 0 else 4


def main(argv: list[str] | None = None) -> int:
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    config, flags = Path(argv[0]), argv[1:]
    try:
        job = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        print(f"raysft.submit: error: {config}: {e}", file=sys.stderr)
        return 2
    if not isinstance(job, dict):
        print(f"raysft.submit: error: {config}: must be a mapping of flag names to values", file=sys.stderr)
        return 2
    workdir = Path(os.environ.get("WORKING_DIR") or ROOT)
    for p in named_paths(job, read_only=True):
        where = os.path.normpath(p)
        if where == ".." or where.startswith(".." + os.sep):
            print(f"raysft.submit: error: {config} names {p}, outside {workdir}, the folder uploaded with the job: "
                  "give a path every node sees (absolute, shared storage) or a URL", file=sys.stderr)
            return 2
        if not glob.glob(str(workdir / p)):
            print(f"raysft.submit: error: {config} names {p}, which is not in {workdir} (the folder uploaded with "
                  "the job)", file=sys.stderr)
            return 2
    address = os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    sid = f"raysft-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"
    shutil.copyfile(config, workdir / JOB_FILE)
    try:
        from ray.job_submission import JobSubmissionClient

        try:
            client = JobSubmissionClient(address)
            entry = " ".join(["python -m raysft.build --config", JOB_FILE, *(_quote(f) for f in flags)])
            client.submit_job(entrypoint=entry, submission_id=sid,
                              runtime_env={"working_dir": str(workdir), "excludes": excludes_for(job)})
        except Exception as e:  # noqa: BLE001 - a cluster that cannot be reached: one line
            print(f"raysft.submit: error: cannot submit to {address}: {str(e).splitlines()[0][:300]}",
                  file=sys.stderr)
            return 4
        print(f"{_now()} submitted {sid} to {address} ({config})", flush=True)
        poll = float(os.environ.get("RAYSFT_POLL_S", "5"))
        while True:
            try:
                details = client.get_job_info(sid)
            except Exception as e:  # noqa: BLE001 - the head went away while the job ran
                print(f"raysft.submit: error: lost the cluster at {address} while {sid} ran: "
                      f"{str(e).splitlines()[0][:300]}", file=sys.stderr)
                return 4
            if str(getattr(details.status, "value", details.status)) in TERMINAL:
                break
            time.sleep(poll)
        try:
            sys.stdout.write(client.get_job_logs(sid))
        except Exception:  # noqa: BLE001 - the log is a courtesy; the status decides
            pass
        code = exit_code(details)
        status = getattr(details.status, "value", details.status)
        print(f"{_now()} job {sid}: {status} (exit {code})", flush=True)
        return code
    finally:
        (workdir / JOB_FILE).unlink(missing_ok=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _quote(flag: str) -> str:
    import shlex

    return shlex.quote(flag)


if __name__ == "__main__":
    sys.exit(main())

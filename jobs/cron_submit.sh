#!/usr/bin/env bash
# Submit a raysft build to a Ray cluster, wait for it, print its log, and exit with the build's
# own exit code (0 ok, 1 bad input, 2 usage, 3 storage, 4 cluster, 130 stopped). For cron, e.g.:
#   0 2 * * *  RAY_ADDRESS=http://ray-head:8265 /opt/raysft/jobs/cron_submit.sh /opt/raysft/jobs/nightly.yaml >> /var/log/raysft.log 2>&1
#
# usage: jobs/cron_submit.sh CONFIG.yaml [extra raysft.build flags...]
# env:   RAY_ADDRESS     dashboard address of the cluster (default http://127.0.0.1:8265)
#        RAY_AUTH_MODE   must match the cluster's setting (see docs/cluster.md)
#        WORKING_DIR     code to ship with the job (default: this repository); the paths the
#                        job file names (e.g. --tokenizer example/tokenizer) are uploaded with it
#        PYTHON          the interpreter with raysft and ray[default] (default: python3)
# The job's status is read from Ray's job API (raysft.submit), not from `ray job status` text.
set -uo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG.yaml [extra raysft.build flags...]" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here" || exit 2
exec "${PYTHON:-python3}" -m raysft.submit "$@"

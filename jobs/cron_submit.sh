#!/usr/bin/env bash
# Submit a raysft build to a Ray cluster and wait for it; exit non-zero when the job fails.
# For cron, e.g.:
#   0 2 * * *  RAY_ADDRESS=http://ray-head:8265 /opt/raysft/jobs/cron_submit.sh /opt/raysft/jobs/nightly.yaml >> /var/log/raysft.log 2>&1
#
# usage: jobs/cron_submit.sh CONFIG.yaml [extra raysft.build flags...]
# env:   RAY_ADDRESS     dashboard address of the cluster (default http://127.0.0.1:8265)
#        RAY_AUTH_MODE   must match the cluster's setting (see README, "Running on a cluster")
#        WORKING_DIR     code to ship with the job (default: this repository)
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG.yaml [extra raysft.build flags...]" >&2
  exit 2
fi
config=$1
shift
here=$(cd "$(dirname "$0")/.." && pwd)
address=${RAY_ADDRESS:-http://127.0.0.1:8265}
workdir=${WORKING_DIR:-$here}
id="raysft-$(date -u +%Y%m%dT%H%M%SZ)-$$"
cp "$config" "$workdir/.raysft-job.yaml"
trap 'rm -f "$workdir/.raysft-job.yaml"' EXIT
echo "$(date -u +%FT%TZ) submitting $id to $address ($config)"
set +e
ray job submit --address "$address" --submission-id "$id" --working-dir "$workdir" \
  --runtime-env-json '{"excludes": [".venv", ".git", "example", "bench-out"]}' \
  -- python -m raysft.build --config .raysft-job.yaml "$@"
rc=$?
set -e
status=$(ray job status --address "$address" "$id" 2>/dev/null | grep -Eo 'SUCCEEDED|FAILED|STOPPED|RUNNING|PENDING' | tail -n1 || true)
echo "$(date -u +%FT%TZ) job $id: ${status:-unknown} (submit exit code $rc)"
if [ "$rc" -ne 0 ] || [ "$status" != "SUCCEEDED" ]; then
  exit 1
fi

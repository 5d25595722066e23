#!/usr/bin/env bash
# Launcher for Alibaba Cloud PAI-DLC multi-node jobs (one process per node).
# DLC sets RANK, WORLD_SIZE and MASTER_ADDR in every node's environment. Rank 0 starts the
# Ray head, waits for the other nodes, runs the build with `ray job submit` and exits with
# its status; the other ranks join the cluster and stay until the head goes away.
#
# DLC command, e.g.:
#   bash /app/deploy/dlc_launch.sh --config /app/jobs/example.yaml \
#        --tokenizer /mnt/models/llama3 --output oss-bucket-path... (any raysft.build flags)
set -euo pipefail
RANK=${RANK:-0}
WORLD_SIZE=${WORLD_SIZE:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}   # same value on every node and for the client
here=$(cd "$(dirname "$0")/.." && pwd)

if [ "$RANK" = "0" ]; then
  ray start --head --port "$RAY_PORT" --dashboard-host 0.0.0.0 --dashboard-port "$DASHBOARD_PORT" --disable-usage-stats
  echo "waiting for $WORLD_SIZE nodes"
  for _ in $(seq 1 180); do
    nodes=$(python -c "import ray; ray.init(address='auto', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))" 2>/dev/null || echo 0)
    [ "$nodes" -ge "$WORLD_SIZE" ] && break
    sleep 5
  done
  echo "cluster has ${nodes:-0}/$WORLD_SIZE nodes"
  set +e
  ray job submit --address "http://127.0.0.1:$DASHBOARD_PORT" --working-dir "$here" \
    --runtime-env-json '{"excludes": [".venv", ".git"]}' -- python -m raysft.build "$@"
  rc=$?
  set -e
  ray stop --force
  exit $rc
else
  for _ in $(seq 1 60); do
    ray start --address "$MASTER_ADDR:$RAY_PORT" --disable-usage-stats && break
    sleep 5
  done
  # stay while the head is reachable; exit 0 when the head stops after the job
  while python -c "import socket,sys; socket.create_connection(('$MASTER_ADDR', $RAY_PORT), 5)" 2>/dev/null; do
    sleep 15
  done
  ray stop --force || true
fi

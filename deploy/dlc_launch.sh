#!/usr/bin/env bash
# Launcher for Alibaba Cloud PAI-DLC multi-node jobs (one process per node).
# DLC sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in every node's environment. Rank 0
# starts the Ray head on MASTER_PORT, waits until all WORLD_SIZE nodes have joined (or fails
# with exit 4 after RAYSFT_JOIN_TIMEOUT_S, default 900), runs the build as the cluster's driver
# and exits with the build's own exit code (0 ok, 1 bad input, 2 usage, 3 storage, 4 cluster,
# 130 stopped). Every other rank joins the head (exit 4 if it cannot within the same timeout)
# and stays until the head goes away.
#
# DLC command, e.g.:
#   bash /app/deploy/dlc_launch.sh --config /app/jobs/example.yaml \
#        --tokenizer /mnt/models/llama3 --output oss://bucket/packed/ (any raysft.build flags)
set -uo pipefail
RANK=${RANK:-0}
WORLD_SIZE=${WORLD_SIZE:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
RAY_PORT=${MASTER_PORT:-${RAY_PORT:-6379}}        # DLC's MASTER_PORT is the port every node may reach
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
JOIN_TIMEOUT_S=${RAYSFT_JOIN_TIMEOUT_S:-900}
PYTHON=${PYTHON:-python3}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}   # same value on every node and for the driver
here=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "dlc_launch rank $RANK: $*" >&2; }

head_reachable() {
  "$PYTHON" -c "import socket,sys; socket.create_connection(('$MASTER_ADDR', $RAY_PORT), 5)" 2>/dev/null
}

if [ "$RANK" = "0" ]; then
  ray start --head --port "$RAY_PORT" --dashboard-host 0.0.0.0 --dashboard-port "$DASHBOARD_PORT" \
    --disable-usage-stats || { log "cannot start the Ray head on port $RAY_PORT"; exit 4; }
  deadline=$(( $(date +%s) + JOIN_TIMEOUT_S ))
  nodes=0
  while :; do
    nodes=$("$PYTHON" -c "import ray; ray.init(address='auto', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))" 2>/dev/null || echo 0)
    [ "${nodes:-0}" -ge "$WORLD_SIZE" ] && break
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "only ${nodes:-0} of $WORLD_SIZE nodes joined in ${JOIN_TIMEOUT_S} s: not building on a partial cluster"
      ray stop --force >/dev/null 2>&1
      exit 4
    fi
    sleep 5
  done
  log "cluster has $nodes/$WORLD_SIZE nodes; building"
  cd "$here" && RAY_ADDRESS=auto "$PYTHON" -m raysft.build "$@"
  rc=$?
  log "build exit code $rc"
  ray stop --force >/dev/null 2>&1
  exit $rc
else
  deadline=$(( $(date +%s) + JOIN_TIMEOUT_S ))
  until ray start --address "$MASTER_ADDR:$RAY_PORT" --disable-usage-stats; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "cannot join the head at $MASTER_ADDR:$RAY_PORT in ${JOIN_TIMEOUT_S} s"
      exit 4
    fi
    sleep 5
  done
  # stay while the head is reachable; the head's exit code is the job's
  while head_reachable; do
    sleep 15
  done
  ray stop --force >/dev/null 2>&1 || true
fi

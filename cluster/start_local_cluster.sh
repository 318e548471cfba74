#!/usr/bin/env bash
# Start a two-node Ray 2.60 test cluster on 127.0.0.1 with token authentication, for development.
#
#   cluster/start_local_cluster.sh            # head (0 CPUs: nothing is scheduled there) + 1 worker
#   export RAY_AUTH_TOKEN_PATH=$RLFT_CLUSTER_DIR/auth_token
#   rlft submit tune_configs/<sweep>.yaml --sweep --address http://127.0.0.1:8266 --wait
#   cluster/stop_local_cluster.sh
#
# Both nodes run in their own process group (setsid + `ray start --block`), so the stop script ends
# exactly the processes started here: it never calls `ray stop`, which would end every Ray process on
# the machine. The dashboard and the Jobs API listen on 127.0.0.1 only.
#
# Settings (environment variables, defaults in brackets):
#   RLFT_CLUSTER_DIR [/tmp/rlft-cluster]  state: token, pids, logs, Ray temp dirs (keep it short: Ray
#                                          puts Unix sockets under it)
#   RLFT_GCS_PORT [6390]  RLFT_DASHBOARD_PORT [8266]  RLFT_CLIENT_PORT [6392]
#   RLFT_HEAD_CPUS [0]  RLFT_WORKER_CPUS [2]  RLFT_WORKER_GPUS [0]  (logical GPUs: placement tests only)
#   RLFT_WORKER_RESOURCES ['{"worker_node": 1}']  custom resources of the worker node
#   RLFT_OBJECT_STORE_MB [512]  object store per node
#   RAY_AUTH_TOKEN_PATH  use this token file instead of generating $RLFT_CLUSTER_DIR/auth_token
#   RAY  the `ray` executable [the one next to this Python, else `ray` on PATH]
#   RLFT_START_TIMEOUT [60]  seconds to wait for both nodes
set -euo pipefail

DIR=${RLFT_CLUSTER_DIR:-/tmp/rlft-cluster}
GCS_PORT=${RLFT_GCS_PORT:-6390}
DASHBOARD_PORT=${RLFT_DASHBOARD_PORT:-8266}
CLIENT_PORT=${RLFT_CLIENT_PORT:-6392}
HEAD_CPUS=${RLFT_HEAD_CPUS:-0}
WORKER_CPUS=${RLFT_WORKER_CPUS:-2}
WORKER_GPUS=${RLFT_WORKER_GPUS:-0}
WORKER_RESOURCES=${RLFT_WORKER_RESOURCES:-'{"worker_node": 1}'}
TIMEOUT=${RLFT_START_TIMEOUT:-60}
OBJECT_STORE_BYTES=$(( ${RLFT_OBJECT_STORE_MB:-512} * 1024 * 1024 ))
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -z "${RAY:-}" ]]; then
  if [[ -x "$HERE/../.venv/bin/ray" ]]; then RAY="$HERE/../.venv/bin/ray"; else RAY=$(command -v ray); fi
fi
PYTHON=$(dirname "$RAY")/python
[[ -x "$PYTHON" ]] || PYTHON=python3
# jobs run `python -m rlft.cli ...`: `python` on the nodes must be the one Ray (and rlft's deps) live in
export PATH="$(dirname "$RAY"):$PATH"

if [[ -f "$DIR/head.pid" ]] && kill -0 "$(cat "$DIR/head.pid")" 2>/dev/null; then
  echo "a local cluster is already running from $DIR (head pid $(cat "$DIR/head.pid")); stop it with $HERE/stop_local_cluster.sh" >&2
  exit 1
fi
mkdir -p "$DIR"
chmod 700 "$DIR"

# -- the token: every node, every driver and every Jobs client presents it -------------------------
if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
  TOKEN_PATH=$RAY_AUTH_TOKEN_PATH
  [[ -s "$TOKEN_PATH" ]] || { echo "RAY_AUTH_TOKEN_PATH=$TOKEN_PATH is missing or empty" >&2; exit 1; }
else
  TOKEN_PATH=$DIR/auth_token
  if [[ ! -s "$TOKEN_PATH" ]]; then
    (umask 077; "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$TOKEN_PATH")
  fi
fi
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_PATH
unset RAY_AUTH_TOKEN RAY_ADDRESS
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}

# -- head: GCS, dashboard + Jobs API on 127.0.0.1, no CPUs so that trials run on the worker --------
setsid "$RAY" start --head --block --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port="$CLIENT_PORT" \
  --num-cpus="$HEAD_CPUS" --num-gpus=0 --object-store-memory="$OBJECT_STORE_BYTES" \
  --temp-dir="$DIR/head" --dashboard-agent-listen-port=0 --disable-usage-stats \
  >"$DIR/head.log" 2>&1 </dev/null &
echo $! >"$DIR/head.pid"

# alive_nodes: how many nodes the dashboard reports alive (fails while the dashboard is not up)
alive_nodes() {
  "$PYTHON" - "$DASHBOARD_PORT" "$TOKEN_PATH" <<'PY'
import json, sys, urllib.request
token = open(sys.argv[2]).read().strip()
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/api/v0/nodes?detail=0",
                             headers={"Authorization": f"Bearer {token}"})
nodes = json.load(urllib.request.urlopen(req, timeout=3))["data"]["result"]["result"]
print(sum(n["state"] == "ALIVE" for n in nodes))
PY
}

deadline=$((SECONDS + TIMEOUT))
until [[ "$(alive_nodes 2>/dev/null)" -ge 1 ]]
do
  if ((SECONDS > deadline)) || ! kill -0 "$(cat "$DIR/head.pid")" 2>/dev/null; then
    echo "the head did not come up within ${TIMEOUT}s; log: $DIR/head.log" >&2
    tail -n 20 "$DIR/head.log" >&2 || true
    "$HERE/stop_local_cluster.sh" >/dev/null 2>&1 || true
    exit 1
  fi
  sleep 1
done

# -- worker: its own temp dir; agent ports are picked free (0) on both nodes: two raylets share one host
#    and other Ray instances on it may hold Ray's default agent port 52365 ------------------------------
setsid "$RAY" start --block --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 \
  --num-cpus="$WORKER_CPUS" --num-gpus="$WORKER_GPUS" --resources="$WORKER_RESOURCES" \
  --object-store-memory="$OBJECT_STORE_BYTES" --temp-dir="$DIR/worker" \
  --dashboard-agent-listen-port=0 --disable-usage-stats \
  >"$DIR/worker.log" 2>&1 </dev/null &
echo $! >"$DIR/worker.pid"

until [[ "$(alive_nodes 2>/dev/null)" -ge 2 ]]
do
  if ((SECONDS > deadline)) || ! kill -0 "$(cat "$DIR/worker.pid")" 2>/dev/null; then
    echo "the worker did not join within ${TIMEOUT}s; log: $DIR/worker.log" >&2
    tail -n 20 "$DIR/worker.log" >&2 || true
    "$HERE/stop_local_cluster.sh" >/dev/null 2>&1 || true
    exit 1
  fi
  sleep 1
done

cat <<EOF
local Ray cluster up: head + 1 worker on 127.0.0.1 (state in $DIR)
  GCS address      127.0.0.1:$GCS_PORT
  dashboard + Jobs http://127.0.0.1:$DASHBOARD_PORT
  token            $TOKEN_PATH
  use it:          export RAY_AUTH_TOKEN_PATH=$TOKEN_PATH
                   rlft submit CONFIG --address http://127.0.0.1:$DASHBOARD_PORT --wait
  stop it:         $HERE/stop_local_cluster.sh
EOF

#!/usr/bin/env bash
# Stop the cluster started by cluster/start_local_cluster.sh: end exactly what it started — its two
# process groups (worker first, then head) and every process descended from them (Ray's raylet starts
# its workers in process groups of their own) — SIGTERM, then SIGKILL after a grace period.
# Never calls `ray stop`, which would end every Ray process on the machine.
#
#   RLFT_CLUSTER_DIR [/tmp/rlft-cluster]  the directory the start script used
#   RLFT_STOP_GRACE [5]                   seconds between SIGTERM and SIGKILL
set -uo pipefail

DIR=${RLFT_CLUSTER_DIR:-/tmp/rlft-cluster}
GRACE=${RLFT_STOP_GRACE:-5}

descendants() {  # pids of every process below process $1
  ps -eo pid=,ppid= | awk -v root="$1" '
    {parent[$1] = $2}
    END {for (p in parent) {q = p; while (q in parent && q != root && q > 1) q = parent[q]; if (q == root && p != root) print p}}'
}

group_alive() {  # any non-zombie process left in process group $1?
  ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
}

pids_alive() {  # any of the pids $@ still running (not a zombie)?
  local p
  for p in "$@"; do
    [[ "$(ps -o stat= -p "$p" 2>/dev/null)" =~ ^[^Z] ]] && return 0
  done
  return 1
}

stop_group() {  # $1 = pid file; the pid is also the process-group id (started under setsid)
  local pidfile=$1 pid children i
  [[ -f "$pidfile" ]] || return 0
  pid=$(cat "$pidfile")
  if [[ "$pid" =~ ^[0-9]+$ ]] && group_alive "$pid"; then
    children=$(descendants "$pid")
    kill -TERM -- "-$pid" 2>/dev/null
    for ((i = 0; i < GRACE * 10; i++)); do
      group_alive "$pid" || break
      sleep 0.1
    done
    if group_alive "$pid"; then
      kill -KILL -- "-$pid" 2>/dev/null
      echo "process group $pid did not stop in ${GRACE}s: killed" >&2
    fi
    # workers, job drivers and trials live in their own process groups: end those started here too
    for ((i = 0; i < 50; i++)); do
      group_alive "$pid" || pids_alive $children || break
      sleep 0.1
    done
    if [[ -n "$children" ]] && pids_alive $children; then
      kill -KILL $children 2>/dev/null
    fi
  fi
  rm -f "$pidfile"
}

stop_group "$DIR/worker.pid"
stop_group "$DIR/head.pid"
echo "local Ray cluster in $DIR stopped"

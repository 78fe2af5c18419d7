#!/usr/bin/env bash
# Run the same command on a list of GPU hosts over ssh, one process per host.
#
#   scripts/launch_gpu_hosts.sh hosts.txt [PORT] -- python run.py --checkpoint /data/grok-1 \
#       --mesh data=1,model=16 --prompt "..."
#
# hosts.txt: one hostname per line; the first is process 0 and runs the coordinator on PORT
# (default 12355; it must be reachable from the other hosts). Each host gets
# JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, which run.py reads. The repository
# (REPO_DIR, default: this checkout's path) and the checkpoint must exist at the same path on every
# host. Host 0's output comes back here; the others' goes to logs/host-N.log on this machine.
# If any host fails, the others are stopped.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,13p' "$0"; exit 2
fi
hosts_file=$1; shift
port=12355
if [ "${1:-}" != "--" ]; then port=$1; shift; fi
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "error: no command after --" >&2; exit 2; }
mapfile -t hosts < <(grep -v '^\s*\(#\|$\)' "$hosts_file")
[ ${#hosts[@]} -gt 0 ] || { echo "error: no hosts in $hosts_file" >&2; exit 2; }
repo=${REPO_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
command=$(printf '%q ' "$@")
mkdir -p logs
pids=()
for i in "${!hosts[@]}"; do
  env="JAX_COORDINATOR_ADDRESS=${hosts[0]}:$port JAX_NUM_PROCESSES=${#hosts[@]} JAX_PROCESS_ID=$i"
  remote="cd $(printf '%q' "$repo") && env $env $command"
  if [ "$i" -eq 0 ]; then
    ssh -o BatchMode=yes "${hosts[$i]}" "$remote" &
  else
    ssh -o BatchMode=yes "${hosts[$i]}" "$remote" > "logs/host-$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then status=1; kill "${pids[@]}" 2>/dev/null || true; fi
done
exit $status

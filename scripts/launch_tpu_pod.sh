#!/usr/bin/env bash
# Run the same command on every worker of a TPU VM pod slice (e.g. v5e-32: 8 workers x 4 chips).
#
#   scripts/launch_tpu_pod.sh TPU_NAME ZONE [--project P] -- python run.py --distributed \
#       --checkpoint /mnt/grok-1 --mesh model=32 --prompt "..."
#
# JAX finds the other workers itself on TPU pods (`--distributed` calls jax.distributed.initialize
# with no arguments), so every worker runs the identical command. The repository and the
# checkpoint must be at the same path on every worker (a shared disk or a copy on each).
# Only worker 0 prints results; the others' output is prefixed by gcloud with their worker id.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,12p' "$0"; exit 2
fi
name=$1; zone=$2; shift 2
extra=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do extra+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "error: no command after --" >&2; exit 2; }
repo=${REPO_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
command=$(printf '%q ' "$@")
exec gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${extra[@]}" --worker=all \
  --command "cd $(printf '%q' "$repo") && $command"

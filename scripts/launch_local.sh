#!/usr/bin/env bash
# Multi-process run on one machine: NUM_PROCESSES CPU processes (default 2), each
# with DEVICES_PER_PROCESS emulated devices (default 4), joined by
# jax.distributed.initialize() into one global mesh. Same command as a single run:
#
#   scripts/launch_local.sh train --workdir runs/mp --set train.steps=20
#
# Logs of process i go to $LOG_DIR/process_i.log (default: a temp dir).
set -euo pipefail
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
LOG_DIR=${LOG_DIR:-$(mktemp -d)}
CMD=${EFFICIENT_ATTN:-efficient-attn}

# Your own XLA_FLAGS are kept; a device count in them is replaced by DEVICES_PER_PROCESS.
flags=$(printf ' %s' ${XLA_FLAGS:-} | sed -E 's/ --xla_force_host_platform_device_count=[0-9]+//g')
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${flags# } --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}" \
  JAX_COORDINATOR_ADDRESS="localhost:${PORT}" JAX_NUM_PROCESSES="${NUM_PROCESSES}" JAX_PROCESS_ID="$i" \
    $CMD "$@" >"${LOG_DIR}/process_${i}.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; its log:" >&2
    tail -n 20 "${LOG_DIR}/process_${i}.log" >&2
    status=1
  fi
done
cat "${LOG_DIR}/process_0.log"
exit $status

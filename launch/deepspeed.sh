#!/usr/bin/env bash
# clt-train under the deepspeed launcher (it appends --local_rank=N; clt-train strips it before Hydra).
#   NPROC=8 launch/deepspeed.sh data.path=/data/acts parallel=fp2 deepspeed=zero2
#   multi-node: HOSTFILE=hosts.txt launch/deepspeed.sh ...   (hostfile lines: "node1 slots=8")
set -uo pipefail
NPROC=${NPROC:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
NPROC=$(( NPROC > 0 ? NPROC : 1 ))
if ! (nvidia-smi -L >/dev/null 2>&1); then
  export DS_ACCELERATOR=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi
ARGS=(--master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then ARGS+=(--hostfile "$HOSTFILE"); else ARGS+=(--num_gpus "$NPROC"); fi
source "$(dirname "$0")/exit_code.sh"
run_ranks deepspeed "${ARGS[@]}" --module cltrain.train.trainer "$@"

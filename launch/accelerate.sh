#!/usr/bin/env bash
# clt-train under `accelerate launch` (used only as a process launcher: clt-train drives DeepSpeed itself).
#   NPROC=8 launch/accelerate.sh data.path=/data/acts parallel=fp2
set -uo pipefail
NPROC=${NPROC:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
NPROC=$(( NPROC > 0 ? NPROC : 1 ))
if ! (nvidia-smi -L >/dev/null 2>&1); then
  export ACCELERATE_USE_CPU=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi
MODE=(); [ "$NPROC" -gt 1 ] && MODE=(--multi_gpu)
source "$(dirname "$0")/exit_code.sh"
run_ranks accelerate launch "${MODE[@]}" --num_processes "$NPROC" --num_machines "${NNODES:-1}" \
  --mixed_precision no --dynamo_backend no --main_process_port "${MASTER_PORT:-29500}" \
  -m cltrain.train.trainer "$@"

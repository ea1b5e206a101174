#!/usr/bin/env bash
# clt-train under torchrun, one node or many (same command on every node).
#   NPROC=8 launch/torchrun.sh data.path=/data/acts model.n_features=32768 parallel=fp2
#   multi-node: NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0> launch/torchrun.sh ...
# Everything after the script name is a Hydra override for clt-train.
# Automatic relaunch: MAX_RESTARTS=3 launch/torchrun.sh resume=true ... lets torchrun restart every
# rank after one dies (a killed or OOM-killed process); with resume=true they continue from the last
# checkpoint (tests/test_faults.py::test_a_killed_rank_is_relaunched_by_torchrun_and_resumes_by_itself).
set -euo pipefail
NPROC=${NPROC:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
NPROC=$(( NPROC > 0 ? NPROC : 1 ))
NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ]; then
  : "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
  RDZV=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
else
  RDZV=(--standalone)
fi
# Without a GPU each process runs gloo on CPU: give every rank its share of the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
# torchrun through cltrain.train.launch: the ranks' exit code (2, 3, 75, 130) and their one-line messages,
# not torchrun's exit 1 and traceback; SIGUSR1/USR2 forwarded; CLTRAIN_SHUTDOWN_TIMEOUT s (default 600)
# for the ranks to checkpoint on Ctrl-C or SIGTERM; a second Ctrl-C stops them at once.
exec "${PYTHON:-python}" -m cltrain.train.launch "${RDZV[@]}" --nproc_per_node "$NPROC" \
  --max-restarts "${MAX_RESTARTS:-0}" -m cltrain.train.trainer "$@"

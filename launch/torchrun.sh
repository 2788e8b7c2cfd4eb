#!/usr/bin/env bash
# Launch moetrain.train with torchrun on this node; extra arguments are Hydra overrides.
#
#   launch/torchrun.sh parallel.ep=2                     # one node, NPROC_PER_NODE processes
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/torchrun.sh parallel.tp=2 parallel.ep=2
#
# Environment: NNODES (1), NPROC_PER_NODE (the GPU count, else 1), NODE_RANK (0), MASTER_ADDR
# (127.0.0.1), MASTER_PORT (29500), RUN_ID (multi-node rendezvous id, shared by every node of a
# job; torchrun exports it and the run directory defaults to runs/<RUN_ID>), LOCAL_ADDR (the
# address other nodes reach this node at, when the hostname does not resolve to it), DRY_RUN=1
# prints the command instead of running it, MODULE (moetrain.train) the Python module torchrun
# runs (e.g. a benchmark worker, benchmarks.overlap_worker, which needs the repository root on
# PYTHONPATH; its arguments are then the extra arguments), VALIDATE=0 skips the config check.
#
# Before starting any worker, the config is checked once in one process (moetrain-train
# --validate-only, with this launch's world size): a config error prints moetrain's one line and
# exits 2 without torchrun's report. Plain `torchrun -m moetrain.train` checks it in every worker;
# its error then comes first, followed by torchrun's own ChildFailedError report.
#
# The run directory defaults to runs/<timestamp>-<torchrun pid> (one node) or runs/<RUN_ID>
# (several nodes): relaunching the same command starts a new run. To resume a launch, pass its
# directory: launch/torchrun.sh run.dir=runs/20250101-120000-4242 ...
set -euo pipefail

NNODES=${NNODES:-1}
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)
fi
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_ID=${RUN_ID:-moetrain-$(date +%Y%m%d-%H%M%S)}

if [[ $NNODES == 1 ]]; then
  cmd=(torchrun --standalone --nproc-per-node "$NPROC_PER_NODE")
else
  cmd=(torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE"
       --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RUN_ID"
       # node 0 hosts the rendezvous store even when MASTER_ADDR is an address torchrun does not
       # recognise as its own (a second interface, a network namespace)
       --rdzv-conf "is_host=$([[ $NODE_RANK == 0 ]] && echo 1 || echo 0)")
fi
if [[ -n ${LOCAL_ADDR:-} ]]; then
  # the address other nodes reach this one at (torchrun otherwise publishes the hostname)
  cmd+=(--local-addr "$LOCAL_ADDR")
fi
cmd+=(-m "${MODULE:-moetrain.train}" "$@")

if [[ ${MODULE:-moetrain.train} == moetrain.train && ${VALIDATE:-1} == 1 && ${DRY_RUN:-0} != 1 ]]; then
  # one process, no training: a config error is one line here, not one per worker + torchrun's
  WORLD_SIZE=$((NNODES * NPROC_PER_NODE)) python3 -m moetrain.train --validate-only "$@" \
    > /dev/null || exit $?
fi

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"

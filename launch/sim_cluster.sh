#!/usr/bin/env bash
# Simulate a multi-node cluster on one machine: NODES network namespaces joined by veth pairs to
# a bridge (in a "switch" namespace of its own), optionally rate-limited with tc, and the
# multi-node torchrun command (launch/torchrun.sh) run once per namespace, gloo talking over the
# veth interfaces. Everything it creates is removed on exit, on success, failure or Ctrl-C.
# Extra arguments are Hydra overrides for moetrain.train.
#
#   sudo launch/sim_cluster.sh parallel.ep=2 train.steps=20          # 2 nodes x 2 processes
#   sudo NODES=2 NPROC_PER_NODE=2 RATE=1gbit launch/sim_cluster.sh parallel.ep=4
#
# Environment: NODES (2), NPROC_PER_NODE (2), RATE (each node's egress rate, tc tbf, e.g. 1gbit;
# empty = unlimited), DELAY (added one-way latency, tc netem, e.g. 1ms; empty = none), PREFIX (mtsim:
# names of the namespaces), SUBNET (10.77.0: node i is SUBNET.(i+1)), MASTER_PORT (29500),
# RUN_ID, DRY_RUN=1 (print the commands, create nothing; needs no root).
# Needs root (or CAP_NET_ADMIN) and iproute2; says so and exits 3 otherwise.
set -euo pipefail

NODES=${NODES:-2}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
RATE=${RATE:-}
DELAY=${DELAY:-}
PREFIX=${PREFIX:-mtsim}
SUBNET=${SUBNET:-10.77.0}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_ID=${RUN_ID:-sim-$(date +%Y%m%d-%H%M%S)-$$}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SWITCH=$PREFIX-sw

run() {  # print in dry-run mode, else execute
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [[ ${DRY_RUN:-0} != 1 ]]; then
  if [[ $(id -u) != 0 ]]; then
    echo "sim_cluster.sh: needs root to create network namespaces (run with sudo)" >&2
    exit 3
  fi
  if ! command -v ip >/dev/null; then
    echo "sim_cluster.sh: needs iproute2 ('ip'); install it" >&2
    exit 3
  fi
fi

pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  if [[ ${DRY_RUN:-0} != 1 ]]; then
    for ((i = 0; i < NODES; i++)); do
      ip netns del "$PREFIX-n$i" 2>/dev/null || true
    done
    ip netns del "$SWITCH" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

run ip netns add "$SWITCH"
run ip -n "$SWITCH" link add br0 type bridge
run ip -n "$SWITCH" link set br0 up
for ((i = 0; i < NODES; i++)); do
  ns=$PREFIX-n$i
  run ip netns add "$ns"
  run ip link add "$PREFIX-v$i" netns "$SWITCH" type veth peer name eth0 netns "$ns"
  run ip -n "$SWITCH" link set "$PREFIX-v$i" master br0 up
  run ip -n "$ns" addr add "$SUBNET.$((i + 1))/24" dev eth0
  run ip -n "$ns" link set eth0 up
  run ip -n "$ns" link set lo up
  # RATE: a token bucket (tbf: in every kernel; netem is a module some kernels lack); DELAY:
  # netem at the root with the token bucket as its child. burst: a 64 KiB GSO segment and room.
  tbf=(tbf rate "$RATE" burst 128kb latency 50ms)
  if [[ -n $DELAY ]]; then
    run ip netns exec "$ns" tc qdisc add dev eth0 root handle 1: netem delay "$DELAY"
    if [[ -n $RATE ]]; then
      run ip netns exec "$ns" tc qdisc add dev eth0 parent 1:1 handle 10: "${tbf[@]}"
    fi
  elif [[ -n $RATE ]]; then
    run ip netns exec "$ns" tc qdisc add dev eth0 root "${tbf[@]}"
  fi
done

for ((i = 0; i < NODES; i++)); do
  ns=$PREFIX-n$i
  cmd=(ip netns exec "$ns" env NNODES="$NODES" NODE_RANK="$i" NPROC_PER_NODE="$NPROC_PER_NODE"
       MASTER_ADDR="$SUBNET.1" LOCAL_ADDR="$SUBNET.$((i + 1))" MASTER_PORT="$MASTER_PORT" RUN_ID="$RUN_ID"
       GLOO_SOCKET_IFNAME=eth0 bash "$HERE/torchrun.sh" "$@")
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    run "${cmd[@]}"
  else
    "${cmd[@]}" &
    pids+=($!)
  fi
done

status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
pids=()
exit "$status"

#!/usr/bin/env bash
# nngeo_dist on one node: N processes through torchrun; every argument goes to the FIM CLI.
#
#   launch/local.sh [python -m nngeo_dist.fim arguments...]
#   NPROC=4 launch/local.sh --repr kfac --out F.zarr
#   launch/local.sh --model mypkg.models:net --data mypkg.data:train --repr diag --out F.zarr
#
# Each process takes its exact shard of the data set (one process per GPU on a GPU node,
# NCCL; gloo on CPUs); rank 0 prints the JSON summary. Exit status: torchrun's (non-zero when
# any rank failed, each rank having printed one "error: ..." line).
#
# ---- lines to adapt (or set these variables in the environment) -------------------------
NPROC="${NPROC:-}"              # processes on this node; empty: one per visible GPU, else 2
PYTHON="${PYTHON:-python}"      # the interpreter of the environment that has nngeo_dist
MODULE="${MODULE:-nngeo_dist.fim}"  # the command line to run (nngeo_dist.ntk for NTK Grams)
# ------------------------------------------------------------------------------------------
set -euo pipefail

if [ -z "$NPROC" ]; then
    NPROC=2
    gpus=0
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        # the GPUs this job may use (nvidia-smi lists every GPU of the node); "" or -1: none
        visible="${CUDA_VISIBLE_DEVICES//[[:space:]]/}"
        if [ -n "$visible" ] && [ "$visible" != "-1" ]; then
            gpus=$(echo "$visible" | tr ',' '\n' | grep -c . || true)
        fi
    elif command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [ "${gpus:-0}" -gt 0 ]; then NPROC="$gpus"; fi
fi

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m "$MODULE" "$@"

#!/usr/bin/env bash
# Start `lsp train` on every local rank through torchrun (the same entry point as `lsp launch`).
#
#   launch/torchrun.sh CONFIG.yaml [key=value ...]
#
# Environment (all optional):
#   NPROC_PER_NODE  ranks on this node (default: number of GPUs, or 2 on a CPU-only machine)
#   NNODES          nodes (default 1); with NNODES > 1 also set MASTER_ADDR (and MASTER_PORT, default 29500)
#   NODE_RANK       this node's index (default 0)
#   MAX_RESTARTS    torchrun restarts after a failure (default 0); a restarted run resumes from `latest`
#
# `exec`: this shell becomes `lsp launch` (torchrun's agent), so a signal sent to this PID reaches every rank, which
# saves and exits 75 (docs/training.md, "Stopping, preemption, time limits").
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: launch/torchrun.sh CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
NPROC_PER_NODE=${NPROC_PER_NODE:-$([[ $gpus -gt 0 ]] && echo "$gpus" || echo 2)}
NNODES=${NNODES:-1}
args=(--nproc-per-node "$NPROC_PER_NODE" --nnodes "$NNODES" --max-restarts "${MAX_RESTARTS:-0}")
if [[ $NNODES -gt 1 ]]; then
    args+=(--node-rank "${NODE_RANK:-0}" --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}")
fi
exec lsp launch "${args[@]}" "$@"

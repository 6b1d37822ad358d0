#!/usr/bin/env bash
# Distributed training with torchrun (one process per GPU).
#   tools/dist_train.sh CONFIG GPUS [train.py options]
# Several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 tools/dist_train.sh CONFIG 8 ...
set -euo pipefail
CONFIG=$1
GPUS=$2
shift 2
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
  --nproc_per_node="$GPUS" \
  "$(dirname "$0")/train.py" "$CONFIG" --launcher pytorch "$@"

#!/usr/bin/env bash
# Every kind of parallelism at once on a CPU (gloo): 8 processes = tensor 2 x pipeline 2 x data 2, with
# sequence parallelism, the distributed optimizer and overlapped gradient reduction, on a tiny LLaMA and
# synthetic tokens; saves a checkpoint, then resumes it in another layout (tp1 x pp1 x dp8).
#   bash examples/cpu_8proc.sh   (OUT=DIR, default work_dirs/cpu_8proc)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-work_dirs/cpu_8proc}
export OMP_NUM_THREADS=1
bash examples/keep_previous.sh "$OUT/checkpoints"  # a rerun keeps the last run's checkpoints
# torchrun --standalone picks a free port on this machine; MASTER_PORT=N fixes one instead
if [[ -n "${MASTER_PORT:-}" ]]; then RDZV=(--master_addr 127.0.0.1 --master_port "$MASTER_PORT"); else RDZV=(--standalone); fi

MODEL=(--model-preset llama-tiny --num-layers 4 --seq-length 32 --max-position-embeddings 32 --mock-data
       --micro-batch-size 2 --global-batch-size 16 --train-iters 10 --lr 1e-3 --lr-warmup-iters 2
       --log-interval 1 --eval-interval 5 --eval-iters 1 --use-distributed-optimizer --overlap-grad-reduce)

echo "== tp2 x pp2 x dp2: iterations 1-6, then save"
$PY -m torch.distributed.run "${RDZV[@]}" --nproc_per_node 8 \
    pretrain.py "${MODEL[@]}" \
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel \
    --exit-interval 6 --save "$OUT/checkpoints"

echo "== tp1 x pp1 x dp8: resume from the checkpoint for iterations 7-10"
$PY -m torch.distributed.run "${RDZV[@]}" --nproc_per_node 8 \
    pretrain.py "${MODEL[@]}" --load "$OUT/checkpoints" --save "$OUT/checkpoints"

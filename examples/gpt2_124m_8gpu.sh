#!/usr/bin/env bash
# GPT-2 124M on one node of 8 GPUs (or several nodes): data parallel x8 with the distributed optimizer
# (ZeRO-1: AdamW moments sharded over the 8 ranks) and gradient reduction overlapped with backward, BF16.
# 124M parameters fit one GPU easily, so no tensor/pipeline parallelism: DP is the fastest layout.
#
#   DATA=/data/owt_text_document VOCAB=gpt2-vocab.json MERGES=gpt2-merges.txt bash examples/gpt2_124m_8gpu.sh
#
# Multi-node: run the same command on every node with
#   NNODES=2 NODE_RANK=<0..NNODES-1> MASTER_ADDR=<node 0's address> MASTER_PORT=29500
# (DP grows to 8 x NNODES; keep GLOBAL_BATCH divisible by MICRO_BATCH x DP).
# Without data files, MOCK=1 trains on synthetic tokens (a smoke test of the layout).
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/gpu_common.sh
OUT=${OUT:-work_dirs/gpt2_124m}
MICRO_BATCH=${MICRO_BATCH:-16}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}   # 512 x 1024 tokens = 0.5M tokens per step, as GPT-2/nanoGPT
ITERS=${ITERS:-20000}

data_args gpt2 50257

launch \
    --model-preset gpt2-124m \
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 \
    --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather \
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$ITERS" \
    --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 700 --lr-decay-style cosine \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16 \
    "${DATA_ARGS[@]}" \
    --log-interval 10 --eval-interval 500 --eval-iters 20 \
    --save "$OUT/checkpoints" --load "$OUT/checkpoints" --save-interval 1000 --exit-signal-handler \
    --tensorboard-dir "$OUT/tensorboard"

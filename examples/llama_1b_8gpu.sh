#!/usr/bin/env bash
# LLaMA-style 1B (16 layers, h 2048, GQA 32/8, SwiGLU, RoPE) on one node of 8 GPUs (or several nodes):
# tensor parallel 2 with sequence parallelism (within an NVLink pair), data parallel 4 with the
# distributed optimizer (ZeRO-1) and overlapped gradient reduction, BF16, activation recomputation.
# PP=1: at 1B the pipeline bubble costs more than it saves; use PP=2 for longer sequences or more layers.
#
#   DATA=/data/slimpajama_text_document TOKENIZER=/models/llama/tokenizer.model bash examples/llama_1b_8gpu.sh
#
# Multi-node: run the same command on every node with
#   NNODES=2 NODE_RANK=<0..NNODES-1> MASTER_ADDR=<node 0's address> MASTER_PORT=29500
# (TP stays inside a node: ranks are laid out tp fastest; DP grows to 4 x NNODES).
# Without data files, MOCK=1 trains on synthetic tokens (a smoke test of the layout).
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/gpu_common.sh
OUT=${OUT:-work_dirs/llama_1b}
TP=${TP:-2}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-4}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}   # 256 x 2048 tokens = 0.5M tokens per step
ITERS=${ITERS:-50000}

data_args sentencepiece 32000

launch \
    --model-preset llama-1b \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --sequence-parallel \
    --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather \
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$ITERS" \
    --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000 --lr-decay-style cosine \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16 --recompute-activations \
    "${DATA_ARGS[@]}" \
    --log-interval 10 --eval-interval 1000 --eval-iters 20 \
    --save "$OUT/checkpoints" --load "$OUT/checkpoints" --save-interval 1000 --exit-signal-handler \
    --tensorboard-dir "$OUT/tensorboard"

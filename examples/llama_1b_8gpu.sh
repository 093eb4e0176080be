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
PY=${PY:-.venv/bin/python}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
OUT=${OUT:-work_dirs/llama_1b}
TP=${TP:-2}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-4}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}   # 256 x 2048 tokens = 0.5M tokens per step
ITERS=${ITERS:-50000}

if [[ "${MOCK:-0}" == 1 ]]; then
  DATA_ARGS=(--mock-data --vocab-size 32000)
else
  DATA_ARGS=(--data-path "${DATA:?set DATA=PREFIX_text_document (or MOCK=1)}" --split 969,30,1
             --tokenizer-type SentencePieceTokenizer --tokenizer-model "${TOKENIZER:?set TOKENIZER}")
fi

$PY -m torch.distributed.run \
    --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    pretrain.py \
    --model-preset llama-1b \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --sequence-parallel \
    --use-distributed-optimizer --overlap-grad-reduce \
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$ITERS" \
    --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000 --lr-decay-style cosine \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16 --recompute-activations \
    "${DATA_ARGS[@]}" \
    --log-interval 10 --eval-interval 1000 --eval-iters 20 \
    --save "$OUT/checkpoints" --load "$OUT/checkpoints" --save-interval 1000 --exit-signal-handler \
    --tensorboard-dir "$OUT/tensorboard"

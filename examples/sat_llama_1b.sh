#!/usr/bin/env bash
# SAT continued pretraining of a dense LLaMA-style 1B (16 layers, h 2048, GQA 32/8, SwiGLU, RoPE) on one node
# of 8 GPUs (or several): TP 2 with sequence parallelism, DP 4 with the distributed optimizer, BF16,
# activation recomputation, as examples/llama_1b_8gpu.sh. SAT omits rho_c = 0.5 of the MLP channels and
# rho_h = 0.25 of the query heads (--sat-head-unit query-head: each TP rank keeps 12 of its 16, the K/V of its
# 4 groups stay dense) in every layer but the first, for the first half of the run, then a 4-stair ladder back
# to dense. SAT needs --transformer-impl local (the default here).
#
#   DENSE_CKPT=work_dirs/llama_1b/checkpoints DATA=/data/slimpajama_text_document \
#     TOKENIZER=/models/llama/tokenizer.model bash examples/sat_llama_1b.sh
#
# DENSE_CKPT is the dense checkpoint to continue (ours, or an HF model converted with
# tools/checkpoint/convert.py); it is loaded with --finetune (weights only). Once this run has saved, a
# restart resumes its own checkpoint instead (SAT state included). Without DENSE_CKPT the run starts from
# random weights (a smoke test); MOCK=1 trains on synthetic tokens. Multi-node: NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT as in examples/gpu_common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/gpu_common.sh
OUT=${OUT:-work_dirs/sat_llama_1b}
TP=${TP:-2}
MICRO_BATCH=${MICRO_BATCH:-4}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
ITERS=${ITERS:-20000}

data_args sentencepiece 32000

LOAD=()
if [[ -f "$OUT/checkpoints/latest_checkpointed_iteration.txt" ]]; then
  LOAD=(--load "$OUT/checkpoints")                 # resume this SAT run, mid-ladder included
elif [[ -n "${DENSE_CKPT:-}" ]]; then
  LOAD=(--load "$DENSE_CKPT" --finetune)           # continued pretraining from the dense model
fi

launch \
    --model-preset llama-1b \
    --tensor-model-parallel-size "$TP" --sequence-parallel \
    --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather \
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$ITERS" \
    --lr 1e-4 --min-lr 1e-5 --lr-warmup-iters 200 --lr-decay-style cosine \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16 --recompute-activations \
    --sat --sat-omission-rate-mlp 0.5 --sat-omission-rate-heads 0.25 --sat-lors-start 0.5 --sat-lors-steps 4 \
    --sat-exempt-layers first \
    "${DATA_ARGS[@]}" "${LOAD[@]}" \
    --log-interval 10 --eval-interval 1000 --eval-iters 20 \
    --save "$OUT/checkpoints" --save-interval 1000 --exit-signal-handler \
    --tensorboard-dir "$OUT/tensorboard"

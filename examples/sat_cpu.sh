#!/usr/bin/env bash
# SAT (sparsity-accelerated training) on a 2-core CPU, in its setting: continued pretraining of an existing
# dense model. A small LLaMA-shaped model is first pretrained dense on the shipped corpus (DENSE_ITERS), then
# continued with --sat from that checkpoint (--load ... --finetune) for ITERS iterations: half the run at
# rho_c = 0.5 of the MLP channels and rho_h = 0.25 of the heads omitted (in every layer but the first), then a
# 4-stair ladder back to dense.
# The log shows sat/omission_heads, sat/omission_mlp, sat/predicted_speedup, sat/step_time and flops/saved_x;
# the run ends with a "SAT: ..." summary line. Everything lands in work_dirs/sat_cpu/ (override OUT, ITERS,
# DENSE_ITERS).
#
#   bash examples/sat_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-work_dirs/sat_cpu}
DENSE_ITERS=${DENSE_ITERS:-100}
ITERS=${ITERS:-100}
mkdir -p "$OUT"

if [[ ! -f "$OUT/data/britannica_text_document.idx" ]]; then
  PY=$PY OUT=$OUT bash examples/prepare_corpus.sh
fi

MODEL=(--num-layers 4 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 352 --swiglu
       --normalization RMSNorm --position-embedding-type rope --disable-bias-linear
       --untie-embeddings-and-output-weights --seq-length 128 --max-position-embeddings 128)
DATA=(--data-path 0.6 "$OUT/data/shakespeare_text_document" 0.3 "$OUT/data/milton_text_document"
                  0.1 "$OUT/data/britannica_text_document"
      --split 95,5,0 --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model")
COMMON=(--micro-batch-size 8 --global-batch-size 16 --weight-decay 0.1 --clip-grad 1.0
        --log-interval 20 --eval-interval 50 --eval-iters 4)

if [[ ! -f "$OUT/dense/latest_checkpointed_iteration.txt" ]]; then
  echo "== dense pretraining ($DENSE_ITERS iterations): the model SAT continues"
  $PY pretrain.py "${MODEL[@]}" "${DATA[@]}" "${COMMON[@]}" --train-iters "$DENSE_ITERS" \
      --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 10 --lr-decay-style cosine --save "$OUT/dense"
fi

echo "== SAT continued pretraining ($ITERS iterations from the dense checkpoint)"
rm -rf "$OUT/sat"
$PY pretrain.py "${MODEL[@]}" "${DATA[@]}" "${COMMON[@]}" --train-iters "$ITERS" \
    --lr 5e-4 --min-lr 5e-5 --lr-warmup-iters 5 --lr-decay-style cosine \
    --load "$OUT/dense" --finetune \
    --sat --sat-omission-rate-mlp 0.5 --sat-omission-rate-heads 0.25 --sat-lors-start 0.5 --sat-lors-steps 4 \
    --sat-importance wanda --sat-selection topk --sat-exempt-layers first \
    --save "$OUT/sat" --save-interval 50 --tensorboard-dir "$OUT/tensorboard"

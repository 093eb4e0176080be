#!/usr/bin/env bash
# Sheared LLaMA on a 2-core CPU: pretrain a small LLaMA on the shipped corpus, prune it to a smaller shape
# with learned hard-concrete masks and dynamic batch loading, extract the pruned model, and continue
# pretraining it (with dynamic batch loading). Everything lands in work_dirs/sheared_cpu/ (override OUT,
# SOURCE_ITERS, PRUNE_ITERS, CONTINUE_ITERS).
#
#   bash examples/sheared_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-work_dirs/sheared_cpu}
SOURCE_ITERS=${SOURCE_ITERS:-100}
PRUNE_ITERS=${PRUNE_ITERS:-40}
CONTINUE_ITERS=${CONTINUE_ITERS:-60}
mkdir -p "$OUT"

if [[ ! -f "$OUT/data/britannica_text_document.idx" ]]; then
  PY=$PY OUT=$OUT bash examples/prepare_corpus.sh
fi
DATA=(--data-path 0.6 "$OUT/data/shakespeare_text_document" 0.3 "$OUT/data/milton_text_document"
                  0.1 "$OUT/data/britannica_text_document" --split 95,5,0 --data-max-blend-weight 1
      --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model")
COMMON=(--seq-length 64 --max-position-embeddings 64 --swiglu --normalization RMSNorm
        --position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights
        --micro-batch-size 16 --global-batch-size 16 --clip-grad 1.0 --log-interval 10 --eval-iters 4)
SOURCE=(--num-layers 4 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 352)
rm -rf "$OUT/source" "$OUT/pruning" "$OUT/pruned" "$OUT/continued"

echo "== 1. the source model: 4 layers, hidden 128, 4 heads, ffn 352"
$PY pretrain.py "${SOURCE[@]}" "${COMMON[@]}" "${DATA[@]}" --train-iters "$SOURCE_ITERS" --lr 3e-3 --min-lr 3e-4 \
    --lr-warmup-iters 10 --eval-interval "$SOURCE_ITERS" --save "$OUT/source"

echo "== reference losses for dynamic batch loading: the source model's per-domain validation losses"
REF=()
for domain in shakespeare milton britannica; do
  $PY tools/evaluate.py --load "$OUT/source" --data-path "$OUT/data/${domain}_text_document" --split 95,5,0 \
      --micro-batch-size 8 --eval-iters 4 --results-json "$OUT/reference_$domain.json" > /dev/null
  REF+=("$($PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["loss"])' "$OUT/reference_$domain.json")")
done
echo "reference losses (shakespeare milton britannica): ${REF[*]}"

echo "== 2. pruning to 2 layers, hidden 64, 2 heads, ffn 176 (masks and lambdas learn; DBL every 10 iterations)"
$PY pretrain.py "${SOURCE[@]}" "${COMMON[@]}" "${DATA[@]}" --train-iters "$PRUNE_ITERS" --lr 1e-3 --min-lr 1e-4 \
    --lr-warmup-iters 4 --eval-interval "$PRUNE_ITERS" --load "$OUT/source" --finetune --save "$OUT/pruning" \
    --prune --prune-target-num-layers 2 --prune-target-hidden-size 64 --prune-target-num-attention-heads 2 \
    --prune-target-ffn-hidden-size 176 \
    --dbl --dbl-update-interval 10 --dbl-reference-loss "${REF[@]}"

echo "== 3. extraction: the dense 2-layer model"
$PY tools/checkpoint/prune.py --load-dir "$OUT/pruning" --save-dir "$OUT/pruned"

echo "== 4. continued pretraining of the pruned model (DBL every 20 iterations)"
$PY pretrain.py --num-layers 2 --hidden-size 64 --num-attention-heads 2 --ffn-hidden-size 176 \
    "${COMMON[@]}" "${DATA[@]}" --train-iters "$CONTINUE_ITERS" --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 2 \
    --eval-interval "$CONTINUE_ITERS" --load "$OUT/pruned" --finetune --save "$OUT/continued" \
    --dbl --dbl-update-interval 20 --dbl-reference-loss "${REF[@]}"

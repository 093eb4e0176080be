#!/usr/bin/env bash
# MST (Mixed Sparsity Training) on a 2-core CPU in a few minutes: a small GPT-2-shaped model on the shipped
# corpus through warm-up (dense -> 90 % sparse), ultra-sparse (with hybrid sparse attention) and restoration
# (-> dense). The log shows mst/sparsity, flops/actual and the cumulative flops/saved_x; the run ends with
# an "MST: ..." summary line. Everything lands in work_dirs/mst_cpu/ (override OUT, ITERS); a rerun moves the
# earlier checkpoints/ and tensorboard/ to *.previous/.
#
#   bash examples/mst_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-work_dirs/mst_cpu}
ITERS=${ITERS:-200}
mkdir -p "$OUT"

if [[ ! -f "$OUT/data/britannica_text_document.idx" ]]; then
  PY=$PY OUT=$OUT bash examples/prepare_corpus.sh
fi

echo "== MST pretraining (phases 20/40/20 % of $ITERS iterations + 20 % dense, s_max 0.9, ER, HSA 'sparse' w=16)"
bash examples/keep_previous.sh "$OUT/checkpoints" "$OUT/tensorboard"  # a rerun keeps the last run
$PY pretrain.py \
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 --max-position-embeddings 128 \
    --disable-bias-linear \
    --micro-batch-size 8 --global-batch-size 16 --train-iters "$ITERS" \
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 10 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 \
    --data-path 0.6 "$OUT/data/shakespeare_text_document" 0.3 "$OUT/data/milton_text_document" \
                0.1 "$OUT/data/britannica_text_document" \
    --split 95,5,0 --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" \
    --mst --mst-max-sparsity 0.9 --mst-update-interval 10 --mst-hsa-pattern sparse --mst-hsa-window 16 \
    --log-interval 20 --eval-interval 100 --eval-iters 4 \
    --save "$OUT/checkpoints" --save-interval 100 --tensorboard-dir "$OUT/tensorboard"

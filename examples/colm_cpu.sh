#!/usr/bin/env bash
# CoLM (mini-batch coresets) on a 2-core CPU: a small LLaMA-shaped model on the shipped corpus, each step
# training on a coreset of 16 sequences chosen from 32 candidates, the small domain (Britannica) kept whole.
# The log shows colm/kept, colm/features_ms, colm/select_ms and the per-domain counts colm/n_*; the run ends
# with a "CoLM: ..." summary line. Everything lands in work_dirs/colm_cpu/ (override OUT, ITERS).
#
#   bash examples/colm_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-work_dirs/colm_cpu}
ITERS=${ITERS:-40}
mkdir -p "$OUT"

if [[ ! -f "$OUT/data/britannica_text_document.idx" ]]; then
  PY=$PY OUT=$OUT bash examples/prepare_corpus.sh
fi

echo "== CoLM pretraining: coresets of 16 from 32 candidates, $ITERS iterations"
rm -rf "$OUT/checkpoints"
$PY pretrain.py \
    --num-layers 2 --hidden-size 128 --num-attention-heads 4 --seq-length 64 --max-position-embeddings 64 \
    --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear \
    --untie-embeddings-and-output-weights \
    --micro-batch-size 8 --global-batch-size 16 --train-iters "$ITERS" \
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 4 --lr-decay-style cosine --clip-grad 1.0 \
    --data-path 0.6 "$OUT/data/shakespeare_text_document" 0.3 "$OUT/data/milton_text_document" \
                0.1 "$OUT/data/britannica_text_document" \
    --split 95,5,0 --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" \
    --colm --colm-large-batch-size 32 --colm-keep-sources britannica_text_document \
    --log-interval 10 --eval-interval "$ITERS" --eval-iters 2 \
    --save "$OUT/checkpoints" --save-interval "$ITERS"

#!/usr/bin/env bash
# Quickstart on a 2-core CPU (a few minutes): tokenizer -> preprocessing -> tiny LLaMA pretraining ->
# checkpoint -> generated sample. Run it as `make quickstart` (which creates .venv first).
# Everything lands in work_dirs/quickstart/ (override with OUT=...; ITERS, EVAL_INTERVAL, SAVE_INTERVAL too); a rerun
# moves the earlier checkpoints/ and tensorboard/ to checkpoints.previous/ and tensorboard.previous/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-work_dirs/quickstart}
ITERS=${ITERS:-300}
EVAL_INTERVAL=${EVAL_INTERVAL:-50}
SAVE_INTERVAL=${SAVE_INTERVAL:-100}
mkdir -p "$OUT"

echo "== 1-3/5 shipped corpus -> tokenizer -> Megatron .bin/.idx (examples/prepare_corpus.sh)"
PY=$PY OUT=$OUT bash examples/prepare_corpus.sh

echo "== 4/5 pretrain a tiny LLaMA (RMSNorm, SwiGLU, RoPE, GQA) on a 60/30/10 blend"
bash examples/keep_previous.sh "$OUT/checkpoints" "$OUT/tensorboard"  # a rerun keeps the last run
$PY pretrain.py \
    --num-layers 4 --hidden-size 256 --num-attention-heads 8 --group-query-attention --num-query-groups 4 \
    --ffn-hidden-size 704 --seq-length 128 --max-position-embeddings 128 \
    --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear \
    --untie-embeddings-and-output-weights \
    --micro-batch-size 8 --global-batch-size 16 --train-iters "$ITERS" \
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 30 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 \
    --data-path 0.6 "$OUT/data/shakespeare_text_document" 0.3 "$OUT/data/milton_text_document" \
                0.1 "$OUT/data/britannica_text_document" \
    --split 95,5,0 --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" \
    --log-interval 20 --eval-interval "$EVAL_INTERVAL" --eval-iters 4 \
    --save "$OUT/checkpoints" --save-interval "$SAVE_INTERVAL" --tensorboard-dir "$OUT/tensorboard"

echo "== 5/5 sample from the checkpoint"
$PY tools/generate.py --load "$OUT/checkpoints" --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model "$OUT/tokenizer.model" --prompt "ROMEO." --max-new-tokens 80 \
    --temperature 0.8 --top-k 40

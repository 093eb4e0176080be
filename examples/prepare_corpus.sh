#!/usr/bin/env bash
# The shipped corpus as training data: JSON lines per domain -> sentencepiece BPE (2,048 tokens) ->
# Megatron .bin/.idx per domain. Used by the quickstart, examples/mst_cpu.sh and bench/mst_quality.py.
#
#   OUT=work_dirs/data bash examples/prepare_corpus.sh
# writes OUT/tokenizer.model and OUT/data/{shakespeare,milton,britannica}_text_document.{bin,idx}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"

echo "== shipped corpus -> JSON lines (one file per domain)"
$PY tools/corpus_to_jsonl.py --output-dir "$OUT/corpus" --combined "$OUT/corpus/all.jsonl"

echo "== sentencepiece BPE tokenizer"
$PY tools/train_tokenizer.py --input "$OUT/corpus/all.jsonl" --json-keys text \
    --model-prefix "$OUT/tokenizer" --vocab-size 2048 --model-type bpe

echo "== preprocess each domain into Megatron .bin/.idx"
for domain in shakespeare milton britannica; do
  $PY tools/preprocess_data.py --input "$OUT/corpus/$domain.jsonl" --json-keys text \
      --output-prefix "$OUT/data/$domain" --tokenizer-type SentencePieceTokenizer \
      --tokenizer-model "$OUT/tokenizer.model" --append-eod --workers 2
done

# Sourced (not run) by the GPU example launchers: the torchrun command for one or several nodes and the
# data arguments, so the launchers only say what is theirs (model, layout, recipe).
#
#   NNODES=2 NODE_RANK=<0..NNODES-1> MASTER_ADDR=<node 0's address> MASTER_PORT=29500   # multi-node
#   MOCK=1                 # synthetic tokens instead of DATA=... (a smoke test of the layout)
#   DRY_RUN=1              # print the command instead of running it
PY=${PY:-.venv/bin/python}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

# launch ARGS...: torchrun pretrain.py ARGS... on GPUS_PER_NODE x NNODES ranks (or print it with DRY_RUN=1).
launch() {
  local cmd=("$PY" -m torch.distributed.run
             --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
             --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" pretrain.py "$@")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
  else
    "${cmd[@]}"
  fi
}

# data_args gpt2|sentencepiece VOCAB_SIZE: sets DATA_ARGS for DATA (+ VOCAB/MERGES or TOKENIZER), or for
# synthetic tokens of VOCAB_SIZE ids with MOCK=1 (NullTokenizer's --vocab-size N counts the ids before eod).
data_args() {
  if [[ "${MOCK:-0}" == 1 ]]; then
    DATA_ARGS=(--mock-data --vocab-size "$(($2 - 1))")
    return
  fi
  DATA_ARGS=(--data-path "${DATA:?set DATA=PREFIX_text_document (or MOCK=1)}" --split 969,30,1)
  if [[ "$1" == gpt2 ]]; then
    DATA_ARGS+=(--tokenizer-type GPT2BPETokenizer --vocab-file "${VOCAB:?set VOCAB}" --merge-file "${MERGES:?set MERGES}")
  else
    DATA_ARGS+=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "${TOKENIZER:?set TOKENIZER}")
  fi
}

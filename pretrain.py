"""Pretrain a GPT-2- or LLaMA-shaped model with Megatron-LM flags.

    python pretrain.py --model-preset llama-tiny --data-path data/quickstart/shakespeare_text_document \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --train-iters 200 --save ckpt
    torchrun --nproc_per_node 8 pretrain.py --tensor-model-parallel-size 2 ...

`python pretrain.py --help` lists every flag.
"""

import sys

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.launch import check_launch
from megatron_eff.parallel.state import shutdown_distributed
from megatron_eff.training.checkpointing import CheckpointError
from megatron_eff.training.trainer import pretrain


def tokenizer_vocab_size(args) -> int | None:
    """The tokenizer's vocabulary size, which sets the model's (before padding) unless --vocab-size is given.
    NullTokenizer has no files: `model_config_from_args` makes its --vocab-size N a vocabulary of N + 1."""
    if args.vocab_size is not None or args.tokenizer_type == "NullTokenizer":
        return None
    from megatron_eff.data.tokenizer import build_tokenizer

    return build_tokenizer(args.tokenizer_type, tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                           merge_file=args.merge_file).vocab_size


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # every config error surfaces here, before any process-group work (under torchrun: on every rank)
        config = config_from_args(args, tokenizer_vocab_size(args))
        check_launch(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"pretrain.py: error: {error}", file=sys.stderr)
        return 2
    try:
        pretrain(config)
    except CheckpointError as error:  # --load of a checkpoint this model cannot take: raised alike on every rank
        print(f"pretrain.py: error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

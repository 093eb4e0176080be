"""Pretrain a GPT-2- or LLaMA-shaped model with Megatron-LM flags.

    python pretrain.py --model-preset llama-tiny --data-path data/quickstart/shakespeare_text_document \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --train-iters 200 --save ckpt
    torchrun --nproc_per_node 8 pretrain.py --tensor-model-parallel-size 2 ...

`python pretrain.py --help` lists every flag.
"""

import sys

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.errors import RunError
from megatron_eff.launch import check_launch
from megatron_eff.parallel.failures import describe_collective_failure, is_collective_failure
from megatron_eff.parallel.state import shutdown_distributed
from megatron_eff.run_files import check_run_files
from megatron_eff.training.trainer import pretrain


def tokenizer_vocab_size(args) -> int | None:
    """The tokenizer's vocabulary size, which sets the model's (before padding) unless --vocab-size is given.
    NullTokenizer has no files: `model_config_from_args` makes its --vocab-size N a vocabulary of N + 1."""
    if args.vocab_size is not None or args.tokenizer_type == "NullTokenizer":
        return None
    from megatron_eff.data.tokenizer import build_tokenizer

    return build_tokenizer(args.tokenizer_type, tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                           merge_file=args.merge_file, tiktoken_pattern=args.tiktoken_pattern,
                           tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
                           tiktoken_special_tokens=args.tiktoken_special_tokens).vocab_size


def error(message) -> int:
    """The one line a user error gets (no traceback); exit status 2, as argparse's."""
    print(f"pretrain.py: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # every config error surfaces here, before any process-group work (under torchrun: on every rank)
        config = config_from_args(args, tokenizer_vocab_size(args))
        check_launch(config)
        check_run_files(config)  # --save writable and not overwriting, --load compatible, token ids in range
    except (ValueError, FileNotFoundError, RunError) as failure:
        return error(failure)
    clean = False
    try:
        pretrain(config)
        clean = True
    except RunError as failure:  # a damaged checkpoint, --max-bad-steps, a full disk, ...
        return error(failure)
    except RuntimeError as failure:
        if not is_collective_failure(failure):
            raise
        print(f"pretrain.py: error: {describe_collective_failure(failure)}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed(clean=clean)  # after a failure without the final barrier: a rank may be gone
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generate text from a megatron_eff checkpoint (single process, CPU or one GPU).

    python tools/generate.py --load work_dirs/quickstart/checkpoints \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model work_dirs/quickstart/tokenizer.model \
        --prompt "ROMEO." --max-new-tokens 80 --temperature 0.8 --top-k 40

Greedy with `--temperature 0` (the default); sampling with `--temperature T` and optionally `--top-k` /
`--top-p`. The model's shape is read from the checkpoint (any TP/PP layout loads into one process), the
tokenizer flags default to the checkpoint's run. Decoding uses a KV cache (`--no-kv-cache` re-runs the
whole context every step; both give the same tokens).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eff.config import ModelConfig  # noqa: E402
from megatron_eff.data.tokenizer import build_tokenizer  # noqa: E402
from megatron_eff.generation import generate  # noqa: E402
from megatron_eff.model.gpt_model import GPTModel  # noqa: E402
from megatron_eff.training.checkpointing import load_checkpoint, read_meta  # noqa: E402


def load_model(root: str) -> GPTModel:
    """Rebuild the model from the config stored in the checkpoint and load its weights."""
    _, meta = read_meta(root)
    model = GPTModel(ModelConfig(**meta["config"]["model"]))
    load_checkpoint(root, dict(model.named_parameters()), None, finetune=True)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint directory (run dir or iter_N)")
    parser.add_argument("--tokenizer-type", help="default: the checkpoint's run")
    parser.add_argument("--tokenizer-model", help="default: the checkpoint's run")
    parser.add_argument("--vocab-file")
    parser.add_argument("--merge-file")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the whole context every step")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.load)
        run_data = {} if args.tokenizer_type else read_meta(args.load)[1]["config"].get("data", {})
        pick = lambda name: getattr(args, name) or run_data.get(name)
        tokenizer = build_tokenizer(pick("tokenizer_type") or "NullTokenizer", tokenizer_model=pick("tokenizer_model"),
                                    vocab_file=pick("vocab_file"), merge_file=pick("merge_file"),
                                    vocab_size=model.config.vocab_size - 1)
    except (ValueError, FileNotFoundError) as error:
        print(f"generate.py: error: {error}", file=sys.stderr)
        return 2
    start = tokenizer.bos if tokenizer.bos is not None else tokenizer.eod
    prompt = tokenizer.tokenize(args.prompt) if args.prompt else [start]
    new = generate(model, prompt, args.max_new_tokens, tokenizer.vocab_size, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eod=tokenizer.eod, seed=args.seed,
                   use_cache=not args.no_kv_cache)
    print(tokenizer.detokenize((prompt if args.prompt else []) + new))
    return 0


if __name__ == "__main__":
    sys.exit(main())

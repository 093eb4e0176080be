"""Generate text from a megatron_eff checkpoint (single process, CPU or one GPU: `--device`).

    python tools/generate.py --load work_dirs/quickstart/checkpoints \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model work_dirs/quickstart/tokenizer.model \
        --prompt "ROMEO." --max-new-tokens 80 --temperature 0.8 --top-k 40

Greedy with `--temperature 0` (the default); sampling with `--temperature T` and optionally `--top-k` /
`--top-p`. The model's shape and Unit Scaling are read from the checkpoint (any TP/PP layout loads into one
process; FP8 training is not emulated), the tokenizer flags default to the checkpoint's run. Decoding uses a
KV cache (`--no-kv-cache` re-runs the whole context every step; both give the same tokens).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eff.config import ModelConfig  # noqa: E402
from megatron_eff.data.tokenizer import checkpoint_tokenizer  # noqa: E402
from megatron_eff.errors import RunError  # noqa: E402
from megatron_eff.generation import generate  # noqa: E402
from megatron_eff.model.gpt_model import GPTModel  # noqa: E402
from megatron_eff.parallel.state import use_cuda  # noqa: E402
from megatron_eff.precision import apply_precision, inference_precision  # noqa: E402
from megatron_eff.training.checkpointing import load_checkpoint, read_meta  # noqa: E402


def load_model(root: str, device: torch.device | str = "cpu") -> GPTModel:
    """Rebuild the model from the config stored in the checkpoint (with its Unit Scaling, if any; FP8 is not
    emulated), load its weights and move it to `device`."""
    _, meta = read_meta(root)
    model = GPTModel(ModelConfig(**meta["config"]["model"]))
    apply_precision(model, inference_precision(meta["config"]), model.config)
    load_checkpoint(root, dict(model.named_parameters()), None, finetune=True)
    return model.to(device)


def parse_device(name: str) -> torch.device:
    """`--device` (cpu, cuda, cuda:N); a CUDA device on a machine without one is an error here, not later."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def check_sampling_flags(args: argparse.Namespace) -> None:
    """Reject sampling flags that have no meaning, naming the flag (`--temperature 0` is greedy, `--top-k 0` off)."""
    if not args.temperature >= 0:
        raise ValueError(f"--temperature {args.temperature}: must be at least 0 (0 is greedy)")
    if args.top_k < 0:
        raise ValueError(f"--top-k {args.top_k}: must be at least 0 (0 keeps every token)")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")


def prompt_ids(tokenizer, text: str, vocab_size: int) -> list[int]:
    """Token ids of `--prompt`, or the bos id (else eod) to start from for an empty prompt; ValueError naming the
    flag when the text does not tokenize or gives an id outside the model's `vocab_size`."""
    if not text:
        start = tokenizer.bos if tokenizer.bos is not None else tokenizer.eod
        if start is None:
            raise ValueError("--prompt is empty and the tokenizer has no bos or eod token to start from")
        return [start]
    try:
        ids = tokenizer.tokenize(text)
    except ValueError as error:
        raise ValueError(f"--prompt {text!r}: {error}") from None
    if ids and max(ids) >= vocab_size:
        raise ValueError(f"--prompt {text!r}: id {max(ids)} is outside the model's vocabulary ({vocab_size}); is it "
                         "the tokenizer the model was trained with?")
    return ids


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
    parser.add_argument("--device", default="cuda" if use_cuda() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda if available and MEGATRON_EFF_DEVICE is not cpu)")
    args = parser.parse_args(argv)
    try:
        check_sampling_flags(args)
        model = load_model(args.load, parse_device(args.device))
        run_data = read_meta(args.load)[1]["config"].get("data", {})
        tokenizer = checkpoint_tokenizer(vars(args), run_data, model.config.vocab_size)
        prompt = prompt_ids(tokenizer, args.prompt, model.config.vocab_size)
    except (ValueError, FileNotFoundError, RunError) as error:  # RunError: a damaged checkpoint
        print(f"generate.py: error: {error}", file=sys.stderr)
        return 2
    new = generate(model, prompt, args.max_new_tokens, tokenizer.vocab_size, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eod=tokenizer.eod, seed=args.seed,
                   use_cache=not args.no_kv_cache)
    print(tokenizer.detokenize((prompt if args.prompt else []) + new))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert between megatron_eff checkpoints and Hugging Face model folders (flags as Megatron-LM's converter).

megatron_eff -> HF (any TP/PP layout; GPT-2 shapes -> GPT2LMHeadModel, LLaMA shapes -> LlamaForCausalLM):

    python tools/checkpoint/convert.py --model-type GPT --loader megatron --saver hf \\
        --load-dir work_dirs/quickstart/checkpoints --save-dir work_dirs/quickstart/hf

HF -> megatron_eff (LLaMA / GPT-2 folder; a weights-only checkpoint for `pretrain.py --load DIR --finetune`):

    python tools/checkpoint/convert.py --model-type GPT --loader hf --saver megatron \\
        --load-dir work_dirs/quickstart/hf --save-dir work_dirs/quickstart/from_hf \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2

The import prints the pretrain.py model flags that match the checkpoint (also in SAVE_DIR/pretrain_flags.txt,
one a line, and in its meta.json):

    torchrun --nproc_per_node 4 pretrain.py $(cat SAVE_DIR/pretrain_flags.txt) --load SAVE_DIR --finetune ...

The output folder must be new (or empty); on any error nothing is left behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_eff.errors import RunError  # noqa: E402
from megatron_eff.hf.convert import PRETRAIN_FLAGS, export_to_hf, import_from_hf  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="GPT", choices=["GPT"], help="decoder-only GPT (GPT-2 / LLaMA)")
    parser.add_argument("--loader", required=True, choices=["megatron", "hf"], help="format of --load-dir")
    parser.add_argument("--saver", required=True, choices=["megatron", "hf"], help="format of --save-dir")
    parser.add_argument("--load-dir", required=True, help="megatron_eff run dir / iter_N, or an HF model folder")
    parser.add_argument("--save-dir", required=True, help="new folder to write")
    hf = parser.add_argument_group("to HF (--saver hf)")
    hf.add_argument("--tokenizer-type", help="default: the checkpoint's run (--tokenizer-type in meta.json)")
    hf.add_argument("--tokenizer-model", help="default: the checkpoint's run")
    hf.add_argument("--vocab-file", help="GPT2BPETokenizer; default: the checkpoint's run")
    hf.add_argument("--merge-file", help="GPT2BPETokenizer; default: the checkpoint's run")
    hf.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this (default 5GB)")
    hf.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ours = parser.add_argument_group("to megatron_eff (--saver megatron)")
    ours.add_argument("--target-tensor-parallel-size", type=int, default=1)
    ours.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    ours.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    ours.add_argument("--seq-length", type=int, help="default: the HF max_position_embeddings")
    args = parser.parse_args(argv)
    if args.loader == args.saver:
        parser.error(f"--loader {args.loader} and --saver {args.saver}: nothing to convert")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.saver == "hf":
            tokenizer = {k: getattr(args, k) for k in ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")
                         if getattr(args, k)}
            hf_config = export_to_hf(args.load_dir, args.save_dir, tokenizer, max_shard_size=args.max_shard_size,
                                     dtype=args.hf_dtype)
            print(f"wrote {args.save_dir} ({hf_config['architectures'][0]}, {hf_config['vocab_size']} tokens)")
        else:
            _, flags = import_from_hf(
                args.load_dir, args.save_dir, tensor_parallel_size=args.target_tensor_parallel_size,
                pipeline_model_parallel_size=args.target_pipeline_parallel_size,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, seq_length=args.seq_length,
            )
            flags_file = os.path.join(args.save_dir, PRETRAIN_FLAGS)
            print(f"wrote {args.save_dir}; continue training with (these flags are also in {flags_file}):\n"
                  f"  pretrain.py {' '.join(flags)} --load {args.save_dir} --finetune ...")
    except (ValueError, FileNotFoundError, RunError) as error:  # RunError: a damaged checkpoint
        print(f"convert.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

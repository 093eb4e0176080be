"""Sheared LLaMA on the shipped corpus, on CPU: prune a pretrained source LLaMA to a smaller shape, continue
pretraining it, and compare against the same shape trained from scratch; dynamic batch loading vs static
blend weights in continued pretraining. Figures are measured and printed, never asserted.

    .venv/bin/python bench/sheared.py   # defaults: 4L h64 -> 2L h32, seq 32, batch 8; ~10 min on 2 idle CPU cores
    .venv/bin/python bench/sheared.py --source-hidden 128 --source-ffn 352 --target-hidden 64 --target-ffn 176
    .venv/bin/python bench/sheared.py --reuse-source --prune-iters 100   # same source, another pruning budget

Stages (one seed, data blend 0.6/0.3/0.1 of shakespeare/milton/britannica, same validation samples):
1. source: a LLaMA (--source-layers, --source-hidden, ...) pretrained --source-iters iterations;
2. pruning: --prune-iters iterations from the source (`--prune`, targets --target-*), then
   `tools/checkpoint/prune.py` extracts the target-shape model;
3. continued pretraining of the pruned model, --continue-iters iterations, on the source's blend; then DBL
   against static weights, both starting from --dbl-start-weights (reference losses: the source model's
   per-domain validation losses, the paper's "source reference");
4. the target shape from scratch: at equal tokens (prune + continue iterations) and at equal FLOPs with
   the pruning counted at the source's size.
Continued pretraining and both scratch runs each try every peak LR of --lr-search and keep the best validation
loss (a pruned model and a fresh one want different LRs; one fixed LR would favour one side).
Printed: the expected sparsities against the targets after pruning, the validation losses of every model,
and the spread (max - min) of the per-domain gaps (loss - reference) with and without DBL.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [ROOT, BENCH]

from mst_quality import prepare_data  # noqa: E402

from megatron_eff.arguments import config_from_args, parse_args  # noqa: E402
from megatron_eff.training import flops as flops_lib  # noqa: E402
from megatron_eff.training.trainer import Trainer  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "work_dirs", "sheared_bench"))
    p.add_argument("--source-layers", type=int, default=4)
    p.add_argument("--source-hidden", type=int, default=64)
    p.add_argument("--source-heads", type=int, default=4)
    p.add_argument("--source-ffn", type=int, default=176)
    p.add_argument("--target-layers", type=int, default=2)
    p.add_argument("--target-hidden", type=int, default=32)
    p.add_argument("--target-heads", type=int, default=2)
    p.add_argument("--target-ffn", type=int, default=88)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--source-iters", type=int, default=2000)
    p.add_argument("--reuse-source", action="store_true",
                   help="keep OUT/source from an earlier run with the same source flags instead of training it again")
    p.add_argument("--prune-iters", type=int, default=100)
    p.add_argument("--continue-iters", type=int, default=2000)
    p.add_argument("--dbl-interval", type=int, default=50)
    p.add_argument("--dbl-start-weights", type=lambda v: v.split(","), default=["0.8", "0.15", "0.05"],
                   help="the blend weights (comma-separated, one per domain) that the DBL run starts from and the "
                        "static run keeps: DBL is for a mixture that leaves domains behind; on the source's own "
                        "blend (0.6,0.3,0.1) the per-domain gaps are a few hundredths either way")
    p.add_argument("--lr", type=float, default=3e-3, help="the source's peak LR")
    p.add_argument("--lr-search", type=lambda v: [float(x) for x in v.split(",")], default=[3e-3, 6e-3, 1.2e-2],
                   help="peak LRs tried for continued pretraining and for each scratch run (comma-separated)")
    p.add_argument("--prune-lr", type=float, default=1e-3, help="weights LR while pruning")
    p.add_argument("--prune-mask-lr", type=float, default=1.0)
    p.add_argument("--prune-lambda-lr", type=float, default=3.0,
                   help="3.0: the Lagrangian settles within a 100-iteration pruning run (1.0 needs ~200)")
    p.add_argument("--eval-iters", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


def shape_flags(layers: int, hidden: int, heads: int, ffn: int, seq: int, head_dim: int) -> list[str]:
    return ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
            "--ffn-hidden-size", str(ffn), "--kv-channels", str(head_dim), "--seq-length", str(seq),
            "--max-position-embeddings", str(seq), "--swiglu", "--normalization", "RMSNorm",
            "--position-embedding-type", "rope", "--disable-bias-linear", "--untie-embeddings-and-output-weights"]


def run(args, tokenizer: str, blend: list[str], iters: int, lr: float, *extra: str) -> tuple[dict, Trainer, float]:
    """Train; returns ({"loss": validation loss, domain: loss}, the trainer, seconds)."""
    flags = [
        "--micro-batch-size", str(args.micro_batch), "--global-batch-size", str(args.global_batch),
        "--train-iters", str(iters), "--lr", str(lr), "--min-lr", str(lr / 10), "--lr-warmup-iters",
        str(max(1, iters // 10)), "--clip-grad", "1.0", "--seed", str(args.seed), "--data-path", *blend,
        "--split", "95,5,0", "--data-max-blend-weight", "1", "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", tokenizer, "--vocab-size", "2048", "--log-interval", str(max(1, iters // 5)),
        "--eval-interval", str(10 * iters), "--eval-iters", str(args.eval_iters), *extra,
    ]
    start = time.time()
    trainer = Trainer(config_from_args(parse_args(flags)))
    trainer.train()
    losses = trainer.evaluate()
    return losses, trainer, time.time() - start


def best_lr(args, tokenizer: str, blend: list[str], iters: int, *extra: str) -> tuple[dict, Trainer, float]:
    """`run` at every LR of --lr-search; the one with the lowest validation loss: (losses, trainer, lr)."""
    best = None
    for lr in args.lr_search:
        losses, trainer, _ = run(args, tokenizer, blend, iters, lr, *extra)
        print(f"   lr {lr:g}: val loss {losses['loss']:.4f}", flush=True)
        if best is None or losses["loss"] < best[0]["loss"]:
            best = (losses, trainer, lr)
    return best


def iteration_flops(trainer: Trainer) -> float:
    config = trainer.config
    tokens = config.train.resolved_global_batch_size(1) * config.model.seq_length
    return flops_lib.model_flops_per_iteration(config.model, tokens, config.model.seq_length)


def gap_spread(losses: dict, reference: dict) -> float:
    gaps = [losses[d] - reference[d] for d in reference]
    return max(gaps) - min(gaps)


def main() -> None:
    args = parse()
    os.makedirs(args.out, exist_ok=True)
    tokenizer, blend = prepare_data(args.out)
    ck = {name: os.path.join(args.out, name) for name in ("source", "pruning", "pruned")}
    for name, path in ck.items():
        if not (name == "source" and args.reuse_source):
            shutil.rmtree(path, ignore_errors=True)
    head_dim = args.source_hidden // args.source_heads  # kept by pruning
    source_shape = shape_flags(args.source_layers, args.source_hidden, args.source_heads, args.source_ffn, args.seq,
                               head_dim)
    target_shape = shape_flags(args.target_layers, args.target_hidden, args.target_heads, args.target_ffn, args.seq,
                               head_dim)
    figures = {}

    print("== 1. source model", flush=True)
    if args.reuse_source and os.path.isdir(ck["source"]):  # evaluate the kept source instead of training it
        source, src_trainer, figures["source_s"] = run(args, tokenizer, blend, args.source_iters, args.lr,
                                                       *source_shape, "--load", ck["source"])
    else:
        source, src_trainer, figures["source_s"] = run(args, tokenizer, blend, args.source_iters, args.lr,
                                                       *source_shape, "--save", ck["source"])
    source_flops = iteration_flops(src_trainer)
    reference = {d: v for d, v in source.items() if d != "loss"}

    print("== 2. pruning", flush=True)
    targets = ["--prune-target-num-layers", str(args.target_layers), "--prune-target-hidden-size",
               str(args.target_hidden), "--prune-target-num-attention-heads", str(args.target_heads),
               "--prune-target-ffn-hidden-size", str(args.target_ffn)]
    _, prune_trainer, figures["prune_s"] = run(args, tokenizer, blend, args.prune_iters, args.prune_lr, *source_shape,
                                               "--prune", *targets, "--prune-mask-lr", str(args.prune_mask_lr),
                                               "--prune-lambda-lr", str(args.prune_lambda_lr), "--load", ck["source"],
                                               "--finetune", "--save", ck["pruning"])
    prune = prune_trainer.methods.get("prune")
    sparsity = prune.expected_sparsity()
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "checkpoint", "prune.py"), "--load-dir",
                    ck["pruning"], "--save-dir", ck["pruned"]], check=True)

    print("== 3. continued pretraining of the pruned model", flush=True)
    load = ["--load", ck["pruned"], "--finetune"]
    static, target_trainer, continue_lr = best_lr(args, tokenizer, blend, args.continue_iters, *target_shape, *load)
    target_flops = iteration_flops(target_trainer)
    dbl_flags = ["--dbl", "--dbl-update-interval", str(args.dbl_interval), "--dbl-reference-loss",
                 *[f"{reference[d]:.6f}" for d in reference]]
    skewed = [x for weight, prefix in zip(args.dbl_start_weights, blend[1::2]) for x in (weight, prefix)]
    print(f"== 3b. from the blend {'/'.join(args.dbl_start_weights)}: static weights, then DBL", flush=True)
    skewed_static, _, _ = run(args, tokenizer, skewed, args.continue_iters, continue_lr, *target_shape, *load)
    dbl, _, _ = run(args, tokenizer, skewed, args.continue_iters, continue_lr, *target_shape, *load, *dbl_flags)

    print("== 4. the target shape from scratch", flush=True)
    equal_tokens = args.prune_iters + args.continue_iters
    equal_flops = args.continue_iters + round(args.prune_iters * source_flops / target_flops)
    print(f"   equal tokens: {equal_tokens} iterations", flush=True)
    scratch_tokens, _, tokens_lr = best_lr(args, tokenizer, blend, equal_tokens, *target_shape)
    print(f"   equal FLOPs: {equal_flops} iterations", flush=True)
    scratch_flops, _, flops_lr = best_lr(args, tokenizer, blend, equal_flops, *target_shape)

    tokens_per_iter = args.global_batch * args.seq
    print(f"\n== Sheared LLaMA bench: source {args.source_layers}L h{args.source_hidden} {args.source_heads} heads "
          f"ffn {args.source_ffn} -> target {args.target_layers}L h{args.target_hidden} {args.target_heads} heads "
          f"ffn {args.target_ffn}; {tokens_per_iter:,} tokens per iteration")
    print(f"source ({args.source_iters} it): val loss {source['loss']:.4f}")
    print("expected sparsity after pruning vs target: " + ", ".join(
        f"{m} {s:.4f}/{1 - prune.targets[m][1] / prune.targets[m][0]:.4f}" for m, s in sparsity.items()))
    print(f"pruned + continued ({args.prune_iters} + {args.continue_iters} it, lr {continue_lr:g}): val loss "
          f"{static['loss']:.4f}")
    print(f"scratch, equal tokens ({equal_tokens} it, lr {tokens_lr:g}): val loss {scratch_tokens['loss']:.4f}")
    print(f"scratch, equal FLOPs incl. pruning at source size ({equal_flops} it, lr {flops_lr:g}): val loss "
          f"{scratch_flops['loss']:.4f}")
    start = "/".join(args.dbl_start_weights)
    spreads = [gap_spread(losses, reference) for losses in (static, skewed_static, dbl)]
    print(f"spread of per-domain (loss - source loss), static on the source's blend: {spreads[0]:.4f}; "
          f"from the blend {start}: static {spreads[1]:.4f}, DBL {spreads[2]:.4f}")
    print("per-domain gaps static: " + ", ".join(f"{d} {skewed_static[d] - reference[d]:+.4f}" for d in reference))
    print("per-domain gaps DBL:    " + ", ".join(f"{d} {dbl[d] - reference[d]:+.4f}" for d in reference))
    print(f"times: source {figures['source_s'] / 60:.1f} min, pruning {figures['prune_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()

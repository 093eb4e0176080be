"""Precision benchmark: loss and tokens/s of BF16 vs FP8 training (GPU, Transformer Engine), or of the CPU
emulation (FP32 / FP8 fake-quantised / Unit Scaling / FP16 underflow) on a tiny model.

CPU (emulation, runs anywhere; a tiny LLaMA on the noisy-bigram task of `precision/numerics.py`):

    OMP_NUM_THREADS=1 .venv/bin/python bench/precision.py --cpu   # each variant at each --lrs, 60 steps: ~3 min
    .venv/bin/python bench/precision.py --cpu --steps 200 --lrs 1e-3 3e-3 1e-2 \
        --variants fp32 "unit-scaled fp32"
    OMP_NUM_THREADS=1 .venv/bin/python bench/precision.py --depth-profile   # gradient std per layer, 24 layers

`--cpu` prints, per variant, the final loss (mean of the last 5 steps) at each LR of the sweep and its best;
then FP16 without loss scaling (gradient elements below FP16's smallest normal) and FP8 without amax scaling
(`--fp8-recipe unscaled`: the weight gradients' relative error to FP32 under 64-micro-batch accumulation).
`--depth-profile` prints the std of the gradient at each layer's output at init, Unit Scaling with the
fixed (v0.1) and the depth (default) residual rules, a 24-layer LLaMA shape (hidden 256, SwiGLU).

GPU (needs CUDA + Transformer Engine; `pip install --no-build-isolation transformer_engine[pytorch]`):

    .venv/bin/python bench/precision.py --gpu --preset llama-350m --iters 200 --micro-batch-size 8
    .venv/bin/python bench/precision.py --gpu --preset llama-1b --iters 200 --micro-batch-size 4 \
        --recipes delayed tensorwise   # add mxfp8 on Blackwell (sm100) only
    .venv/bin/python bench/precision.py --gpu --preset llama-350m --iters 200 --micro-batch-size 8 \
        --fp8-gemm scaled_mm                                  # torch._scaled_mm FP8 GEMMs, no TE needed

The GPU mode runs `pretrain` on mock data with `--bf16 --transformer-impl transformer_engine` (with
`--fp8-gemm scaled_mm`: `--transformer-impl local`, delayed/tensorwise recipes only), once without FP8 and
once per `--fp8-recipe` (hybrid format), and prints the final losses (mean of the last 10 iterations),
the loss gap to BF16 and tokens/s (median over iterations after 10 warm-up ones).
Figures are measured and printed, never asserted.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_eff.precision.numerics import (  # noqa: E402
    gradient_error,
    gradient_underflow,
    layer_gradient_profile,
    train_synthetic,
)

# --vocab-size 63: NullTokenizer ids 0..62 + eod = 64 ids, no vocabulary padding
CPU_BASE = ["--model-preset", "llama-tiny", "--micro-batch-size", "8", "--seq-length", "32",
            "--max-position-embeddings", "32", "--vocab-size", "63", "--make-vocab-size-divisible-by", "64",
            "--lr-warmup-iters", "0", "--clip-grad", "0", "--weight-decay", "0"]
US = ["--unit-scaling"]
CPU_VARIANTS = {
    "fp32": [],
    "fp8 hybrid delayed": ["--fp8-format", "hybrid"],
    "fp8 hybrid unscaled": ["--fp8-format", "hybrid", "--fp8-recipe", "unscaled"],
    "unit-scaled fp32": US,
    "unit-scaled fp32, one LR for all tensors": [*US, "--no-unit-scaling-lr-scaling"],
    "unit-scaled fp8 hybrid delayed": [*US, "--fp8-format", "hybrid"],
    "unit-scaled fp8 hybrid unscaled": [*US, "--fp8-format", "hybrid", "--fp8-recipe", "unscaled"],
    "unit-scaled fp16, static loss scale 1": [*US, "--fp16"],
}
DEPTH_FLAGS = ["--model-preset", "llama-tiny", "--num-layers", "24", "--hidden-size", "256", "--ffn-hidden-size",
               "688", "--num-attention-heads", "4", "--micro-batch-size", "2", "--seq-length", "64",
               "--max-position-embeddings", "64", "--unit-scaling"]


def run_cpu(steps: int, lrs: list[float], variants: list[str]) -> None:
    print(f"tiny LLaMA, noisy-bigram task, {steps} steps, final loss = mean of the last 5; LRs {lrs}")
    for name, flags in CPU_VARIANTS.items():
        if variants and name not in variants:
            continue
        start, finals = time.time(), {}
        for lr in lrs:
            losses = train_synthetic([*CPU_BASE, "--lr", str(lr), *flags], steps)
            finals[lr] = sum(losses[-5:]) / 5 if all(map(math.isfinite, losses)) else float("nan")
        best = min((v, lr) for lr, v in finals.items() if math.isfinite(v))
        sweep = "  ".join(f"{lr:g}: {v:.4f}" for lr, v in finals.items())
        print(f"  {name:42s} best {best[0]:.4f} at lr {best[1]:g}   [{sweep}]   ({time.time() - start:.0f} s)")
    for name, flags in (("fp16, no loss scaling", []), ("unit-scaled fp16, no loss scaling", US)):
        u = gradient_underflow([*CPU_BASE, "--fp16", "--loss-scale", "1", *flags])
        print(f"  {name:36s} weight-grad elements below FP16's smallest normal: {u['subnormal']:.2%} "
              f"(exactly 0: {u['zero']:.2%}; same model in FP32: {u['fp32_subnormal']:.2%})")
    for name, flags in (("standard", []), ("unit-scaled", US)):
        errors = {recipe: gradient_error([*CPU_BASE, *flags, "--fp8-format", "hybrid", "--fp8-recipe", recipe],
                                         [*CPU_BASE, *flags], num_micro_batches=64)
                  for recipe in ("unscaled", "tensorwise")}
        print(f"  {name:12s} FP8 weight-gradient error vs FP32, 64 micro-batches accumulated: "
              f"unscaled {errors['unscaled']:.1%}, tensorwise (amax-scaled) {errors['tensorwise']:.1%}")


def run_depth_profile() -> None:
    print("std of the gradient at each layer's output at init (layer 0 .. 23), Unit Scaling, 24-layer LLaMA shape")
    for rule in ("fixed", "depth"):
        profile = layer_gradient_profile([*DEPTH_FLAGS, "--unit-scaling-residual", rule])
        print(f"  {rule:5s} {min(profile):.2f}-{max(profile):.2f}: " + " ".join(f"{x:.2f}" for x in profile))


def run_gpu(args) -> None:
    from megatron_eff.arguments import config_from_args, parse_args
    from megatron_eff.training.trainer import Trainer

    te = args.fp8_gemm == "te"
    base = ["--model-preset", args.preset, "--mock-data", "--bf16",
            "--transformer-impl", "transformer_engine" if te else "local",
            "--micro-batch-size", str(args.micro_batch_size), "--train-iters", str(args.iters), "--lr", "3e-4",
            "--lr-warmup-iters", "20", "--eval-iters", "0", "--log-interval", "10"]
    gemm = [] if te else ["--fp8-gemm", "scaled_mm"]
    variants = {"bf16": []}
    variants.update({f"fp8 hybrid {r}": ["--fp8-format", "hybrid", "--fp8-recipe", r, *gemm] for r in args.recipes})
    finals = {}
    for name, flags in variants.items():
        times, last = [], [time.perf_counter()]
        config = config_from_args(parse_args([*base, *flags]))
        trainer = Trainer(config)
        real_step = trainer.train_step

        def timed_step(*a, real_step=real_step, times=times, last=last, **k):
            import torch

            result = real_step(*a, **k)
            torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
            return result

        trainer.train_step = timed_step
        result = trainer.train()
        tokens = config.train.resolved_global_batch_size(1) * config.model.seq_length
        finals[name] = sum(result.losses[-10:]) / 10
        print(f"{name:28s} final loss {finals[name]:.4f} (gap to bf16 {finals[name] / finals['bf16'] - 1:+.2%}) "
              f"| {tokens / statistics.median(times[10:]):,.0f} tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cpu", action="store_true")
    mode.add_argument("--gpu", action="store_true")
    mode.add_argument("--depth-profile", action="store_true")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2], help="--cpu: the LR sweep")
    parser.add_argument("--variants", nargs="+", default=[], choices=list(CPU_VARIANTS),
                        help="--cpu: run only these variants (default: all)")
    parser.add_argument("--preset", default="llama-350m")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--recipes", nargs="+", default=["delayed", "tensorwise"],
                        choices=["delayed", "tensorwise", "mxfp8", "blockwise"])
    parser.add_argument("--fp8-gemm", choices=["te", "scaled_mm"], default="te",
                        help="GPU FP8 GEMMs: Transformer Engine, or torch._scaled_mm on the local backend")
    args = parser.parse_args()
    if args.cpu:
        run_cpu(args.steps, args.lrs, args.variants)
    elif args.depth_profile:
        run_depth_profile()
    else:
        run_gpu(args)


if __name__ == "__main__":
    main()

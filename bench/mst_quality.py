"""Dense vs MST (Mixed Sparsity Training) at the same token budget on the shipped corpus, on CPU.

Trains a small GPT-2-shaped model (LayerNorm, GELU, learned positions, tied embeddings, no biases, as the
authors' nanoGPT setting) twice from the same seed and data order: once dense, once with `--mst` (default
MST flags: 25/50/25 % phases, s_max 0.9, staircase, ER, drop 0.3, grow 3:1, HSA `sparse` in the ultra phase).
Prints the validation perplexities, their gap and MST's training-FLOP reduction. Figures are measured,
never asserted.

    .venv/bin/python bench/mst_quality.py                      # ~10-25 min on 2 CPU cores
    .venv/bin/python bench/mst_quality.py --iters 200 --eval-iters 8   # a quick look
    .venv/bin/python bench/mst_quality.py --mst-args "--mst-sparsify-head --mst-max-sparsity 0.8"
    .venv/bin/python bench/mst_quality.py --mst-args "" --mst-args "--mst-hsa-pattern none"   # one dense, two MST

`--mst-args` may be given several times: the dense model is trained once and each MST variant is compared
with it, in a table at the end.

The data (sentencepiece BPE 2048 + Megatron .bin/.idx of the three shipped domains) is built once under
`--out` with the repository's tools, as the quickstart does.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_eff.arguments import config_from_args, parse_args  # noqa: E402
from megatron_eff.training.trainer import Trainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = ("shakespeare", "milton", "britannica")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "work_dirs", "mst_bench"))
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--mst-args", action="append",
                   help="extra --mst-* flags for one MST run (repeat for several variants; default: one run, "
                        "default flags)")
    return p.parse_args()


def prepare_data(out: str) -> tuple[str, list[str]]:
    """(tokenizer model, [weight, prefix, ...]) built with the repository's tools if not there yet."""
    py, tokenizer = sys.executable, os.path.join(out, "tokenizer.model")
    prefixes = [os.path.join(out, "data", d) for d in DOMAINS]
    if not all(os.path.exists(p + "_text_document.idx") for p in prefixes):
        env = {**os.environ, "PY": py, "OUT": out}
        subprocess.run(["bash", "examples/prepare_corpus.sh"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    blend = []
    for weight, prefix in zip(("0.6", "0.3", "0.1"), prefixes):
        blend += [weight, prefix + "_text_document"]
    return tokenizer, blend


def train(args, tokenizer: str, blend: list[str], extra: list[str]) -> tuple[float, object, float]:
    """(final validation loss, the MST hooks or None, seconds)."""
    flags = [
        "--num-layers", str(args.layers), "--hidden-size", str(args.hidden), "--num-attention-heads",
        str(args.heads), "--seq-length", str(args.seq), "--max-position-embeddings", str(args.seq),
        "--disable-bias-linear", "--micro-batch-size", str(args.micro_batch), "--global-batch-size",
        str(args.global_batch), "--train-iters", str(args.iters), "--lr", str(args.lr), "--min-lr",
        str(args.lr / 10), "--lr-warmup-iters", str(max(1, args.iters // 20)), "--weight-decay", "0.1",
        "--clip-grad", "1.0", "--seed", str(args.seed), "--data-path", *blend, "--split", "95,5,0",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer, "--vocab-size", "2048",
        "--log-interval", str(max(1, args.iters // 10)), "--eval-interval", str(args.iters),
        "--eval-iters", str(args.eval_iters), *extra,
    ]
    start = time.time()
    trainer = Trainer(config_from_args(parse_args(flags)))
    result = trainer.train()
    return result.valid_losses[args.iters], trainer.methods.get("mst"), time.time() - start


def paper_scale_estimate(iters: int = 6000, **mst_flags) -> float:
    """MST's training-FLOP reduction for GPT-2 124M (seq 1024) by our accounting, with every layer at its
    scheduled density (no training run: the schedule, ER densities and update iterations only)."""
    from megatron_eff.config import MODEL_PRESETS, ModelConfig
    from megatron_eff.methods.mst import method as mst_lib
    from megatron_eff.methods.mst.attention_patterns import attention_pattern, pattern_density
    from megatron_eff.methods.mst.config import MSTConfig
    from megatron_eff.training import flops

    config = ModelConfig(**{**MODEL_PRESETS["gpt2-124m"], "add_bias_linear": False})
    mst = MSTConfig(enabled=True, **mst_flags)
    schedule = mst_lib.MSTSchedule.from_config(mst, iters)
    shapes = mst_lib.sparse_layer_shapes(config, 1, mst.sparsify_head)
    hsa = pattern_density(attention_pattern(mst.hsa_pattern, config.seq_length, config.seq_length // 8))
    densities, dense, actual, s = dict.fromkeys(shapes, 1.0), 0.0, 0.0, config.seq_length
    for t in range(iters):
        attention = dict.fromkeys(range(config.num_layers), hsa) if schedule.warm_end <= t < schedule.ultra_end else {}
        update = schedule.is_update(t + 1)
        dense += flops.model_flops_per_iteration(config, s, s)
        actual += flops.sparse_training_flops(config, s, s, densities, attention, dense_weight_grad=update)
        if update:
            densities = mst_lib.layer_densities(shapes, schedule.target_sparsity(t + 1), mst.distribution)
    return dense / actual


def main() -> None:
    args = parse()
    os.makedirs(args.out, exist_ok=True)
    tokenizer, blend = prepare_data(args.out)
    print("== dense", flush=True)
    dense_loss, _, dense_s = train(args, tokenizer, blend, [])
    results = []
    for variant in args.mst_args or [""]:
        print(f"== MST {variant}", flush=True)
        results.append((variant, *train(args, tokenizer, blend, ["--mst", *shlex.split(variant)])))
    dense_ppl = math.exp(dense_loss)
    tokens = args.iters * args.global_batch * args.seq
    print("\n== MST quality bench: same model, seed, data order and token budget "
          f"({args.iters} iterations, {tokens:,} tokens; {args.layers}L h{args.hidden} seq {args.seq})")
    print(f"dense: val loss {dense_loss:.4f} | val ppl {dense_ppl:.2f} | {dense_s / 60:.1f} min")
    for variant, mst_loss, mst, mst_s in results:
        mst_ppl = math.exp(mst_loss)
        print(f"MST {variant or '(default flags)'}: val loss {mst_loss:.4f} | val ppl {mst_ppl:.2f} | "
              f"gap {100 * (mst_ppl / dense_ppl - 1):+.2f} % | training FLOPs {mst.saved_x():.2f}x fewer "
              f"({100 * (1 - 1 / mst.saved_x()):.1f} % saved) | {mst.updates} topology updates, final sparsity "
              f"{mst.sparsity():.3f} | {mst_s / 60:.1f} min")
    head = paper_scale_estimate(sparsify_head=True)
    print("GPT-2 124M (paper scale) by the same accounting, from the schedule alone: "
          f"default flags {paper_scale_estimate():.2f}x; --mst-sparsify-head {head:.2f}x; "
          "--mst-sparsify-head --mst-phase-fractions 0.1,0.8,0.1 "
          f"{paper_scale_estimate(sparsify_head=True, phase_fractions=(0.1, 0.8, 0.1)):.2f}x")


if __name__ == "__main__":
    main()

"""Dense vs MST (Mixed Sparsity Training) on the shipped corpus, on CPU: at the same tokens and at the same
training FLOPs.

Trains a small GPT-2-shaped model (LayerNorm, GELU, learned positions, tied embeddings, no biases, as the
authors' nanoGPT setting) from the same seed and data order: once dense, once per MST variant (`--mst` with
the default flags: phases 0.2/0.4/0.2 of the run + a dense tail, s_max 0.9, staircase warm-up, cubic
restoration, ER, drop 0.3, grow 3:1, HSA `sparse` in the ultra phase), and once dense *at MST's FLOPs*: the
dense model trained for fewer iterations (its own LR schedule over them), so that its training FLOPs equal
the MST run's. Prints the validation perplexities, the gaps and MST's training-FLOP reduction, and draws
`loss_vs_tokens.png` and `loss_vs_flops.png` (train and validation loss of every run) under `--out`.
Figures are measured, never asserted.

    .venv/bin/python bench/mst_quality.py                      # ~15-35 min on 2 CPU cores
    .venv/bin/python bench/mst_quality.py --iters 200 --eval-iters 8   # a quick look
    .venv/bin/python bench/mst_quality.py --mst-args "--mst-sparsify-head --mst-max-sparsity 0.8"
    .venv/bin/python bench/mst_quality.py --mst-args "" --mst-args "--no-mst-decay-embeddings"   # two MST runs

`--mst-args` may be given several times (a single `--no-mst-...` flag as its value is fine): the dense
model is trained once at the full budget, each MST variant is compared with it and with its own
equal-FLOPs dense run, in a table at the end.

The data (sentencepiece BPE 2048 + Megatron .bin/.idx of the three shipped domains) is built once under
`--out` with the repository's tools, as the quickstart does.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_eff.arguments import config_from_args, parse_args  # noqa: E402
from megatron_eff.plotting import plot_runs  # noqa: E402
from megatron_eff.training import flops  # noqa: E402
from megatron_eff.training.trainer import Trainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = ("shakespeare", "milton", "britannica")


def _glue_mst_args(argv: list[str]) -> list[str]:
    """`--mst-args VALUE` -> `--mst-args=VALUE`, so a VALUE that starts with '--' is not read as an option."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--mst-args" and i + 1 < len(argv):
            out.append(f"--mst-args={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
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
    return p.parse_args(_glue_mst_args(sys.argv[1:] if argv is None else argv))


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


@dataclass
class Run:
    label: str
    iters: int
    valid_loss: float
    seconds: float
    tensorboard: str
    flops: float  # training FLOPs of the whole run (MST: actual; dense: model FLOPs)
    mst: object = None  # the MST method object (None for dense)


def train(args, tokenizer: str, blend: list[str], label: str, extra: list[str], iters: int | None = None) -> Run:
    """Train one run for `iters` (default `--iters`) iterations, its LR schedule fitted to them."""
    iters = iters or args.iters
    tensorboard = os.path.join(args.out, "runs", label)
    shutil.rmtree(tensorboard, ignore_errors=True)
    flags = [
        "--num-layers", str(args.layers), "--hidden-size", str(args.hidden), "--num-attention-heads",
        str(args.heads), "--seq-length", str(args.seq), "--max-position-embeddings", str(args.seq),
        "--disable-bias-linear", "--micro-batch-size", str(args.micro_batch), "--global-batch-size",
        str(args.global_batch), "--train-iters", str(iters), "--lr", str(args.lr), "--min-lr",
        str(args.lr / 10), "--lr-warmup-iters", str(max(1, iters // 20)), "--weight-decay", "0.1",
        "--clip-grad", "1.0", "--seed", str(args.seed), "--data-path", *blend, "--split", "95,5,0",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer, "--vocab-size", "2048",
        "--log-interval", str(max(1, iters // 50)), "--eval-interval", str(iters),
        "--eval-iters", str(args.eval_iters), "--tensorboard-dir", tensorboard, *extra,
    ]
    start = time.time()
    trainer = Trainer(config_from_args(parse_args(flags)))
    result = trainer.train()
    mst = trainer.methods.get("mst")
    model, tokens = trainer.config.model, args.global_batch * args.seq
    dense_flops = iters * flops.model_flops_per_iteration(model, tokens, model.seq_length)
    return Run(label, iters, result.valid_losses[iters], time.time() - start, tensorboard,
               mst.flops_actual if mst else dense_flops, mst)


def paper_scale_estimate(iters: int = 6000, **mst_flags) -> float:
    """MST's training-FLOP reduction for GPT-2 124M (seq 1024) by our accounting, with every layer at its
    scheduled density (no training run: the schedule, ER densities and update iterations only)."""
    from megatron_eff.config import MODEL_PRESETS, ModelConfig
    from megatron_eff.methods.mst import method as mst_lib
    from megatron_eff.methods.mst.attention_patterns import attention_pattern, pattern_density
    from megatron_eff.methods.mst.config import MSTConfig

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


def plot(args, runs: list[Run]) -> list[str]:
    """Train/validation loss of every run against tokens and against training FLOPs."""
    dirs, labels = [r.tensorboard for r in runs], [r.label for r in runs]
    per_iteration = [None if r.mst else r.flops / r.iters for r in runs]
    return [plot_runs(dirs, os.path.join(args.out, f"loss_vs_{x}.png"), labels=labels, x=x,
                      flops_per_iteration=per_iteration) for x in ("tokens", "flops")]


def main() -> None:
    args = parse()
    os.makedirs(args.out, exist_ok=True)
    tokenizer, blend = prepare_data(args.out)
    print("== dense", flush=True)
    dense = train(args, tokenizer, blend, "dense", [])
    rows = []
    for n, variant in enumerate(args.mst_args or [""]):
        print(f"== MST {variant}", flush=True)
        mst = train(args, tokenizer, blend, f"mst{n or ''}", ["--mst", *shlex.split(variant)])
        matched_iters = max(1, round(args.iters * mst.flops / dense.flops))  # dense FLOPs are the same per iteration
        print(f"== dense at the FLOPs of MST {variant}: {matched_iters} iterations", flush=True)
        rows.append((variant, mst, train(args, tokenizer, blend, f"dense_flops{n or ''}", [], matched_iters)))
    tokens = args.iters * args.global_batch * args.seq
    dense_ppl = math.exp(dense.valid_loss)
    print("\n== MST quality bench: same model, seed and data order "
          f"({args.layers}L h{args.hidden} seq {args.seq}; {args.iters} iterations, {tokens:,} tokens)")
    print("| run | iterations | tokens | training FLOPs | val loss | val ppl | ppl vs MST | minutes |")
    print("|---|---|---|---|---|---|---|---|")

    def row(name: str, run: Run, reference: float | None) -> None:
        ppl = math.exp(run.valid_loss)
        gap = f"{100 * (ppl / reference - 1):+.1f} %" if reference else "—"
        print(f"| {name} | {run.iters} | {run.iters * args.global_batch * args.seq:,} | {run.flops:.3g} | "
              f"{run.valid_loss:.4f} | {ppl:.2f} | {gap} | {run.seconds / 60:.1f} |")

    for variant, mst, matched in rows:
        mst_ppl = math.exp(mst.valid_loss)
        row("dense, equal tokens", dense, mst_ppl)
        row(f"MST {variant or '(default flags)'}", mst, None)
        row("dense, equal FLOPs", matched, mst_ppl)
        m = mst.mst
        print(f"MST {variant or '(default flags)'}: gap vs dense at equal tokens "
              f"{100 * (mst_ppl / dense_ppl - 1):+.2f} %; training FLOPs {m.saved_x():.2f}x fewer "
              f"({100 * (1 - 1 / m.saved_x()):.1f} % saved); {m.updates} topology updates, final sparsity "
              f"{m.sparsity():.3f}")
    print("plots: " + ", ".join(plot(args, [dense, *[r for _, mst, matched in rows for r in (mst, matched)]])))
    head = paper_scale_estimate(sparsify_head=True)
    print("GPT-2 124M (paper scale) by the same accounting, from the schedule alone: "
          f"default flags {paper_scale_estimate():.2f}x; --mst-sparsify-head {head:.2f}x; "
          "--mst-sparsify-head --mst-phase-fractions 0.1,0.8,0.1 "
          f"{paper_scale_estimate(sparsify_head=True, phase_fractions=(0.1, 0.8, 0.1)):.2f}x")


if __name__ == "__main__":
    main()

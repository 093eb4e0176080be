"""SAT in its setting, continued pretraining, on CPU: quality at equal tokens, at equal wall-clock time, and
the ablations the paper implies (the ladder vs a constant omission rate; wanda vs random importance).

1. pretrain a small LLaMA-shaped model dense on the shipped corpus (`--pretrain-iters`), save it;
2. continue it (`--load ... --finetune`, same data order, seed and LR schedule) for `--iters` iterations:
   dense; SAT with the default flags (ladder ending dense); SAT at a constant rate (`--sat-lors-start 1`);
   SAT with `--sat-importance random`;
3. a dense continuation given SAT's training time (its iteration count scaled by SAT's training time / dense
   training time; training time = the training loop without what the trainer's logger leaves out of its
   throughput (validation, checkpoint saves); the set-up -- model, checkpoint load, data indices -- is the
   same for every run and is reported apart).
Prints each run's final validation loss, the gap to dense, training FLOPs saved, training time and the whole
run's time. Time is CPU time of this process on one thread (`--threads 1`, the default), which is the
wall-clock time of an idle machine and, unlike wall-clock time, not inflated by other jobs on a shared one.
Figures are measured, never asserted.

    .venv/bin/python bench/sat_quality.py                                # ~36 min on an idle 2-core CPU
    .venv/bin/python bench/sat_quality.py --reuse-pretrained --equal-time none \
        --variant "rho_h 0=--sat --sat-omission-rate-heads 0" --variant "sample=--sat --sat-selection sample"
                                                                         # a sweep from the same dense model
    .venv/bin/python bench/sat_quality.py --hidden 128 --heads 4 --ffn 352 --pretrain-iters 80 --iters 40 \
        --micro-batch 4 --global-batch 8 --eval-iters 4                  # a quick look (~10 min)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from mst_quality import prepare_data  # noqa: E402

from megatron_eff.arguments import config_from_args, parse_args  # noqa: E402
from megatron_eff.training.trainer import Trainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "work_dirs", "sat_bench"))
    p.add_argument("--pretrain-iters", type=int, default=300)
    p.add_argument("--iters", type=int, default=150, help="continued-pretraining iterations")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--eval-iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--reuse-pretrained", action="store_true",
                   help="continue from OUT/dense_ckpt of an earlier run with the same model and seed flags instead "
                        "of pretraining again")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=FLAGS",
                   help="a continued-pretraining run to compare with dense (repeatable): its label and its extra "
                        "pretrain.py flags, e.g. 'rho 0.3=--sat --sat-omission-rate-mlp 0.3'; given, these replace "
                        "the default SAT runs (defaults, constant rate, random importance)")
    p.add_argument("--equal-time", choices=("first", "each", "none"), default="first",
                   help="dense continuations given a SAT run's training time: for the first SAT variant, for each, "
                        "or none")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on a shared 2-core machine one thread ran 25x faster than two)")
    return p.parse_args()


def run(args, tokenizer: str, blend: list[str], iters: int, lr: float,
        extra: list[str]) -> tuple[float, object, float, float]:
    """(final validation loss, the SAT method or None, training seconds, whole-run seconds)."""
    flags = [
        "--num-layers", str(args.layers), "--hidden-size", str(args.hidden), "--num-attention-heads", str(args.heads),
        "--ffn-hidden-size", str(args.ffn), "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type",
        "rope", "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--seq-length", str(args.seq),
        "--max-position-embeddings", str(args.seq), "--micro-batch-size", str(args.micro_batch),
        "--global-batch-size", str(args.global_batch), "--train-iters", str(iters), "--lr", str(lr),
        "--min-lr", str(lr / 10), "--lr-warmup-iters", str(max(1, iters // 20)), "--lr-decay-style", "cosine",
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", str(args.seed), "--data-path", *blend,
        "--split", "95,5,0", "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer,
        "--vocab-size", "2048",
        "--log-interval", str(max(1, iters // 5)), "--eval-interval", str(iters), "--eval-iters", str(args.eval_iters),
        *extra,
    ]
    start = time.process_time()
    trainer = Trainer(config_from_args(parse_args(flags)))
    paused_s = [0.0]  # what the trainer leaves out of its training time (validation, saves), on this clock
    paused = trainer.logger.paused

    @contextlib.contextmanager
    def timed_pause():
        t = time.process_time()
        with paused():
            yield
        paused_s[0] += time.process_time() - t

    trainer.logger.paused = timed_pause
    loop_start = time.process_time()
    result = trainer.train()
    end = time.process_time()
    loss = result.valid_losses[iters] if iters in result.valid_losses else trainer.evaluate()["loss"]
    return loss, trainer.methods.get("sat"), end - loop_start - paused_s[0], end - start


def variants(args) -> list[tuple[str, list[str]]]:
    """(label, extra flags) of each continued-pretraining run, dense first."""
    if not args.variant:
        return [("dense", []), ("SAT (defaults: LORS ending dense)", ["--sat"]),
                ("SAT constant rate (no ladder)", ["--sat", "--sat-lors-start", "1"]),
                ("SAT random importance", ["--sat", "--sat-importance", "random"])]
    runs = [("dense", [])]
    for text in args.variant:
        label, sep, flags = text.partition("=")
        if not sep or not label.strip():
            raise SystemExit(f"--variant {text!r}: expected LABEL=FLAGS, e.g. "
                             "'rho 0.3=--sat --sat-omission-rate-mlp 0.3'")
        runs.append((label.strip(), shlex.split(flags)))
    return runs


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    runs = variants(args)
    tokenizer, blend = prepare_data(args.out)
    dense_ckpt = os.path.join(args.out, "dense_ckpt")
    if args.reuse_pretrained:
        if not os.path.exists(os.path.join(dense_ckpt, "latest_checkpointed_iteration.txt")):
            raise SystemExit(f"--reuse-pretrained: no checkpoint in {dense_ckpt}; run once without it first")
        print(f"== dense model from {dense_ckpt} (evaluated, not trained again)", flush=True)
        pre_loss, *_ = run(args, tokenizer, blend, args.pretrain_iters, 2e-3, ["--load", dense_ckpt])
    else:
        print(f"== dense pretraining, {args.pretrain_iters} iterations", flush=True)
        pre_loss, *_ = run(args, tokenizer, blend, args.pretrain_iters, 2e-3, ["--save", dense_ckpt])
    cont = ["--load", dense_ckpt, "--finetune"]
    results = []
    for name, extra in runs:
        print(f"== continued pretraining: {name}", flush=True)
        results.append((name, *run(args, tokenizer, blend, args.iters, 5e-4, [*cont, *extra])))
    dense_s = results[0][3]
    sat_runs = [r for r in results[1:] if r[2] is not None]
    timed = {"first": sat_runs[:1], "each": sat_runs, "none": []}[args.equal_time]
    for equal_time_iters in sorted({max(1, round(args.iters * r[3] / dense_s)) for r in timed}, reverse=True):
        print(f"== dense continuation in a SAT run's training time: {equal_time_iters} iterations", flush=True)
        results.append((f"dense in {equal_time_iters} its (a SAT run's time)",
                        *run(args, tokenizer, blend, equal_time_iters, 5e-4, cont)))
    dense_loss = results[0][1]
    tokens = args.iters * args.global_batch * args.seq
    print(f"\n== SAT continued pretraining: {args.layers}L h{args.hidden} {args.heads} heads ffn {args.ffn} seq "
          f"{args.seq}; dense pretraining {args.pretrain_iters} its (val loss {pre_loss:.4f}), then {args.iters} "
          f"its = {tokens:,} tokens")
    print("| run | val loss | val ppl | vs dense (loss) | training FLOPs | training time | whole run |")
    print("|---|---|---|---|---|---|---|")
    for name, loss, sat, seconds, whole in results:
        saved = f"{sat.saved_x():.2f}x fewer" if sat is not None else "1x"
        print(f"| {name} | {loss:.4f} | {math.exp(loss):.2f} | {100 * (loss / dense_loss - 1):+.2f} % | {saved} | "
              f"{seconds:.1f} s ({seconds / dense_s:.2f}x dense) | {whole:.1f} s |")


if __name__ == "__main__":
    main()

"""Dense vs SAT step time on CPU fp32 for a LLaMA shape, at fixed omission rates, in one run.

Builds two trainers from the same flags (one with `--sat` held at constant omission rates: `--sat-lors-start 1`)
and alternates their training steps (selection + forward + backward + AdamW + SAT's freezing of omitted rows,
batch fetch excluded), so load changes on a shared machine hit both alike. By default a step is timed in CPU
seconds of this process on one thread (`--clock process`), which other processes on a shared machine do not
inflate; `--clock wall` times wall-clock seconds (use it on an idle machine, or with several threads).
Prints, per setting, the median and the best (smallest) step times, the measured speed-ups and what the FLOP
model predicts (dense-equivalent / actual training FLOPs, logits included), and their ratio. Every layer omits
(`--exempt-layers none`; the SAT default keeps the first layer dense, which moves measured and predicted
alike). Other load only ever adds time to a step (on a virtual machine CPU steal is counted as process time
too), so on a busy machine the best steps are the closer estimate. Figures are measured, never asserted.

    .venv/bin/python bench/sat_speed.py                          # rho_c 0.5 / rho_h 0.25 and the defaults
    .venv/bin/python bench/sat_speed.py --steps 4                # a quicker look
    .venv/bin/python bench/sat_speed.py --clock wall --threads 2  # wall-clock, two threads (idle machine)
    .venv/bin/python bench/sat_speed.py --setting 0.7,0.5        # extra settings RHO_C,RHO_H (repeatable)
    .venv/bin/python bench/sat_speed.py --groups 2               # GQA (4 query heads per group), query-head unit
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_eff.arguments import config_from_args, parse_args  # noqa: E402
from megatron_eff.methods.sat.config import SATConfig  # noqa: E402
from megatron_eff.training.trainer import Trainer  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=0, help="query groups (GQA); 0: MHA")
    p.add_argument("--head-unit", choices=["query-head", "kv-group"], default="query-head",
                   help="--sat-head-unit (the same with MHA)")
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=["process", "wall"], default="process",
                   help="process: CPU seconds of this process (robust to other load; with one thread); wall")
    p.add_argument("--exempt-layers", default="none", help="--sat-exempt-layers of the SAT trainers")
    p.add_argument("--setting", action="append", default=[], metavar="RHO_C,RHO_H",
                   help="extra omission rates to time (default: 0.5,0.25 and the --sat defaults)")
    return p.parse_args()


def model_flags(a: argparse.Namespace) -> list[str]:
    gqa = ["--group-query-attention", "--num-query-groups", str(a.groups)] if a.groups else []
    return [*gqa,
        "--num-layers", str(a.layers), "--hidden-size", str(a.hidden), "--num-attention-heads", str(a.heads),
        "--ffn-hidden-size", str(a.ffn), "--seq-length", str(a.seq), "--max-position-embeddings", str(a.seq),
        "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
        "--untie-embeddings-and-output-weights", "--vocab-size", str(a.vocab), "--mock-data",
        "--micro-batch-size", str(a.batch), "--global-batch-size", str(a.batch), "--train-iters", "1000",
        "--lr", "1e-4", "--eval-iters", "0", "--log-interval", "100000", "--seed", "1",
    ]


def timed_step(trainer: Trainer, iteration: int, clock) -> float:
    batches = trainer.batch_source.next_global_batch()
    start = clock()
    trainer.methods.before_iteration(iteration)  # SAT's scoring and selection count as step time
    trainer.train_step(batches, iteration, 1e-4)
    return clock() - start


def main() -> None:
    a = parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    defaults = SATConfig()
    settings = [(0.5, 0.25), (defaults.omission_rate_mlp, defaults.omission_rate_heads)]
    settings += [tuple(float(v) for v in s.split(",")) for s in a.setting]
    settings = list(dict.fromkeys(settings))
    base = model_flags(a)
    clock = time.process_time if a.clock == "process" else time.perf_counter
    dense = Trainer(config_from_args(parse_args(base)))
    sats = [Trainer(config_from_args(parse_args([
        *base, "--sat", "--sat-omission-rate-mlp", str(c), "--sat-omission-rate-heads", str(h),
        "--sat-lors-start", "1", "--sat-head-unit", a.head_unit, "--sat-exempt-layers", a.exempt_layers])))
        for c, h in settings]
    times: dict[str, list[float]] = {"dense": [], **{str(s): [] for s in settings}}
    for it in range(1, a.steps + 3):
        for name, trainer in (("dense", dense), *zip(map(str, settings), sats)):
            dt = timed_step(trainer, it, clock)
            if it > 2:
                times[name].append(dt)
    d, d_best = statistics.median(times["dense"]), min(times["dense"])
    groups = f" in {a.groups} query groups (SAT unit: {a.head_unit})" if a.groups else ""
    print(f"LLaMA shape: {a.layers} layers, hidden {a.hidden}, {a.heads} heads{groups}, ffn {a.ffn}, seq {a.seq}, "
          f"batch {a.batch}, vocab {a.vocab}; fp32 CPU, {torch.get_num_threads()} threads, {a.steps} timed steps, "
          f"{a.clock} clock")
    print(f"dense: median step {d * 1e3:.0f} ms, best {d_best * 1e3:.0f} ms")
    print("| rho_c | rho_h | SAT step ms: median / best | measured speed-up: median / best | FLOP model | "
          "measured / predicted: median / best |")
    print("|---|---|---|---|---|---|")
    for (c, h), trainer in zip(settings, sats):
        s, s_best = statistics.median(times[str((c, h))]), min(times[str((c, h))])
        dense_flops, actual_flops = trainer.methods.get("sat").last_flops
        predicted = dense_flops / actual_flops
        print(f"| {c} | {h} | {s * 1e3:.0f} / {s_best * 1e3:.0f} | {d / s:.2f}x / {d_best / s_best:.2f}x | "
              f"{predicted:.2f}x | {100 * d / s / predicted:.0f}% / {100 * d_best / s_best / predicted:.0f}% |")


if __name__ == "__main__":
    main()

"""CoLM (mini-batch coresets) vs a random small batch vs a large batch, at equal steps on the shipped corpus (CPU).

Trains the same small LLaMA-shaped model from the same seed three times: at --small-batch (random, the
baseline), with --colm (a coreset of --small-batch chosen from --large-batch candidates; Britannica, the
small domain, kept whole) and at --large-batch. Prints, all measured, never asserted:
- validation loss at equal steps, overall and on the small domain (Britannica), and seconds per iteration;
- the gradient-matching error |g_coreset - g_L| / |g_L| of CoLM's coresets, with true per-sample gradients of
  the model at that step, against random subsets of the same size (mean over --match-steps iterations);
- peak memory of one CoLM step [no-grad scoring forward of B_L + train on B_S] vs training at B_L, each
  in one micro-batch, as the peak resident set during the step over the one before it, in a fresh process
  (Linux: the peak is reset through /proc/self/clear_refs; big tensors are mmap'ed and returned when freed,
  so the peak follows the live tensors), and the time of the same two steps.

    .venv/bin/python bench/colm.py                          # ~45 min on 2 heavily shared CPU cores
    .venv/bin/python bench/colm.py --iters 20 --match-steps 20 --eval-iters 2 --skip-memory   # a quick look

The data is built once under --out with the repository's tools (as bench/mst_quality.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.mst_quality import prepare_data  # noqa: E402
from megatron_eff.arguments import config_from_args, parse_args  # noqa: E402
from megatron_eff.training.trainer import Trainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_DOMAIN = "britannica_text_document"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "work_dirs", "mst_bench"), help="data folder (shared with "
                   "bench/mst_quality.py)")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--small-batch", type=int, default=16)
    p.add_argument("--large-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-iters", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--match-steps", type=int, default=20, help="CoLM iterations whose coresets are checked "
                   "against true gradients (spread over the run)")
    p.add_argument("--random-subsets", type=int, default=10, help="random subsets per checked iteration")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-only", action="store_true", help="only the memory and step-time comparison")
    p.add_argument("--memory-probe", choices=["large", "colm"], help=argparse.SUPPRESS)
    return p.parse_args()


def flags(args, blend: list[str], tokenizer: str, global_batch: int, extra: list[str]) -> list[str]:
    return [
        "--num-layers", str(args.layers), "--hidden-size", str(args.hidden), "--num-attention-heads", str(args.heads),
        "--seq-length", str(args.seq), "--max-position-embeddings", str(args.seq), "--normalization", "RMSNorm",
        "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear",
        "--untie-embeddings-and-output-weights", "--micro-batch-size", str(args.micro_batch),
        "--global-batch-size", str(global_batch), "--train-iters", str(args.iters), "--lr", str(args.lr),
        "--min-lr", str(args.lr / 10), "--lr-warmup-iters", str(max(1, args.iters // 20)), "--clip-grad", "1.0",
        "--seed", str(args.seed), "--data-path", *blend, "--split", "95,5,0", "--tokenizer-type",
        "SentencePieceTokenizer", "--tokenizer-model", tokenizer, "--vocab-size", "2048",
        "--log-interval", str(max(1, args.iters // 5)), "--eval-interval", str(args.iters), "--eval-iters",
        str(args.eval_iters), *extra,
    ]


def sample_gradients(model, micro_batches: list[dict]) -> torch.Tensor:
    """[n, P]: each sample's gradient of its token-mean loss (eval mode)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    model.eval()
    for batch in micro_batches:
        for i in range(batch["tokens"].shape[0]):
            mask = batch["loss_mask"][i:i + 1].float()
            loss = (model(tokens=batch["tokens"][i:i + 1], labels=batch["labels"][i:i + 1]) * mask).sum() / mask.sum()
            rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    model.train()
    return torch.stack(rows)


class MatchingProbe:
    """Wraps CoLM's select_batch: at chosen iterations, the coreset's and random subsets' gradient error."""

    def __init__(self, trainer, iterations: set[int], subsets: int, seed: int):
        self.trainer, self.iterations, self.subsets = trainer, iterations, subsets
        self.colm = trainer.methods.get("colm")
        self.select = self.colm.select_batch
        self.colm.select_batch = self
        self.generator = torch.Generator().manual_seed(seed)
        self.coreset_errors: list[float] = []
        self.random_errors: list[float] = []

    def __call__(self, iteration: int, source):
        batches = self.select(iteration, source)
        if iteration in self.iterations:
            pool = source.candidates
            chosen = [i - pool.first_sample for i in self.colm.selections[-1]]
            grads = sample_gradients(self.trainer.model[0], pool.micro_batches)  # single process: the whole pool
            full = grads.mean(0)
            error = lambda rows: float((grads[rows].mean(0) - full).norm() / full.norm())  # noqa: E731
            self.coreset_errors.append(error(chosen))
            n = grads.shape[0]
            self.random_errors += [error(torch.randperm(n, generator=self.generator)[:len(chosen)])
                                   for _ in range(self.subsets)]
        return batches


def train(args, blend, tokenizer, name: str, global_batch: int, extra: list[str], probe: bool = False) -> dict:
    print(f"== {name}", flush=True)
    trainer = Trainer(config_from_args(parse_args(flags(args, blend, tokenizer, global_batch, extra))))
    matching = None
    if probe:
        every = max(1, args.iters // args.match_steps)
        matching = MatchingProbe(trainer, set(range(1, args.iters + 1, every)), args.random_subsets, args.seed)
    start = time.time()
    result = trainer.train()
    seconds = time.time() - start
    domains = result.valid_domain_losses.get(args.iters, {})
    out = {"loss": result.valid_losses[args.iters], "small": domains.get(SMALL_DOMAIN, float("nan")),
           "s_per_it": seconds / args.iters}
    if matching is not None:
        out["coreset_error"] = sum(matching.coreset_errors) / len(matching.coreset_errors)
        out["random_error"] = sum(matching.random_errors) / len(matching.random_errors)
        out["matched_steps"] = len(matching.coreset_errors)
        out["coreset_beats_random"] = sum(
            c < sum(matching.random_errors[k * args.random_subsets:(k + 1) * args.random_subsets]) / args.random_subsets
            for k, c in enumerate(matching.coreset_errors))
    return out


def _status_kb(field: str) -> int:
    """A /proc/self/status memory field in kB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_probe(args, blend, tokenizer) -> None:
    """One step in this fresh process; prints {"extra_mb", "seconds"} (peak RSS growth over model + data)."""
    from megatron_eff.methods.colm.zo import shared_direction, value_rows, zo_forward_step

    torch.set_num_threads(1)
    large = args.memory_probe == "large"
    extra = ["--micro-batch-size", str(args.large_batch)] if large else ["--colm", "--colm-large-batch-size",
                                                                         str(args.large_batch)]
    trainer = Trainer(config_from_args(parse_args(
        flags(args, blend, tokenizer, args.large_batch if large else args.small_batch, extra + ["--eval-iters", "0"]))))
    model = trainer.model[0]
    batch = trainer.batch_source.draw(args.large_batch)
    pool = {k: torch.cat([b[k] for b in batch.micro_batches]) for k in ("tokens", "labels", "loss_mask")}
    z = shared_direction(1, value_rows(model.decoder.layers[str(args.layers - 1)]), 0, 1)
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current resident set
        f.write("5")
    start = time.perf_counter()
    if not large:
        model.eval()
        with torch.no_grad():
            for k in range(0, args.large_batch, args.micro_batch):  # scoring runs in micro-batches
                part = {key: t[k:k + args.micro_batch] for key, t in pool.items()}
                zo_forward_step(model, part, None, last_layer_index=args.layers - 1, z=z, eps=1e-3)
        model.train()
    n = args.large_batch if large else args.small_batch
    loss = model(tokens=pool["tokens"][:n], labels=pool["labels"][:n]).mean()
    loss.backward()
    seconds = time.perf_counter() - start
    extra_kb = _status_kb("VmHWM") - before
    print(json.dumps({"extra_mb": extra_kb / 1024, "seconds": seconds}))


def measure_memory(args) -> dict:
    results = {}
    for kind in ("large", "colm"):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", kind, "--out", args.out,
               "--layers", str(args.layers), "--hidden", str(args.hidden), "--heads", str(args.heads), "--seq",
               str(args.seq), "--micro-batch", str(args.micro_batch), "--small-batch", str(args.small_batch),
               "--large-batch", str(args.large_batch), "--iters", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def main() -> None:
    args = parse()
    os.makedirs(args.out, exist_ok=True)
    tokenizer, blend = prepare_data(args.out)
    if args.memory_probe:
        memory_probe(args, blend, tokenizer)
        return
    if args.memory_only:
        report_memory(args)
        return
    colm_flags = ["--colm", "--colm-large-batch-size", str(args.large_batch), "--colm-keep-sources", SMALL_DOMAIN]
    runs = {
        f"random B_S={args.small_batch}": train(args, blend, tokenizer, "random small batch", args.small_batch, []),
        f"CoLM B_S={args.small_batch} of B_L={args.large_batch}": train(
            args, blend, tokenizer, "CoLM", args.small_batch, colm_flags),
        f"random B_L={args.large_batch}": train(args, blend, tokenizer, "large batch", args.large_batch, []),
    }
    # the same CoLM run again with the gradient probe (it slows the run, so the timing above is without it)
    colm = train(args, blend, tokenizer, "CoLM with the gradient-matching probe", args.small_batch, colm_flags,
                 probe=True)
    tokens = args.iters * args.seq
    print(f"\n== CoLM bench: {args.iters} iterations each, same seed; {args.layers}L h{args.hidden} seq {args.seq}, "
          f"blend shakespeare 0.6 / milton 0.3 / britannica 0.1 ({tokens:,} tokens per batch row)")
    for name, r in runs.items():
        print(f"{name:28s} val loss {r['loss']:.4f} | britannica {r['small']:.4f} | {r['s_per_it']:.2f} s/it")
    print(f"gradient matching |g_S - g_L| / |g_L| over {colm['matched_steps']} iterations: CoLM coreset "
          f"{colm['coreset_error']:.4f} vs random subsets {colm['random_error']:.4f} "
          f"(coreset lower at {colm['coreset_beats_random']} of {colm['matched_steps']} iterations)")
    if not args.skip_memory:
        report_memory(args)


def report_memory(args) -> None:
    mem = measure_memory(args)
    large, ours = mem["large"], mem["colm"]
    print(f"peak memory over model + data, one step: train B_L={args.large_batch} {large['extra_mb']:.1f} MB | "
              f"CoLM [no-grad scoring of B_L + train B_S={args.small_batch}] {ours['extra_mb']:.1f} MB = "
              f"{ours['extra_mb'] / large['extra_mb']:.2f}x; step time {large['seconds']:.2f} s vs "
              f"{ours['seconds']:.2f} s = {ours['seconds'] / large['seconds']:.2f}x")


if __name__ == "__main__":
    main()

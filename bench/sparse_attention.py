"""Forward + backward time of MST's Hybrid Sparse Attention: SDPA dense causal, SDPA with the pattern's
boolean mask (`--mst-hsa-impl mask`) and the factorized kernel (`--mst-hsa-impl factorized`), per pattern.

    .venv/bin/python bench/sparse_attention.py                       # b 4, 8 heads, s 1024, d 64, w 128
    .venv/bin/python bench/sparse_attention.py --seq 1024 2048 --repeats 5 --threads 1
    .venv/bin/python bench/sparse_attention.py --device cuda --dtype bfloat16

Prints the median of `--repeats` timed runs (after one warm-up) in milliseconds, the pattern's density
relative to causal and the speed-up of factorized over mask. Figures are measured, never asserted.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_eff.methods.mst.attention_patterns import (  # noqa: E402
    PATTERNS,
    attention_pattern,
    pattern_density,
    sparse_attention,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, help="K/V groups (GQA; default: --heads)")
    parser.add_argument("--seq", type=int, nargs="+", default=[1024])
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parser.parse_args()


def time_ms(fn, q, k, v, repeats: int) -> float:
    """Median milliseconds of forward + backward (one warm-up run first)."""
    grad = torch.randn_like(q)
    times = []
    for i in range(repeats + 1):
        if q.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(q, k, v).backward(grad)
        if q.is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - start) * 1e3)
        for x in (q, k, v):
            x.grad = None
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    dtype, groups = getattr(torch, args.dtype), args.groups or args.heads
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"b {args.batch}, heads {args.heads}, groups {groups}, d {args.head_dim}, w {args.window}, "
          f"{args.dtype} on {args.device} ({torch.get_num_threads()} threads), median of {args.repeats}, "
          f"forward + backward in ms")
    print(f"{'s':>5} {'pattern':>8} {'density':>8} {'causal':>8} {'mask':>8} {'factorized':>10} {'mask/fact':>9}")
    sdpa = functools.partial(F.scaled_dot_product_attention, enable_gqa=groups != args.heads)
    for s in args.seq:
        q, k, v = (torch.randn(args.batch, heads, s, args.head_dim, device=args.device, dtype=dtype, requires_grad=True)
                   for heads in (args.heads, groups, groups))
        causal = time_ms(functools.partial(sdpa, is_causal=True), q, k, v, args.repeats)
        for pattern in args.patterns:
            mask = attention_pattern(pattern, s, args.window, args.device)
            masked = time_ms(functools.partial(sdpa, attn_mask=mask), q, k, v, args.repeats)
            factorized = time_ms(functools.partial(sparse_attention, pattern=pattern, window=args.window),
                                 q, k, v, args.repeats)
            print(f"{s:>5} {pattern:>8} {pattern_density(mask):>8.3f} {causal:>8.1f} {masked:>8.1f} "
                  f"{factorized:>10.1f} {masked / factorized:>8.2f}x")

if __name__ == "__main__":
    main()

"""Forward + backward time of one FP8 linear on the local backend: emulation (`--fp8-gemm emulate`) vs real
FP8 GEMMs through `torch._scaled_mm` (`--fp8-gemm scaled_mm`), tensorwise scaling, one CPU thread by default.
Median of 5 after 2 warm-up calls; figures are printed, never asserted.

    .venv/bin/python bench/fp8_gemm.py [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_eff.precision.fp8 import Fp8Gemm, Fp8Meta, Fp8Recipe, ScaledMmFp8Gemm  # noqa: E402

SHAPES = ((1024, 64, 192), (512, 256, 256), (2048, 1024, 1024))  # (tokens, in, out)


def median_ms(gemm, x: torch.Tensor, w: torch.Tensor, repeats: int = 5) -> float:
    for _ in range(2):
        gemm(x, w, None).sum().backward()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gemm(x, w, None).sum().backward()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"tokens x in -> out | emulate ms | scaled_mm ms  (fwd + bwd, tensorwise, {args.threads} thread(s))")
    for tokens, n_in, n_out in SHAPES:
        x = torch.randn(tokens, n_in, requires_grad=True)
        w = torch.randn(n_out, n_in, requires_grad=True)
        emulate, real = (median_ms(cls(Fp8Recipe(recipe="tensorwise"), Fp8Meta(4)), x, w)
                         for cls in (Fp8Gemm, ScaledMmFp8Gemm))
        print(f"{tokens} x {n_in} -> {n_out} | {emulate:.1f} | {real:.1f}")


if __name__ == "__main__":
    main()

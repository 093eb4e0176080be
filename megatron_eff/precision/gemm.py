"""A linear's GEMM as a chain: precision features wrap the GEMM, none replaces another.

Each linear of `parallel/layers.py` computes `self.gemm(x, weight, bias)`, `F.linear` by default (the
*kernel*). A precision feature is a `GemmLink`: a callable with the same signature that does its work
around `self.inner(x, weight, bias)`. `add_link(linear.gemm, link)` puts the link at its place in the chain,
by `depth` (links of smaller depth sit nearer the kernel), whatever order the features were applied in:

    UnitScaledGemm (depth 20: scales x, y and the gradients)
      -> Fp8Gemm (depth 10: quantises the operands and the output gradient of the GEMM it wraps)
        -> F.linear (the kernel)

So with FP8 and Unit Scaling both on, the quantiser sees the unit-scaled tensors (the point of unit
scaling), and `apply_fp8` then `apply_unit_scaling` builds the same chain as the other order.
`ScaledMmFp8Gemm` is a link that is also the kernel (it runs `torch._scaled_mm` itself and does not call
its `inner`); nothing sits below FP8, so nothing is bypassed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F

FP8_DEPTH = 10  # operand quantisation: right around the kernel
UNIT_SCALING_DEPTH = 20  # scale factors around whatever computes the product


class GemmLink:
    """One link of a GEMM chain: `__call__(x, weight, bias) -> y` around `self.inner`."""

    depth: int = 0
    inner: Callable = F.linear


def add_link(gemm: Callable, link: GemmLink) -> Callable:
    """The chain `gemm` with `link` inserted below every link deeper than it (its `inner` set); returns the
    chain's new outermost callable (assign it back to `linear.gemm`)."""
    if isinstance(gemm, GemmLink) and gemm.depth > link.depth:
        gemm.inner = add_link(gemm.inner, link)
        return gemm
    link.inner = gemm
    return link


def gemm_chain(gemm: Callable) -> list[Callable]:
    """The callables of a chain, outermost first, ending with the kernel."""
    chain = [gemm]
    while isinstance(chain[-1], GemmLink):
        chain.append(chain[-1].inner)
    return chain

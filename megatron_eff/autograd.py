"""One factory for the small autograd Functions that do one thing in forward and another to the gradient.

    f = forward_backward_function("_ScaleBwd", lambda x, s: x.view_as(x), lambda grad, s: grad * s)
    y = f(x, 0.5)   # identity in forward; x's gradient is grad * 0.5

Users: the tensor-parallel mappings (`parallel/mappings.py`: a collective each way), the FP8 quantisers
(`precision/fp8.py`) and the Unit Scaling scale ops (`precision/unit_scaling.py`).
"""

from __future__ import annotations

import torch


def forward_backward_function(name: str, forward_fn, backward_fn):
    """`f(x, arg)`: `forward_fn(x, arg)` in forward; x's gradient is `backward_fn(grad, arg)` (arg gets none)."""

    def forward(ctx, x, arg):
        ctx.arg = arg
        return forward_fn(x, arg)

    def backward(ctx, grad):
        return backward_fn(grad, ctx.arg), None

    members = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    return type(name, (torch.autograd.Function,), members).apply

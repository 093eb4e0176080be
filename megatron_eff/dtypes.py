"""The one rule for reduction precision: losses, softmax sums and norms are computed in at least float32.

FP32 master weights make float32 the working dtype of a training run; BF16/FP16 autocast outputs are
upcast to it before any reduction. A model built in float64 (the multi-process parity tests do, see
`tests/dist_utils.py`) stays in float64 end to end, so those reductions are not rounded back to float32.
"""

from __future__ import annotations

import torch


def reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype reduces in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    """`x` in `reduction_dtype(x.dtype)` (a no-op for float32 and float64 tensors)."""
    return x.to(reduction_dtype(x.dtype))

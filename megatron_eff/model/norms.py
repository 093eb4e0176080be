"""Normalisation layers: LayerNorm (GPT-2: weight and bias) and RMSNorm (LLaMA: weight only).

Both are replicated across tensor-parallel ranks. Under sequence parallelism each rank normalises its own
slice of the sequence, so the weights' gradients are partial: `param.sequence_parallel = True` tells the
trainer to all-reduce them over the TP group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_eff.parallel.layers import mark_sharded


def _replicated(shape: tuple[int, ...], init: str, sequence_parallel: bool) -> nn.Parameter:
    param = mark_sharded(nn.Parameter(torch.empty(shape)), None, shape, init)
    param.sequence_parallel = sequence_parallel
    return param


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = _replicated((hidden_size,), "ones", sequence_parallel)
        self.bias = _replicated((hidden_size,), "zeros", sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = _replicated((hidden_size,), "ones", sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

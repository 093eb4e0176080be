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


def _gamma(hidden_size: int, zero_centered: bool, sequence_parallel: bool) -> nn.Parameter:
    """The scale: stored as is (init 1), or zero-centred (init 0, applied as 1 + weight: Megatron's
    `--apply-layernorm-1p`, so weight decay pulls the scale towards 1 rather than 0)."""
    return _replicated((hidden_size,), "zeros" if zero_centered else "ones", sequence_parallel)


def _replicated(shape: tuple[int, ...], init: str, sequence_parallel: bool) -> nn.Parameter:
    param = mark_sharded(nn.Parameter(torch.empty(shape)), None, shape, init)
    param.sequence_parallel = sequence_parallel
    return param


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False,
                 zero_centered_gamma: bool = False):
        super().__init__()
        self.eps, self.zero_centered_gamma = eps, zero_centered_gamma
        self.weight = _gamma(hidden_size, zero_centered_gamma, sequence_parallel)
        self.bias = _replicated((hidden_size,), "zeros", sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        return F.layer_norm(x, self.weight.shape, weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False,
                 zero_centered_gamma: bool = False):
        super().__init__()
        self.eps, self.zero_centered_gamma = eps, zero_centered_gamma
        self.weight = _gamma(hidden_size, zero_centered_gamma, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        return F.rms_norm(x, self.weight.shape, weight, self.eps)

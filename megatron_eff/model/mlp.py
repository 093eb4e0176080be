"""Feed-forward block: GELU (GPT-2, tanh approximation) or SwiGLU (LLaMA).

SwiGLU's gate and up projections are one fused column-parallel GEMM with weight `[2, ffn/tp, h]`
(index 0 = gate, 1 = up), so each TP rank holds matching slices of both: `silu(x W_gate^T) * (x W_up^T)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_eff.config import ModelConfig
from megatron_eff.parallel.layers import scaled_init_std


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, backend):
        super().__init__()
        self.swiglu = config.swiglu
        std, ffn, hidden = config.init_method_std, config.ffn_hidden_size, config.hidden_size
        num_fused = 2 if config.swiglu else 1
        self.linear_fc1 = backend.column_linear(
            hidden, num_fused * ffn, bias=config.add_bias_linear, init_std=std, num_fused=num_fused
        )
        self.linear_fc2 = backend.row_linear(
            ffn, hidden, bias=config.add_bias_linear, init_std=scaled_init_std(std, config.num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_fc1(x)  # [s, b, num_fused * ffn/tp]
        if self.swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        else:
            y = F.gelu(y, approximate="tanh")
        return self.linear_fc2(y)  # [s, b, h]

"""Feed-forward block: GELU (GPT-2, tanh approximation) or SwiGLU (LLaMA).

SwiGLU's gate and up projections are one fused column-parallel GEMM with weight `[2, ffn/tp, h]`
(index 0 = gate, 1 = up), so each TP rank holds matching slices of both: `silu(x W_gate^T) * (x W_up^T)`.

`forward(x, channels=...)` (a LongTensor of this rank's ffn channel indices) computes only those channels:
fc1's rows of them (SwiGLU: their gate and up rows) and fc2's input columns (smaller GEMMs,
`parallel/layers.py`); the result equals the full MLP with the other channels zeroed. The intermediate
activation passes the `ffn_site` (`model/sites.py`) before fc2.

`swiglu` is `silu(gate) * up` with a hand-written backward that writes the gate and up gradients straight
into one fc1-output gradient (autograd would concatenate the two halves' gradients: one more pass over the
largest activation of the layer). Under `torch.compile` the plain form is traced (the compiler fuses it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_eff.config import ModelConfig
from megatron_eff.model.sites import Site
from megatron_eff.parallel.layers import scaled_init_std
from megatron_eff.parallel.state import group_size


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, backend, layer_number: int | None = None):
        super().__init__()
        self.swiglu = config.swiglu
        self.local_ffn = config.ffn_hidden_size // group_size(backend.tp_group)  # SwiGLU: where fc1's up rows start
        std, ffn, hidden = config.init_method_std, config.ffn_hidden_size, config.hidden_size
        num_fused = 2 if config.swiglu else 1
        self.linear_fc1 = backend.column_linear(
            hidden, num_fused * ffn, bias=config.add_bias_linear, init_std=std, num_fused=num_fused
        )
        self.linear_fc2 = backend.row_linear(
            ffn, hidden, bias=config.add_bias_linear, init_std=scaled_init_std(std, config.num_layers)
        )

        self.ffn_site = Site("ffn", layer_number)  # [s, b, ffn/tp] activation, before fc2

    def forward(self, x: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
        """`[s, b, h]` -> `[s, b, h]`; `channels`: only these local ffn channels (module docstring)."""
        if channels is None:
            y = self.linear_fc1(x)  # [s, b, num_fused * ffn/tp]
        else:
            rows = torch.cat([channels, channels + self.local_ffn]) if self.swiglu else channels
            y = self.linear_fc1(x, rows=rows)  # [s, b, num_fused * len(channels)]
        if self.swiglu:
            y = swiglu(y)
        else:
            y = F.gelu(y, approximate="tanh")
        y = self.ffn_site(y, channels)
        if channels is None:
            return self.linear_fc2(y)  # [s, b, h]
        return self.linear_fc2(y, cols=channels)


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """`[..., 2 n]` (gate ; up) -> `silu(gate) * up` `[..., n]`."""
    if torch.compiler.is_compiling():
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _SwiGLU.apply(y)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        gate, up = y.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(gate, up, activated)
        return activated * up

    @staticmethod
    def backward(ctx, grad):
        gate, up, activated = ctx.saved_tensors
        n = gate.shape[-1]
        grad_y = torch.empty((*gate.shape[:-1], 2 * n), dtype=grad.dtype, device=grad.device)
        torch.mul(grad, activated, out=grad_y[..., n:])  # d/d up = silu(gate)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_y[..., :n])  # d/d gate
        return grad_y

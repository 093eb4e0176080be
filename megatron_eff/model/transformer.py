"""Pre-norm transformer layer and the block of layers one pipeline stage owns.

Layers are keyed by their *global* index (`layers.4` is layer 4 whatever the pipeline layout), so
parameter names, initial weights and checkpoints do not depend on how the model is split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_eff.config import ModelConfig
from megatron_eff.model.attention import SelfAttention
from megatron_eff.model.mlp import MLP


class TransformerLayer(nn.Module):
    """x + dropout(attention(norm(x))), then x + dropout(mlp(norm(x))). Activations `[s, b, h]`."""

    def __init__(self, config: ModelConfig, backend):
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = backend.norm(config.hidden_size)
        self.self_attention = SelfAttention(config, backend)
        self.pre_mlp_layernorm = backend.norm(config.hidden_size)
        self.mlp = MLP(config, backend)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if self.hidden_dropout == 0.0 or not self.training:
            return x
        return F.dropout(x, self.hidden_dropout, training=True)

    # The residual connection `skip + branch(h)` with `h, skip = residual_split(x, name)`: a plain sum by
    # default; Unit Scaling (precision/unit_scaling.py) swaps in its tau-weighted split/add pair.
    @staticmethod
    def residual_split(x: torch.Tensor, branch: str) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x

    @staticmethod
    def residual_add(y: torch.Tensor, skip: torch.Tensor, branch: str) -> torch.Tensor:
        return skip + y

    def forward(self, x: torch.Tensor, inference_cache=None) -> torch.Tensor:
        h, skip = self.residual_split(x, "attention")
        x = self.residual_add(self._dropout(self.self_attention(self.input_layernorm(h), inference_cache)), skip,
                              "attention")
        h, skip = self.residual_split(x, "mlp")
        return self.residual_add(self._dropout(self.mlp(self.pre_mlp_layernorm(h))), skip, "mlp")


class TransformerBlock(nn.Module):
    """Layers `layer_range = (first, last)` (global indices, `last` exclusive) and, on the last pipeline
    stage, the final norm. With `config.recompute_activations` each layer's activations are recomputed
    in the backward pass instead of stored, by the backend's `checkpoint` (non-reentrant; dropout masks are
    replayed; TE's checkpoint also replays the FP8 scales of the forward)."""

    def __init__(self, config: ModelConfig, backend, layer_range: tuple[int, int], post_process: bool):
        super().__init__()
        self.recompute = config.recompute_activations
        self.checkpoint = backend.checkpoint  # a function: torch's checkpoint or the TE backend's
        self.layers = nn.ModuleDict({str(i): TransformerLayer(config, backend) for i in range(*layer_range)})
        self.final_layernorm = backend.norm(config.hidden_size) if post_process else None

    def forward(self, x: torch.Tensor, inference_cache=None) -> torch.Tensor:
        for layer in self.layers.values():
            if self.recompute and torch.is_grad_enabled():
                x = self.checkpoint(layer, x)
            else:
                x = layer(x, inference_cache)
        return x if self.final_layernorm is None else self.final_layernorm(x)

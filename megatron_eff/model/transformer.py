"""Pre-norm transformer layer and the block of layers one pipeline stage owns.

Layers are keyed by their *global* index (`layers.4` is layer 4 whatever the pipeline layout, and
`TransformerLayer.layer_number` = 4), so parameter names, initial weights and checkpoints do not depend on how
the model is split.

Structured omission (SAT): a layer computes only some attention heads and ffn channels when its
`selection` attribute (or the `selection=` argument of `forward`, which wins) is a `LayerSelection`:
`heads` = this rank's query-group indices to keep (or `query_heads` = this rank's query-head indices, K/V
of every group kept), `channels` = this rank's ffn channel indices to keep (None: all). The GEMMs are really
smaller (`parallel/layers.py` rows/cols), and the result equals the full layer with the other heads' context
/ channels' activation zeroed. A method sets the attribute between steps; the block, the pipeline schedule
and activation recompute need not know.

Sites (`model/sites.py`): each layer's attention holds a "head" site, its MLP an "ffn" site, and the layer
two "layer" sites (the attention and MLP residual deltas) and a "hidden" site (its output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_eff.config import ModelConfig
from megatron_eff.model.attention import SelfAttention
from megatron_eff.model.mlp import MLP
from megatron_eff.model.sites import Site


@dataclass
class LayerSelection:
    """The heads and channels one layer computes on this rank; local indices (LongTensors), None = all."""

    heads: torch.Tensor | None = None  # query groups of this TP rank (MHA: heads), in [0, g/tp)
    channels: torch.Tensor | None = None  # ffn channels of this TP rank, in [0, ffn/tp)
    query_heads: torch.Tensor | None = None  # instead of heads: query heads of this TP rank, in [0, nq/tp); K/V dense


class TransformerLayer(nn.Module):
    """x + dropout(attention(norm(x))), then x + dropout(mlp(norm(x))). Activations `[s, b, h]`.
    `layer_number`: the global layer index."""

    def __init__(self, config: ModelConfig, backend, layer_number: int = 0):
        super().__init__()
        self.layer_number = layer_number
        self.selection: LayerSelection | None = None  # set by a method (SAT): see the module docstring
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = backend.norm(config.hidden_size)
        self.self_attention = SelfAttention(config, backend, layer_number)
        self.pre_mlp_layernorm = backend.norm(config.hidden_size)
        self.mlp = MLP(config, backend, layer_number)
        self.attention_delta_site = Site("layer", layer_number, branch="attention")
        self.mlp_delta_site = Site("layer", layer_number, branch="mlp")
        self.output_site = Site("hidden", layer_number)

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

    def forward(self, x: torch.Tensor, inference_cache=None, selection: LayerSelection | None = None) -> torch.Tensor:
        selection = selection or self.selection or LayerSelection()
        h, skip = self.residual_split(x, "attention")
        y = self.self_attention(self.input_layernorm(h), inference_cache, heads=selection.heads,
                                query_heads=selection.query_heads)
        x = self.residual_add(self.attention_delta_site(self._dropout(y)), skip, "attention")
        h, skip = self.residual_split(x, "mlp")
        y = self.mlp(self.pre_mlp_layernorm(h), channels=selection.channels)
        x = self.residual_add(self.mlp_delta_site(self._dropout(y)), skip, "mlp")
        return self.output_site(x)  # [s, b, h]


class TransformerBlock(nn.Module):
    """Layers `layer_range = (first, last)` (global indices, `last` exclusive) and, on the last pipeline
    stage, the final norm. With `config.recompute_activations` each layer's activations are recomputed
    in the backward pass instead of stored, by the backend's `checkpoint` (non-reentrant; dropout masks are
    replayed; TE's checkpoint also replays the FP8 scales of the forward)."""

    def __init__(self, config: ModelConfig, backend, layer_range: tuple[int, int], post_process: bool):
        super().__init__()
        self.recompute = config.recompute_activations
        self.checkpoint = backend.checkpoint  # a function: torch's checkpoint or the TE backend's
        self.layers = nn.ModuleDict({str(i): TransformerLayer(config, backend, i) for i in range(*layer_range)})
        self.final_layernorm = backend.norm(config.hidden_size) if post_process else None

    def forward(self, x: torch.Tensor, inference_cache=None) -> torch.Tensor:
        for layer in self.layers.values():
            if self.recompute and torch.is_grad_enabled():
                x = self.checkpoint(layer, x)
            else:
                x = layer(x, inference_cache)
        return x if self.final_layernorm is None else self.final_layernorm(x)

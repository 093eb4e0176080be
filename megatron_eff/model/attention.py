"""Causal self-attention: MHA or grouped-query attention (GQA), optional RoPE, PyTorch SDPA.

The fused QKV projection's output rows are laid out per query group (Megatron's GQA layout, which the
Hugging Face converter relies on):

    [q heads of group 0 ; k of group 0 ; v of group 0 ; q heads of group 1 ; k ; v ; ...]

so a column-parallel split gives each TP rank `num_query_groups / tp` whole groups and attention needs
no communication. K/V are not repeated per query head: SDPA's `enable_gqa=True` broadcasts them (measured
on CPU fp32 as fast as or faster than `repeat_interleave`, and it saves the copies).

The causal softmax(q k^T / sqrt(d)) v of training and evaluation is the backend's `core_attention` module:
`CoreAttention` below (SDPA) with `local`, TE's `DotProductAttention` with `transformer_engine`. Two paths
bypass it, whatever the backend: generation with a KV cache (`inference_cache`, SDPA here) and MST's Hybrid
Sparse Attention (`sparse_attention`, set by the MST method, `methods/mst/method.py`).

Head counts come from the input: the number of query groups is the QKV output width over
`(heads per group + 2) * head_dim`, so `forward(x, heads=...)` (a LongTensor of this rank's query-group
indices; with MHA a group is one head) computes only those groups: QKV's rows of those groups, attention
over them, `linear_proj`'s input columns of their query heads (smaller GEMMs, `parallel/layers.py`). The
result equals the full layer with the other heads' context zeroed. `heads=` needs the `local` backend (TE's
linears and DotProductAttention have fixed sizes) and no KV cache. The per-head context passes the
`head_site` (`model/sites.py`) before the output projection.

Context parallelism (`--context-parallel-size`, `parallel/context_parallel.py`): this rank's s/cp tokens sit
at load-balanced global positions; RoPE rotates them by those positions and the causal attention over the
CP group's gathered keys/values replaces `core_attention`, whatever the backend.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_eff.config import ModelConfig
from megatron_eff.model.rope import RotaryEmbedding, apply_rotary
from megatron_eff.model.sites import Site
from megatron_eff.parallel.context_parallel import ContextParallel
from megatron_eff.parallel.layers import scaled_init_std


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, backend, layer_number: int | None = None):
        super().__init__()
        self.head_dim = config.head_dim
        self.heads_per_group = config.num_attention_heads // config.num_query_groups
        self.attention_dropout = config.attention_dropout
        qkv_size = (config.num_attention_heads + 2 * config.num_query_groups) * self.head_dim
        std = config.init_method_std
        self.linear_qkv = backend.column_linear(
            config.hidden_size, qkv_size, bias=config.add_bias_linear, init_std=std
        )
        self.linear_proj = backend.row_linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear,
            init_std=scaled_init_std(std, config.num_layers),
        )
        # Optional sparse pattern inside the causal triangle, set by a training method (MST's hybrid sparse
        # attention): a function (q, k, v, dropout_p) -> out in SDPA layout (q [b, nq/tp, s, d], k/v
        # [b, g/tp, s, d]) used instead of `core_attention`. None keeps the backend's causal attention.
        self.sparse_attention: Callable[..., torch.Tensor] | None = None
        self.core_attention = backend.core_attention()  # no parameters: names match between backends
        self.rotary = None
        if config.position_embedding_type == "rope":
            self.rotary = RotaryEmbedding(config.rotary_dim, config.rotary_base)  # --rotary-percent: first dims
        self.head_site = Site("head", layer_number)  # [s, b, heads, d] context, before linear_proj
        self.context_parallel = ContextParallel.from_state(backend.pstate)  # None without CP

    def forward(self, x: torch.Tensor, inference_cache=None, heads: torch.Tensor | None = None) -> torch.Tensor:
        """`[s, b, h]` -> `[s, b, h]`; `heads`: only these local query groups (see the module docstring)."""
        group_width = (self.heads_per_group + 2) * self.head_dim  # a group's q heads, k, v
        if heads is None:
            qkv = self.linear_qkv(x)  # [s, b, (nq + 2g) d / tp]
        else:
            qkv = self.linear_qkv(x, rows=_unit_elements(heads, group_width))  # [s, b, len(heads) * group_width]
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, qkv.shape[-1] // group_width, self.heads_per_group + 2, self.head_dim)
        if self.rotary is not None:  # rotate q and k of every group in one go
            if self.context_parallel is not None:  # this rank's tokens sit at load-balanced global positions
                cos, sin = self.rotary(s * self.context_parallel.size, qkv.device, qkv.dtype)
                positions = self.context_parallel.positions(s, qkv.device)
                cos, sin = cos[positions], sin[positions]
            elif inference_cache is None:
                cos, sin = self.rotary(s, qkv.device, qkv.dtype)
            else:  # positions offset .. offset + s - 1 (one cos/sin table for the whole generation)
                cos, sin = self.rotary(inference_cache.max_length, qkv.device, qkv.dtype)
                cos, sin = (t[inference_cache.offset:inference_cache.offset + s] for t in (cos, sin))
            qk = apply_rotary(qkv[:, :, :, :-1], cos.unsqueeze(2), sin.unsqueeze(2))
            q, k = qk[:, :, :, :-1], qk[:, :, :, -1]
        else:
            q, k = qkv[:, :, :, :-2], qkv[:, :, :, -2]
        v = qkv[:, :, :, -1]  # [s, b, g/tp, d]
        q = q.reshape(s, b, -1, self.head_dim)  # [s, b, nq/tp, d]
        dropout = self.attention_dropout if self.training else 0.0
        if inference_cache is not None:
            out = _in_sdpa_layout(self._cached_attention, q, k, v, inference_cache, dropout)
        elif self.sparse_attention is not None:  # MST's HSA
            if self.context_parallel is not None:
                raise ValueError("MST's hybrid sparse attention (--mst-hsa-*) does not support "
                                 "--context-parallel-size > 1")
            out = _in_sdpa_layout(self.sparse_attention, q, k, v, dropout_p=dropout)
        elif self.context_parallel is not None:  # causal attention over the whole sequence of the CP group
            out = self.context_parallel.attention(q, k, v, dropout, gqa=self.heads_per_group > 1)
        else:
            out = self.core_attention(q, k, v)  # [s, b, nq/tp * d]
        q_heads = None if heads is None else _unit_elements(heads, self.heads_per_group)  # query heads present
        out = self.head_site(out.reshape(s, b, -1, self.head_dim), q_heads).flatten(2)  # [s, b, nq/tp * d]
        if heads is None:
            return self.linear_proj(out)  # [s, b, h]
        return self.linear_proj(out, cols=_unit_elements(q_heads, self.head_dim))

    def _cached_attention(self, q, k, v, inference_cache, dropout: float) -> torch.Tensor:
        """SDPA over the KV cache (generation), on every backend: q `[b, nq/tp, s, d]` attends to the cached
        positions and its own; k/v `[b, g/tp, s, d]` are appended to the cache."""
        mask = inference_cache.causal_mask(q.shape[2], q.device)
        k, v = inference_cache.update(self, k, v)  # [b, g/tp, offset + s, d]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=self.heads_per_group > 1
        )  # [b, nq/tp, s, d]


def _unit_elements(units: torch.Tensor, width: int) -> torch.Tensor:
    """The element indices of units of `width` consecutive elements: [u0 w, .., u0 w + w - 1, u1 w, ...]."""
    return (units.unsqueeze(-1) * width + torch.arange(width, device=units.device)).flatten()


def _in_sdpa_layout(attend: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   *args, **kwargs) -> torch.Tensor:
    """`attend(q, k, v, *args, **kwargs)`, a function in SDPA layout (`[b, heads, s, d]`), on q `[s, b, nq/tp, d]`,
    k/v `[s, b, g/tp, d]`; returns `[s, b, nq/tp * d]`."""
    s, b = q.shape[:2]
    out = attend(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), *args, **kwargs)
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [b, nq/tp, s, d] -> [s, b, nq/tp * d]


class CoreAttention(nn.Module):
    """The `local` backend's core attention: causal SDPA (flash/cuDNN kernels on GPU), GQA broadcast by SDPA.
    q `[s, b, nq/tp, d]`, k/v `[s, b, g/tp, d]` -> `[s, b, nq/tp * d]`, as TE's DotProductAttention("sbhd")."""

    def __init__(self, attention_dropout: float, gqa: bool):
        super().__init__()
        self.attention_dropout, self.gqa = attention_dropout, gqa

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dropout = self.attention_dropout if self.training else 0.0
        return _in_sdpa_layout(F.scaled_dot_product_attention, q, k, v, dropout_p=dropout, is_causal=True,
                              enable_gqa=self.gqa)  # [s, b, nq/tp * d]

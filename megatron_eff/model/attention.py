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
result equals the full layer with the other heads' context zeroed. `forward(x, query_heads=...)` (this
rank's query-head indices) omits single query heads instead, K and V of every group staying: QKV computes
the kept heads' q rows and every group's k and v rows (`qkv_rows_of_query_heads`), each kept head attends to
its own group's K/V (gathered per kept head, so a group may keep any number of its heads, none included, and
SDPA runs with equal q and kv heads; the gather copies `[s, b, kept, d]`, ~1/h of the QKV GEMM's work), and
`linear_proj` takes the kept heads' columns. The result equals the full layer with the other query heads'
context zeroed. `heads=` and `query_heads=` need the `local` backend (TE's linears and DotProductAttention
have fixed sizes) and no KV cache. The per-head context passes the `head_site` (`model/sites.py`) before the
output projection.

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
from megatron_eff.model.rope import RotaryEmbedding, apply_rotary, halves, rotary_reference, rotate_into
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

    def forward(self, x: torch.Tensor, inference_cache=None, heads: torch.Tensor | None = None,
                query_heads: torch.Tensor | None = None) -> torch.Tensor:
        """`[s, b, h]` -> `[s, b, h]`; `heads`: only these local query groups, `query_heads`: only these local
        query heads, K/V dense (see the module docstring)."""
        if query_heads is not None:
            q, k, v = self._qkv_of_query_heads(x, query_heads)
        else:
            q, k, v = self._qkv(x, inference_cache, heads)
        s, b = q.shape[:2]
        dropout = self.attention_dropout if self.training else 0.0
        if inference_cache is not None:
            out = _in_sdpa_layout(self._cached_attention, q, k, v, inference_cache, dropout)
        elif self.sparse_attention is not None:  # MST's HSA
            if self.context_parallel is not None:
                raise ValueError("MST's hybrid sparse attention (--mst-hsa-*) does not support "
                                 "--context-parallel-size > 1")
            out = _in_sdpa_layout(self.sparse_attention, q, k, v, dropout_p=dropout)
        elif self.context_parallel is not None:  # causal attention over the whole sequence of the CP group
            out = self.context_parallel.attention(q, k, v, dropout, gqa=q.shape[2] > k.shape[2])
        else:
            out = self.core_attention(q, k, v)  # [s, b, nq/tp * d]
        if query_heads is None and heads is not None:
            query_heads = _unit_elements(heads, self.heads_per_group)  # the query heads present
        out = self.head_site(out.reshape(s, b, -1, self.head_dim), query_heads).flatten(2)  # [s, b, nq/tp * d]
        if query_heads is None:
            return self.linear_proj(out)  # [s, b, h]
        return self.linear_proj(out, cols=_unit_elements(query_heads, self.head_dim))

    def _rotary_angles(self, s: int, device, dtype, inference_cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[s, 1, 1, r]` at the positions of this rank's `s` tokens."""
        if self.context_parallel is not None:  # this rank's tokens sit at load-balanced global positions
            cos, sin = self.rotary(s * self.context_parallel.size, device, dtype)
            positions = self.context_parallel.positions(s, device)
            return cos[positions], sin[positions]
        if inference_cache is None:
            return self.rotary(s, device, dtype)
        # positions offset .. offset + s - 1 (one cos/sin table for the whole generation)
        cos, sin = self.rotary(inference_cache.max_length, device, dtype)
        return tuple(t[inference_cache.offset:inference_cache.offset + s] for t in (cos, sin))

    def _qkv(self, x: torch.Tensor, inference_cache, heads: torch.Tensor | None):
        """q `[s, b, nq/tp, d]`, k and v `[s, b, g/tp, d]` of every local group, or of the groups `heads`."""
        group_width = (self.heads_per_group + 2) * self.head_dim  # a group's q heads, k, v
        if heads is None:
            qkv = self.linear_qkv(x)  # [s, b, (nq + 2g) d / tp]
        else:
            qkv = self.linear_qkv(x, rows=_unit_elements(heads, group_width))  # [s, b, len(heads) * group_width]
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, qkv.shape[-1] // group_width, self.heads_per_group + 2, self.head_dim)
        if self.rotary is None:
            return split_qkv(qkv)
        return split_qkv(qkv, *self._rotary_angles(s, qkv.device, qkv.dtype, inference_cache))

    def _qkv_of_query_heads(self, x: torch.Tensor, query_heads: torch.Tensor):
        """q `[s, b, kept, d]` of the query heads `query_heads`, and k, v `[s, b, kept, d]`: each one's group's."""
        num_groups = self.linear_qkv.weight.shape[0] // ((self.heads_per_group + 2) * self.head_dim)  # local
        rows = qkv_rows_of_query_heads(query_heads, num_groups, self.heads_per_group, self.head_dim)
        qkv = self.linear_qkv(x, rows=rows)  # [s, b, (kept + 2 g/tp) d]: kept q ; every k ; every v
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, -1, self.head_dim)
        kept = query_heads.numel()
        qk = qkv[:, :, :kept + num_groups]
        if self.rotary is not None:
            qk = apply_rotary(qk, *self._rotary_angles(s, qkv.device, qkv.dtype))
        group_of_head = query_heads // self.heads_per_group
        k = qk[:, :, kept:].index_select(2, group_of_head)  # [s, b, kept, d]
        v = qkv[:, :, kept + num_groups:].index_select(2, group_of_head)
        return qk[:, :, :kept], k, v

    def _cached_attention(self, q, k, v, inference_cache, dropout: float) -> torch.Tensor:
        """SDPA over the KV cache (generation), on every backend: q `[b, nq/tp, s, d]` attends to the cached
        positions and its own; k/v `[b, g/tp, s, d]` are appended to the cache."""
        mask = inference_cache.causal_mask(q.shape[2], q.device)
        k, v = inference_cache.update(self, k, v)  # [b, g/tp, offset + s, d]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=self.heads_per_group > 1
        )  # [b, nq/tp, s, d]


def split_qkv(qkv: torch.Tensor, cos: torch.Tensor | None = None,
              sin: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused QKV output `[s, b, g, hpg + 2, d]` (per group: its hpg q heads, k, v) -> q `[s, b, g * hpg, d]`,
    k and v `[s, b, g, d]`, q and k rotated if RoPE's cos/sin `[s, 1, 1, r]` are given.

    Eager: one pass writes them into new tensors laid out as `[b, heads, s, d]` in memory (what SDPA reads
    fastest: its `permute(1, 2, 0, 3)` is contiguous), and the backward writes their gradients straight into
    one QKV gradient (slicing would give autograd a zero-filled QKV-sized buffer per slice to add up). Under
    `torch.compile`: plain slicing and `rotary_reference`, which the compiler fuses."""
    if not torch.compiler.is_compiling():
        return _SplitQKV.apply(qkv, *((None, None) if cos is None else halves(cos, sin)))
    s, b, d = qkv.shape[0], qkv.shape[1], qkv.shape[-1]
    qk = qkv[:, :, :, :-1] if cos is None else rotary_reference(qkv[:, :, :, :-1], cos.unsqueeze(2), sin.unsqueeze(2))
    return qk[:, :, :, :-1].reshape(s, b, -1, d), qk[:, :, :, -1], qkv[:, :, :, -1]


class _SplitQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin):
        s, b, g, slots, d = qkv.shape
        ctx.save_for_backward(cos, sin)
        ctx.qkv_shape = qkv.shape
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zero-filled tensor)

        def sbhd_view_of_bhsd(*heads):  # [s, b, *heads, d] view of [b, *heads, s, d] memory
            return torch.empty((b, *heads, s, d), dtype=qkv.dtype, device=qkv.device).movedim(-2, 0)

        q, k, v = sbhd_view_of_bhsd(g, slots - 2), sbhd_view_of_bhsd(g), sbhd_view_of_bhsd(g)
        for source, target, angles in _qk_parts(qkv, q, k, cos, sin):
            _rotate_or_copy(source, target, angles, inverse=False)
        v.copy_(qkv[:, :, :, -1])
        return q.flatten(2, 3), k, v  # q's group and head dims merge: a view

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        if grad_q is None and grad_k is None and grad_v is None:
            return None, None, None
        cos, sin = ctx.saved_tensors
        like = next(t for t in (grad_q, grad_k, grad_v) if t is not None)
        grad = torch.empty(ctx.qkv_shape, dtype=like.dtype, device=like.device)
        grad_q = grad_q.unflatten(2, (grad.shape[2], grad.shape[3] - 2)) if grad_q is not None else None
        for target, source, angles in _qk_parts(grad, grad_q, grad_k, cos, sin):
            if source is None:
                target.zero_()
            else:
                _rotate_or_copy(source, target, angles, inverse=True)
        if grad_v is None:
            grad[:, :, :, -1].zero_()
        else:
            grad[:, :, :, -1].copy_(grad_v)
        return grad, None, None


def _qk_parts(qkv, q, k, cos, sin):
    """(QKV's q slice, q, angles for it), (QKV's k slice, k, angles): cos/sin broadcast to each (or None)."""
    q_angles = None if cos is None else (cos.unsqueeze(2), sin.unsqueeze(2))
    k_angles = None if cos is None else (cos, sin)
    return ((qkv[:, :, :, :-2], q, q_angles), (qkv[:, :, :, -2], k, k_angles))


def _rotate_or_copy(source, target, angles, inverse: bool) -> None:
    if angles is None:
        target.copy_(source)
    else:
        rotate_into(source, *angles, target, inverse=inverse)


def query_rows(query_heads: torch.Tensor, heads_per_group: int, head_dim: int) -> torch.Tensor:
    """The local QKV output rows of these local query heads' q projections (the per-group layout above)."""
    return _unit_elements(_query_slots(query_heads, heads_per_group), head_dim)


def qkv_rows_of_query_heads(query_heads: torch.Tensor, num_groups: int, heads_per_group: int,
                            head_dim: int) -> torch.Tensor:
    """QKV output rows for query-head omission: the q rows of `query_heads`, then the k rows and the v rows of
    every one of the `num_groups` local groups."""
    k_slots = torch.arange(num_groups, device=query_heads.device) * (heads_per_group + 2) + heads_per_group
    q_slots = _query_slots(query_heads, heads_per_group)
    return _unit_elements(torch.cat([q_slots, k_slots, k_slots + 1]), head_dim)


def _query_slots(query_heads: torch.Tensor, heads_per_group: int) -> torch.Tensor:
    """Where each query head's q sits in QKV's output, in units of head_dim rows."""
    return query_heads // heads_per_group * (heads_per_group + 2) + query_heads % heads_per_group


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

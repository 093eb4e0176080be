"""Rotary position embeddings, non-interleaved ("rotate half") as in Hugging Face `modeling_llama`:
the head dim is split into halves `[x1 ; x2]` that rotate as pairs `(x1[i], x2[i])` at frequency
`base^(-2i/d)`. cos/sin are computed in float32 for positions `0..s-1` and cached per (s, device, dtype).
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # not a buffer: not checkpointed

    def forward(
        self, seq_len: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape `[s, 1, 1, d]` (broadcast over batch and heads)."""
        key = (seq_len, device, dtype)
        if key not in self._cache:
            even = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
            inv_freq = 1.0 / (self.base ** (even / self.head_dim))  # [d/2]
            positions = torch.arange(seq_len, dtype=torch.float32, device=device)
            freqs = torch.outer(positions, inv_freq)  # [s, d/2]
            angles = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # [s, 1, 1, d]
            self._cache[key] = (angles.cos().to(dtype), angles.sin().to(dtype))
        return self._cache[key]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [s, b, n, d]` by the angles of its position (cos/sin `[s, 1, 1, r]`): the first r dims of
    each head (r < d with Megatron's --rotary-percent), the rest pass through."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rotated, rest = x[..., :r], x[..., r:]
    return torch.cat((rotated * cos + rotate_half(rotated) * sin, rest), dim=-1)

"""Rotary position embeddings, non-interleaved ("rotate half") as in Hugging Face `modeling_llama`:
the head dim is split into halves `[x1 ; x2]` that rotate as pairs `(x1[i], x2[i])` at frequency
`base^(-2i/d)`. cos/sin are computed in float32 for positions `0..s-1` and cached per (s, device, dtype).

`apply_rotary` is the textbook `x cos + rotate_half(x) sin`, written pair-wise into one output buffer
(`rotate_into`: `x1 c - x2 s ; x2 c + x1 s`, backward: the rotation by minus the angle) so eager mode does
not pay for `rotate_half`'s negation and concatenation and their backward (attention's `split_qkv` rotates
the fused QKV output the same way). Under `torch.compile` the textbook form is traced instead (the compiler
fuses it itself).
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


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The textbook form of `apply_rotary` (what the compiler traces)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rotated, rest = x[..., :r], x[..., r:]
    return torch.cat((rotated * cos + rotate_half(rotated) * sin, rest), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [s, b, n, d]` by the angles of its position (cos/sin `[s, 1, 1, r]`): the first r dims of
    each head (r < d with Megatron's --rotary-percent), the rest pass through. Returns a new contiguous
    tensor."""
    if torch.compiler.is_compiling():
        return rotary_reference(x, cos, sin)
    return _Rotary.apply(x, *halves(cos, sin))


def halves(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables hold each angle twice (`cat(freqs, freqs)`): the first half is every pair's angle."""
    half = cos.shape[-1] // 2
    return cos[..., :half], sin[..., :half]


def rotate_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, inverse: bool) -> None:
    """out <- x with its pairs (x1[i], x2[i]) of the first 2 r' dims rotated by the angles (cos/sin `[..., r']`,
    broadcast against x), by minus the angles if `inverse`; dims past 2 r' copied."""
    r = cos.shape[-1]
    x1, x2, o1, o2 = x[..., :r], x[..., r:2 * r], out[..., :r], out[..., r:2 * r]
    sign = 1 if inverse else -1
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=sign)  # x1 c - x2 s (inverse: + x2 s)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin, value=-sign)  # x2 c + x1 s (inverse: - x1 s)
    if 2 * r < x.shape[-1]:
        out[..., 2 * r:] = x[..., 2 * r:]


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rotate_into(x, cos, sin, out, inverse=False)
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        grad_x = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        rotate_into(grad, cos, sin, grad_x, inverse=True)
        return grad_x, None, None

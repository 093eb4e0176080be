"""Rotary position embeddings, non-interleaved ("rotate half") as in Hugging Face `modeling_llama`:
the head dim is split into halves `[x1 ; x2]` that rotate as pairs `(x1[i], x2[i])` at frequency
`base^(-2i/d)`. cos/sin are computed in float32 for positions `0..s-1` and cached per (s, device, dtype).

`apply_rotary` is the textbook `x cos + rotate_half(x) sin`, written pair-wise into one output buffer
(`x1 c - x2 s ; x2 c + x1 s`, backward: the rotation by minus the angle) so eager mode does not pay for
`rotate_half`'s negation and concatenation and their backward; `split_qkv_rotary` does the same for the
fused QKV output, writing q, k, v straight into the `[b, heads, s, d]` memory layout attention reads fastest
(one pass instead of rotate-then-copy; the rotation's inner loops run along the sequence) and their
gradients straight into one QKV gradient (no per-slice zero-filled buffers). Under `torch.compile` the textbook form is traced instead
(the compiler fuses it itself).
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
    return _Rotary.apply(x, *_halves(cos, sin))


def split_qkv_rotary(qkv: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused QKV output `[s, b, g, hpg + 2, d]` (per group: its hpg q heads, k, v) -> q `[s, b, g * hpg, d]`
    and k `[s, b, g, d]` rotated (cos/sin `[s, 1, 1, r]`), v `[s, b, g, d]`: views of new tensors laid out as
    `[b, heads, s, d]` in memory, the layout SDPA reads fastest (its `permute(1, 2, 0, 3)` is contiguous)."""
    s, b, g, slots, d = qkv.shape
    if torch.compiler.is_compiling():
        qk = rotary_reference(qkv[:, :, :, :-1], cos.unsqueeze(2), sin.unsqueeze(2))
        return qk[:, :, :, :-1].reshape(s, b, -1, d), qk[:, :, :, -1], qkv[:, :, :, -1]
    return _SplitQKVRotary.apply(qkv, *_halves(cos, sin))


def _halves(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables hold each angle twice (`cat(freqs, freqs)`): the first half is every pair's angle."""
    half = cos.shape[-1] // 2
    return cos[..., :half], sin[..., :half]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, inverse: bool) -> None:
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
        _rotate(x, cos, sin, out, inverse=False)
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        grad_x = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        _rotate(grad, cos, sin, grad_x, inverse=True)
        return grad_x, None, None


class _SplitQKVRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin):
        s, b, g, slots, d = qkv.shape
        ctx.save_for_backward(cos, sin)
        ctx.qkv_shape = qkv.shape
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zero-filled tensor)

        def sbhd_view_of_bhsd(*heads):  # [s, b, *heads, d] view of [b, *heads, s, d] memory
            memory = torch.empty((b, *heads, s, d), dtype=qkv.dtype, device=qkv.device)
            return memory.movedim(-2, 0)

        q, k, v = sbhd_view_of_bhsd(g, slots - 2), sbhd_view_of_bhsd(g), sbhd_view_of_bhsd(g)
        _rotate(qkv[:, :, :, :-2], cos.unsqueeze(2), sin.unsqueeze(2), q, inverse=False)
        _rotate(qkv[:, :, :, -2], cos, sin, k, inverse=False)
        v.copy_(qkv[:, :, :, -1])
        return q.flatten(2, 3), k, v  # q's group and head dims merge: a view

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        s, b, g, slots, d = ctx.qkv_shape
        ref = next((t for t in (grad_q, grad_k, grad_v) if t is not None), None)
        if ref is None:
            return None, None, None
        grad = torch.empty(ctx.qkv_shape, dtype=ref.dtype, device=ref.device)
        for part, (cos_, sin_, view) in ((grad_q, (cos.unsqueeze(2), sin.unsqueeze(2), grad[:, :, :, :-2])),
                                        (grad_k, (cos, sin, grad[:, :, :, -2]))):
            if part is None:
                view.zero_()
            else:
                _rotate(part.reshape(view.shape), cos_, sin_, view, inverse=True)
        if grad_v is None:
            grad[:, :, :, -1].zero_()
        else:
            grad[:, :, :, -1].copy_(grad_v)
        return grad, None, None

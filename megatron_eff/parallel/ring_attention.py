"""Ring attention: causal attention of this CP rank's queries over the whole sequence, the key/value blocks
travelling around the CP group with point-to-point sends (Megatron-LM's `--cp-comm-type p2p`).

    out = ring_attention(q, k, v, q_positions, block_positions, group)   # SDPA layout, see below

Forward: at step i (of cp) rank r holds the K/V block of rank (r − i) mod cp; it posts the send of that block
to rank r+1 and the receive of the next one from rank r−1 (`dist.batch_isend_irecv`, which gloo runs too),
attends to the block it holds while they travel, and merges the block's result into a running output with
the online softmax (running row maximum m, denominator l, unnormalised output o), as FlashAttention does.
Only the K/V of one block are held at a time besides the local ones. The causal mask compares global
positions (the load-balanced chunks of `parallel/context_parallel.py`); a block no query of this rank may
see (all its keys later than all queries) is skipped.

Backward (written out, since autograd cannot differentiate through the ring): the same ring again, each
block travelling with its gradient accumulators dK, dV. With the saved log-sum-exp L = m + log l and
D = rowsum(dO ∘ O): P = exp(S − L), dV += Pᵀ dO, dS = P ∘ (dO Vᵀ − D), dQ += dS K · scale,
dK += dSᵀ Q · scale. After cp steps and one more hop every block is back at its owner with the gradient of
every rank's queries summed in.

Shapes (SDPA layout): q `[b, nq, s/cp, d]`; k, v `[b, g, s/cp, d]` with GQA (nq = g · heads per group; the
block is broadcast over a group's query heads, and its gradients summed back); q_positions `[s/cp]`;
block_positions `[cp, s/cp]` (rank j's positions in row j). Scores are computed in float32 or better.
Attention dropout is not supported (the config refuses it with p2p).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _expand(kv: torch.Tensor, heads_per_group: int) -> torch.Tensor:
    """`[b, g, s, d]` -> `[b, g * hpg, s, d]` (each group's block repeated for its query heads)."""
    return kv if heads_per_group == 1 else kv.repeat_interleave(heads_per_group, dim=1)


def _fold(grad: torch.Tensor, heads_per_group: int) -> torch.Tensor:
    """Inverse of `_expand` for gradients: `[b, g * hpg, s, d]` -> `[b, g, s, d]` summed over the group's heads."""
    if heads_per_group == 1:
        return grad
    b, h, s, d = grad.shape
    return grad.view(b, h // heads_per_group, heads_per_group, s, d).sum(dim=2)


class _Ring:
    """Send a list of tensors to the next CP rank and receive the same shapes from the previous one."""

    def __init__(self, group):
        self.group = group
        ranks = dist.get_process_group_ranks(group)
        me = ranks.index(dist.get_rank())
        self.next, self.prev = ranks[(me + 1) % len(ranks)], ranks[(me - 1) % len(ranks)]
        self.size, self.rank = len(ranks), me

    def start(self, tensors: list[torch.Tensor]):
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in received]
        return dist.batch_isend_irecv(ops), received

    @staticmethod
    def wait(pending) -> list[torch.Tensor]:
        handles, received = pending
        for handle in handles:
            handle.wait()
        return received


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Masked scaled scores `[b, nq, s_q, s_k]` in float32 or better (-inf where a query may not attend)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    return s.masked_fill(~mask, float("-inf"))


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, block_pos, group):
        ring = _Ring(group)
        hpg = q.shape[1] // k.shape[1]
        scale = 1.0 / math.sqrt(q.shape[-1])
        dtype = torch.promote_types(q.dtype, torch.float32)
        b, h, s_q, d = q.shape
        m = torch.full((b, h, s_q, 1), float("-inf"), dtype=dtype, device=q.device)
        denom = torch.zeros((b, h, s_q, 1), dtype=dtype, device=q.device)
        acc = torch.zeros((b, h, s_q, v.shape[-1]), dtype=dtype, device=q.device)
        block = [k, v]
        for step in range(ring.size):
            pending = ring.start(block) if step < ring.size - 1 else None
            mask = q_pos[:, None] >= block_pos[(ring.rank - step) % ring.size][None, :]
            if mask.any():
                scores = _scores(q, _expand(block[0], hpg), mask, scale)
                m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
                m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with no key yet
                p = torch.exp(scores - m_safe)
                correction = torch.exp(m - m_safe)
                denom = denom * correction + p.sum(dim=-1, keepdim=True)
                acc = acc * correction + torch.matmul(p, _expand(block[1], hpg).to(dtype))
                m = m_new
            if pending is not None:
                block = ring.wait(pending)
        out = acc / denom  # every query sees at least its own position: denom > 0
        lse = m + torch.log(denom)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, block_pos)
        ctx.ring, ctx.scale = ring, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, q_pos, block_pos = ctx.saved_tensors
        ring, scale = ctx.ring, ctx.scale
        hpg = q.shape[1] // k.shape[1]
        dtype = out.dtype
        grad_out = grad_out.to(dtype)
        delta = (grad_out * out).sum(dim=-1, keepdim=True)  # D = rowsum(dO * O)
        dq = torch.zeros_like(q, dtype=dtype)
        block = [k, v, torch.zeros_like(k, dtype=dtype), torch.zeros_like(v, dtype=dtype)]
        for step in range(ring.size):
            mask = q_pos[:, None] >= block_pos[(ring.rank - step) % ring.size][None, :]
            if mask.any():
                k_blk, v_blk = _expand(block[0], hpg).to(dtype), _expand(block[1], hpg).to(dtype)
                p = torch.exp(_scores(q, k_blk, mask, scale) - lse)  # the forward's probabilities
                block[3] = block[3] + _fold(torch.matmul(p.transpose(-1, -2), grad_out), hpg)
                ds = p * (torch.matmul(grad_out, v_blk.transpose(-1, -2)) - delta)
                dq = dq + torch.matmul(ds, k_blk) * scale
                block[2] = block[2] + _fold(torch.matmul(ds.transpose(-1, -2), q.to(dtype)) * scale, hpg)
            if step < ring.size - 1:  # pass the block on with its accumulated gradients
                block = ring.wait(ring.start(block))
        dk, dv = ring.wait(ring.start(block[2:]))  # the last hop brings each block's gradients home
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
                   block_positions: torch.Tensor, group) -> torch.Tensor:
    """Causal attention `[b, nq, s/cp, d]` of the local queries over every CP rank's K/V (module docstring)."""
    return RingAttention.apply(q, k, v, q_positions, block_positions, group)

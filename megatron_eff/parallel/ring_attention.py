"""Ring attention: causal attention of this CP rank's queries over the whole sequence, the key/value blocks
travelling around the CP group with point-to-point sends (Megatron-LM's `--cp-comm-type p2p`).

    out = ring_attention(q, k, v, q_positions, block_positions, group)   # SDPA layout, see below

Forward: at step i (of cp) rank r holds the K/V block of rank (r − i) mod cp; it posts the send of that block
to rank r+1 and the receive of the next one from rank r−1 (`dist.batch_isend_irecv`, which gloo runs too),
attends to the block it holds while they travel, and merges the block's (output, log-sum-exp) into the
running ones (online softmax, as FlashAttention and Megatron-LM's ring do). Only the K/V of one block are
held at a time besides the local ones. The causal mask compares global positions (the load-balanced chunks
of `parallel/context_parallel.py`); of each block only the query rows that see some key and the keys some
row sees are computed, which with load-balanced chunks leaves an all-visible rectangle or the causal
triangle of the rank's own block: no masked-out work, as in Megatron-LM.

Backward (written out, since autograd cannot differentiate through the ring): the same ring again, each
block travelling with its gradient accumulators dK, dV; each block's gradients follow from the whole
attention's output O and log-sum-exp L (FlashAttention's backward). After cp steps and one more hop every
block is back at its owner with the gradient of every rank's queries summed in.

Block kernels: on CPU PyTorch's flash-attention kernels, which return L and take O and L back for the
backward (`aten::_scaled_dot_product_flash_attention_for_cpu[_backward]`); elsewhere plain matmuls in float32
or better (`_block_forward`, `_block_backward`).

Shapes (SDPA layout): q `[b, nq, s/cp, d]`; k, v `[b, g, s/cp, d]` with GQA (nq = g · heads per group; the
block is broadcast over a group's query heads, and its gradients summed back); q_positions `[s/cp]`;
block_positions `[cp, s/cp]` (rank j's positions in row j). Attention dropout is not supported (the config
refuses it with p2p).
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


def _select(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """(query rows, key columns, mask of that sub-block or None, causal) of the part of a block that attends:
    rows with a visible key and keys some row sees. With load-balanced chunks a block is all-visible
    (an earlier chunk), causal (the rank's own) or, cut down like this, all-visible again."""
    rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
    sub = mask.index_select(0, rows).index_select(1, cols)
    if bool(sub.all()):
        return rows, cols, None, False
    if sub.shape[0] == sub.shape[1] and torch.equal(sub, torch.ones_like(sub).tril()):
        return rows, cols, None, True
    return rows, cols, sub, False


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`t` at the sorted sequence positions `index` (dim 2); no copy when `index` is all of them."""
    return t if index.numel() == t.shape[2] else t.index_select(2, index)


def _block_forward(q, k, v, mask, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q kᵀ·scale) v, logsumexp of the scores) of one sub-block, all rows seeing a key; q `[b, h, sq, d]`,
    k/v `[b, h, sk, d]`; the log-sum-exp `[b, h, sq]` in float32 or better."""
    if _fused(q):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale)
    scores = _scores(q, k, mask, causal, scale)
    lse = scores.logsumexp(dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v.to(scores.dtype)).to(q.dtype), lse


def _block_backward(grad_out, q, k, v, out, lse, mask, causal: bool, scale: float):
    """(dq, dk, dv) of one sub-block given the *whole* attention's output and log-sum-exp for its rows (the
    FlashAttention backward: P = exp(S − L), dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)))."""
    if _fused(q):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), 0.0, causal,
            attn_mask=_additive(mask, q.dtype), scale=scale)
    dtype = lse.dtype
    grad_out, out = grad_out.to(dtype), out.to(dtype)
    p = torch.exp(_scores(q, k, mask, causal, scale) - lse[..., None])
    ds = p * (torch.matmul(grad_out, v.to(dtype).transpose(-1, -2)) - (grad_out * out).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k.to(dtype)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(dtype)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), torch.matmul(p.transpose(-1, -2), grad_out).to(v.dtype)


USE_CPU_FLASH_KERNELS = True  # False: the matmul blocks on CPU too (the tests run both)


def _fused(q: torch.Tensor) -> bool:
    """PyTorch's CPU flash-attention kernels return the log-sum-exp a ring needs (and take it back in
    backward); elsewhere the blocks are computed with plain matmuls."""
    return (USE_CPU_FLASH_KERNELS and q.device.type == "cpu"
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _scores(q, k, mask, causal: bool, scale: float) -> torch.Tensor:
    """Masked scaled scores `[b, h, sq, sk]` in float32 or better (-inf where a query may not attend)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, block_pos, group):
        ring = _Ring(group)
        hpg = q.shape[1] // k.shape[1]
        scale = 1.0 / math.sqrt(q.shape[-1])
        b, h, s_q, _ = q.shape
        lse = torch.full((b, h, s_q), float("-inf"), dtype=torch.promote_types(q.dtype, torch.float32),
                         device=q.device)
        out = torch.zeros((b, h, s_q, v.shape[-1]), dtype=lse.dtype, device=q.device)
        block, selections = [k, v], []
        for step in range(ring.size):
            pending = ring.start(block) if step < ring.size - 1 else None
            mask = q_pos[:, None] >= block_pos[(ring.rank - step) % ring.size][None, :]
            selections.append(_select(mask) if mask.any() else None)  # reused by backward
            if selections[-1] is not None:  # merge this block's rows into the running output (online softmax)
                rows, cols, sub, causal = selections[-1]
                k_blk, v_blk = (_take(_expand(t, hpg), cols) for t in block)
                out_blk, lse_blk = _block_forward(_take(q, rows), k_blk, v_blk, sub, causal, scale)
                lse_old = _take(lse, rows)
                lse_new = torch.logaddexp(lse_old, lse_blk.to(lse.dtype))
                merged = (_take(out, rows) * torch.exp(lse_old - lse_new)[..., None]
                          + out_blk.to(out.dtype) * torch.exp(lse_blk - lse_new)[..., None])
                out.index_copy_(2, rows, merged)
                lse.index_copy_(2, rows, lse_new)
            if pending is not None:
                block = ring.wait(pending)
        out = out.to(q.dtype)  # every query sees at least its own position: lse is finite
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.scale, ctx.selections = ring, scale, selections
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale = ctx.ring, ctx.scale
        hpg = q.shape[1] // k.shape[1]
        dq = torch.zeros_like(q)
        block = [k, v, torch.zeros_like(k), torch.zeros_like(v)]
        for step, selection in enumerate(ctx.selections):
            if selection is not None:
                rows, cols, sub, causal = selection
                k_blk, v_blk = (_take(_expand(t, hpg), cols) for t in block[:2])
                dq_blk, dk_blk, dv_blk = _block_backward(
                    _take(grad_out, rows), _take(q, rows), k_blk, v_blk, _take(out, rows), _take(lse, rows), sub,
                    causal, scale)
                dq.index_add_(2, rows, dq_blk)
                block[2] = block[2].index_add(2, cols, _fold(dk_blk, hpg))
                block[3] = block[3].index_add(2, cols, _fold(dv_blk, hpg))
            if step < ring.size - 1:  # pass the block on with its accumulated gradients
                block = ring.wait(ring.start(block))
        dk, dv = ring.wait(ring.start(block[2:]))  # the last hop brings each block's gradients home
        return dq, dk, dv, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
                   block_positions: torch.Tensor, group) -> torch.Tensor:
    """Causal attention `[b, nq, s/cp, d]` of the local queries over every CP rank's K/V (module docstring)."""
    return RingAttention.apply(q, k, v, q_positions, block_positions, group)

"""Vocab-parallel cross entropy: each TP rank holds logits for its slice of the vocabulary; the max,
the softmax denominator and the target logit are all-reduced, so no rank ever builds full-vocab logits.

With one rank it is `F.cross_entropy` (per token, no reduction).

`chunk_tokens` (`--cross-entropy-loss-fusion`): the same loss and gradient, computed `chunk_tokens` tokens at
a time. Only the logits (in the model's dtype) and one float32 log-sum-exp per token are kept for backward,
which recomputes each chunk's softmax; the full-size float32 copies the plain path makes (the upcast, the
shifted logits, their exponentials, the saved softmax) never exist — at most one chunk of them does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_eff.dtypes import upcast
from megatron_eff.parallel.state import group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group):
        # logits [..., v/tp] (float32, or float64 for a float64 model), target [...] global ids
        logits = upcast(logits)
        max_logit = logits.max(dim=-1).values
        dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=group)
        logits = logits - max_logit.unsqueeze(-1)

        per_rank = logits.shape[-1]
        start = dist.get_rank(group) * per_rank
        outside = (target < start) | (target >= start + per_rank)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=group)

        exp_logits = logits.exp()
        sum_exp = exp_logits.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target_logit

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax  # d loss / d logits = softmax - onehot(target), in place: no [N, v/tp] one-hot
        inside = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -inside)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None


def _all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> None:
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


class _ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group, chunk_tokens: int):
        per_rank = logits.shape[-1]
        flat, flat_target = logits.reshape(-1, per_rank), target.reshape(-1)
        start = dist.get_rank(group) * per_rank if group_size(group) > 1 else 0
        outside = (flat_target < start) | (flat_target >= start + per_rank)
        local_target = (flat_target - start).masked_fill(outside, 0)
        dtype = upcast(flat[:0]).dtype  # float32, or float64 for a float64 model
        lse = torch.empty(flat.shape[0], dtype=dtype, device=flat.device)
        target_logit = torch.empty_like(lse)
        for lo in range(0, flat.shape[0], chunk_tokens):
            hi = min(lo + chunk_tokens, flat.shape[0])
            chunk = upcast(flat[lo:hi])
            max_logit = chunk.max(dim=-1).values
            _all_reduce(max_logit, group, dist.ReduceOp.MAX)
            sum_exp = (chunk - max_logit.unsqueeze(-1)).exp_().sum(dim=-1)
            _all_reduce(sum_exp, group)
            lse[lo:hi] = sum_exp.log_().add_(max_logit)
            target_logit[lo:hi] = chunk.gather(-1, local_target[lo:hi].unsqueeze(-1)).squeeze(-1)
        target_logit.masked_fill_(outside, 0.0)
        _all_reduce(target_logit, group)
        ctx.save_for_backward(logits, local_target, outside, lse)
        ctx.chunk_tokens = chunk_tokens
        return (lse - target_logit).view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, local_target, outside, lse = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        grad = torch.empty_like(flat)
        grad_loss = grad_loss.reshape(-1)
        inside = (~outside).to(lse.dtype)
        for lo in range(0, flat.shape[0], ctx.chunk_tokens):
            hi = min(lo + ctx.chunk_tokens, flat.shape[0])
            softmax = (upcast(flat[lo:hi]) - lse[lo:hi].unsqueeze(-1)).exp_()  # d loss / d logits = softmax
            softmax.scatter_add_(-1, local_target[lo:hi].unsqueeze(-1), -inside[lo:hi].unsqueeze(-1))  # - onehot
            grad[lo:hi] = softmax.mul_(grad_loss[lo:hi].unsqueeze(-1))
        return grad.view_as(logits), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None,
                                 chunk_tokens: int | None = None) -> torch.Tensor:
    """Per-token loss `[...]` from vocab-sharded logits `[..., v/tp]` and global target ids `[...]`;
    `chunk_tokens` computes it a chunk of tokens at a time (module docstring)."""
    if chunk_tokens:
        return _ChunkedVocabParallelCrossEntropy.apply(logits, target, tp_group, chunk_tokens)
    if group_size(tp_group) == 1:
        return F.cross_entropy(upcast(logits).flatten(0, -2), target.flatten(), reduction="none").view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group)

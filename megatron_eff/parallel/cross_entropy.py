"""Vocab-parallel cross entropy: each TP rank holds logits for its slice of the vocabulary; the max,
the softmax denominator and the target logit are all-reduced, so no rank ever builds full-vocab logits.

With one rank it is `F.cross_entropy` (per token, no reduction).
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


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Per-token loss `[...]` from vocab-sharded logits `[..., v/tp]` and global target ids `[...]`."""
    if group_size(tp_group) == 1:
        return F.cross_entropy(upcast(logits).flatten(0, -2), target.flatten(), reduction="none").view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group)

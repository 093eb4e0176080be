"""The training side of the loss contract: method loss terms on any pipeline stage, and the iteration's loss.

Auxiliary terms (`Method.loss_terms`) are attached to a chunk's output with `attach_aux_loss`, Megatron's
`MoEAuxLossAutoScaler` idea: the forward value is unchanged, and the backward that reaches the output also
sends `scale` into the terms, so they train on whatever stage computed them without travelling through
the pipeline. `scale` weights them like one micro-batch of the LM loss (`aux_loss_scale`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_eff.parallel.state import ParallelState, communication_device


class _AuxLossScaler(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


def attach_aux_loss(output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
    """`output`, with `aux_loss` (a scalar) receiving gradient `scale` when backward passes through it."""
    return _AuxLossScaler.apply(output, aux_loss, scale)


def aux_loss_scale(loss_scale: float, num_micro_batches: int, per_token_loss: bool,
                   tokens_per_micro_batch: int) -> float:
    """The backward weight of an auxiliary term computed once per micro-batch: 1/M of the (scaled) loss, as
    the LM loss's token mean. With per-token loss the gradients are later divided by the global token count
    over DP (the data-parallel all-reduce averages), so the term is weighted by the nominal tokens of one
    micro-batch instead, which gives the same 1/M when every token counts."""
    if per_token_loss:
        return loss_scale * tokens_per_micro_batch
    return loss_scale / num_micro_batches


def iteration_loss_tensor(results: list, pstate: ParallelState, per_token_loss: bool = False) -> torch.Tensor:
    """[loss, global token count] of an iteration from the schedule's per-micro-batch results, float64 on the
    communication device and the same on every rank, without reading it on the host: the mean of the
    micro-batches' token means over micro-batches and DP ranks (what the default backward optimises), or with
    `per_token_loss` the global token mean."""
    device = communication_device()
    if results:
        sums = torch.stack([r.loss_sum for r in results]).to(device, torch.float64)
        tokens = torch.stack([r.num_tokens for r in results]).to(device, torch.float64)
        value = (sums / tokens.clamp(min=1)).mean() if not per_token_loss else sums.sum()
        count = tokens.sum()
    else:
        value = count = torch.zeros((), dtype=torch.float64, device=device)
    both = torch.stack([value, count])
    if pstate.grad_group is not None and pstate.grad_size > 1:  # DP (x CP: see parallel/context_parallel.py)
        dist.all_reduce(both, group=pstate.grad_group)
    if pstate.pp_size > 1:
        dist.broadcast(both, src=pstate.pp_ranks[-1], group=pstate.pp_group)
    value, count = both.unbind()
    return torch.stack([value / count.clamp(min=1) if per_token_loss else value / pstate.grad_size, count])


def iteration_loss(results: list, pstate: ParallelState, per_token_loss: bool = False) -> tuple[float, float]:
    """`iteration_loss_tensor`, read on the host: (loss, global token count)."""
    value, count = iteration_loss_tensor(results, pstate, per_token_loss).tolist()
    return value, count


def per_domain_losses(results: list, pstate: ParallelState, names: list[str]) -> dict[str, float]:
    """{domain name: token-mean loss} from per-sample reports carrying `dataset_id` (last stage), reduced over
    DP and broadcast over the pipeline; domains without tokens are left out."""
    device = communication_device()
    totals = torch.zeros(2, len(names), dtype=torch.float64, device=device)
    for r in results:
        ids = r.report["dataset_id"].to(device).long()
        totals[0].index_add_(0, ids, r.report["sample_loss_sum"].to(device, torch.float64))
        totals[1].index_add_(0, ids, r.report["sample_tokens"].to(device, torch.float64))
    if pstate.grad_group is not None and pstate.grad_size > 1:  # CP ranks report their own positions' sums
        dist.all_reduce(totals, group=pstate.grad_group)
    if pstate.pp_size > 1:
        dist.broadcast(totals, src=pstate.pp_ranks[-1], group=pstate.pp_group)
    return {name: s / n for name, s, n in zip(names, totals[0].tolist(), totals[1].tolist()) if n > 0}

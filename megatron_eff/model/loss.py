"""The language model's side of the pipeline loss contract (`parallel/pipeline.py`).

    output, loss_func = lm_forward_step(chunk, batch, input_tensor)
    loss_sum, num_tokens, report = loss_func(output)        # on the chunk with the output layer

`loss_mask` (float `[b, s]`, 1 where a token counts) weights the per-token cross entropy; without one every
token counts. The report holds, per sample, the loss sum and the token count, and the sample's
`dataset_id` when the batch has one: enough for per-sample scores (coresets) and per-domain losses.

With context parallelism the step runs on this rank's positions of the micro-batch
(`ContextParallel.split_batch`) and the loss covers the CP group's tokens (`ContextParallel.loss`); the
report stays this rank's (its sums add up over the data x context-parallel group).
"""

from __future__ import annotations

import functools

import torch

from megatron_eff.dtypes import upcast


def lm_forward_step(model, batch: dict[str, torch.Tensor], input_tensor: torch.Tensor | None):
    """Run one model chunk on one micro-batch: (hidden states or per-token losses, loss function or None)."""
    context_parallel = getattr(model, "context_parallel", None)
    if context_parallel is not None:
        batch = context_parallel.split_batch(batch)
    out = model(tokens=batch["tokens"] if model.pre_process else None,
                labels=batch["labels"] if model.post_process else None, input_tensor=input_tensor)
    if not model.post_process:
        return out, None
    if context_parallel is not None:
        return out, functools.partial(_context_parallel_loss, batch=batch, context_parallel=context_parallel)
    return out, functools.partial(masked_lm_loss, batch=batch)


def _context_parallel_loss(token_losses: torch.Tensor, batch: dict[str, torch.Tensor], context_parallel):
    loss_sum, num_tokens, report = masked_lm_loss(token_losses, batch)
    return (*context_parallel.loss(loss_sum, num_tokens), report)


def masked_lm_loss(token_losses: torch.Tensor, batch: dict[str, torch.Tensor]):
    """(loss_sum, num_tokens, report) of per-token losses `[b, s]` under the batch's `loss_mask`."""
    losses = upcast(token_losses)
    mask = batch.get("loss_mask")
    if mask is not None:
        losses = losses * mask.to(losses.dtype)
        per_sample_tokens = mask.to(losses.dtype).sum(dim=1)
    else:
        per_sample_tokens = torch.full((losses.shape[0],), float(losses.shape[1]), dtype=losses.dtype,
                                       device=losses.device)
    per_sample = losses.sum(dim=1)
    report = {"sample_loss_sum": per_sample.detach(), "sample_tokens": per_sample_tokens}
    if "dataset_id" in batch:
        report["dataset_id"] = batch["dataset_id"]
    return per_sample.sum(), per_sample_tokens.sum(), report

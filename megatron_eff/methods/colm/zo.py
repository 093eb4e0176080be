"""Per-candidate zeroth-order scalars of CoLM: the directional derivative c_i = (l_i(theta_v + eps z) -
l_i(theta_v - eps z)) / (2 eps) of each candidate's token-mean loss along a direction z of the last layer's
V projection (the V rows of its fused QKV weight).

    v_rows = value_rows(last_layer)                       # a view of this TP rank's V rows [g/tp, d, h]
    z = shared_direction(seed, v_rows, tp_rank, tp_size)  # the same global z on every rank, sharded like V
    results = run_schedule(chunks, batches, M, ..., forward_only=True,
                           forward_step=functools.partial(zo_forward_step, last_layer_index=L - 1, z=z, eps=eps))
    scalars = torch.cat([r.report["zo_scalar"] for r in results])   # last stage: [candidates of this rank]

The trunk (embedding and every layer but the last, on every pipeline stage) runs once; the chunk holding the
last layer then runs the last layer, the final norm and the output layer twice, with theta_v + eps z and
theta_v - eps z, and restores theta_v from a copy (bit for bit: no drift from adding and subtracting). Under
TP each rank perturbs its own V rows with its slice of one global z drawn from a shared seed, so the
perturbed model is the same whatever the layout. The caller runs it under no-grad in eval mode.
"""

from __future__ import annotations

import functools

import torch

from megatron_eff.dtypes import upcast
from megatron_eff.model.loss import lm_forward_step
from megatron_eff.parallel.cross_entropy import vocab_parallel_cross_entropy


def value_rows(layer) -> torch.Tensor:
    """A view `[groups/tp, head_dim, hidden]` of the V rows of `layer`'s fused QKV weight (per query group
    `[q heads ; k ; v]`, Megatron's layout)."""
    attention = layer.self_attention
    weight = attention.linear_qkv.weight  # [(nq + 2g) d / tp, h]
    group = attention.heads_per_group + 2
    return weight.data.view(-1, group, attention.head_dim, weight.shape[-1])[:, -1]


def full_direction(seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """z ~ N(0, I) float64 over the full V rows `[groups, d, h]` of the model, drawn on the CPU from `seed`
    by a private generator (the global RNG is left alone)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def shared_direction(seed: int, v_rows: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of `full_direction` (its V rows `v_rows` `[groups/tp, d, h]`), in `v_rows`' dtype
    and device."""
    local_groups = v_rows.shape[0]
    z = full_direction(seed, (local_groups * tp_size, *v_rows.shape[1:]))
    return z[tp_rank * local_groups:(tp_rank + 1) * local_groups].to(v_rows.device, v_rows.dtype)


def zo_forward_step(chunk, batch: dict, input_tensor, *, last_layer_index: int, z: torch.Tensor, eps: float):
    """The forward step of the scoring pass: a plain forward on chunks without the last layer; on the chunk
    with it, the per-token losses at theta_v +- eps z `[2, b, s]` and `zo_loss` as the loss function."""
    layers = chunk.decoder.layers
    if not chunk.post_process or str(last_layer_index) not in layers:
        return lm_forward_step(chunk, batch, input_tensor)
    x = chunk.embedding(batch["tokens"]) if chunk.pre_process else input_tensor
    last = layers[str(last_layer_index)]
    for layer in layers.values():
        if layer is not last:
            x = layer(x)  # [s, b, h]
    v_rows = value_rows(last)
    saved = v_rows.clone()
    losses = []
    for sign in (1.0, -1.0):
        v_rows.add_(z, alpha=sign * eps)
        hidden = chunk.decoder.final_layernorm(last(x))
        logits = chunk._logits(hidden)  # [s, b, V/tp]
        losses.append(vocab_parallel_cross_entropy(logits, batch["labels"].t(), chunk.pstate.tp_group).t())
        v_rows.copy_(saved)
    return torch.stack(losses), functools.partial(zo_loss, batch=batch, eps=eps)  # [2, b, s]


def zo_loss(token_losses: torch.Tensor, batch: dict, eps: float):
    """(loss_sum, num_tokens, report) of the scoring pass: the report's `zo_scalar` [b] is each sample's
    c_i from its token-mean losses (under `loss_mask`) at theta_v +- eps z."""
    losses = upcast(token_losses)  # [2, b, s]
    mask = batch.get("loss_mask")
    mask = torch.ones_like(losses[0]) if mask is None else mask.to(losses.dtype)
    tokens = mask.sum(dim=1).clamp_min(1)  # [b]
    means = (losses * mask).sum(dim=2) / tokens  # [2, b]
    report = {"zo_scalar": ((means[0] - means[1]) / (2 * eps)).detach(), "sample_loss": means.mean(0).detach()}
    return (means.mean(0) * tokens).sum(), mask.sum(), report

"""Unit importance and selection: which heads and MLP channels one layer keeps this step.

Scores are per *unit* of this TP rank's shard: a query head (`--sat-head-unit query-head` under GQA; its K/V
are not omitted), a query group with its q heads, k and v (`kv-group`; with MHA a group is one head), or an
MLP channel:

- `wanda`: s_u = sum over the unit's rows r of the column linear (QKV: the head's q rows, or the group's q, k
  and v rows; SwiGLU: gate and up rows of the channel) of sum_i |W[r, i]| * rms(X[:, i]); X is the layer's
  (normed) input, its per-feature RMS a running average over earlier iterations (so the selection is known
  before the projections run: the causality constraint). One matrix-vector product |W| rms per layer and
  linear, O(rows * h), against O(tokens * rows * h) for the GEMM.
- `magnitude`: the same with rms = 1.
- `ema`: a running average of the unit's output mean square (the head's context, the channel's activation)
  from the iterations that computed it; units never computed score highest (each is tried once).
- `random`: uniform scores drawn from a generator keyed by (seed, iteration, layer, kind, block).

Selection works in equal *blocks* of consecutive units, each keeping the same count (TP rank r's shard is
blocks r*B/tp .. (r+1)*B/tp - 1 in global order), so with B = TP size each rank keeps the same count from its own
shard without communication and the result does not depend on the layout. `topk` keeps the highest scores
(ranked at bfloat16 precision, ties to the lower index, so float reduction order across layouts cannot swap
near-ties); `sample` draws without replacement in proportion to the score (Gumbel top-k, keyed generator).
"""

from __future__ import annotations

import hashlib

import torch


def unit_generator(seed: int, iteration: int, layer: int, kind: str, block: int) -> torch.Generator:
    digest = hashlib.sha256(f"sat:{seed}:{iteration}:{layer}:{kind}:{block}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def wanda_scores(weight: torch.Tensor, input_rms: torch.Tensor | None) -> torch.Tensor:
    """The score of every row r of a column linear's `weight` `[..., h]`: sum_i |W[r, i]| * input_rms[i]
    (`input_rms` `[h]`; None: 1, i.e. magnitude) -> `[...]`, as one matrix-vector product in the weight's
    dtype; a unit's score is the sum over its rows."""
    weight = weight.detach()
    h = weight.shape[-1]
    rms = weight.new_ones(h) if input_rms is None else input_rms.to(weight.dtype)
    return (weight.reshape(-1, h).abs() @ rms).view(weight.shape[:-1])


def keep_count(num_units: int, rate: float) -> int:
    """Units kept of `num_units` at omission rate `rate` (at least one)."""
    return max(1, round((1.0 - rate) * num_units))


def select_units(scores: torch.Tensor, num_blocks: int, keep_per_block: int, mode: str,
                 generator_of_block) -> torch.Tensor:
    """Sorted local indices of the kept units: `scores` `[units]` of this shard split into `num_blocks` equal
    blocks, `keep_per_block` from each. `generator_of_block(j)`: the generator of local block j (`sample`).
    On the scores' device, without a host synchronisation (the sampling noise is drawn on the CPU and copied)."""
    blocks = scores.detach().view(num_blocks, -1)  # [blocks, units per block]
    per_block = blocks.shape[1]
    if mode == "sample":  # Gumbel top-k: without replacement, proportional to the score
        noise = torch.stack([torch.rand(per_block, generator=generator_of_block(j), dtype=torch.float64)
                             for j in range(num_blocks)]).to(scores.device)
        key = blocks.double().clamp_min(1e-30).log() - torch.log(-torch.log(noise.clamp_min(1e-300)))
    else:
        key = blocks.float().to(torch.bfloat16).float()
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :keep_per_block]
    offsets = torch.arange(num_blocks, device=scores.device).unsqueeze(1) * per_block
    return torch.sort((order + offsets).flatten()).values

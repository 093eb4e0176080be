"""Autograd-aware collectives that move activations into and out of the tensor-parallel region.

Each function is the identity when the group is None or has one rank, so the single-device model runs
the same code. Names and semantics follow Megatron-core:

| function                                   | forward                 | backward                |
|--------------------------------------------|-------------------------|-------------------------|
| copy_to_tensor_parallel_region             | identity                | all-reduce              |
| reduce_from_tensor_parallel_region         | all-reduce              | identity                |
| scatter_to_tensor_parallel_region          | split last dim          | all-gather last dim     |
| gather_from_tensor_parallel_region         | all-gather last dim     | split last dim          |
| scatter_to_sequence_parallel_region        | split first dim         | all-gather first dim    |
| gather_from_sequence_parallel_region       | all-gather first dim    | reduce-scatter first dim|
| reduce_scatter_to_sequence_parallel_region | reduce-scatter first dim| all-gather first dim    |
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_eff.autograd import forward_backward_function

# torch >= 2.10 renamed the flat-tensor collectives (the old names warn); keep working with both.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    return x.chunk(n, dim=-1)[dist.get_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


def _split_first(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    return x.chunk(n, dim=0)[dist.get_rank(group)].contiguous()


def _gather_first(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    x = x.contiguous()
    out = torch.empty((x.shape[0] * n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_flat(out, x, group=group)
    return out


def _reduce_scatter_first(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    x = x.contiguous()
    out = torch.empty((x.shape[0] // n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_flat(out, x, group=group)
    return out


def _mapping(name: str, forward_fn, backward_fn):
    """`f(x, group)`: the collective `forward_fn` in forward, `backward_fn` on the gradient; identity on one rank.
    Under `--torch-compile` (compiled layers) a graph break: run eagerly, since gloo collectives cannot be
    traced; the code before and after it is compiled."""
    fn = torch.compiler.disable(forward_backward_function(name, forward_fn, backward_fn))
    return lambda x, group: x if _size(group) == 1 else fn(x, group)


copy_to_tensor_parallel_region = _mapping("_CopyToTP", lambda x, g: x, _all_reduce)
reduce_from_tensor_parallel_region = _mapping("_ReduceFromTP", _all_reduce, lambda x, g: x)
scatter_to_tensor_parallel_region = _mapping("_ScatterToTP", _split_last, _gather_last)
gather_from_tensor_parallel_region = _mapping("_GatherFromTP", _gather_last, _split_last)
scatter_to_sequence_parallel_region = _mapping("_ScatterToSP", _split_first, _gather_first)
gather_from_sequence_parallel_region = _mapping("_GatherFromSP", _gather_first, _reduce_scatter_first)
reduce_scatter_to_sequence_parallel_region = _mapping("_ReduceScatterToSP", _reduce_scatter_first, _gather_first)

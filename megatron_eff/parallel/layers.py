"""Tensor-parallel building blocks: column/row-parallel linears and the vocab-parallel embedding.

Activations are `[s, b, h]` (sequence first, like Megatron), so sequence parallelism shards dim 0.
With `tp_group=None` (or one rank) every layer is a plain linear/embedding: the single-device model is
built from the same classes.

Every parameter records how it is sharded (`param.partition_dim`, `param.full_shape`), so:
- `init_parallel_parameters(model, seed)` draws each *full* tensor from a generator seeded by the
  parameter's global name and keeps this rank's slice: the initial weights do not depend on the layout;
- checkpointing and conversion can reassemble full tensors.

Each linear's matmul is `self.gemm(x, weight, bias)` (`F.linear` by default): precision features
(`megatron_eff/precision/`: FP8 emulation, Unit Scaling) wrap that one callable, as a chain
(`precision/gemm.py`), and touch nothing else.

Composable linears (Megatron-core's `forward(input_, weight=None)`, extended for structured omission):
`ColumnParallelLinear.forward(x, weight=None, rows=None)` and `RowParallelLinear.forward(x, weight=None,
cols=None)`. `weight` replaces this rank's weight for one call (same shape as `self.weight`); `rows` (a
LongTensor of this TP shard's output rows, local indices into the `[out/tp, in]` view of the weight) makes
the column linear compute only those outputs, `cols` says which of the row linear's local input features
`x` holds. Only the selected rows/columns of the weight (and bias) enter the GEMM, so it is genuinely
smaller; the result equals the full computation with the other rows/columns of the weight set to zero
(and, for `rows`, the missing outputs dropped). The selected weight goes through the GEMM chain, so FP8 and
Unit Scaling apply unchanged (Unit Scaling keeps the full layer's fan-in/fan-out factors).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_eff.parallel import mappings
from megatron_eff.parallel.state import group_size


def _rank(group) -> int:
    return 0 if group is None else torch.distributed.get_rank(group)


def mark_sharded(param: nn.Parameter, partition_dim: int | None, full_shape, init: str, std: float = 0.0):
    """Record the sharding and init rule of a parameter (read by init, checkpointing and conversion)."""
    param.partition_dim = partition_dim  # None: replicated across TP
    param.full_shape = tuple(full_shape)
    param.init_rule = init  # "normal" | "zeros" | "ones"
    param.init_std = std
    return param


class ColumnParallelLinear(nn.Module):
    """Y = X W^T + b with W split along its output rows: each TP rank computes `out/tp` features.

    `num_fused > 1` stacks several outputs (e.g. SwiGLU's gate and up) as a `[num_fused, out/tp, in]`
    weight so each rank keeps matching slices of each and the full tensor stays layout-independent.
    Input `[s, b, in]` (or `[s/tp, b, in]` with sequence parallel) -> output `[s, b, out/tp]`
    (or `[s, b, out]` with `gather_output`).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool = True,
        tp_group=None,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        init_std: float = 0.02,
        num_fused: int = 1,
    ):
        super().__init__()
        tp = group_size(tp_group)
        if output_size % (tp * num_fused) != 0:
            raise ValueError(f"output size {output_size} not divisible by TP {tp} x {num_fused}")
        self.tp_group, self.gather_output, self.sequence_parallel = tp_group, gather_output, sequence_parallel
        self.input_size, self.output_size = input_size, output_size
        per_part = output_size // num_fused
        if num_fused == 1:
            shape, full, dim = (output_size // tp, input_size), (output_size, input_size), 0
        else:
            shape, full, dim = (num_fused, per_part // tp, input_size), (num_fused, per_part, input_size), 1
        self.weight = mark_sharded(nn.Parameter(torch.empty(shape)), dim, full, "normal", init_std)
        if bias:
            bshape, bfull = shape[:-1], full[:-1]
            self.bias = mark_sharded(nn.Parameter(torch.empty(bshape)), dim, bfull, "zeros")
        else:
            self.register_parameter("bias", None)
        self.gemm = F.linear  # (x, weight, bias) -> y; swapped by megatron_eff/precision

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """`[s, b, in]` -> `[s, b, out/tp]`, or `[s, b, len(rows)]`: only the output rows `rows` (local
        indices into the flattened `[out/tp, in]` weight; with `num_fused` > 1, part k's row r is
        `k * out/(tp num_fused) + r`). `weight`: this call's weight instead of `self.weight` (same shape)."""
        weight = (self.weight if weight is None else weight).flatten(0, -2)  # [out/tp, in]
        bias = None if self.bias is None else self.bias.flatten()
        if rows is not None:
            if self.gather_output:
                raise ValueError("ColumnParallelLinear: rows= cannot be combined with gather_output")
            weight = weight.index_select(0, rows)  # [len(rows), in]
            bias = None if bias is None else bias.index_select(0, rows)
        return column_parallel_linear(
            x, weight, bias, self.tp_group,
            sequence_parallel=self.sequence_parallel, gather_output=self.gather_output, gemm=self.gemm,
        )


def column_parallel_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tp_group, *,
    sequence_parallel: bool = False, gather_output: bool = False, gemm=F.linear,
) -> torch.Tensor:
    """The column-parallel matmul on a given `[out/tp, in]` weight (also used by the output layer tied to
    the word embedding, whose weight lives in another module)."""
    if sequence_parallel:
        x = mappings.gather_from_sequence_parallel_region(x, tp_group)  # [s, b, in]
    else:
        x = mappings.copy_to_tensor_parallel_region(x, tp_group)
    y = gemm(x, weight, bias)  # [s, b, out/tp]
    if gather_output:
        y = mappings.gather_from_tensor_parallel_region(y, tp_group)
    return y


class RowParallelLinear(nn.Module):
    """Y = X W^T + b with W split along its input columns; partial sums are all-reduced (or
    reduce-scattered along the sequence with sequence parallel). Input `[s, b, in/tp]` -> `[s, b, out]`
    (`[s/tp, b, out]` with sequence parallel). The bias is replicated and added after the reduction."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool = True,
        tp_group=None,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        init_std: float = 0.02,
    ):
        super().__init__()
        tp = group_size(tp_group)
        if input_size % tp != 0:
            raise ValueError(f"input size {input_size} not divisible by TP {tp}")
        self.tp_group, self.input_is_parallel, self.sequence_parallel = tp_group, input_is_parallel, sequence_parallel
        self.input_size, self.output_size = input_size, output_size
        self.weight = mark_sharded(
            nn.Parameter(torch.empty(output_size, input_size // tp)), 1, (output_size, input_size), "normal", init_std
        )
        if bias:
            self.bias = mark_sharded(nn.Parameter(torch.empty(output_size)), None, (output_size,), "zeros")
            self.bias.sequence_parallel = sequence_parallel  # grads need a TP all-reduce under SP
        else:
            self.register_parameter("bias", None)
        self.gemm = F.linear  # (x, weight, bias) -> y; swapped by megatron_eff/precision

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None,
                cols: torch.Tensor | None = None) -> torch.Tensor:
        """`[s, b, in/tp]` -> `[s, b, out]`. With `cols` (local indices into this shard's `in/tp` input
        features), x is `[s, b, len(cols)]` and holds just those features: only those weight columns are
        used. Ranks may select different numbers of columns. `weight`: this call's weight (same shape)."""
        weight = self.weight if weight is None else weight  # [out, in/tp]
        if cols is not None:
            if not self.input_is_parallel:
                raise ValueError("RowParallelLinear: cols= needs input_is_parallel (x already this rank's features)")
            weight = weight.index_select(1, cols)  # [out, len(cols)]
        if not self.input_is_parallel:
            x = mappings.scatter_to_tensor_parallel_region(x, self.tp_group)
        y = self.gemm(x, weight, None)  # [s, b, out] partial sums
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_parallel_region(y, self.tp_group)  # [s/tp, b, out]
        else:
            y = mappings.reduce_from_tensor_parallel_region(y, self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the (padded) vocabulary; each rank looks up its id range, zeros the
    rest, and the partial embeddings are all-reduced. Input `[b, s]` ids -> output `[b, s, h]`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group=None, init_std: float = 0.02):
        super().__init__()
        tp = group_size(tp_group)
        if num_embeddings % tp != 0:
            raise ValueError(f"padded vocabulary {num_embeddings} not divisible by TP {tp}")
        self.tp_group = tp_group
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per_rank = num_embeddings // tp
        self.vocab_start = _rank(tp_group) * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = mark_sharded(
            nn.Parameter(torch.empty(per_rank, embedding_dim)), 0, (num_embeddings, embedding_dim), "normal", init_std
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return mappings.reduce_from_tensor_parallel_region(out, self.tp_group)


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def local_shard(full: torch.Tensor, partition_dim: int | None, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of a full tensor (the inverse of concatenating shards along `partition_dim`)."""
    if partition_dim is None or tp_size == 1:
        return full
    return full.chunk(tp_size, dim=partition_dim)[tp_rank]


@torch.no_grad()
def init_parallel_parameters(named_params, seed: int, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Initialise every parameter from a generator keyed by (seed, global name), then keep the local shard.

    `named_params` yields (global_name, param). Parameters without an `init_rule` keep their values; a
    parameter with `init_name` is seeded by that name instead of its own (e.g. an output layer that must
    start equal to the word embedding on another pipeline stage). Meta-device parameters are skipped.
    """
    for name, param in named_params:
        rule = getattr(param, "init_rule", None)
        if rule is None or param.is_meta:
            continue
        name = getattr(param, "init_name", name)
        full_shape = getattr(param, "full_shape", tuple(param.shape))
        if rule == "zeros":
            param.zero_()
        elif rule == "ones":
            param.fill_(1.0)
        elif rule == "normal":
            gen = torch.Generator().manual_seed(_name_seed(seed, name))
            full = torch.empty(full_shape).normal_(0.0, param.init_std, generator=gen)
            target = param.view(getattr(param, "local_view_shape", param.shape))  # TE's fused SwiGLU fc1
            target.copy_(local_shard(full, param.partition_dim, tp_rank, tp_size))
        else:
            raise ValueError(f"unknown init rule {rule!r} for {name}")


def scaled_init_std(std: float, num_layers: int) -> float:
    """GPT-2 / Megatron scaled init for output projections of residual branches: std / sqrt(2L)."""
    return std / math.sqrt(2.0 * num_layers)

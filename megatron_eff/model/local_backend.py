"""The `local` backend: pure PyTorch layers -- `megatron_eff.parallel.layers` (column/row-parallel linears),
`norms.py`, SDPA (`model.attention.CoreAttention`) and `torch.utils.checkpoint`. `model/backends.py` picks a
backend; the TE backend builds on this one for what TE does not replace.
"""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from megatron_eff.config import ModelConfig
from megatron_eff.model.attention import CoreAttention
from megatron_eff.model.norms import LayerNorm, RMSNorm
from megatron_eff.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_eff.parallel.state import ParallelState


class LocalBackend:
    """Builds layers from `megatron_eff.parallel.layers` over `pstate.tp_group`."""

    def __init__(self, config: ModelConfig, pstate: ParallelState, sequence_parallel: bool):
        self.config, self.pstate, self.sequence_parallel = config, pstate, sequence_parallel
        self.tp_group = pstate.tp_group

    def column_linear(
        self, input_size: int, output_size: int, *, bias: bool, init_std: float, num_fused: int = 1,
        gather_output: bool = False,
    ) -> nn.Module:
        """`[s, b, in]` (`[s/tp, b, in]` with sequence parallel) -> `[s, b, out/tp]`."""
        return ColumnParallelLinear(
            input_size, output_size, bias=bias, tp_group=self.tp_group, gather_output=gather_output,
            sequence_parallel=self.sequence_parallel, init_std=init_std, num_fused=num_fused,
        )

    def row_linear(self, input_size: int, output_size: int, *, bias: bool, init_std: float) -> nn.Module:
        """`[s, b, in/tp]` -> `[s, b, out]` (`[s/tp, b, out]` with sequence parallel)."""
        return RowParallelLinear(
            input_size, output_size, bias=bias, tp_group=self.tp_group, input_is_parallel=True,
            sequence_parallel=self.sequence_parallel, init_std=init_std,
        )

    def norm(self, hidden_size: int) -> nn.Module:
        norm_class = LayerNorm if self.config.normalization == "LayerNorm" else RMSNorm
        return norm_class(hidden_size, self.config.norm_epsilon, self.sequence_parallel,
                          zero_centered_gamma=self.config.apply_layernorm_1p)

    def core_attention(self) -> nn.Module:
        """Causal attention of this rank's heads: q `[s, b, nq/tp, d]`, k/v `[s, b, g/tp, d]` -> `[s, b, nq/tp * d]`."""
        config = self.config
        return CoreAttention(config.attention_dropout, gqa=config.num_attention_heads > config.num_query_groups)

    @staticmethod
    def checkpoint(function, *args):
        """`function(*args)`, its activations recomputed in backward (non-reentrant; dropout masks replayed)."""
        return torch_checkpoint(function, *args, use_reentrant=False)

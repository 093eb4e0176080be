"""Layer factories: the transformer asks a backend for its linears, norms and core attention, and for the
activation-recompute function, so tensor parallelism and precision are a choice of layer, not a branch in
`forward`.

- `local`: pure PyTorch — `megatron_eff.parallel.layers` (column/row-parallel linears), `norms.py`, SDPA
  (`model.attention.CoreAttention`) and `torch.utils.checkpoint` (`model/local_backend.py`).
- `transformer_engine`: TE modules (fused norm + linear, DotProductAttention) and TE's checkpoint,
  `megatron_eff/model/te_backend.py`; imported lazily, so without TE/CUDA only that flag fails
  (with a clear message).
FP8 emulation and Unit Scaling transform the built model (`megatron_eff/precision/`), not the backend.
"""

from __future__ import annotations

from megatron_eff.config import ModelConfig
from megatron_eff.model.local_backend import LocalBackend
from megatron_eff.parallel.state import ParallelState


def build_backend(config: ModelConfig, pstate: ParallelState, sequence_parallel: bool):
    if config.transformer_impl == "local":
        return LocalBackend(config, pstate, sequence_parallel)
    if config.transformer_impl == "transformer_engine":
        from megatron_eff.model.te_backend import TEBackend  # lazy: TE only when asked for

        return TEBackend(config, pstate, sequence_parallel)
    raise ValueError(
        f"--transformer-impl must be local or transformer_engine, got {config.transformer_impl!r}"
    )

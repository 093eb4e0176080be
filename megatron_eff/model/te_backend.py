"""Transformer Engine backend (`--transformer-impl transformer_engine`): TE layers for the model, their names.

TE is imported lazily, only when this backend is asked for: without TE or without CUDA the flag fails with one
clear line, and `import megatron_eff` never needs TE. TE's FP8 recipes and autocast are precision, in
`megatron_eff/precision/transformer_engine.py` (which imports this module; this module imports nothing from
`precision/`).

What the backend builds (the same model, names mapping 1:1 to the `local` backend's):
- QKV and MLP-in: `te.pytorch.LayerNormLinear` (the layer's input norm fused in, `parallel_mode="column"`);
- attention projection and MLP-out: `te.pytorch.Linear(parallel_mode="row")`;
- the final norm: our local norm (unfused, as there is no linear after it in the block);
- core attention: `te.pytorch.DotProductAttention` (`qkv_format="sbhd"`, `attn_mask_type="causal"`, GQA
  through `num_gqa_groups`; TE picks its flash / cuDNN fused / unfused kernel). It has no parameters, so
  names do not change. Generation with a KV cache and MST's Hybrid Sparse Attention keep our SDPA path
  (`model/attention.py`) on this backend too. Attention dropout draws from the default CUDA generator, as
  the local backend's SDPA does (no `get_rng_state_tracker`: TE forks one only when given it);
- activation recompute (`--recompute-activations`): `te.pytorch.checkpoint` (non-reentrant), which under FP8
  recomputes each layer with the FP8 scales of its forward pass.
TP and sequence parallelism go through TE's own `tp_group`, `tp_size`, `sequence_parallel` arguments. TE's
linears take no per-call weight override or row/column selection (`parallel/layers.py`): head/channel
selection (`heads=`, `channels=`) needs the `local` backend.

Names: TE's LayerNormLinear holds the fused norm as `layer_norm_weight` / `layer_norm_bias`; checkpoints
store them under our `input_layernorm.*` / `pre_mlp_layernorm.*` names (`local_parameter_name`), and the
SwiGLU fc1 weight (TE: `[2 ffn/tp, h]` = `[gate ; up]` of this rank) is viewed as our `[2, ffn/tp, h]`
(`param.local_view_shape`), so a checkpoint moves between the two backends, in both directions.

FP8 state: TE's amax histories and scales (`get_extra_state()` of the linears and of DotProductAttention,
`...core_attention`) are saved per rank with the checkpoint (`te_extra_state`) and restored when the layout is
unchanged (`load_te_extra_state`).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_eff.model.local_backend import LocalBackend
from megatron_eff.parallel.layers import mark_sharded

# (TE name suffix, local name suffix): the only names that differ between the two backends.
TE_NAME_SUFFIXES = (
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"),
    ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"),
)


def local_parameter_name(name: str) -> str:
    """The `local` backend's name of a parameter (identity for local names)."""
    for te_suffix, local_suffix in TE_NAME_SUFFIXES:
        if name.endswith(te_suffix):
            return name[: -len(te_suffix)] + local_suffix
    return name


def te_parameter_name(name: str) -> str:
    """The TE backend's name of a `local` parameter name (inverse of `local_parameter_name`)."""
    for te_suffix, local_suffix in TE_NAME_SUFFIXES:
        if name.endswith(local_suffix) and ".layers." in name:
            return name[: -len(local_suffix)] + te_suffix
    return name


_NOT_IMPORTABLE = (
    "--transformer-impl transformer_engine: Transformer Engine is not importable here ({reason}); install it on "
    "a CUDA machine (pip install --no-build-isolation transformer_engine[pytorch]) or use --transformer-impl local "
    "(FP8 then runs as emulation)"
)
_NO_CUDA = "--transformer-impl transformer_engine needs a CUDA GPU; use --transformer-impl local"


def check_transformer_engine() -> None:
    """The launch-time check, without importing TE: a ValueError unless TE is installed and CUDA is there."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:
        raise ValueError(_NOT_IMPORTABLE.format(reason="no module named 'transformer_engine'"))
    if not torch.cuda.is_available():
        raise ValueError(_NO_CUDA)


def import_transformer_engine():
    """`transformer_engine.pytorch`, or a ValueError naming the flag and what is missing."""
    try:
        import transformer_engine.pytorch as te
    except ImportError as error:  # also raised by TE itself when its CUDA libraries are missing
        raise ValueError(_NOT_IMPORTABLE.format(reason=error)) from None
    if not torch.cuda.is_available():
        raise ValueError(_NO_CUDA)
    return te


def _absorb_norm(norm: nn.Module) -> None:
    """This norm is now computed inside the next LayerNormLinear: drop its parameters, pass x through."""
    for name in list(norm._parameters):
        delattr(norm, name)
    norm.forward = lambda x: x


class TEBackend:
    """Builds the transformer's linears from TE modules over `pstate.tp_group` (see the module docstring).

    `norm()` returns a local norm and remembers it; the next `column_linear()` fuses it (LayerNormLinear)
    and empties it. The block's final norm is never followed by a column linear, so it stays a real norm."""

    def __init__(self, config, pstate, sequence_parallel: bool):
        self.te = import_transformer_engine()
        self.config, self.pstate, self.sequence_parallel = config, pstate, sequence_parallel
        self.tp_group, self.tp_size = pstate.tp_group, pstate.tp_size
        self._local = LocalBackend(config, pstate, sequence_parallel)
        self._pending_norm: nn.Module | None = None

    def _parallel_kwargs(self, mode: str) -> dict:
        return dict(parallel_mode=mode, tp_group=self.tp_group, tp_size=self.tp_size,
                    sequence_parallel=self.sequence_parallel, params_dtype=torch.float32, device="cuda")

    def norm(self, hidden_size: int) -> nn.Module:
        self._pending_norm = self._local.norm(hidden_size)
        return self._pending_norm

    def column_linear(self, input_size: int, output_size: int, *, bias: bool, init_std: float, num_fused: int = 1,
                      gather_output: bool = False) -> nn.Module:
        if gather_output:
            raise ValueError("--transformer-impl transformer_engine: gather_output column linears are not built")
        kwargs = self._parallel_kwargs("column")
        norm, self._pending_norm = self._pending_norm, None
        if norm is None:
            module = self.te.Linear(input_size, output_size, bias=bias, **kwargs)
        else:
            module = self.te.LayerNormLinear(input_size, output_size, eps=self.config.norm_epsilon, bias=bias,
                                             normalization=self.config.normalization, **kwargs,
                                             **({"zero_centered_gamma": True} if self.config.apply_layernorm_1p
                                                else {}))
            _absorb_norm(norm)
            gamma_init = "zeros" if self.config.apply_layernorm_1p else "ones"
            for name in ("layer_norm_weight", "layer_norm_bias"):
                param = getattr(module, name, None)
                if param is not None:
                    mark_sharded(param, None, param.shape, gamma_init if name.endswith("weight") else "zeros")
                    param.sequence_parallel = self.sequence_parallel
        per_part = output_size // num_fused
        mark_sharded(module.weight, 1 if num_fused > 1 else 0,
                     (num_fused, per_part, input_size) if num_fused > 1 else (output_size, input_size),
                     "normal", init_std)
        if num_fused > 1:
            module.weight.local_view_shape = (num_fused, per_part // self.tp_size, input_size)
        if bias:
            mark_sharded(module.bias, 0, (output_size,), "zeros")
        module.input_size, module.output_size = input_size, output_size
        return module

    def core_attention(self) -> nn.Module:
        """q `[s, b, nq/tp, d]`, k/v `[s, b, g/tp, d]` -> `[s, b, nq/tp * d]`; head counts are global, TE divides
        them by `tp_size`. Softmax scale: TE's default 1/sqrt(kv_channels), as SDPA's."""
        c = self.config
        return self.te.DotProductAttention(
            c.num_attention_heads, c.head_dim, num_gqa_groups=c.num_query_groups,
            attention_dropout=c.attention_dropout, qkv_format="sbhd", attn_mask_type="causal",
            sequence_parallel=self.sequence_parallel, tp_size=self.tp_size, tp_group=self.tp_group,
        )

    def checkpoint(self, function, *args):
        """TE's activation checkpoint, non-reentrant as the local backend's; CPU/CUDA RNG states replayed."""
        return self.te.checkpoint(function, *args, use_reentrant=False)

    def row_linear(self, input_size: int, output_size: int, *, bias: bool, init_std: float) -> nn.Module:
        self._pending_norm = None
        module = self.te.Linear(input_size, output_size, bias=bias, **self._parallel_kwargs("row"))
        mark_sharded(module.weight, 1, (output_size, input_size), "normal", init_std)
        if bias:
            mark_sharded(module.bias, None, (output_size,), "zeros")
            module.bias.sequence_parallel = self.sequence_parallel
        module.input_size, module.output_size = input_size, output_size
        return module


def _has_te_extra_state(module: nn.Module) -> bool:
    """A TE module that implements `get_extra_state` (LayerNormLinear, Linear, DotProductAttention). Every
    nn.Module has the method, raising unless overridden: DotProductAttention's inner FlashAttention,
    FusedAttention, UnfusedDotProductAttention (also TE classes) do not override it."""
    return (type(module).__module__.startswith("transformer_engine")
            and type(module).get_extra_state is not nn.Module.get_extra_state)


def te_extra_state(model_chunks) -> dict:
    """{module name: TE FP8 state} of every TE module with FP8 state (what `get_extra_state` returns)."""
    state = {}
    for chunk in model_chunks:
        for name, module in chunk.named_modules():
            if _has_te_extra_state(module):
                state[name] = module.get_extra_state()
    return state


def load_te_extra_state(model_chunks, state: dict) -> None:
    for chunk in model_chunks:
        for name, module in chunk.named_modules():
            if name in state and _has_te_extra_state(module):
                module.set_extra_state(state[name])

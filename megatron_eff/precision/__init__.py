"""Precision: FP8 (Transformer Engine, or local fake-quantised emulation), FP16 loss scaling, Unit Scaling.

    apply_precision(model_chunk, config.precision, config.model)   # after building, before init_weights
    apply_precision(model, inference_precision(meta["config"]), model.config)   # tools: a checkpoint's model

The model does not know which precision is on: FP8 emulation and Unit Scaling add links to the GEMM chain of
the transformer layers' linears (`gemm.py`: FP8 quantises the operands of the kernel, Unit Scaling scales
around it, in either order of application; `fp8.py`; with `--fp8-param-gather` the linears hold FP8
weights cast from the FP32 masters after each step, `fp8_params.py`), Unit Scaling also swaps the residual ops
and adds embedding hooks (`unit_scaling.py`),
Transformer Engine is a model backend (`model/te_backend.py`; its FP8 recipes and autocast are
`transformer_engine.py` here). The trainer owns the loss scaler
(`loss_scaler.py`); delayed FP8 scaling updates per micro-batch forward and backward, as TE's
(`fp8.DelayedScalingUpdates`, its forward update at the exit of the autocast region of each forward).
"""

from __future__ import annotations

import torch
from torch import nn


def apply_precision(model: nn.Module, precision, model_config) -> None:
    """Transform one freshly built `GPTModel` chunk in place for `precision` (a `PrecisionConfig`)."""
    first_last = (0, model_config.num_layers - 1)
    if model_config.transformer_impl == "transformer_engine":  # (no Unit Scaling: PrecisionConfig.check_run)
        if precision.fp8 and precision.first_last_layers_bf16:
            from megatron_eff.precision.transformer_engine import keep_layers_out_of_fp8

            keep_layers_out_of_fp8(model, first_last)
        return  # TE's FP8 enters through fp8_autocast around forward (training/trainer.py)
    if precision.fp8:
        from megatron_eff.precision.fp8 import Fp8Recipe, apply_fp8

        apply_fp8(model, Fp8Recipe.from_config(precision), model_config.num_layers, precision.first_last_layers_bf16)
        if precision.fp8_param_gather:  # the FP8 linears' weights kept in FP8 (fp8_params.py)
            from megatron_eff.precision.fp8_params import attach_fp8_weights

            attach_fp8_weights(model)
    if precision.unit_scaling:
        from megatron_eff.precision.unit_scaling import apply_unit_scaling, residual_rule

        apply_unit_scaling(model, model_config, residual_rule(precision, model_config.num_layers),
                           precision.unit_scaling_lr_scaling)


def inference_precision(run_config: dict):
    """The `PrecisionConfig` a checkpoint's model is rebuilt with by the tools (evaluate, generate): its Unit
    Scaling, which is part of the function the model computes, and no FP8 or loss scaling, which are training
    numerics (an FP8-trained model is evaluated with full-precision GEMMs). `run_config` is meta.json's."""
    from megatron_eff.config import PrecisionConfig

    saved = dict(run_config.get("precision") or {})
    saved.setdefault("unit_scaling_residual", "fixed")  # checkpoints from before the depth rule used v0.1's
    names = ("unit_scaling", "unit_scaling_residual", "unit_scaling_residual_mult",
             "unit_scaling_residual_attn_ratio", "unit_scaling_residual_tau_attn", "unit_scaling_residual_tau_mlp")
    return PrecisionConfig(**{name: saved[name] for name in names if name in saved})


def precision_state(model_chunks) -> dict:
    """Checkpoint tensors of the local FP8 emulation, keyed `precision.<global buffer name>` (identical on
    every TP/DP rank: the amaxes are reduced over both)."""
    from megatron_eff.precision.fp8 import Fp8Meta

    state = {}
    for chunk in model_chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, Fp8Meta):
                for buffer_name, buffer in module.named_buffers():
                    state[f"precision.{name}.{buffer_name}"] = buffer
    return state


class PrecisionRuntime:
    """What the trainer does for precision around each step: the loss scale for backward (FP16 loss scaler
    x, under Unit Scaling, the number of micro-batches), unscaling the gradients, the loss scaler's update,
    the delayed-scaling FP8 updates (per micro-batch; amax reduced over TP and DP), TE's FP8 autocast,
    the FP8 weights of `--fp8-param-gather` (cast from the masters after each step and load; with the
    distributed optimizer, `grad_sync`'s sharded step casts and gathers them), checkpoint state."""

    def __init__(self, config, model_chunks, pstate, grad_sync=None):
        from megatron_eff.precision.fp8 import Fp8Recipe
        from megatron_eff.precision.loss_scaler import LossScaler

        p = config.precision
        self.precision, self.model, self.pstate = p, list(model_chunks), pstate
        self.loss_scaler = LossScaler.from_config(p) if config.train.fp16 else None
        self.unit_scaling = p.unit_scaling
        self.te = config.model.transformer_impl == "transformer_engine"
        self.fp8_recipe = Fp8Recipe.from_config(p) if p.fp8 and not self.te else None
        self.fp8_updates = None
        if self.fp8_recipe is not None and self.fp8_recipe.recipe == "delayed":
            from megatron_eff.precision.fp8 import DelayedScalingUpdates

            self.fp8_updates = DelayedScalingUpdates(self.model, self.fp8_recipe, (pstate.tp_group, pstate.grad_group))
        self.fp8_params = None
        if p.fp8_param_gather and self.fp8_recipe is not None:
            from megatron_eff.precision.fp8_params import Fp8ParamGather

            self.fp8_params = Fp8ParamGather(self.model, self.fp8_recipe, grad_sync)

    def wrap_autocast(self, autocast):
        """TE with FP8: `te.fp8_autocast` inside the BF16 autocast; local delayed FP8: `autocast`, then the
        forward scale update when a forward with gradients leaves it; otherwise `autocast` unchanged."""
        import contextlib

        if self.fp8_updates is not None:
            updates = self.fp8_updates

            @contextlib.contextmanager
            def then_update():
                with autocast():
                    yield
                if torch.is_grad_enabled():
                    updates.forward_done()

            return then_update
        if not (self.te and self.precision.fp8):
            return autocast

        from megatron_eff.precision.transformer_engine import fp8_autocast

        fp8 = fp8_autocast(self.precision, self._amax_group())

        @contextlib.contextmanager
        def both():
            with autocast(), fp8():
                yield

        return both

    def _amax_group(self):
        """TE's fp8_group: the TP x CP x DP ranks of this pipeline stage (Megatron-LM's amax reduction group).
        Ranks are tp fastest, then cp, dp, pp, so stage p holds ranks [p tp cp dp, (p + 1) tp cp dp)."""
        import torch.distributed as dist

        from megatron_eff.parallel.state import collective_timeout

        if not dist.is_initialized():
            return None
        per_stage, mine = self.pstate.tp_size * self.pstate.cp_size * self.pstate.dp_size, None
        for stage in range(self.pstate.pp_size):  # collective: every rank creates every stage's group
            ranks = list(range(stage * per_stage, (stage + 1) * per_stage))
            group = dist.new_group(ranks, timeout=collective_timeout())
            if stage == self.pstate.pp_rank:
                mine = group
        return mine

    @property
    def fp16_loss_scale(self) -> float | None:
        """The FP16 loss scaler's current scale, for the logs; None without --fp16."""
        return self.loss_scaler.scale if self.loss_scaler is not None else None

    def loss_scale(self, num_micro_batches: int) -> float:
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        return scale * num_micro_batches if self.unit_scaling else scale

    @staticmethod
    def unscale_(params, loss_scale: float) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if loss_scale != 1.0 and grads:
            torch._foreach_mul_(grads, 1.0 / loss_scale)

    def weights_stepped(self) -> None:
        """After `optimizer.step()` (not after a skipped step): the FP8 weights follow the masters."""
        if self.fp8_params is not None:
            self.fp8_params.weights_stepped()

    def weights_loaded(self) -> None:
        """After a checkpoint wrote the masters (and the FP8 scales): cast the FP8 weights again."""
        if self.fp8_params is not None:
            self.fp8_params.weights_loaded()

    def gather_masters(self) -> None:
        """Before a checkpoint is written or the run ends: the full FP32 masters on every rank (with the
        distributed optimizer and FP8 weights, only the owned slices are current after a step)."""
        if self.fp8_params is not None:
            self.fp8_params.gather_masters()

    def end_step(self, overflow: bool) -> None:
        if self.loss_scaler is not None:
            self.loss_scaler.update(overflow)

    def state_tensors(self) -> dict:
        """Checkpoint tensors: local FP8 buffers and the loss scaler's state (replicated on every rank)."""
        state = precision_state(self.model)
        if self.loss_scaler is not None:
            state.update(self.loss_scaler.state_tensors())
        return state

    def rank_state(self) -> dict | None:
        """TE's FP8 state per rank (TE only)."""
        if not self.te:
            return None
        from megatron_eff.model.te_backend import te_extra_state

        return te_extra_state(self.model)

    def load_rank_state(self, state: dict) -> None:
        from megatron_eff.model.te_backend import load_te_extra_state

        load_te_extra_state(self.model, state)

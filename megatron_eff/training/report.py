"""What a run says about itself: a start-up summary (what will run) and an end-of-run summary (what ran).

Both are pure functions of the run's parts so tests can read them; the trainer logs them on rank 0 (start)
and on the logging rank (end, which holds the losses).
"""

from __future__ import annotations

import os

from megatron_eff.config import Config
from megatron_eff.training import flops as flops_lib
from megatron_eff.training.logging import format_duration


def precision_in_use(config: Config) -> str:
    """The arithmetic actually used: autocast dtype, FP8 recipe, loss scaling, Unit Scaling."""
    train, precision = config.train, config.precision
    parts = ["BF16 autocast" if train.bf16 else "FP16 autocast" if train.fp16 else "FP32"]
    if precision.fp8:
        where = "Transformer Engine" if config.model.transformer_impl == "transformer_engine" else \
            f"local {precision.fp8_gemm}"
        parts.append(f"FP8 {precision.fp8_format} {precision.fp8_recipe} ({where})")
        if precision.fp8_param_gather:
            gather = ", all-gathered as FP8" if config.parallel.use_distributed_optimizer else ""
            parts.append(f"FP8 linear weights (--fp8-param-gather{gather})")
    if train.fp16:
        parts.append(f"loss scale {precision.loss_scale:g}" if precision.loss_scale else "dynamic loss scaling")
    if precision.unit_scaling:
        parts.append("Unit Scaling")
    return ", ".join(parts) + "; FP32 master weights"


def _members(dataset) -> list:
    return list(getattr(dataset, "datasets", None) or [dataset])


def dataset_line(split: str, dataset, seq_length: int) -> str:
    """`train: 1,024 samples; shakespeare_text_document 2.3 epochs, ...` (epochs: tokens read / tokens in the
    split, for each member of a blend)."""
    if dataset is None:
        return f"{split}: none"
    parts = []
    for member in _members(dataset):
        description = getattr(member, "description", None) or {}
        name = os.path.basename(description.get("path_prefix", type(member).__name__))
        per_epoch = description.get("tokens_per_epoch")
        if per_epoch:
            epochs = len(member) * seq_length / per_epoch
            parts.append(f"{name} {len(member):,} samples = {epochs:.2f} epochs of its {per_epoch:,} tokens")
        else:
            parts.append(f"{name} {len(member):,} samples")
    weights = getattr(dataset, "weights", None)
    blend = f" (blend weights {', '.join(f'{w:.3g}' for w in weights)})" if weights and len(weights) > 1 else ""
    return f"{split}: {len(dataset):,} samples{blend}: " + "; ".join(parts)


def startup_summary(config: Config, pstate, train_ds, valid_ds, method_names: list[str], start_iteration: int,
                    ) -> str:
    model, parallel, train = config.model, config.parallel, config.train
    gbs = train.resolved_global_batch_size(pstate.dp_size)
    total = flops_lib.count_parameters(model, pstate.tp_size)
    shape = (f"{model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} heads "
             f"({model.num_query_groups} query groups), ffn {model.ffn_hidden_size}, "
             f"{'SwiGLU' if model.swiglu else 'GELU'}, {model.normalization}, {model.position_embedding_type}")
    vpp = parallel.num_layers_per_virtual_pipeline_stage
    cp = f" x CP {pstate.cp_size} ({parallel.cp_comm_type})" if pstate.cp_size > 1 else ""
    layout = (f"TP {pstate.tp_size}{' + SP' if parallel.sequence_parallel else ''}{cp} x PP {pstate.pp_size}"
              f"{f' (virtual stages of {vpp} layers)' if vpp else ''} x DP {pstate.dp_size}"
              f"{' (distributed optimizer)' if parallel.use_distributed_optimizer else ''}"
              f" = {pstate.world_size} process{'es' if pstate.world_size > 1 else ''}")
    remaining = train.train_iters - start_iteration
    plan = f"iterations {start_iteration + 1}..{train.train_iters}"
    if train.rampup_batch_size is not None:
        start, increment, ramp = train.rampup_batch_size
        plan += f", the global batch ramping up from {start} by {increment} over {ramp:,} samples"
    elif train.step_batch_size_schedule is not None:
        plan += f", the global batch stepping as {train.step_batch_size_schedule!r} (tokens:batch)"
    else:
        plan += f" ({remaining:,} to run, {remaining * gbs * model.seq_length:,} tokens)"
    lines = [
        "run summary:",
        f"  model: {shape}; {total:,} parameters",
        f"  vocabulary: {model.vocab_size:,} (padded to {model.padded_vocab_size(pstate.tp_size):,})",
        f"  layout: {layout}",
        f"  precision: {precision_in_use(config)}",
        f"  batch: global {gbs} x seq {model.seq_length} = {gbs * model.seq_length:,} tokens per iteration; {plan}",
        f"  data: {dataset_line('train', train_ds, model.seq_length)}",
        f"        {dataset_line('valid', valid_ds, model.seq_length)}",
        f"  methods: {', '.join(method_names) if method_names else 'none'}",
    ]
    return "\n".join(lines)


def end_summary(result, tokens: int, seconds: float, last_checkpoint: str | None) -> str:
    """Final losses, tokens, wall time, throughput and the last checkpoint."""
    train = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    valid = f"{result.valid_losses[max(result.valid_losses)]:.4f}" if result.valid_losses else "n/a"
    where = last_checkpoint or "none saved (no --save)"
    return (f"run finished at iteration {result.state.iteration}: train loss {train}, last valid loss {valid}; "
            f"{tokens:,} tokens in {format_duration(seconds)} ({tokens / max(seconds, 1e-9):,.0f} tokens/s "
            f"including evaluation and saving); last checkpoint: {where}")

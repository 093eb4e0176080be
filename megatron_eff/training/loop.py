"""The pretraining loop: build everything from a `Config`, then a plain `for` loop over iterations.

    pretrain(config) -> final TrainState

Each iteration: `num_micro_batches` forward/backward passes (gradient accumulation), gradient sync,
global grad norm, NaN/inf check (skip the step, stop after `--max-bad-steps` in a row), clipping, AdamW
step with the scheduled LR, then logging, evaluation, checkpointing and exit checks.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_eff.config import Config
from megatron_eff.data.samplers import MockGPTDataset, micro_batches
from megatron_eff.model.gpt_model import GPTModel
from megatron_eff.parallel.data_parallel import GradSync, finalize_gradients
from megatron_eff.parallel.pipeline import activation_shape, get_forward_backward_func, pipeline_layer_ranges
from megatron_eff.parallel.state import (
    ParallelState,
    communication_device,
    init_distributed,
    initialize_parallel_state,
    use_cuda,
)
from megatron_eff.precision import PrecisionRuntime, apply_precision
from megatron_eff.training import flops as flops_lib
from megatron_eff.training.checkpointing import TrainState, find_checkpoint, load_checkpoint, save_checkpoint
from megatron_eff.training.hooks import MethodHooks, build_method_hooks
from megatron_eff.training.logging import TrainingLogger, guess_peak_tflops, log
from megatron_eff.training.lr_schedule import learning_rate
from megatron_eff.training.optimizer import build_optimizer, clip_gradients, global_grad_norm, set_learning_rate


@dataclass
class RunResult:
    """What `pretrain` returns: the final position and the per-iteration history (for tests and tools)."""

    state: TrainState
    losses: list[float]
    valid_losses: dict[int, float]


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool
    overflow: bool = False  # FP16 loss scaling: the scaled gradients overflowed (skipped, not a bad step)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device_for_run() -> torch.device:
    if use_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_context(config: Config, device: torch.device):
    """BF16/FP16 autocast around forward; parameters (the master weights) stay FP32."""
    if config.train.bf16:
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    if config.train.fp16:
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext


def build_model(config: Config, pstate: ParallelState, device: torch.device) -> list[GPTModel]:
    """This pipeline rank's model chunks (one without interleaving); layers keep their global indices."""
    ranges = pipeline_layer_ranges(config.model.num_layers, pstate.pp_size,
                                   config.parallel.num_layers_per_virtual_pipeline_stage)[pstate.pp_rank]
    chunks = []
    for v, layer_range in enumerate(ranges):
        model = GPTModel(
            config.model, pstate, layer_range=layer_range, pre_process=pstate.is_first_stage and v == 0,
            post_process=pstate.is_last_stage and v == len(ranges) - 1,
            sequence_parallel=config.parallel.sequence_parallel, seed=None,
        )
        apply_precision(model, config.precision, config.model)  # FP8 emulation, Unit Scaling: transforms
        model.init_weights(config.train.seed)  # after the transforms, which may change the init rules
        chunks.append(model.to(device))
    return chunks


def model_chunks(model) -> list[GPTModel]:
    """`build_model`'s list, or a single model (tests and tools may pass one)."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def run_schedule(model, batches, num_micro_batches: int, config: Config, pstate: ParallelState, autocast,
                 forward_only: bool = False, loss_scale: float = 1.0) -> list[torch.Tensor]:
    """Forward/backward of one iteration with this layout's schedule (no pipelining, 1F1B, interleaved)."""
    chunks = model_chunks(model)
    schedule = get_forward_backward_func(pstate, virtual=len(chunks) > 1)
    shape = activation_shape(config.model.seq_length, config.train.micro_batch_size, config.model.hidden_size,
                             pstate.tp_size, config.parallel.sequence_parallel)
    return schedule(chunks, batches, num_micro_batches, pstate=pstate, tensor_shape=shape,
                    forward_only=forward_only, autocast=autocast, loss_scale=loss_scale)


def build_datasets(config: Config, pstate: ParallelState, vocab_size: int):
    """(train, valid) datasets sized for the whole run; valid is None when there is no valid split."""
    gbs = config.train.resolved_global_batch_size(pstate.dp_size)
    train_samples = config.train.train_iters * gbs
    valid_samples = config.train.eval_iters * gbs
    seq = config.model.seq_length
    if config.data.mock_data:
        train = MockGPTDataset(train_samples, seq, vocab_size, config.train.seed)
        valid = MockGPTDataset(valid_samples, seq, vocab_size, config.train.seed + 1) if valid_samples else None
        return train, valid
    from megatron_eff.data.builders import build_train_valid_test_datasets

    train, valid, _ = build_train_valid_test_datasets(
        config.data.data_path, config.data.split, (train_samples, valid_samples, 0), seq,
        config.train.seed, config.data.data_cache_path,
    )
    return train, valid


def train_step(model, optimizer, batches, num_micro_batches: int, config: Config, pstate: ParallelState,
               lr: float, autocast, grad_sync: GradSync | None = None, hooks: MethodHooks | None = None,
               iteration: int = 0, precision: PrecisionRuntime | None = None) -> StepResult:
    """One iteration over `num_micro_batches` micro-batches; the step is skipped on a NaN/inf.

    `grad_sync` (bucketed, possibly overlapped / sharded gradient reduction) is armed before the schedule
    and finished after it; without one, gradients are reduced by `finalize_gradients`. Method `hooks` see
    the reduced gradients (`after_backward`) and the stepped weights (`after_step`) of `iteration`.
    `precision` scales the loss before backward (FP16 loss scaler; x M under Unit Scaling) and the gradients
    back after it; an overflow of scaled FP16 gradients skips the step as `overflow`, not as a bad step."""
    params = [p for chunk in model_chunks(model) for p in chunk.parameters() if p.requires_grad]
    if grad_sync is not None:
        grad_sync.start(num_micro_batches)  # zero the grad buffer; reductions start on the last micro-batch
    else:
        for p in params:
            p.grad = None
    loss_scale = precision.loss_scale(num_micro_batches) if precision is not None else 1.0
    losses = run_schedule(model, batches, num_micro_batches, config, pstate, autocast, loss_scale=loss_scale)
    if grad_sync is not None:
        grad_sync.finish()
    else:
        finalize_gradients(params, pstate)
    # The distributed optimizer's main params are this rank's shard pieces, normed over every rank.
    main_params = getattr(optimizer, "main_params", params)
    if precision is not None:
        precision.unscale_(main_params, loss_scale)
    if hooks is not None:
        hooks.after_backward(iteration)
    loss = average_loss(losses, pstate)
    norm_group = getattr(optimizer, "grad_norm_group", pstate.model_parallel_group)
    grad_norm = global_grad_norm(main_params, norm_group, is_owner=lambda p: _counts_once(p, pstate))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        for p in params:
            p.grad = None
        overflow = math.isfinite(loss) and precision is not None and precision.loss_scaler is not None
        if precision is not None:
            precision.end_step(overflow)
        return StepResult(loss, grad_norm, skipped=True, overflow=overflow)
    clip_gradients(main_params, config.optim.clip_grad, grad_norm)
    set_learning_rate(optimizer, lr)
    optimizer.step()
    if precision is not None:
        precision.end_step(overflow=False)
    if hooks is not None:
        if hooks and grad_sync is not None:  # methods read and write the weights: finish the parameter gather
            grad_sync.finish_param_gather()
        hooks.after_step(iteration)
    return StepResult(loss, grad_norm, skipped=False)


def _counts_once(param, pstate: ParallelState) -> bool:
    """In the global norm, replicated TP params count on TP rank 0 only, tied copies on the first stage."""
    if getattr(param, "partition_dim", None) is None and pstate.tp_rank != 0:
        return False
    return not (getattr(param, "shared_embedding", False) and not pstate.is_first_stage)


def average_loss(losses: list[torch.Tensor], pstate: ParallelState) -> float:
    """Mean over micro-batches and DP ranks; broadcast from the last stage so every rank agrees."""
    value = torch.stack(losses).mean() if losses else torch.zeros((), device=communication_device())
    if pstate.dp_group is not None and pstate.dp_size > 1:
        dist.all_reduce(value, group=pstate.dp_group)
        value /= pstate.dp_size
    if pstate.pp_size > 1:
        dist.broadcast(value, src=pstate.pp_ranks[-1], group=pstate.pp_group)
    return value.item()


@torch.no_grad()
def evaluate(model, dataset, config: Config, pstate: ParallelState, autocast) -> float:
    """Mean loss over the first `--eval-iters` global batches of `dataset` (the same batches every time)."""
    for chunk in model_chunks(model):
        chunk.eval()
    m = config.train.num_micro_batches(pstate.dp_size)
    # In this process (no --num-workers): each validation reads a few batches from the start, and worker
    # processes forked afresh every time would cost more than they save.
    batches = micro_batches(dataset, 0, config.train.micro_batch_size, pstate.dp_rank, pstate.dp_size)
    losses = []
    for _ in range(config.train.eval_iters):
        losses += run_schedule(model, batches, m, config, pstate, autocast, forward_only=True)
    for chunk in model_chunks(model):
        chunk.train()
    return average_loss(losses, pstate)


class _ExitSignal:
    """Remembers a SIGTERM so the loop can save and exit at the end of the iteration."""

    def __init__(self, enabled: bool):
        self.received = False
        if enabled:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)], device=communication_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _layout(pstate: ParallelState) -> dict:
    return {"tp": pstate.tp_size, "pp": pstate.pp_size, "dp": pstate.dp_size}


@dataclass
class Run:
    """Everything `pretrain` builds once: the model chunks and what trains them, data, logging, position."""

    config: Config
    pstate: ParallelState
    model: list[GPTModel]
    named_params: dict[str, torch.nn.Parameter]  # global names, over all chunks
    optimizer: torch.optim.Optimizer
    grad_sync: GradSync
    hooks: MethodHooks
    precision: PrecisionRuntime
    autocast: object
    state: TrainState
    train_ds: object
    valid_ds: object
    logger: TrainingLogger
    is_logger: bool

    def save(self) -> None:
        if not self.config.checkpoint.save:
            return
        self.grad_sync.finish_param_gather()  # --overlap-param-gather: the stepped weights, not the last forward's
        with self.logger.paused():  # not training time: left out of tokens/s, MFU, ms/it
            path = save_checkpoint(
                self.config.checkpoint.save, self.state, self.named_params, self.optimizer, self.config.to_dict(),
                _layout(self.pstate), self.pstate, hooks=self.hooks, extra_state=self.precision.state_tensors(),
                rank_state=self.precision.rank_state(),
            )
        log(f"saved checkpoint {path}", self.pstate.rank == 0)


def setup_run(config: Config) -> Run:
    """Process groups, model, optimizer, gradient sync, method hooks, precision, checkpoint, data, logger."""
    init_distributed()
    pstate = initialize_parallel_state(config.parallel)
    config.parallel.check_model(config.model)
    device = device_for_run()
    set_seed(config.train.seed)
    model = model_chunks(build_model(config, pstate, device))
    named_params = {name: p for chunk in model for name, p in chunk.named_parameters()}
    grad_sync = GradSync(
        list(named_params.values()), pstate, bucket_size=config.parallel.ddp_bucket_size,
        overlap=config.parallel.overlap_grad_reduce, shard=config.parallel.use_distributed_optimizer,
        overlap_param_gather=config.parallel.overlap_param_gather,
    )
    grad_sync.install_param_gather_hooks(model)  # --overlap-param-gather: wait per module in the next forward
    optimizer = build_optimizer(named_params.items(), config.optim, grad_sync)
    hooks = build_method_hooks(config, model, optimizer, grad_sync, pstate)  # MST, ...: installed on the model
    precision = PrecisionRuntime(config, model, pstate)  # loss scaling, FP8 state, TE's FP8 autocast
    log(f"model: {sum(p.numel() for p in named_params.values()):,} parameters on this rank "
        f"({pstate.describe()})", pstate.rank == 0)
    state = TrainState()
    if config.checkpoint.load and find_checkpoint(config.checkpoint.load) is None:  # as Megatron-LM: start fresh
        log(f"WARNING: could not find a checkpoint in --load {config.checkpoint.load}; will not load any "
            "checkpoint and will start from random", pstate.rank == 0)
    elif config.checkpoint.load:
        state = load_checkpoint(
            config.checkpoint.load, named_params, optimizer, finetune=config.checkpoint.finetune,
            load_optim=not config.checkpoint.no_load_optim, load_rng=not config.checkpoint.no_load_rng,
            layout=_layout(pstate), pstate=pstate, hooks=hooks,
            extra_state=precision.state_tensors(), rank_state_loader=precision.load_rank_state,
        )
        log(f"loaded {config.checkpoint.load} at iteration {state.iteration}", pstate.rank == 0)
    train_ds, valid_ds = build_datasets(config, pstate, config.model.vocab_size)
    is_logger = pstate.is_last_stage and pstate.tp_rank == 0 and pstate.dp_rank == 0
    logger = TrainingLogger(
        enabled=is_logger, tensorboard_dir=config.logging.tensorboard_dir, train_iters=config.train.train_iters,
        world_size=pstate.world_size, peak_tflops=config.logging.peak_tflops or guess_peak_tflops(device),
        seq_length=config.model.seq_length,
    )
    autocast = precision.wrap_autocast(autocast_context(config, device))
    return Run(config, pstate, model, named_params, optimizer, grad_sync, hooks, precision, autocast, state,
               train_ds, valid_ds, logger, is_logger)


def _account_skips(run: Run, result: StepResult, bad_steps: int) -> int:
    """Log a skipped step; returns the new count of consecutive non-finite steps (stops at the limit).
    FP16 overflows are expected now and then (the loss scale adapts) and are not counted."""
    state, rank0 = run.state, run.pstate.rank == 0
    if result.overflow:
        state.skipped_iterations += 1
        log(f"iteration {state.iteration}: FP16 gradient overflow, step skipped; loss scale now "
            f"{run.precision.loss_scaler.scale:g}", rank0)
        return bad_steps
    if not result.skipped:
        return 0
    state.skipped_iterations += 1
    log(f"WARNING: iteration {state.iteration}: non-finite loss {result.loss} or grad norm "
        f"{result.grad_norm}; step skipped ({bad_steps + 1} in a row)", rank0)
    if bad_steps + 1 >= run.config.train.max_bad_steps:
        raise RuntimeError(f"{bad_steps + 1} consecutive non-finite steps (--max-bad-steps); stopping")
    return bad_steps + 1


def _validate(run: Run, result_log: RunResult) -> None:
    with run.logger.paused():  # not training time: left out of tokens/s, MFU, ms/it
        val = evaluate(run.model, run.valid_ds, run.config, run.pstate, run.autocast)
    iteration = run.state.iteration
    log(f"validation at iter {iteration}: loss {val:.4f} | ppl {math.exp(min(val, 50)):.2f}", run.is_logger)
    result_log.valid_losses[iteration] = val
    run.logger.scalars(iteration, {"valid/loss": val, "valid/ppl": math.exp(min(val, 50))})


def _exit_reason(run: Run, start_time: float, exit_signal: _ExitSignal) -> str | None:
    """Why to stop after this iteration (all ranks agree), or None to go on."""
    train = run.config.train
    minutes = (time.time() - start_time) / 60
    timed_out = train.exit_duration_in_mins is not None and minutes > train.exit_duration_in_mins
    if _any_rank(exit_signal.received or timed_out):
        return "signal" if exit_signal.received else "duration"
    if train.exit_interval and run.state.iteration % train.exit_interval == 0:
        return "--exit-interval"
    return None


def pretrain(config: Config) -> RunResult:
    """Run training as configured. Collective under torchrun."""
    start_time = time.time()
    run = setup_run(config)
    train, pstate, state = config.train, run.pstate, run.state
    gbs = train.resolved_global_batch_size(pstate.dp_size)
    num_micro = train.num_micro_batches(pstate.dp_size)
    batches = micro_batches(run.train_ds, state.consumed_train_samples, train.micro_batch_size, pstate.dp_rank,
                            pstate.dp_size, config.data.num_workers)
    tokens_per_iter = gbs * config.model.seq_length
    # Model FLOPs (no recompute), the numerator of MFU.
    flops_per_iter = flops_lib.model_flops_per_iteration(config.model, tokens_per_iter, config.model.seq_length)
    exit_signal = _ExitSignal(train.exit_signal_handler)
    result_log, bad_steps, saved_last = RunResult(state, [], {}), 0, False
    for chunk in run.model:
        chunk.train()
    while state.iteration < train.train_iters:
        lr = learning_rate(state.iteration, config.optim, train.train_iters)
        run.hooks.before_iteration(state.iteration + 1)
        result = train_step(run.model, run.optimizer, batches, num_micro, config, pstate, lr, run.autocast,
                            run.grad_sync, hooks=run.hooks, iteration=state.iteration + 1, precision=run.precision)
        state.iteration += 1
        state.consumed_train_samples += gbs
        bad_steps = _account_skips(run, result, bad_steps)
        result_log.losses.append(result.loss)
        run.logger.record(result.loss, tokens_per_iter, flops_per_iter, skipped=result.skipped)
        if state.iteration % train.log_interval == 0:
            run.logger.flush(state, lr, result.grad_norm, loss_scale=run.precision.fp16_loss_scale,
                             extra=run.hooks.log_scalars())
        if run.valid_ds is not None and train.eval_iters and state.iteration % train.eval_interval == 0:
            _validate(run, result_log)
        saved_last = bool(config.checkpoint.save_interval) and state.iteration % config.checkpoint.save_interval == 0
        if saved_last:
            run.save()
        reason = _exit_reason(run, start_time, exit_signal)
        if reason:
            if not saved_last:
                run.save()
            log(f"exiting at iteration {state.iteration} ({reason})", pstate.rank == 0)
            break
    else:
        if not saved_last:
            run.save()
    run.grad_sync.finish_param_gather()  # the last step's weights, for whoever reads the model next
    summary = run.hooks.summary()
    if summary:
        log(summary, run.is_logger)
    run.logger.close()
    return result_log

"""The trainer: builds every part of a run from a `Config`, exposes them, and runs a plain loop over iterations.

    trainer = Trainer(config)      # process groups, model chunks, methods, grad sync, optimizer, precision,
                                   # checkpoint, data, logger -- in that order
    result = trainer.train()       # -> RunResult; `pretrain(config)` is `Trainer(config).train()`

Build order, and why: the model chunks are built and initialised, then each training method transforms them
(`Method.transform_model`: masks, selections, added parameters) before the gradient buckets and the optimizer
exist, so what a method adds is bucketed, sharded and optimised like any parameter (`Method.param_groups`
gives its own LR or ascent). Then the batch source (datasets and position), then `Method.attach(trainer)`, and
only then the checkpoint is loaded -- methods' state is restored when the datasets and the optimizer exist.

Each iteration: the methods' `before_iteration`; the batch source's global batch (a method's `select_batch`
may replace it: coresets); `num_micro_batches` forward/backward passes under the layout's schedule with the
loss contract (`parallel/pipeline.py`; methods add `loss_terms` on any stage); gradient sync; the methods'
`after_backward`; global grad norm, NaN/inf check (skip the step, stop after `--max-bad-steps` in a row),
clipping, AdamW step with the scheduled LR; `after_step`; then logging, evaluation (overall and per domain),
checkpointing and exit checks. Tests and benchmarks read the parts off the trainer (`trainer.model`,
`trainer.optimizer`, `trainer.methods`, ...) instead of patching module globals.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from megatron_eff.config import Config
from megatron_eff.data.batch_source import BatchSource
from megatron_eff.data.samplers import MockGPTDataset, micro_batches
from megatron_eff.dtypes import upcast
from megatron_eff.errors import RunError
from megatron_eff.methods import build_methods
from megatron_eff.methods.base import MethodList
from megatron_eff.model.gpt_model import GPTModel
from megatron_eff.model.loss import lm_forward_step
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
from megatron_eff.precision.fp8_params import fp8_weight_params
from megatron_eff.training import flops as flops_lib
from megatron_eff.training.batch_schedule import batch_size_schedule
from megatron_eff.training.checkpointing import (
    TrainState,
    find_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from megatron_eff.training.compile import compile_layers
from megatron_eff.training.logging import TrainingLogger, guess_peak_tflops, log
from megatron_eff.training.loss import attach_aux_loss, aux_loss_scale, iteration_loss, iteration_loss_tensor
from megatron_eff.training.lr_schedule import checkpoint_schedule, learning_rate, schedule_differences
from megatron_eff.training.optimizer import (
    build_optimizer,
    clip_gradients,
    decoupled_lr_groups,
    global_grad_norm_sq,
    set_learning_rate,
)
from megatron_eff.training.report import end_summary, startup_summary
from megatron_eff.training.step_hooks import StepHooks


@dataclass
class RunResult:
    """What `train` returns: the final position and the per-iteration history (for tests and tools)."""

    state: TrainState
    losses: list[float] = field(default_factory=list)
    valid_losses: dict[int, float] = field(default_factory=dict)
    valid_domain_losses: dict[int, dict[str, float]] = field(default_factory=dict)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool
    overflow: bool = False  # FP16 loss scaling: the scaled gradients overflowed (skipped, not a bad step)
    agreed: list[float] = field(default_factory=list)  # what `agree` returned, read on the host


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
                 forward_only: bool = False, loss_scale: float = 1.0, forward_step=lm_forward_step) -> list:
    """Forward/backward of one iteration with this layout's schedule (no pipelining, 1F1B, interleaved);
    the per-micro-batch `MicroBatchLoss`es on the last stage."""
    chunks = model_chunks(model)
    schedule = get_forward_backward_func(pstate, virtual=len(chunks) > 1)
    seq_length = config.model.seq_length // pstate.cp_size  # each CP rank holds s/cp positions
    shape = activation_shape(seq_length, config.train.micro_batch_size, config.model.hidden_size,
                             pstate.tp_size, config.parallel.sequence_parallel)
    return schedule(chunks, batches, num_micro_batches, pstate=pstate, tensor_shape=shape,
                    forward_only=forward_only, autocast=autocast, loss_scale=loss_scale, forward_step=forward_step,
                    per_token_loss=config.train.calculate_per_token_loss and not forward_only)


def build_datasets(config: Config, pstate: ParallelState, vocab_size: int):
    """(train, valid, {domain: valid}) datasets sized for the whole run; valid is None when there is no valid
    split; the per-domain validation sets exist with several --data-path prefixes (and
    --per-domain-validation)."""
    gbs = config.train.resolved_global_batch_size(pstate.dp_size)
    # a method that draws more candidates than it trains on (CoLM) says how many it reads per iteration
    per_iteration = max([gbs] + [m.samples_per_iteration(gbs) for m in config.enabled_methods().values()
                                 if hasattr(m, "samples_per_iteration")])
    train_samples = config.train.train_iters * per_iteration
    valid_samples = config.train.eval_iters * gbs
    seq = config.model.seq_length
    if config.data.mock_data:
        train = MockGPTDataset(train_samples, seq, vocab_size, config.train.seed)
        valid = MockGPTDataset(valid_samples, seq, vocab_size, config.train.seed + 1) if valid_samples else None
        return train, valid, {}
    from megatron_eff.data.builders import build_datasets as build_data

    data = build_data(
        config.data.data_path, config.data.split, (train_samples, valid_samples, 0), seq, config.train.seed,
        config.data.data_cache_path, max_blend_weight=config.data.max_blend_weight,
        per_domain_valid=config.data.per_domain_validation, mmap_bin_files=config.data.mmap_bin_files,
    )
    per_domain = data.valid_per_domain if len(data.valid_per_domain) > 1 else {}
    return data.train, data.valid, per_domain


def train_step(model, optimizer, batches, num_micro_batches: int, config: Config, pstate: ParallelState,
               lr: float, autocast, grad_sync: GradSync | None = None, methods: MethodList | None = None,
               iteration: int = 0, precision: PrecisionRuntime | None = None, forward_step=lm_forward_step,
               consumed_samples: int | None = None, agree=None) -> StepResult:
    """One iteration over `num_micro_batches` micro-batches; the step is skipped on a NaN/inf.

    Losses, token counts and the gradient norm stay on the device until one host read per iteration, just
    before the skip decision. `agree` (optional) returns more device values to read at that point: the
    trainer's exit agreement over ranks rides along instead of costing a sync of its own.

    `grad_sync` (bucketed, possibly overlapped / sharded gradient reduction) is armed before the schedule
    and finished after it; without one, gradients are reduced by `finalize_gradients`. `methods` see the
    reduced gradients (`after_backward`) and the stepped weights (`after_step`) of `iteration`.
    `precision` scales the loss before backward (FP16 loss scaler; x M under Unit Scaling) and the gradients
    back after it; an overflow of scaled FP16 gradients skips the step as `overflow`, not as a bad step."""
    params = [p for chunk in model_chunks(model) for p in chunk.parameters() if p.requires_grad]
    if grad_sync is not None:
        grad_sync.start(num_micro_batches)  # zero the grad buffer; reductions start on the last micro-batch
    else:
        for p in params:
            p.grad = None
    loss_scale = precision.loss_scale(num_micro_batches) if precision is not None else 1.0
    results = run_schedule(model, batches, num_micro_batches, config, pstate, autocast, loss_scale=loss_scale,
                           forward_step=forward_step)
    if grad_sync is not None:
        grad_sync.finish()
    else:
        finalize_gradients(params, pstate)
    # The distributed optimizer's main params are this rank's shard pieces, normed over every rank.
    main_params = getattr(optimizer, "main_params", params)
    per_token = config.train.calculate_per_token_loss
    loss_and_tokens = iteration_loss_tensor(results, pstate, per_token)  # on the device until the sync below
    if per_token:  # the DP (x CP) all-reduce averaged sums of token losses: x dp cp / (global token count)
        grads = [p.grad for p in main_params if p.grad is not None]
        if grads:
            factor = pstate.grad_size / loss_and_tokens[1].clamp(min=1)
            torch._foreach_mul_(grads, factor.to(grads[0].device, grads[0].dtype))
    if precision is not None:
        precision.unscale_(main_params, loss_scale)
    if methods is not None:
        methods.after_backward(iteration)
    norm_group = getattr(optimizer, "grad_norm_group", pstate.model_parallel_group)
    norm_sq = global_grad_norm_sq(main_params, norm_group, is_owner=lambda p: _counts_once(p, pstate))
    values = [loss_and_tokens, norm_sq.to(loss_and_tokens.device, torch.float64).reshape(1)]
    if agree is not None:
        values.append(agree().to(loss_and_tokens.device, torch.float64).reshape(-1))
    # The iteration's one host sync: the skip decision (and clipping) needs the loss and the norm on the host.
    loss, _tokens, norm_sq, *agreed = torch.cat(values).tolist()
    grad_norm = math.sqrt(norm_sq)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        for p in params:
            p.grad = None
        overflow = math.isfinite(loss) and precision is not None and precision.loss_scaler is not None
        if precision is not None:
            precision.end_step(overflow)
        return StepResult(loss, grad_norm, skipped=True, overflow=overflow, agreed=agreed)
    clip_gradients(main_params, config.optim.clip_grad, grad_norm)
    set_learning_rate(optimizer, lr, max(iteration - 1, 0), config.optim, config.train.train_iters,
                      consumed_samples)
    optimizer.step()
    if precision is not None:
        precision.weights_stepped()  # --fp8-param-gather: the FP8 weights follow the masters
        precision.end_step(overflow=False)
    if methods:
        if grad_sync is not None:  # methods read and write the weights: finish the parameter gather
            grad_sync.finish_param_gather()
        methods.after_step(iteration)
    return StepResult(loss, grad_norm, skipped=False, agreed=agreed)


def _batch_schedule(config: Config, pstate: ParallelState, methods_on: bool):
    """--rampup-batch-size / --step-batch-size-schedule, checked against the layout (every size whole
    micro-batches of every DP rank); None for a constant global batch."""
    train = config.train
    schedule = batch_size_schedule(train.rampup_batch_size, train.step_batch_size_schedule, config.model.seq_length,
                                   train.resolved_global_batch_size(pstate.dp_size))
    if schedule is None:
        return None
    if methods_on:
        raise ValueError("--rampup-batch-size / --step-batch-size-schedule cannot be combined with a training "
                         "method (methods assume one global batch size)")
    interleaved = config.parallel.num_layers_per_virtual_pipeline_stage is not None
    schedule.check_layout(train.micro_batch_size, pstate.dp_size, pstate.pp_size if interleaved else 1)
    return schedule


def _counts_once(param, pstate: ParallelState) -> bool:
    """In the global norm, replicated TP params count on TP rank 0 only, tied copies and pipeline-replicated
    params on the first stage."""
    if getattr(param, "partition_dim", None) is None and pstate.tp_rank != 0:
        return False
    on_stages = getattr(param, "shared_embedding", False) or getattr(param, "pipeline_replicated", False)
    return not (on_stages and not pstate.is_first_stage)


@torch.no_grad()
def evaluate(model, dataset, config: Config, pstate: ParallelState, autocast) -> float:
    """Mean loss over the first `--eval-iters` global batches of `dataset` (the same batches every time)."""
    for chunk in model_chunks(model):
        chunk.eval()
    m = config.train.num_micro_batches(pstate.dp_size)
    # In this process (no --num-workers): each validation reads a few batches from the start, and worker
    # processes forked afresh every time would cost more than they save.
    batches = micro_batches(dataset, 0, config.train.micro_batch_size, pstate.dp_rank, pstate.dp_size)
    results = []
    for _ in range(config.train.eval_iters):
        results += run_schedule(model, batches, m, config, pstate, autocast, forward_only=True)
    for chunk in model_chunks(model):
        chunk.train()
    return iteration_loss(results, pstate)[0]


class _ExitSignal:
    """Remembers a SIGTERM so the loop can save and exit at the end of the iteration."""

    def __init__(self, enabled: bool):
        self.received = False
        if enabled:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True


def _max_over_ranks(value: int) -> torch.Tensor:
    """`value`'s maximum over all ranks as a device tensor, not read on the host (the caller reads it with
    the iteration's other values)."""
    tensor = torch.tensor([value], dtype=torch.float64, device=communication_device())
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


# Reasons to stop that one rank may see and another not, by precedence: every rank takes the highest any has.
_RANK_LOCAL_REASONS = (None, "duration", "signal")


def _layout(pstate: ParallelState) -> dict:
    layout = {"tp": pstate.tp_size, "pp": pstate.pp_size, "dp": pstate.dp_size}
    if pstate.cp_size > 1:  # only then, so checkpoints of runs without CP compare equal as before
        layout["cp"] = pstate.cp_size
    return layout


class Trainer:
    """A run's parts, built from `config` in the order the module docstring gives, and its loop."""

    def __init__(self, config: Config):
        self.config = config
        self.start_time = time.time()
        init_distributed(timeout_minutes=config.parallel.distributed_timeout_minutes)
        parallel = config.parallel
        self.pstate = pstate = initialize_parallel_state(parallel.tensor_model_parallel_size,
                                                         parallel.pipeline_model_parallel_size,
                                                         cp=parallel.context_parallel_size,
                                                         cp_comm_type=parallel.cp_comm_type)
        self.device = device_for_run()
        set_seed(config.train.seed)
        self.model = model_chunks(build_model(config, pstate, self.device))
        self.methods = build_methods(config, pstate)
        self.batch_schedule = _batch_schedule(config, pstate, bool(config.enabled_methods()))
        self.methods.transform_model(self.model)  # before the buckets and the optimizer: what it adds trains
        if config.train.torch_compile:  # in place, after the methods' hooks and masks are on the layers
            compile_layers(self.model, config.train.torch_compile_mode)
        self.named_params = {name: p for chunk in self.model for name, p in chunk.named_parameters()}
        self.grad_sync = GradSync(
            list(self.named_params.values()), pstate, bucket_size=parallel.ddp_bucket_size,
            overlap=parallel.overlap_grad_reduce, shard=parallel.use_distributed_optimizer,
            overlap_param_gather=parallel.overlap_param_gather,
            reduce_dtype=torch.bfloat16 if parallel.grad_reduce_in_bf16 else None,
            fp8_params=fp8_weight_params(self.model),  # --fp8-param-gather: FP8 buckets, gathered as uint8
        )
        self.grad_sync.install_param_gather_hooks(self.model)  # --overlap-param-gather: wait per module
        self.optimizer = build_optimizer(self.named_params.items(), config.optim, self.grad_sync,
                                         decoupled_lr_groups(self.named_params.items(), config.optim)
                                         + self.methods.param_groups())
        self.precision = PrecisionRuntime(config, self.model, pstate, self.grad_sync)  # loss scale, FP8, TE
        self.autocast = self.precision.wrap_autocast(autocast_context(config, self.device))
        for note in config.notes:  # Megatron-LM flags: what was converted or has no effect here
            log(note, pstate.rank == 0)
        log(f"model: {sum(p.numel() for p in self.named_params.values()):,} parameters on this rank "
            f"({pstate.describe()})", pstate.rank == 0)
        self.state = TrainState()
        try:  # data errors name the file or flag (--split, a corrupt .idx): the user's to fix, no traceback
            self.train_ds, self.valid_ds, self.valid_domains = build_datasets(config, pstate, config.model.vocab_size)
        except (ValueError, OSError) as error:
            raise RunError(str(error)) from error
        self.batch_source = BatchSource(
            self.train_ds, micro_batch_size=config.train.micro_batch_size,
            num_micro_batches=config.train.num_micro_batches(pstate.dp_size), dp_rank=pstate.dp_rank,
            dp_size=pstate.dp_size, num_workers=config.data.num_workers, seed=config.train.seed,
            pin_memory=self.device.type == "cuda",
        )
        self.methods.attach(self)
        self._load_checkpoint()  # the methods' and the batch source's state too
        self.is_logger = pstate.is_last_stage and pstate.tp_rank == 0 and pstate.dp_rank == 0 and pstate.cp_rank == 0
        self.last_checkpoint: str | None = None
        log(startup_summary(config, pstate, self.train_ds, self.valid_ds, [m.name for m in self.methods],
                            self.state.iteration), pstate.rank == 0)
        self.logger = TrainingLogger(
            enabled=self.is_logger, tensorboard_dir=config.logging.tensorboard_dir,
            train_iters=config.train.train_iters, world_size=pstate.world_size,
            peak_tflops=config.logging.peak_tflops or guess_peak_tflops(self.device),
            seq_length=config.model.seq_length,
        )
        self.result = RunResult(self.state)
        self.step_hooks = StepHooks(config, pstate.rank)  # --manual-gc, --profile

    # --- building -----------------------------------------------------------------------------------------

    def _load_checkpoint(self) -> None:
        config, pstate = self.config, self.pstate
        load = config.checkpoint.load
        if load and find_checkpoint(load) is None:  # as Megatron-LM: start fresh
            log(f"WARNING: could not find a checkpoint in --load {load}; will not load any checkpoint and will "
                "start from random", pstate.rank == 0)
        elif load:
            self.state = load_checkpoint(
                load, self.named_params, self.optimizer, finetune=config.checkpoint.finetune,
                load_optim=not config.checkpoint.no_load_optim, load_rng=not config.checkpoint.no_load_rng,
                layout=_layout(pstate), pstate=pstate, methods=self.methods,
                extra_state=self.precision.state_tensors(), rank_state_loader=self.precision.load_rank_state,
            )
            self.precision.weights_loaded()  # --fp8-param-gather: FP8 weights from the loaded masters
            log(f"loaded {load} at iteration {self.state.iteration}", pstate.rank == 0)
            if not config.checkpoint.finetune:
                self._resume_schedule(load)
                data_state = read_meta(load)[1].get("data_state")
                if data_state:
                    self.batch_source.load_state_dict(data_state)
                else:  # a checkpoint from before the batch source kept state: its position
                    self.batch_source.consumed_samples = self.state.consumed_train_samples

    def _resume_schedule(self, load: str) -> None:
        """The LR schedule on resume: the checkpoint's (--use-checkpoint-opt_param-scheduler), or these flags',
        with a warning naming what differs unless --override-opt_param-scheduler says it is meant."""
        config, rank0 = self.config, self.pstate.rank == 0
        saved = read_meta(load)[1].get("config", {})
        if "optim" not in saved or "train" not in saved:
            return
        saved_optim, saved_iters = saved["optim"], saved["train"]["train_iters"]
        if config.checkpoint.use_checkpoint_opt_param_scheduler:
            config.optim = checkpoint_schedule(config.optim, saved_optim, saved_iters)
            log(f"LR schedule of the checkpoint's run (--use-checkpoint-opt_param-scheduler): --lr {config.optim.lr:g}"
                f", --min-lr {config.optim.min_lr:g}, {config.optim.lr_decay_style} decay over "
                f"{config.optim.lr_decay_iters} iterations", rank0)
            return
        differences = schedule_differences(config.optim, config.train.train_iters, saved_optim, saved_iters)
        if differences and not config.checkpoint.override_opt_param_scheduler:
            listed = "; ".join(f"{flag} {old} -> {new}" for flag, (old, new) in differences.items())
            log(f"WARNING: the LR schedule differs from the checkpoint's run ({listed}): the LR at iteration "
                f"{self.state.iteration + 1} follows these flags and may jump. To keep the old schedule pass "
                "--use-checkpoint-opt_param-scheduler; to silence this, --override-opt_param-scheduler", rank0)

    # --- one iteration ------------------------------------------------------------------------------------

    def forward_step(self, chunk, batch: dict, input_tensor):
        """The LM forward step, with the methods' auxiliary loss terms attached on this chunk's stage."""
        output, loss_func = lm_forward_step(chunk, batch, input_tensor)
        terms = self.methods.loss_terms(chunk, batch) if self.methods else {}
        if terms and torch.is_grad_enabled():
            train = self.config.train
            scale = aux_loss_scale(self._loss_scale, train.num_micro_batches(self.pstate.dp_size),
                                   train.calculate_per_token_loss,
                                   train.micro_batch_size * self.config.model.seq_length)
            output = attach_aux_loss(output, torch.stack([upcast(t) for t in terms.values()]).sum(), scale)
        return output, loss_func

    def _num_micro_batches(self, consumed_samples: int) -> int:
        """This iteration's micro-batches per data-parallel rank (they follow --rampup-batch-size or
        --step-batch-size-schedule)."""
        if self.batch_schedule is None:
            return self.config.train.num_micro_batches(self.pstate.dp_size)
        gbs = self.batch_schedule.global_batch_size_at(consumed_samples)
        return gbs // (self.config.train.micro_batch_size * self.pstate.dp_size)

    def train_step(self, batches: list[dict], iteration: int, lr: float,
                   consumed_samples: int | None = None, agree=None) -> StepResult:
        self._loss_scale = self.precision.loss_scale(len(batches))
        return train_step(self.model, self.optimizer, iter(batches), len(batches), self.config, self.pstate, lr,
                          self.autocast, self.grad_sync, methods=self.methods, iteration=iteration,
                          precision=self.precision, forward_step=self.forward_step,
                          consumed_samples=consumed_samples, agree=agree)

    def evaluate(self) -> dict[str, float]:
        """{"loss": blended validation loss, domain: that domain's validation loss, ...}."""
        losses = {"loss": evaluate(self.model, self.valid_ds, self.config, self.pstate, self.autocast)}
        losses.update(self._domain_losses())
        return losses

    def evaluate_domains(self) -> dict[str, float]:
        """{domain: validation loss} on each --data-path domain's held-out samples, on demand (dynamic batch
        loading asks at its own interval); left out of the throughput figures. Collective."""
        with self.logger.paused():
            return self._domain_losses()

    def _domain_losses(self) -> dict[str, float]:
        return {name: evaluate(self.model, dataset, self.config, self.pstate, self.autocast)
                for name, dataset in self.valid_domains.items()}

    def save(self) -> None:
        if not self.config.checkpoint.save:
            return
        self.grad_sync.finish_param_gather()  # --overlap-param-gather: the stepped weights, not the last forward's
        self.precision.gather_masters()  # --fp8-param-gather with the distributed optimizer: full FP32 masters
        with self.logger.paused():  # not training time: left out of tokens/s, MFU, ms/it
            path = save_checkpoint(
                self.config.checkpoint.save, self.state, self.named_params, self.optimizer,
                self.config.to_dict(), _layout(self.pstate), self.pstate, methods=self.methods,
                extra_state=self.precision.state_tensors(), rank_state=self.precision.rank_state(),
                data_state=self.batch_source.state_dict(),
            )
        self.last_checkpoint = path
        log(f"saved checkpoint {path}", self.pstate.rank == 0)

    # --- the loop -----------------------------------------------------------------------------------------

    def _account_skips(self, result: StepResult, bad_steps: int) -> int:
        """Log a skipped step; returns the new count of consecutive non-finite steps (stops at the limit).
        FP16 overflows are expected now and then (the loss scale adapts) and are not counted."""
        state, rank0 = self.state, self.pstate.rank == 0
        if result.overflow:
            state.skipped_iterations += 1
            log(f"iteration {state.iteration}: FP16 gradient overflow, step skipped; loss scale now "
                f"{self.precision.loss_scaler.scale:g}", rank0)
            return bad_steps
        if not result.skipped:
            return 0
        state.skipped_iterations += 1
        log(f"WARNING: iteration {state.iteration}: non-finite loss {result.loss} or grad norm "
            f"{result.grad_norm}; step skipped ({bad_steps + 1} in a row)", rank0)
        if bad_steps + 1 >= self.config.train.max_bad_steps:
            raise RunError(f"{bad_steps + 1} consecutive non-finite steps (--max-bad-steps "
                           f"{self.config.train.max_bad_steps}) at iteration {state.iteration}; stopping without "
                           f"saving. Last checkpoint: {self._last_good_checkpoint() or 'none'}")
        return bad_steps + 1

    def _last_good_checkpoint(self) -> str | None:
        save = self.config.checkpoint.save
        return self.last_checkpoint or (find_checkpoint(save) if save and os.path.isdir(save) else None)

    def _validate(self) -> None:
        with self.logger.paused():  # not training time: left out of tokens/s, MFU, ms/it
            losses = self.evaluate()
        iteration, val = self.state.iteration, losses["loss"]
        domains = {name: loss for name, loss in losses.items() if name != "loss"}
        per_domain = "".join(f" | {name} {loss:.4f}" for name, loss in domains.items())
        log(f"validation at iter {iteration}: loss {val:.4f} | ppl {math.exp(min(val, 50)):.2f}{per_domain}",
            self.is_logger)
        self.result.valid_losses[iteration] = val
        if domains:
            self.result.valid_domain_losses[iteration] = domains
        scalars = {"valid/loss": val, "valid/ppl": math.exp(min(val, 50))}
        scalars.update({f"valid/{name}/loss": loss for name, loss in domains.items()})
        self.logger.scalars(iteration, scalars)
        self.methods.on_validation(iteration, losses)

    def _agree_exit(self, exit_signal: _ExitSignal) -> torch.Tensor:
        """The rank-local reason to stop (a SIGTERM, or past --exit-duration-in-mins), maxed over all ranks on
        the device; asked by the train step after the backward and read with its one host sync."""
        train = self.config.train
        minutes = (time.time() - self.start_time) / 60
        timed_out = train.exit_duration_in_mins is not None and minutes > train.exit_duration_in_mins
        local = "signal" if exit_signal.received else "duration" if timed_out else None
        return _max_over_ranks(_RANK_LOCAL_REASONS.index(local))

    def _exit_reason(self, agreed: float) -> str | None:
        """Why to stop after this iteration, or None to go on. Every rank returns the same: a SIGTERM or the
        clock seen by one rank stops all (a signal wins over the duration limit), so all save and exit together.
        `agreed` is `_agree_exit`'s value for this iteration."""
        reason = _RANK_LOCAL_REASONS[int(agreed)]
        if reason:
            return reason
        train = self.config.train
        if train.exit_interval and self.state.iteration % train.exit_interval == 0:
            return "--exit-interval"
        return None

    def train(self) -> RunResult:
        """Run training as configured. Collective under torchrun."""
        config, pstate, state, train = self.config, self.pstate, self.state, self.config.train
        exit_signal = _ExitSignal(train.exit_signal_handler)
        bad_steps, saved_last = 0, False
        start_iteration, start_samples = state.iteration, state.consumed_train_samples
        if state.iteration >= train.train_iters:
            log(f"nothing to train: the loaded checkpoint is at iteration {state.iteration} and --train-iters is "
                f"{train.train_iters}; raise --train-iters to continue", pstate.rank == 0)
        for chunk in self.model:
            chunk.train()
        while state.iteration < train.train_iters:
            iteration = state.iteration + 1
            consumed = state.consumed_train_samples
            lr = learning_rate(state.iteration, config.optim, train.train_iters, consumed)
            self.methods.before_iteration(iteration)
            self.step_hooks.before_iteration(iteration)
            batches = self.methods.select_batch(iteration, self.batch_source)  # a coreset, or None
            if batches is None:
                batches = self.batch_source.next_global_batch(self._num_micro_batches(consumed))
            tokens_per_iter = len(batches) * train.micro_batch_size * pstate.dp_size * config.model.seq_length
            # Model FLOPs (no recompute), the numerator of MFU.
            flops_per_iter = flops_lib.model_flops_per_iteration(config.model, tokens_per_iter,
                                                                 config.model.seq_length)
            result = self.train_step(batches, iteration, lr, consumed, agree=lambda: self._agree_exit(exit_signal))
            state.iteration = iteration
            state.consumed_train_samples = self.batch_source.consumed_samples
            self.step_hooks.after_iteration(iteration)
            bad_steps = self._account_skips(result, bad_steps)
            self.result.losses.append(result.loss)
            self.logger.record(result.loss, tokens_per_iter, flops_per_iter, skipped=result.skipped)
            reason = self._exit_reason(result.agreed[0])
            if state.iteration % train.log_interval == 0 or state.iteration == train.train_iters or reason:
                self.logger.flush(state, lr, result.grad_norm, loss_scale=self.precision.fp16_loss_scale,
                                  extra=self.methods.log_scalars())
            if self.valid_ds is not None and train.eval_iters and state.iteration % train.eval_interval == 0:
                self._validate()
            interval = config.checkpoint.save_interval
            saved_last = bool(interval) and state.iteration % interval == 0
            if saved_last:
                self.save()
            if reason:
                if not saved_last:
                    self.save()
                log(f"exiting at iteration {state.iteration} ({reason})", pstate.rank == 0)
                break
        else:
            if not saved_last and state.iteration > start_iteration:
                self.save()
        self.close()
        tokens = (state.consumed_train_samples - start_samples) * config.model.seq_length
        log(end_summary(self.result, tokens, time.time() - self.start_time, self.last_checkpoint), self.is_logger)
        return self.result

    def close(self) -> None:
        self.batch_source.close()  # worker processes exit
        self.step_hooks.close()
        if self.step_hooks.trace_file:
            log(f"profiler trace: {self.step_hooks.trace_file}", True)
        self.grad_sync.finish_param_gather()  # the last step's weights, for whoever reads the model next
        self.precision.gather_masters()
        summary = self.methods.summary()
        if summary:
            log(summary, self.is_logger)
        self.logger.close()


def pretrain(config: Config) -> RunResult:
    """Run training as configured (`Trainer(config).train()`). Collective under torchrun."""
    return Trainer(config).train()

"""Megatron-LM launch scripts, unchanged: the flags of its GPT/LLaMA examples that the other flag groups do not
define. Each one either works as in Megatron-LM (sample-based training and LR schedule, `--kv-channels`,
`--rotary-percent`, `--decoupled-lr`, `--manual-gc`, `--profile`, ... — some are defined with the groups they
belong to), or is a Megatron-internal knob that has no meaning here and is accepted with one logged line
saying so (`NO_EFFECT`). Nothing is ignored silently; a flag of theirs not defined here is an argparse error.

    add_arguments(parser)        the flags
    resolve(args) -> (args, notes)   a copy of `args` with sample-based flags turned into the iteration flags
                                     the rest of the code uses, and the lines to log; ValueError on
                                     contradictory schedule flags
"""

from __future__ import annotations

import argparse

# flag -> why it has no effect here (accepted so launch scripts run; logged once at start-up)
NO_EFFECT = {
    "--use-mcore-models": "there is one model implementation here (megatron_eff.model), Megatron-core's layout",
    "--attention-backend": "attention is F.scaled_dot_product_attention (local) or TE's DotProductAttention "
                           "(--transformer-impl transformer_engine), picked by the backend, not by this flag",
    "--ckpt-format": "checkpoints are always torch.distributed.checkpoint (Megatron's torch_dist), resharding "
                     "across TP/PP/DP on load",
    "--empty-unused-memory-level": "the CUDA caching allocator is left alone; nothing to empty on CPU",
    "--no-create-attention-mask-in-dataloader": "the data pipeline never builds attention masks (causal SDPA)",
    "--log-throughput": "tokens/s, TFLOP/s and MFU are always logged",
    "--no-masked-softmax-fusion": "softmax is inside SDPA",
    "--no-bias-gelu-fusion": "no fused bias-GeLU kernel is used",
    "--no-bias-swiglu-fusion": "no fused bias-SwiGLU kernel is used",
    "--no-bias-dropout-fusion": "no fused bias-dropout kernel is used",
    "--no-rope-fusion": "RoPE is plain PyTorch (model/rope.py)",
    "--no-gradient-accumulation-fusion": "gradients accumulate in .grad / the DP buffer with PyTorch ops",
}

DEFAULT_TRAIN_ITERS = 100

_TAKES_VALUE = ("--attention-backend", "--ckpt-format", "--empty-unused-memory-level")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Megatron-LM compatibility (README: Coming from Megatron-LM)")
    g.add_argument("--train-samples", type=int,
                   help="train for this many samples instead of --train-iters (needs --global-batch-size)")
    g.add_argument("--lr-warmup-samples", type=int, help="LR warm-up in samples (sample-based training)")
    g.add_argument("--lr-decay-samples", type=int, help="LR decay length in samples (sample-based training)")
    g.add_argument("--rampup-batch-size", type=int, nargs=3, metavar=("START", "INCREMENT", "RAMP_SAMPLES"),
                   help="grow the global batch from START by INCREMENT over RAMP_SAMPLES samples to "
                        "--global-batch-size (needs --train-samples, as in Megatron-LM)")
    g.add_argument("--step-batch-size-schedule", nargs="+", metavar="TOKENS:BATCH",
                   help="step the global batch at token thresholds, e.g. \"0:768 250B:1536\" (K/M/B/T suffixes; "
                        "the first threshold 0; --global-batch-size is the largest size; needs --train-samples)")
    g.add_argument("--lr-warmup-fraction", type=float,
                   help="LR warm-up as a fraction of the decay length (instead of --lr-warmup-iters/-samples)")
    g.add_argument("--manual-gc", action="store_true",
                   help="disable Python's automatic garbage collection; collect every --manual-gc-interval "
                        "iterations instead (fewer pauses at random points of the step)")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="with --manual-gc: iterations between collections (0: only at start-up)")
    g.add_argument("--profile", action="store_true",
                   help="record a torch.profiler trace of iterations [--profile-step-start, --profile-step-end) "
                        "into --tensorboard-dir (or ./profile)")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0], help="global ranks that profile")
    for flag, why in NO_EFFECT.items():
        if flag in _TAKES_VALUE:
            g.add_argument(flag, help=f"accepted, no effect here: {why}")
        else:
            g.add_argument(flag, action="store_true", help=f"accepted, no effect here: {why}")


def _given(args: argparse.Namespace, flag: str) -> bool:
    value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
    return value not in (None, False)


def resolve(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """Sample-based flags -> iteration flags (on a copy), contradictions -> ValueError; the lines to log."""
    args = argparse.Namespace(**vars(args))
    notes = [f"{flag}: accepted, no effect here: {why}" for flag, why in NO_EFFECT.items() if _given(args, flag)]
    if getattr(args, "tiktoken_pattern", None) and args.tokenizer_type != "TikTokenizer":
        notes.append(f"--tiktoken-pattern: accepted, no effect here: only --tokenizer-type TikTokenizer reads it "
                     f"(this run uses {args.tokenizer_type}), as in Megatron-LM")
    sample_flags = [f for f in ("--train-samples", "--lr-warmup-samples", "--lr-decay-samples",
                                "--rampup-batch-size", "--step-batch-size-schedule") if _given(args, f)]
    if args.train_iters is not None and sample_flags:  # Megatron-LM: iteration- or sample-based, never both
        raise ValueError(f"--train-iters (iteration-based training) cannot be combined with {', '.join(sample_flags)} "
                         "(sample-based); use --train-samples, or --lr-warmup-iters/--lr-decay-iters")
    if args.train_samples is not None:
        notes += _sample_based(args, sample_flags)
    elif sample_flags:
        raise ValueError(f"{', '.join(sample_flags)} need --train-samples (sample-based training)")
    else:
        if args.train_iters is None:
            args.train_iters = DEFAULT_TRAIN_ITERS
        if args.lr_warmup_fraction is not None:
            _check_warmup_fraction(args, args.lr_warmup_iters)
            args.lr_warmup_iters = int(args.lr_warmup_fraction * (args.lr_decay_iters or args.train_iters))
    if args.manual_gc_interval < 0:
        raise ValueError(f"--manual-gc-interval must be >= 0, got {args.manual_gc_interval}")
    if args.profile and not 0 <= args.profile_step_start < args.profile_step_end:
        raise ValueError(f"--profile-step-start {args.profile_step_start} must be < --profile-step-end "
                         f"{args.profile_step_end}")
    return args, notes


def _check_warmup_fraction(args: argparse.Namespace, warmup_given) -> None:
    if not 0 <= args.lr_warmup_fraction <= 1:
        raise ValueError(f"--lr-warmup-fraction must be in [0, 1], got {args.lr_warmup_fraction}")
    if warmup_given:
        raise ValueError("--lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples are mutually exclusive")


def _sample_based(args: argparse.Namespace, flags: list[str]) -> list[str]:
    """Megatron-LM's sample-based training: the run is `--train-samples // --global-batch-size` iterations
    (with `--rampup-batch-size`, its ramp iterations then whole constant batches: `BatchRampup.train_iters`),
    and the LR schedule is counted in samples (`lr_schedule.sample_learning_rate` at the consumed samples):
    warm-up `--lr-warmup-samples` (or `--lr-warmup-fraction` x the decay), decay `--lr-decay-samples`
    (default `--train-samples`)."""
    from megatron_eff.training.batch_schedule import StepBatchSchedule, batch_size_schedule

    if args.step_batch_size_schedule is not None:  # one string in Megatron-LM's scripts; words here too
        args.step_batch_size_schedule = " ".join(args.step_batch_size_schedule)
        steps = StepBatchSchedule.parse(args.step_batch_size_schedule, _seq_length(args))
        if args.global_batch_size not in (None, steps.global_batch_size):
            raise ValueError(f"--global-batch-size {args.global_batch_size}: with --step-batch-size-schedule it is "
                             f"the schedule's largest size, {steps.global_batch_size}")
        args.global_batch_size = steps.global_batch_size
    gbs = args.global_batch_size
    if gbs is None:
        raise ValueError(f"{', '.join(flags)} need --global-batch-size (Megatron-LM's sample-based training)")
    if args.train_samples < 1:
        raise ValueError(f"--train-samples must be positive, got {args.train_samples}")
    if args.lr_warmup_iters or args.lr_decay_iters is not None:
        raise ValueError("--lr-warmup-iters/--lr-decay-iters are iteration-based; with --train-samples use "
                         "--lr-warmup-samples/--lr-decay-samples (as Megatron-LM)")
    schedule = batch_size_schedule(args.rampup_batch_size, args.step_batch_size_schedule, _seq_length(args), gbs)
    args.train_iters = schedule.train_iters(args.train_samples) if schedule else args.train_samples // gbs
    if args.train_iters < 1:
        raise ValueError(f"--train-samples {args.train_samples} is less than one global batch ({gbs})")
    if args.lr_decay_samples is None:
        args.lr_decay_samples = args.train_samples
    if args.lr_warmup_fraction is not None:
        _check_warmup_fraction(args, _given(args, "--lr-warmup-samples"))
        args.lr_warmup_samples = int(args.lr_warmup_fraction * args.lr_decay_samples)
    args.lr_warmup_samples = args.lr_warmup_samples or 0
    ramp_note = f", batch ramp-up {' '.join(map(str, args.rampup_batch_size))}" if args.rampup_batch_size else ""
    if args.step_batch_size_schedule:
        ramp_note = f", batch steps {args.step_batch_size_schedule!r}"
    return [f"sample-based training: --train-samples {args.train_samples} -> {args.train_iters} iterations "
            f"(global batch {gbs}{ramp_note}); LR warm-up {args.lr_warmup_samples} and decay "
            f"{args.lr_decay_samples} samples"]


def _seq_length(args: argparse.Namespace) -> int:
    """--seq-length, else the preset's, else the default (the model flags are resolved after this module)."""
    from megatron_eff.config import MODEL_PRESETS, ModelConfig

    preset = MODEL_PRESETS.get(args.model_preset, {}) if getattr(args, "model_preset", None) else {}
    return args.seq_length or preset.get("seq_length") or ModelConfig.seq_length

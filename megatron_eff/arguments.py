"""Command-line flags (Megatron-LM names) -> `Config`. The only module that knows argparse.

Model-shape flags default to "not given" so `--model-preset NAME` fills the shape and any explicit flag
overrides it. Every error names the flag and the value and is raised before any process-group work.
"""

from __future__ import annotations

import argparse

from megatron_eff import megatron_compat
from megatron_eff.config import (
    MODEL_PRESETS,
    TORCH_COMPILE_MODES,
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    TrainConfig,
)
from megatron_eff.data.tokenizer import TIKTOKEN_PATTERNS, TOKENIZER_TYPES, NullTokenizer
from megatron_eff.methods import add_method_arguments, method_configs_from_args

# dest -> (ModelConfig field). Flags whose dest equals the field are listed by name.
_MODEL_FIELDS = [
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "seq_length",
    "max_position_embeddings", "vocab_size", "make_vocab_size_divisible_by", "position_embedding_type",
    "rotary_base", "rotary_percent", "kv_channels", "apply_layernorm_1p", "normalization", "norm_epsilon", "swiglu",
    "init_method_std",
    "attention_dropout", "hidden_dropout", "recompute_activations", "transformer_impl",
    "untie_embeddings_and_output_weights",
]


def _model_group(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model-preset", choices=sorted(MODEL_PRESETS), help="fill the shape from the sizes table")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--group-query-attention", action="store_true",
                   help="grouped-query attention with --num-query-groups K/V heads")
    g.add_argument("--num-query-groups", type=int,
                   help="K/V heads with --group-query-attention (default: the preset's, else 1, i.e. multi-query "
                        "attention, as Megatron-LM)")
    g.add_argument("--seq-length", type=int)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--vocab-size", type=int,
                   help="NullTokenizer: ids 0..N-1 of the text, plus eod = N, so the model's vocabulary is N + 1 "
                        "(Megatron; without the flag: the preset's, eod included). Other tokenizers: overrides the "
                        "model's vocabulary (default: the tokenizer's size)")
    g.add_argument("--make-vocab-size-divisible-by", type=int)
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"])
    g.add_argument("--rotary-base", type=float)
    g.add_argument("--rotary-percent", type=float, help="fraction of each head's dims RoPE rotates (default: 1.0)")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="compute the (vocab-parallel) cross entropy --cross-entropy-chunk-tokens tokens at a time: "
                        "no full-size float32 copies of the logits or the softmax")
    g.add_argument("--cross-entropy-chunk-tokens", type=int, default=1024,
                   help="tokens per chunk with --cross-entropy-loss-fusion")
    g.add_argument("--apply-layernorm-1p", action="store_true", default=None,
                   help="zero-centred norm scales: stored as w, applied as 1 + w (weight decay pulls them to 1)")
    g.add_argument("--kv-channels", type=int, help="head dim (default: --hidden-size / --num-attention-heads)")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--norm-epsilon", type=float)
    g.add_argument("--swiglu", action="store_true", default=None)
    g.add_argument("--disable-bias-linear", action="store_true", default=None)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)
    g.add_argument("--init-method-std", type=float)
    g.add_argument("--attention-dropout", type=float)
    g.add_argument("--hidden-dropout", type=float)
    g.add_argument("--recompute-activations", action="store_true", default=None)
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"])


def _parallel_group(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="split each sequence over this many ranks (load-balanced causal chunks, attention "
                        "over the whole sequence, --cp-comm-type); --seq-length must be divisible by 2 x this")
    g.add_argument("--cp-comm-type", choices=("p2p", "allgather"), default="p2p",
                   help="context-parallel attention: p2p = ring attention, K/V blocks passed by send/recv "
                        "(default, as Megatron-LM); allgather = all-gather K/V once, then masked SDPA")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer: overlap the parameter all-gather with the next forward")
    g.add_argument("--ddp-bucket-size", type=int, default=40_000_000,
                   help="elements per data-parallel gradient bucket (default 40M, as Megatron-LM)")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="data-parallel gradient reduction in BF16 (half the bytes); accumulation stays FP32")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="a collective that waits this long for another rank (stopped, stuck) fails the run with a "
                        "message naming it, instead of hanging for torch's 30 minutes")


def _training_group(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, help="default: micro-batch size x data-parallel size")
    g.add_argument("--train-iters", type=int, help="iterations to train (default: 100, or --train-samples)")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip-grad", type=float, default=1.0, help="max global grad norm (0 disables)")
    g.add_argument("--decoupled-lr", type=float, help="LR of the embedding and output layer (their own schedule "
                   "between --decoupled-min-lr and this; default: --lr like every parameter)")
    g.add_argument("--decoupled-min-lr", type=float, help="minimum LR with --decoupled-lr (default: --min-lr)")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true", help="BF16 autocast, FP32 master weights")
    g.add_argument("--fp16", action="store_true", help="FP16 autocast, FP32 master weights")
    g.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop after this many consecutive NaN/inf losses or grad norms (each is skipped)")
    g.add_argument("--torch-compile", action="store_true",
                   help="torch.compile each transformer layer in place (as torchtitan): the first iteration "
                        "compiles (tens of seconds on a CPU); checkpoints are the same as without it")
    g.add_argument("--torch-compile-mode", choices=TORCH_COMPILE_MODES, default="default",
                   help="torch.compile's mode with --torch-compile")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="average the loss over all tokens of the global batch (when loss masks make micro-batches "
                        "count different numbers of tokens) instead of the mean of micro-batch token means")


def _data_group(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=[], help="[W1] PREFIX1 [W2] PREFIX2 ...")
    g.add_argument("--mock-data", action="store_true", help="synthetic random tokens (no --data-path)")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions over documents")
    g.add_argument("--tokenizer-type", default="NullTokenizer", choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model")
    g.add_argument("--tiktoken-pattern", choices=sorted(TIKTOKEN_PATTERNS),
                   help="TikTokenizer split pattern (default v2; other tokenizer types do not read it)")
    g.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                   help="TikTokenizer: ids reserved for special tokens before the BPE ranks")
    g.add_argument("--tiktoken-special-tokens", nargs="+",
                   help="TikTokenizer special tokens (default <unk> <s> </s>; must include those three)")
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--data-cache-path")
    g.add_argument("--no-mmap-bin-files", dest="mmap_bin_files", action="store_false",
                   help="read .bin files with pread instead of memory-mapping them")
    g.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader worker processes that read and collate batches ahead of use (0: in the "
                        "training process); the batches and their order do not change")
    g.add_argument("--data-max-blend-weight", type=float,
                   help="size every blend member's train split for up to this share of the run, so methods "
                        "that change blend weights during training (dynamic batch loading) can raise a weight "
                        "that far (default: each member sized from its initial weight)")
    g.add_argument("--no-per-domain-validation", dest="per_domain_validation", action="store_false",
                   help="with several --data-path prefixes, skip the per-domain validation losses (each domain "
                        "costs as much as the blended validation)")


def _checkpoint_logging_group(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpointing and logging")
    g.add_argument("--save")
    g.add_argument("--load")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--finetune", action="store_true", help="load weights only; start at iteration 0")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--use-checkpoint-opt_param-scheduler", dest="use_checkpoint_opt_param_scheduler",
                   action="store_true", help="on resume, keep the LR schedule (--lr, --min-lr, decay style and "
                   "length, warm-up) of the checkpoint's run instead of these flags'")
    g.add_argument("--override-opt_param-scheduler", dest="override_opt_param_scheduler", action="store_true",
                   help="on resume, use these flags' LR schedule even where it differs from the checkpoint's "
                   "(without this, a difference is used but warned about)")
    g.add_argument("--override-existing-checkpoints", action="store_true",
                   help="let --save write into a folder that holds checkpoints this run did not --load from "
                        "(without this such a run is refused, so they are not overwritten)")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--tensorboard-dir")
    g.add_argument("--peak-tflops", type=float, help="per-device peak for MFU (default: guessed from device)")
    g.add_argument("--exit-interval", type=int, help="exit after the iteration divisible by this")
    g.add_argument("--exit-duration-in-mins", type=float)
    g.add_argument("--exit-signal-handler", action="store_true", help="on SIGTERM: save, then exit")


def _precision_group(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("precision: FP8, FP16 loss scaling, Unit Scaling (megatron_eff/precision/)")
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"],
                   help="FP8 GEMMs: e4m3 everywhere, or hybrid (E4M3 forward, E5M2 gradients); TE with "
                        "--transformer-impl transformer_engine, fake-quantised emulation with local")
    g.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "mxfp8", "blockwise", "unscaled"],
                   default="delayed",
                   help="scaling: delayed (amax history), tensorwise (current amax), mxfp8 (1x32 blocks, "
                        "power-of-two scales), blockwise (1x128 activations/grads, 128x128 weights), unscaled "
                        "(scale 1, a plain cast: for --unit-scaling models; local backend)")
    g.add_argument("--fp8-block-fp32-scales", action="store_true",
                   help="blockwise: FP32 block scales (default: powers of two, as TE)")
    g.add_argument("--fp8-amax-history-len", type=int, default=1024, help="delayed scaling: amax history steps")
    g.add_argument("--fp8-amax-compute-algo", choices=["max", "most_recent"], default="max")
    g.add_argument("--fp8-margin", type=int, default=0,
                   help="delayed scaling: scale = fp8_max / amax / 2**margin")
    g.add_argument("--fp8-gemm", choices=["emulate", "scaled_mm"], default="emulate",
                   help="local backend's FP8 GEMMs: emulate (fake-quantised inputs, FP32/BF16 GEMM) or scaled_mm "
                        "(real FP8 GEMMs with torch._scaled_mm, no TE needed; delayed/tensorwise recipes)")
    g.add_argument("--fp8-param-gather", action="store_true",
                   help="keep the weights of the FP8 linears in FP8 (E4M3 + one scale, cast from the FP32 master "
                        "weights after each step); with --use-distributed-optimizer the parameter all-gather moves "
                        "them as FP8 bytes (local backend, per-tensor recipes)")
    g.add_argument("--first-last-layers-bf16", action="store_true",
                   help="keep the first and the last transformer layer out of FP8")
    g.add_argument("--loss-scale", type=float, help="static FP16 loss scale (default: dynamic loss scaling; with "
                                                          "--unit-scaling a static 1)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**16, help="dynamic loss scaling: start")
    g.add_argument("--loss-scale-window", type=int, default=1000,
                   help="dynamic loss scaling: double the scale after this many steps without overflow")
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--hysteresis", type=int, default=2,
                   help="dynamic loss scaling: overflows tolerated before the scale is halved")
    g.add_argument("--unit-scaling", action="store_true",
                   help="unit-scaled model (Blake et al. 2023): unit init, scaled ops, no loss scaling needed")
    g.add_argument("--unit-scaling-residual", choices=["depth", "fixed"], default="depth",
                   help="unit scaling: residual branch weights; depth: the current unit-scaling library's "
                        "depth-dependent rule (keeps gradients unit at depth, also with SwiGLU); fixed: v0.1's "
                        "constant taus (--unit-scaling-residual-tau-attn/-mlp)")
    g.add_argument("--unit-scaling-residual-mult", type=float, default=1.0,
                   help="unit scaling, depth rule: contribution of all residual branches relative to the embedding")
    g.add_argument("--unit-scaling-residual-attn-ratio", type=float, default=1.0,
                   help="unit scaling, depth rule: contribution of attention relative to MLP branches")
    g.add_argument("--unit-scaling-residual-tau-attn", type=float, default=0.01,
                   help="unit scaling, fixed rule: weight of the attention residual branch (v0.1 default)")
    g.add_argument("--unit-scaling-residual-tau-mlp", type=float, default=0.5,
                   help="unit scaling, fixed rule: weight of the MLP residual branch (v0.1 default)")
    g.add_argument("--no-unit-scaling-lr-scaling", dest="unit_scaling_lr_scaling", action="store_false",
                   help="unit scaling: one LR for every tensor (default: per-tensor LR multipliers and "
                        "LR-independent weight decay, so the standard model's --lr works)")


def precision_config_from_args(args: argparse.Namespace) -> PrecisionConfig:
    names = ["fp8_format", "fp8_recipe", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_margin",
             "first_last_layers_bf16", "loss_scale", "initial_loss_scale", "loss_scale_window", "min_loss_scale",
             "hysteresis", "unit_scaling", "unit_scaling_residual_tau_attn", "unit_scaling_residual_tau_mlp",
             "fp8_gemm", "unit_scaling_residual", "unit_scaling_residual_mult", "unit_scaling_residual_attn_ratio",
             "unit_scaling_lr_scaling", "fp8_block_fp32_scales", "fp8_param_gather"]
    return PrecisionConfig(**{name: getattr(args, name) for name in names})


def document_defaults(parser: argparse.ArgumentParser) -> None:
    """Every flag's default in `--help`, once: "(default: X)" is appended unless the help text already says
    what the default is; flags that default to off or unset show none."""
    for action in parser._actions:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or not action.option_strings or unset:
            continue
        action.help = f"{text} (default: %(default)s)".strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain.py",
        description="megatron_eff pretraining (GPT-2 and LLaMA shapes). Flags follow Megatron-LM.",
    )
    for add in (_model_group, _parallel_group, _training_group, _data_group, _checkpoint_logging_group,
                _precision_group, megatron_compat.add_arguments, add_method_arguments):
        add(parser)
    document_defaults(parser)
    return parser


def model_config_from_args(args: argparse.Namespace, vocab_size: int | None = None) -> ModelConfig:
    """Preset (if any), then every explicitly given model flag on top."""
    values: dict = dict(MODEL_PRESETS[args.model_preset]) if args.model_preset else {}
    for name in _MODEL_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    if args.disable_bias_linear:
        values["add_bias_linear"] = False
    if args.cross_entropy_loss_fusion:
        values["cross_entropy_chunk_tokens"] = args.cross_entropy_chunk_tokens
    if args.num_query_groups is not None and not args.group_query_attention:
        raise ValueError("--num-query-groups needs --group-query-attention")
    if args.group_query_attention and values.get("num_query_groups") is None:
        values["num_query_groups"] = 1  # Megatron-LM's default: one K/V head (multi-query attention)
    if args.vocab_size is not None and args.tokenizer_type == "NullTokenizer":
        values["vocab_size"] = NullTokenizer(args.vocab_size).vocab_size  # the text ids and eod (Megatron)
    elif args.vocab_size is None and vocab_size is not None:
        values["vocab_size"] = vocab_size
    return ModelConfig(**values)


def config_from_args(args: argparse.Namespace, vocab_size: int | None = None) -> Config:
    """All dataclasses from parsed flags. `vocab_size` comes from the tokenizer when one is used."""
    args, notes = megatron_compat.resolve(args)
    return Config(
        model=model_config_from_args(args, vocab_size),
        parallel=ParallelConfig(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            context_parallel_size=args.context_parallel_size,
            cp_comm_type=args.cp_comm_type,
            num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
            sequence_parallel=args.sequence_parallel,
            use_distributed_optimizer=args.use_distributed_optimizer,
            overlap_grad_reduce=args.overlap_grad_reduce,
            overlap_param_gather=args.overlap_param_gather,
            ddp_bucket_size=args.ddp_bucket_size, grad_reduce_in_bf16=args.grad_reduce_in_bf16,
            distributed_timeout_minutes=args.distributed_timeout_minutes,
        ),
        optim=OptimizerConfig(
            lr=args.lr, min_lr=args.min_lr, lr_decay_style=args.lr_decay_style,
            lr_warmup_iters=args.lr_warmup_iters, lr_decay_iters=args.lr_decay_iters,
            lr_warmup_samples=args.lr_warmup_samples or 0, lr_decay_samples=args.lr_decay_samples,
            weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps, clip_grad=args.clip_grad, decoupled_lr=args.decoupled_lr,
            decoupled_min_lr=args.decoupled_min_lr,
        ),
        train=TrainConfig(
            micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
            train_iters=args.train_iters, seed=args.seed, bf16=args.bf16, fp16=args.fp16,
            eval_interval=args.eval_interval, eval_iters=args.eval_iters, log_interval=args.log_interval,
            max_bad_steps=args.max_bad_steps, calculate_per_token_loss=args.calculate_per_token_loss,
            manual_gc=args.manual_gc, manual_gc_interval=args.manual_gc_interval, exit_interval=args.exit_interval,
            exit_duration_in_mins=args.exit_duration_in_mins, exit_signal_handler=args.exit_signal_handler,
            train_samples=args.train_samples, rampup_batch_size=args.rampup_batch_size,
            step_batch_size_schedule=args.step_batch_size_schedule, torch_compile=args.torch_compile,
            torch_compile_mode=args.torch_compile_mode,
        ),
        data=DataConfig(
            data_path=args.data_path, split=args.split, tokenizer_type=args.tokenizer_type,
            tiktoken_pattern=args.tiktoken_pattern, tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
            tiktoken_special_tokens=args.tiktoken_special_tokens,
            tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file, merge_file=args.merge_file,
            data_cache_path=args.data_cache_path, num_workers=args.num_workers, mock_data=args.mock_data,
            max_blend_weight=args.data_max_blend_weight, per_domain_validation=args.per_domain_validation,
            mmap_bin_files=args.mmap_bin_files,
        ),
        checkpoint=CheckpointConfig(
            save=args.save, load=args.load, save_interval=args.save_interval, finetune=args.finetune,
            no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng,
            use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
            override_opt_param_scheduler=args.override_opt_param_scheduler,
            override_existing_checkpoints=args.override_existing_checkpoints,
        ),
        logging=LoggingConfig(tensorboard_dir=args.tensorboard_dir, peak_tflops=args.peak_tflops,
                              profile=args.profile, profile_step_start=args.profile_step_start,
                              profile_step_end=args.profile_step_end, profile_ranks=args.profile_ranks),
        methods=method_configs_from_args(args),
        precision=precision_config_from_args(args),
        notes=notes,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)

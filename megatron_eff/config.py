"""Typed configuration: one small dataclass per concern, validated in `__post_init__`.

A leaf module: it imports nothing else from megatron_eff. `arguments.py` (and each method package's
`add_arguments`) are the only places that know argparse; they fill these dataclasses. Every validation error
names the command-line flag and the offending value, so a bad run fails before any process-group work.
Checks that need the world size or the file system are `megatron_eff/launch.py`'s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


def require(condition: bool, message: str) -> None:
    """ValueError(message) unless `condition`: config validation's one way to fail."""
    if not condition:
        raise ValueError(message)


@dataclass
class ModelConfig:
    """Shape and flavour of the one transformer (GPT-2 style or LLaMA style by switches)."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None  # default: 4h (GELU) or the LLaMA 8h/3 rounded to 64 (SwiGLU)
    num_query_groups: int | None = None  # None = MHA (one group per head); fewer = GQA
    seq_length: int = 128
    max_position_embeddings: int | None = None  # default: seq_length
    vocab_size: int = 256  # the tokenizer's vocabulary, before padding
    make_vocab_size_divisible_by: int = 128
    position_embedding_type: str = "learned_absolute"  # or "rope"
    rotary_base: float = 10000.0
    cross_entropy_chunk_tokens: int | None = None  # --cross-entropy-loss-fusion: the loss this many tokens at a time
    apply_layernorm_1p: bool = False  # zero-centred norm scales, applied as 1 + weight (Megatron's flag)
    rotary_percent: float = 1.0  # RoPE on the first fraction of each head's dims (Megatron's --rotary-percent)
    kv_channels: int | None = None  # head dim; default hidden / heads (Megatron's --kv-channels)
    normalization: str = "LayerNorm"  # or "RMSNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = False
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    recompute_activations: bool = False
    transformer_impl: str = "local"

    def __post_init__(self) -> None:
        require(self.num_layers > 0, f"--num-layers must be positive, got {self.num_layers}")
        require(self.hidden_size > 0, f"--hidden-size must be positive, got {self.hidden_size}")
        require(self.num_attention_heads > 0, f"--num-attention-heads must be positive, got {self.num_attention_heads}")
        require(self.kv_channels is None or self.kv_channels > 0,
                f"--kv-channels must be positive, got {self.kv_channels}")
        require(
            self.kv_channels is not None or self.hidden_size % self.num_attention_heads == 0,
            f"--hidden-size {self.hidden_size} must be divisible by --num-attention-heads "
            f"{self.num_attention_heads} (or give the head dim with --kv-channels)",
        )
        require(self.cross_entropy_chunk_tokens is None or self.cross_entropy_chunk_tokens > 0,
                f"--cross-entropy-chunk-tokens must be positive, got {self.cross_entropy_chunk_tokens}")
        require(0 < self.rotary_percent <= 1, f"--rotary-percent must be in (0, 1], got {self.rotary_percent}")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        require(
            0 < self.num_query_groups <= self.num_attention_heads
            and self.num_attention_heads % self.num_query_groups == 0,
            f"--num-query-groups {self.num_query_groups} must divide --num-attention-heads "
            f"{self.num_attention_heads}",
        )
        if self.ffn_hidden_size is None:
            if self.swiglu:  # LLaMA: 2/3 of 4h, rounded up to a multiple of 64
                self.ffn_hidden_size = 64 * math.ceil(int(8 * self.hidden_size / 3) / 64)
            else:
                self.ffn_hidden_size = 4 * self.hidden_size
        require(self.ffn_hidden_size > 0, f"--ffn-hidden-size must be positive, got {self.ffn_hidden_size}")
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        require(self.seq_length > 0, f"--seq-length must be positive, got {self.seq_length}")
        require(
            self.position_embedding_type in ("learned_absolute", "rope"),
            f"--position-embedding-type must be learned_absolute or rope, got {self.position_embedding_type!r}",
        )
        require(  # learned positions have no row past it; RoPE would rotate beyond what the model is sized for
            self.seq_length <= self.max_position_embeddings,
            f"--seq-length {self.seq_length} exceeds --max-position-embeddings {self.max_position_embeddings} "
            f"(--position-embedding-type {self.position_embedding_type})",
        )
        if self.position_embedding_type == "rope":
            require(self.rotary_dim % 2 == 0 and self.rotary_dim > 0,
                    f"rope needs an even number of rotated dims, got head dim {self.head_dim} x --rotary-percent "
                    f"{self.rotary_percent} = {self.rotary_dim}")
        require(
            self.normalization in ("LayerNorm", "RMSNorm"),
            f"--normalization must be LayerNorm or RMSNorm, got {self.normalization!r}",
        )
        require(self.vocab_size > 0, f"--vocab-size must be positive, got {self.vocab_size}")
        require(
            self.make_vocab_size_divisible_by > 0,
            f"--make-vocab-size-divisible-by must be positive, got {self.make_vocab_size_divisible_by}",
        )
        for name in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        require(
            self.transformer_impl in ("local", "transformer_engine"),
            f"--transformer-impl must be local or transformer_engine, got {self.transformer_impl!r}",
        )

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first ones), Megatron's int(kv_channels x rotary_percent)."""
        return int(self.head_dim * self.rotary_percent)

    @property
    def tied_embeddings(self) -> bool:
        return not self.untie_embeddings_and_output_weights

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Megatron's rule: pad to a multiple of `make_vocab_size_divisible_by * TP`."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return multiple * math.ceil(self.vocab_size / multiple)


# Sizes table for --model-preset. Fields not given keep the command line's / dataclass's values.
_GPT2 = dict(
    position_embedding_type="learned_absolute",
    normalization="LayerNorm",
    swiglu=False,
    add_bias_linear=True,
    untie_embeddings_and_output_weights=False,
    max_position_embeddings=1024,
    seq_length=1024,
    vocab_size=50257,
)
_LLAMA = dict(
    position_embedding_type="rope",
    normalization="RMSNorm",
    swiglu=True,
    add_bias_linear=False,
    untie_embeddings_and_output_weights=True,
)
MODEL_PRESETS: dict[str, dict] = {
    "gpt-tiny": {**_GPT2, "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                 "seq_length": 128, "max_position_embeddings": 128, "vocab_size": 256},
    "gpt2-124m": {**_GPT2, "num_layers": 12, "hidden_size": 768, "num_attention_heads": 12},
    "gpt2-350m": {**_GPT2, "num_layers": 24, "hidden_size": 1024, "num_attention_heads": 16},
    "gpt2-774m": {**_GPT2, "num_layers": 36, "hidden_size": 1280, "num_attention_heads": 20},
    "llama-tiny": {**_LLAMA, "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                   "num_query_groups": 2, "ffn_hidden_size": 176, "seq_length": 128, "vocab_size": 256,
                   "norm_epsilon": 1e-5},
    "llama-350m": {**_LLAMA, "num_layers": 24, "hidden_size": 1024, "num_attention_heads": 16,
                   "num_query_groups": 4, "ffn_hidden_size": 2816, "seq_length": 2048,
                   "vocab_size": 32000, "norm_epsilon": 1e-5},
    "llama-1b": {**_LLAMA, "num_layers": 16, "hidden_size": 2048, "num_attention_heads": 32,
                 "num_query_groups": 8, "ffn_hidden_size": 8192, "seq_length": 2048, "vocab_size": 32000,
                 "norm_epsilon": 1e-5, "rotary_base": 500000.0},
    "llama2-7b": {**_LLAMA, "num_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                  "ffn_hidden_size": 11008, "seq_length": 4096, "vocab_size": 32000, "norm_epsilon": 1e-5},
    "llama3-8b": {**_LLAMA, "num_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                  "num_query_groups": 8, "ffn_hidden_size": 14336, "seq_length": 8192,
                  "vocab_size": 128256, "norm_epsilon": 1e-5, "rotary_base": 500000.0},
}


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1  # sequence split over this many ranks (parallel/context_parallel.py)
    cp_comm_type: str = "p2p"  # CP attention: p2p (ring, send/recv) | allgather (all-gathered K/V)
    num_layers_per_virtual_pipeline_stage: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False  # wait for each bucket's parameter all-gather in the next forward
    ddp_bucket_size: int = 40_000_000  # elements per data-parallel gradient bucket (Megatron's default)
    grad_reduce_in_bf16: bool = False  # data-parallel gradient reduction in BF16 (the buffer stays FP32)
    distributed_timeout_minutes: float = 10.0  # a collective waiting this long for a rank fails the run

    def __post_init__(self) -> None:
        require(
            self.tensor_model_parallel_size >= 1,
            f"--tensor-model-parallel-size must be >= 1, got {self.tensor_model_parallel_size}",
        )
        require(
            self.pipeline_model_parallel_size >= 1,
            f"--pipeline-model-parallel-size must be >= 1, got {self.pipeline_model_parallel_size}",
        )
        require(
            self.context_parallel_size >= 1,
            f"--context-parallel-size must be >= 1, got {self.context_parallel_size}",
        )
        require(
            self.cp_comm_type in ("p2p", "allgather"),
            f"--cp-comm-type must be p2p or allgather, got {self.cp_comm_type!r}",
        )
        require(
            not self.sequence_parallel or self.tensor_model_parallel_size > 1,
            "--sequence-parallel needs --tensor-model-parallel-size > 1",
        )
        require(self.ddp_bucket_size > 0, f"--ddp-bucket-size must be positive, got {self.ddp_bucket_size}")
        require(self.distributed_timeout_minutes > 0,
                f"--distributed-timeout-minutes must be positive, got {self.distributed_timeout_minutes}")
        require(
            not self.overlap_param_gather or self.use_distributed_optimizer,
            "--overlap-param-gather needs --use-distributed-optimizer",
        )

    def data_parallel_size(self, world_size: int) -> int:
        cp = self.context_parallel_size
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size * cp
        require(
            world_size % model_parallel == 0,
            f"world size {world_size} is not divisible by --tensor-model-parallel-size "
            f"{self.tensor_model_parallel_size} x --pipeline-model-parallel-size "
            f"{self.pipeline_model_parallel_size}" + (f" x --context-parallel-size {cp}" if cp > 1 else ""),
        )
        return world_size // model_parallel

    def check_model(self, model: ModelConfig) -> None:
        """Divisibility rules between the parallel layout and the model shape."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        require(
            model.num_attention_heads % tp == 0,
            f"--num-attention-heads {model.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}",
        )
        require(
            model.num_query_groups % tp == 0,
            f"--num-query-groups {model.num_query_groups} is not divisible by --tensor-model-parallel-size {tp}",
        )
        require(
            model.ffn_hidden_size % tp == 0,
            f"--ffn-hidden-size {model.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}",
        )
        vpp = self.num_layers_per_virtual_pipeline_stage
        require(
            not vpp or pp > 1,
            f"--num-layers-per-virtual-pipeline-stage {vpp} needs --pipeline-model-parallel-size > 1",
        )
        layers_per_chunk = vpp if vpp else model.num_layers // pp
        chunks = pp * (model.num_layers // (pp * vpp) if vpp else 1)
        require(
            model.num_layers % pp == 0 and layers_per_chunk * chunks == model.num_layers,
            f"--num-layers {model.num_layers} is not divisible by --pipeline-model-parallel-size {pp}"
            + (f" x --num-layers-per-virtual-pipeline-stage {vpp}" if vpp else ""),
        )
        cp = self.context_parallel_size
        require(
            cp == 1 or self.cp_comm_type != "p2p" or model.attention_dropout == 0.0,
            f"--attention-dropout {model.attention_dropout} is not supported by --cp-comm-type p2p (ring "
            "attention); use --cp-comm-type allgather",
        )
        require(
            cp == 1 or model.seq_length % (2 * cp) == 0,
            f"--seq-length {model.seq_length} is not divisible by 2 x --context-parallel-size {cp} "
            "(context parallelism's load-balanced chunks)",
        )
        if self.sequence_parallel:
            require(
                model.seq_length % (tp * cp) == 0,
                f"--seq-length {model.seq_length} is not divisible by --tensor-model-parallel-size {tp}"
                + (f" x --context-parallel-size {cp}" if cp > 1 else "") + " (needed by --sequence-parallel)",
            )


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # default: train_iters
    # sample-based schedule (--train-samples): Megatron-LM's formula at the consumed samples; decay None = iterations
    lr_warmup_samples: int = 0
    lr_decay_samples: int | None = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    decoupled_lr: float | None = None  # embedding and output layer LR (Megatron's --decoupled-lr)
    decoupled_min_lr: float | None = None  # their minimum LR (default: --min-lr)

    def __post_init__(self) -> None:
        require(self.decoupled_lr is None or self.decoupled_lr > 0,
                f"--decoupled-lr must be positive, got {self.decoupled_lr}")
        require(self.decoupled_min_lr is None or self.decoupled_lr is not None,
                "--decoupled-min-lr needs --decoupled-lr")
        require(self.lr > 0, f"--lr must be positive, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        require(
            self.lr_decay_style in ("cosine", "linear", "constant"),
            f"--lr-decay-style must be cosine, linear or constant, got {self.lr_decay_style!r}",
        )
        require(self.lr_warmup_iters >= 0, f"--lr-warmup-iters must be >= 0, got {self.lr_warmup_iters}")
        require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        require(0 <= self.adam_beta1 < 1, f"--adam-beta1 must be in [0, 1), got {self.adam_beta1}")
        require(0 <= self.adam_beta2 < 1, f"--adam-beta2 must be in [0, 1), got {self.adam_beta2}")
        require(self.clip_grad >= 0, f"--clip-grad must be >= 0 (0 disables), got {self.clip_grad}")


TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    global_batch_size: int | None = None  # default: micro_batch_size * data-parallel size
    train_iters: int = 100
    seed: int = 1234
    bf16: bool = False
    fp16: bool = False
    eval_interval: int = 100
    eval_iters: int = 10
    log_interval: int = 10
    max_bad_steps: int = 10  # NaN/inf losses or grad norms in a row before a hard stop
    calculate_per_token_loss: bool = False  # global token mean instead of the mean of micro-batch means
    manual_gc: bool = False  # Python's automatic GC off; collect every manual_gc_interval iterations
    manual_gc_interval: int = 0
    exit_interval: int | None = None
    exit_duration_in_mins: float | None = None
    exit_signal_handler: bool = False
    train_samples: int | None = None  # sample-based training (Megatron's --train-samples); train_iters derived
    rampup_batch_size: list[int] | None = None  # [start, increment, ramp samples] (needs train_samples)
    step_batch_size_schedule: str | None = None  # "T0:BS0 T1:BS1 ..." in tokens (needs train_samples)
    torch_compile: bool = False  # each transformer layer torch.compile'd in place (training/compile.py)
    torch_compile_mode: str = "default"  # torch.compile's mode: default | reduce-overhead | max-autotune | ...

    def __post_init__(self) -> None:
        require(self.torch_compile_mode in TORCH_COMPILE_MODES, f"--torch-compile-mode must be one of "
                f"{', '.join(TORCH_COMPILE_MODES)}, got {self.torch_compile_mode!r}")
        require(self.rampup_batch_size is None or self.train_samples is not None,
                "--rampup-batch-size needs sample-based training (--train-samples), as in Megatron-LM")
        require(self.step_batch_size_schedule is None or self.train_samples is not None,
                "--step-batch-size-schedule needs sample-based training (--train-samples), as in Megatron-LM")
        require(self.micro_batch_size > 0, f"--micro-batch-size must be positive, got {self.micro_batch_size}")
        require(self.train_iters > 0, f"--train-iters must be positive, got {self.train_iters}")
        require(self.max_bad_steps > 0, f"--max-bad-steps must be positive, got {self.max_bad_steps}")
        require(not (self.bf16 and self.fp16), "--bf16 and --fp16 are mutually exclusive")
        require(self.log_interval > 0, f"--log-interval must be positive, got {self.log_interval}")
        require(self.eval_interval > 0, f"--eval-interval must be positive, got {self.eval_interval}")
        require(self.eval_iters >= 0, f"--eval-iters must be >= 0, got {self.eval_iters}")
        if self.global_batch_size is not None:
            require(self.global_batch_size > 0, f"--global-batch-size must be positive, got {self.global_batch_size}")

    def num_micro_batches(self, data_parallel_size: int) -> int:
        """Gradient-accumulation steps per iteration on each data-parallel rank."""
        gbs = self.global_batch_size or self.micro_batch_size * data_parallel_size
        per_step = self.micro_batch_size * data_parallel_size
        require(
            gbs % per_step == 0,
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size {self.micro_batch_size} x "
            f"data-parallel size {data_parallel_size}",
        )
        return gbs // per_step

    def resolved_global_batch_size(self, data_parallel_size: int) -> int:
        return self.global_batch_size or self.micro_batch_size * data_parallel_size


@dataclass
class DataConfig:
    data_path: list[str] = field(default_factory=list)  # [W1] PREFIX1 [W2] PREFIX2 ...
    split: str = "969,30,1"
    tokenizer_type: str = "NullTokenizer"
    tokenizer_model: str | None = None
    tiktoken_pattern: str | None = None  # TikTokenizer only (default v2)
    tiktoken_num_special_tokens: int = 1000
    tiktoken_special_tokens: list[str] | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    data_cache_path: str | None = None
    num_workers: int = 0
    mock_data: bool = False
    max_blend_weight: float | None = None  # size blend members for live weights up to this (None: initial)
    per_domain_validation: bool = True  # a validation loss per --data-path domain (several prefixes)
    mmap_bin_files: bool = True  # False: read .bin files with pread instead of mmap (--no-mmap-bin-files)

    def __post_init__(self) -> None:
        require(self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}")
        require(self.max_blend_weight is None or 0 < self.max_blend_weight <= 1,
                f"--data-max-blend-weight must be in (0, 1], got {self.max_blend_weight}")
        require(
            self.mock_data or bool(self.data_path),
            "--data-path is required (or --mock-data for synthetic tokens)",
        )


@dataclass
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    use_checkpoint_opt_param_scheduler: bool = False  # resume: the LR schedule of the checkpoint's run
    override_opt_param_scheduler: bool = False  # resume: the LR schedule of these flags, without a warning
    override_existing_checkpoints: bool = False  # --save DIR may hold checkpoints this run did not load from

    def __post_init__(self) -> None:
        if self.save_interval is not None:
            require(self.save_interval > 0, f"--save-interval must be positive, got {self.save_interval}")
            require(self.save is not None, "--save-interval needs --save DIR")
        require(not (self.use_checkpoint_opt_param_scheduler and self.override_opt_param_scheduler),
                "--use-checkpoint-opt_param-scheduler and --override-opt_param-scheduler are mutually exclusive")


@dataclass
class LoggingConfig:
    tensorboard_dir: str | None = None
    log_throughput: bool = True
    peak_tflops: float | None = None  # per device, for MFU; default: guessed from the device
    profile: bool = False  # a torch.profiler trace of iterations [profile_step_start, profile_step_end)
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: list[int] = field(default_factory=lambda: [0])


FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise", "unscaled")


@dataclass
class PrecisionConfig:
    """FP8 (TE or local emulation), FP16 loss scaling and Unit Scaling (`megatron_eff/precision/`).

    `--bf16` / `--fp16` stay in `TrainConfig` (autocast); FP8 GEMMs run inside that autocast like TE's."""

    fp8_format: str | None = None  # None: no FP8; e4m3 (fwd and bwd) | hybrid (E4M3 fwd, E5M2 bwd)
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"  # max | most_recent
    fp8_margin: int = 0  # delayed scaling only (TE's current/block scaling recipes have no margin)
    fp8_block_fp32_scales: bool = False  # blockwise: FP32 scales instead of powers of two (TE's default)
    fp8_gemm: str = "emulate"  # local backend: emulate (fake-quantised) | scaled_mm (torch._scaled_mm FP8 GEMMs)
    first_last_layers_bf16: bool = False  # keep the first and last transformer layer out of FP8
    # the FP8 linears' weights kept in FP8 (cast from the FP32 masters after each step); with the distributed
    # optimizer the parameter all-gather of those weights moves FP8 bytes (precision/fp8_params.py)
    fp8_param_gather: bool = False
    loss_scale: float | None = None  # static FP16 loss scale; None: dynamic
    initial_loss_scale: float = 2.0**16
    loss_scale_window: int = 1000
    min_loss_scale: float = 1.0
    hysteresis: int = 2
    unit_scaling: bool = False
    # residual branch weights: depth (the current library's depth rule) | fixed (v0.1: the two taus below)
    unit_scaling_residual: str = "depth"
    unit_scaling_residual_mult: float = 1.0  # depth rule: contribution of all branches : the embedding's
    unit_scaling_residual_attn_ratio: float = 1.0  # depth rule: attention : MLP contribution
    unit_scaling_residual_tau_attn: float = 0.01  # fixed rule: v0.1 defaults of the unit-scaling library
    unit_scaling_residual_tau_mlp: float = 0.5
    unit_scaling_lr_scaling: bool = True  # per-tensor LR multipliers (param.lr_scale) and LR-independent decay

    def __post_init__(self) -> None:
        require(
            self.fp8_format is None or self.fp8_format in FP8_FORMATS,
            f"--fp8-format must be one of {', '.join(FP8_FORMATS)}, got {self.fp8_format!r}",
        )
        require(
            self.fp8_recipe in FP8_RECIPES,
            f"--fp8-recipe must be one of {', '.join(FP8_RECIPES)}, got {self.fp8_recipe!r}",
        )
        require(self.fp8_amax_history_len >= 1,
                 f"--fp8-amax-history-len must be >= 1, got {self.fp8_amax_history_len}")
        require(
            self.fp8_amax_compute_algo in ("max", "most_recent"),
            f"--fp8-amax-compute-algo must be max or most_recent, got {self.fp8_amax_compute_algo!r}",
        )
        require(self.fp8_margin >= 0, f"--fp8-margin must be >= 0, got {self.fp8_margin}")
        require(self.fp8_gemm in ("emulate", "scaled_mm"),
                 f"--fp8-gemm must be emulate or scaled_mm, got {self.fp8_gemm!r}")
        require(self.fp8_gemm == "emulate" or self.fp8, "--fp8-gemm scaled_mm needs --fp8-format")
        require(self.fp8_gemm == "emulate" or self.fp8_recipe in ("delayed", "tensorwise", "unscaled"),
                 f"--fp8-gemm scaled_mm supports the per-tensor recipes (--fp8-recipe delayed, tensorwise or "
                 f"unscaled), got --fp8-recipe {self.fp8_recipe}")
        require(self.fp8_margin == 0 or self.fp8_recipe == "delayed",
                 f"--fp8-margin applies to --fp8-recipe delayed (TE's DelayedScaling; its current and block "
                 f"scaling recipes have no margin), got --fp8-margin {self.fp8_margin} with {self.fp8_recipe}")
        require(not self.fp8_block_fp32_scales or self.fp8_recipe == "blockwise",
                 f"--fp8-block-fp32-scales is for --fp8-recipe blockwise, got {self.fp8_recipe}")
        require(self.first_last_layers_bf16 is False or self.fp8, "--first-last-layers-bf16 needs --fp8-format")
        require(not self.fp8_param_gather or self.fp8,
                "--fp8-param-gather needs --fp8-format: it keeps the weights of the FP8 GEMMs in FP8")
        require(not self.fp8_param_gather or self.fp8_recipe in ("delayed", "tensorwise", "unscaled"),
                f"--fp8-param-gather keeps one scale per weight: it supports the per-tensor recipes (--fp8-recipe "
                f"delayed, tensorwise or unscaled), got --fp8-recipe {self.fp8_recipe}")
        require(self.loss_scale is None or self.loss_scale > 0,
                 f"--loss-scale must be positive, got {self.loss_scale}")
        require(self.initial_loss_scale > 0, f"--initial-loss-scale must be positive, got {self.initial_loss_scale}")
        require(self.loss_scale_window >= 1, f"--loss-scale-window must be >= 1, got {self.loss_scale_window}")
        require(self.min_loss_scale > 0, f"--min-loss-scale must be positive, got {self.min_loss_scale}")
        require(self.hysteresis >= 1, f"--hysteresis must be >= 1, got {self.hysteresis}")
        for name in ("unit_scaling_residual_tau_attn", "unit_scaling_residual_tau_mlp"):
            tau = getattr(self, name)
            require(0.0 < tau < 1.0, f"--{name.replace('_', '-')} must be in (0, 1), got {tau}")
        require(self.unit_scaling_residual in ("depth", "fixed"),
                 f"--unit-scaling-residual must be depth or fixed, got {self.unit_scaling_residual!r}")
        for name in ("unit_scaling_residual_mult", "unit_scaling_residual_attn_ratio"):
            value = getattr(self, name)
            require(value > 0.0, f"--{name.replace('_', '-')} must be positive, got {value}")

    @property
    def fp8(self) -> bool:
        return self.fp8_format is not None

    def check_run(self, model: ModelConfig, train: TrainConfig, tensor_parallel_size: int) -> None:
        """Rules between precision flags and the rest of the run."""
        require(not (self.fp8 and train.fp16),
                 "--fp8-format runs its non-FP8 ops in BF16 or FP32: use --bf16 (or neither), not --fp16")
        require(self.loss_scale is None or train.fp16, "--loss-scale needs --fp16")
        require(self.fp8_gemm == "emulate" or model.transformer_impl == "local",
                 "--fp8-gemm scaled_mm is for --transformer-impl local (Transformer Engine runs its own FP8 GEMMs)")
        if self.fp8_gemm == "scaled_mm":
            self._check_scaled_mm_sizes(model, tensor_parallel_size)
        require(not self.fp8_param_gather or model.transformer_impl == "local",
                "--fp8-param-gather is built for --transformer-impl local; with transformer_engine it would be TE's "
                "own FP8 parameters (fp8_model_init), which are not wired here because TE cannot be tested without "
                "a GPU")
        require(not self.unit_scaling or model.transformer_impl == "local",
                 "--unit-scaling is implemented for --transformer-impl local only, not transformer_engine")
        require(not (self.fp8 and self.fp8_recipe == "unscaled") or model.transformer_impl == "local",
                 "--fp8-recipe unscaled is for --transformer-impl local (Transformer Engine has no unscaled recipe)")
        require(not self.fp8_block_fp32_scales or model.transformer_impl == "local",
                 "--fp8-block-fp32-scales is for --transformer-impl local (with Transformer Engine set "
                 "NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1)")
        for flag, p in (("--attention-dropout", model.attention_dropout), ("--hidden-dropout", model.hidden_dropout)):
            require(not self.unit_scaling or p == 0.0,
                     f"--unit-scaling needs {flag} 0 (dropout is not unit-scaled: it changes the scale of what it "
                     f"keeps by 1/(1-p) in forward and backward), got {p}")
        if self.fp8 and model.transformer_impl == "local" and self.fp8_recipe in ("mxfp8", "blockwise"):
            block = 32 if self.fp8_recipe == "mxfp8" else 128
            sizes = {"--hidden-size": model.hidden_size, "--ffn-hidden-size": model.ffn_hidden_size}
            for flag, size in sizes.items():
                require(size % block == 0, f"--fp8-recipe {self.fp8_recipe} (local emulation) needs {flag} "
                         f"divisible by its block size {block}, got {size}")

    def _check_scaled_mm_sizes(self, model: ModelConfig, tp: int) -> None:
        """`torch._scaled_mm` on GPU needs both sizes of each rank's FP8 weight [out, in] divisible by 16 (the
        token dim is padded). Checked on every device, so a CPU run catches what a GPU run would refuse."""
        fp8_layers = model.num_layers - (min(model.num_layers, 2) if self.first_last_layers_bf16 else 0)
        if not fp8_layers:
            return
        h, ffn, nq, g = model.hidden_size, model.ffn_hidden_size, model.num_attention_heads, model.num_query_groups
        shapes = {  # this rank's weights: column parallel [out/tp, in], row parallel [out, in/tp]
            "linear_qkv": ((nq + 2 * g) * model.head_dim // tp, h),
            "linear_proj": (h, nq * model.head_dim // tp),
            "linear_fc1": ((2 if model.swiglu else 1) * ffn // tp, h),
            "linear_fc2": (h, ffn // tp),
        }
        for name, (rows, cols) in shapes.items():
            require(rows % 16 == 0 and cols % 16 == 0,
                     f"--fp8-gemm scaled_mm needs linear weights [out, in] with both sizes divisible by 16 on each "
                     f"rank (torch._scaled_mm); {name} has [{rows}, {cols}] with --hidden-size {h}, "
                     f"--ffn-hidden-size {ffn}, --num-attention-heads {nq} / --num-query-groups {g}, "
                     f"--tensor-model-parallel-size {tp}: change the sizes or use --fp8-gemm emulate")


@dataclass
class Config:
    """Everything a run needs; `arguments.parse_args` builds it. `methods` holds each registered training
    method's own config dataclass by name (`megatron_eff/methods/<name>/config.py`); a method is on when its
    config says `enabled`. World-size and file-system checks are `megatron_eff.launch.check_launch`'s."""

    model: ModelConfig
    parallel: ParallelConfig
    optim: OptimizerConfig
    train: TrainConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    methods: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # lines about the flags to log at start-up (megatron_compat)

    def __post_init__(self) -> None:
        self.parallel.check_model(self.model)
        self.precision.check_run(self.model, self.train, self.parallel.tensor_model_parallel_size)
        if self.train.torch_compile:
            self._check_torch_compile()
        for method in self.enabled_methods().values():
            method.check_run(self)

    def _check_torch_compile(self) -> None:
        """What --torch-compile (compiled transformer layers) does not run with."""
        require(self.model.transformer_impl == "local",
                "--torch-compile is for --transformer-impl local (Transformer Engine's layers are not compiled here)")
        require(not self.model.recompute_activations,
                "--torch-compile cannot be combined with --recompute-activations (checkpoint's recomputation of a "
                "compiled layer does not save the tensors its forward saved)")

    def enabled_methods(self) -> dict[str, object]:
        """{name: config} of the methods this run turns on, in registry order."""
        return {name: cfg for name, cfg in self.methods.items() if getattr(cfg, "enabled", False)}

    def method(self, name: str):
        """The config of method `name` (on or off); KeyError if no such method is registered."""
        return self.methods[name]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

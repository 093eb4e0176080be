"""Analytic FLOP and parameter counts of the GPT/LLaMA transformer, one function per model part.

Conventions (the same as Megatron-LM's `num_floating_point_operations`, so MFU figures compare):
- a matmul of `[m, k] x [k, n]` costs `2 m k n` FLOPs; norms, activations, softmax, RoPE and the
  residual adds are left out (they are memory-bound and a few percent at most);
- causal attention is counted as *full* attention: `QK^T` and `AV` cost `2 s h` each per token, although a
  causal kernel only needs about half. This overstates the work of short contexts slightly but is what
  Megatron and most MFU reports use;
- the logits use the padded vocabulary (that is the GEMM that actually runs);
- backward = 2 x forward, so a training step is 3 x forward (model FLOPs, for MFU). With activation
  recomputation the transformer layers run their forward twice: `recompute=True` gives hardware FLOPs.
"""

from __future__ import annotations

from megatron_eff.config import ModelConfig


def embedding_flops(config: ModelConfig) -> int:
    """Per token: 0. The embedding is a table lookup (a gather), not a matmul; Megatron counts none."""
    return 0


def attention_flops(config: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of one attention layer: QKV projection (GQA: nq + 2g heads of size d),
    QK^T and AV against all `seq_len` keys (causal counted as full), output projection."""
    h, d = config.hidden_size, config.head_dim
    qkv = 2 * h * (config.num_attention_heads + 2 * config.num_query_groups) * d
    scores = 2 * seq_len * config.num_attention_heads * d  # q . k for every key
    context = 2 * seq_len * config.num_attention_heads * d  # softmax-weighted sum of v
    projection = 2 * config.num_attention_heads * d * h
    return qkv + scores + context + projection


def mlp_flops(config: ModelConfig) -> int:
    """Forward FLOPs per token of one MLP: 2 matmuls h<->ffn (GELU) or 3 (SwiGLU: gate, up, down)."""
    num_matmuls = 3 if config.swiglu else 2
    return num_matmuls * 2 * config.hidden_size * config.ffn_hidden_size


def logits_flops(config: ModelConfig) -> int:
    """Forward FLOPs per token of the output layer over the padded vocabulary."""
    return 2 * config.hidden_size * config.padded_vocab_size(1)


def layer_flops(config: ModelConfig, seq_len: int) -> int:
    return attention_flops(config, seq_len) + mlp_flops(config)


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    return embedding_flops(config) + config.num_layers * layer_flops(config, seq_len) + logits_flops(config)


def model_flops_per_iteration(
    config: ModelConfig, batch_tokens: int, seq_len: int, recompute: bool = False
) -> int:
    """FLOPs of one training iteration over `batch_tokens` tokens (global batch x seq_len):
    forward + backward (2 x forward) = 3 x forward; `recompute=True` adds the layers' second forward."""
    total = 3 * forward_flops_per_token(config, seq_len)
    if recompute:
        total += config.num_layers * layer_flops(config, seq_len)
    return batch_tokens * total


def count_parameters(config: ModelConfig, tp: int = 1) -> int:
    """Parameters of the full model (all stages, all TP shards) with the vocabulary padded for `tp`."""
    h, ffn, d = config.hidden_size, config.ffn_hidden_size, config.head_dim
    bias = config.add_bias_linear
    norm = h * (2 if config.normalization == "LayerNorm" else 1)
    qkv_out = (config.num_attention_heads + 2 * config.num_query_groups) * d
    fc1_out = ffn * (2 if config.swiglu else 1)
    attention = h * qkv_out + qkv_out * bias + config.num_attention_heads * d * h + h * bias
    mlp = h * fc1_out + fc1_out * bias + ffn * h + h * bias
    layer = 2 * norm + attention + mlp
    vocab = config.padded_vocab_size(tp) * h
    learned_positions = config.position_embedding_type == "learned_absolute"
    positions = config.max_position_embeddings * h if learned_positions else 0
    output = vocab if config.untie_embeddings_and_output_weights else 0
    return vocab + positions + config.num_layers * layer + norm + output


# --- Sparse training (MST) -------------------------------------------------------------------------------
# Our accounting (README.md, "MST — Mixed Sparsity Training"; the paper's exact definition is unconfirmed):
# - a sparse linear of density d costs 2 * tokens * d * n_in * n_out forward and 2x that backward;
# - at a topology-update iteration its weight gradient is computed dense (for growing), RigL's accounting:
#   forward d * F + input-gradient d * F + dense weight-gradient F instead of 3 d F;
# - attention's QK^T and AV are scaled by the attention pattern's density (1 = dense causal);
# - everything else (other linears, the logits) stays dense.


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Every linear of the full model as {global module name: (n_in, n_out)}, in layer order, logits last.

    Fused weights count as one linear: QKV `(h, (nq + 2g) d)`, SwiGLU's fc1 `(h, 2 ffn)`."""
    h, d, ffn = config.hidden_size, config.head_dim, config.ffn_hidden_size
    shapes = {}
    for i in range(config.num_layers):
        prefix = f"decoder.layers.{i}"
        qkv_out = (config.num_attention_heads + 2 * config.num_query_groups) * d
        shapes[f"{prefix}.self_attention.linear_qkv"] = (h, qkv_out)
        shapes[f"{prefix}.self_attention.linear_proj"] = (config.num_attention_heads * d, h)
        shapes[f"{prefix}.mlp.linear_fc1"] = (h, ffn * (2 if config.swiglu else 1))
        shapes[f"{prefix}.mlp.linear_fc2"] = (ffn, h)
    shapes["output_layer"] = (h, config.padded_vocab_size(1))
    return shapes


def attention_core_flops(config: ModelConfig, seq_len: int, density: float = 1.0) -> float:
    """Forward FLOPs per token of QK^T and AV in one layer, scaled by the attention pattern's density."""
    return density * 4 * seq_len * config.num_attention_heads * config.head_dim


def sparse_linear_training_flops(n_in: int, n_out: int, density: float, dense_weight_grad: bool = False) -> float:
    """Training FLOPs per token of one linear at `density`: forward + input grad + weight grad, the weight
    grad dense when `dense_weight_grad` (a topology-update iteration)."""
    forward = 2 * n_in * n_out
    weight_grad = forward if dense_weight_grad else density * forward
    return 2 * density * forward + weight_grad


def sparse_training_flops(
    config: ModelConfig, batch_tokens: int, seq_len: int, densities: dict[str, float] | None = None,
    attention_densities: dict[int, float] | None = None, dense_weight_grad: bool = False,
) -> float:
    """Training FLOPs of one iteration with linears at `densities` (by `linear_shapes` name; missing = 1)
    and attention at `attention_densities` (by layer index; missing = 1). `dense_weight_grad`: the sparse
    linears (density < 1) compute their weight gradient dense this iteration. All densities 1 gives
    `model_flops_per_iteration`."""
    densities, attention_densities = densities or {}, attention_densities or {}
    per_token = 0.0
    for name, (n_in, n_out) in linear_shapes(config).items():
        density = densities.get(name, 1.0)
        per_token += sparse_linear_training_flops(n_in, n_out, density, dense_weight_grad and density < 1.0)
    for i in range(config.num_layers):
        per_token += 3 * attention_core_flops(config, seq_len, attention_densities.get(i, 1.0))
    return batch_tokens * per_token

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
    attention = h * qkv_out + qkv_out * bias + h * h + h * bias
    mlp = h * fc1_out + fc1_out * bias + ffn * h + h * bias
    layer = 2 * norm + attention + mlp
    vocab = config.padded_vocab_size(tp) * h
    learned_positions = config.position_embedding_type == "learned_absolute"
    positions = config.max_position_embeddings * h if learned_positions else 0
    output = vocab if config.untie_embeddings_and_output_weights else 0
    return vocab + positions + config.num_layers * layer + norm + output

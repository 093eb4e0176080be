"""Analytic FLOP counts against a hand count and against Megatron-LM's closed formula."""

from __future__ import annotations

from megatron_eff.config import MODEL_PRESETS, ModelConfig
from megatron_eff.training import flops


def toy(**overrides) -> ModelConfig:
    # h=8, 2 heads of 4, 1 query group (GQA), ffn 16, vocab 10 padded to 16, 3 layers
    base = dict(num_layers=3, hidden_size=8, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=16,
                seq_length=4, vocab_size=10, make_vocab_size_divisible_by=16)
    return ModelConfig(**{**base, **overrides})


def test_hand_count_toy_gelu():
    config = toy()
    s = 4
    qkv = 2 * 8 * (2 + 2 * 1) * 4  # 8 -> 16 features (2 q heads + 1 k + 1 v, head dim 4)
    scores = 2 * s * 8  # one query against 4 keys, 2 heads x 4 dims
    context = 2 * s * 8
    proj = 2 * 8 * 8
    assert flops.attention_flops(config, s) == qkv + scores + context + proj == 512
    assert flops.mlp_flops(config) == 2 * (2 * 8 * 16) == 512
    assert flops.logits_flops(config) == 2 * 8 * 16 == 256
    assert flops.embedding_flops(config) == 0
    per_token = 3 * (512 + 512) + 256
    assert flops.forward_flops_per_token(config, s) == per_token
    assert flops.model_flops_per_iteration(config, batch_tokens=12, seq_len=s) == 12 * 3 * per_token
    with_recompute = flops.model_flops_per_iteration(config, batch_tokens=12, seq_len=s, recompute=True)
    assert with_recompute == 12 * (3 * per_token + 3 * (512 + 512))


def test_swiglu_counts_three_matmuls():
    assert flops.mlp_flops(toy(swiglu=True)) == 3 * (2 * 8 * 16)


def megatron_formula(config: ModelConfig, batch: int, seq: int) -> float:
    """Megatron-LM `num_floating_point_operations` (training.py) for dense GPT/LLaMA models."""
    h, layers = config.hidden_size, config.num_layers
    gated = 1.5 if config.swiglu else 1.0
    group_ratio = config.num_query_groups / config.num_attention_heads
    return 12 * batch * seq * layers * h * h * (
        (1 + group_ratio + seq / h) + config.ffn_hidden_size / h * gated
    ) + 6 * batch * seq * config.padded_vocab_size(1) * h


def test_matches_megatron_formula_on_presets():
    for name in ("gpt2-124m", "llama-1b", "llama3-8b"):
        config = ModelConfig(**MODEL_PRESETS[name])
        s = config.seq_length
        ours = flops.model_flops_per_iteration(config, batch_tokens=8 * s, seq_len=s)
        expected = megatron_formula(config, 8, config.seq_length)
        assert abs(ours - expected) / expected < 1e-12, name


def test_gpt2_124m_flops_per_token_rule_of_thumb():
    # 6N + 6 L s h (attention) per token for training, N = non-embedding params + the logits matrix
    config = ModelConfig(**MODEL_PRESETS["gpt2-124m"])
    s, h, layers = 1024, 768, 12
    matmul_params = layers * 12 * h * h + h * config.padded_vocab_size(1)
    assert 3 * flops.forward_flops_per_token(config, s) == 6 * matmul_params + 12 * layers * s * h

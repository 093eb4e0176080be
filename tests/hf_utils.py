"""Helpers shared by the Hugging Face conversion, generation and evaluation tests: small random models in
both frameworks and single-process checkpoints of ours."""

from __future__ import annotations

import dataclasses

import torch

from megatron_eff.config import ModelConfig
from megatron_eff.model.gpt_model import GPTModel
from megatron_eff.training.checkpointing import TrainState, save_checkpoint

# LLaMA with GQA (8 heads, 2 groups), untied output, vocab 300 (padded to 384: the export must strip it)
LLAMA = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=96,
             seq_length=48, vocab_size=300, position_embedding_type="rope", rotary_base=500.0,
             normalization="RMSNorm", norm_epsilon=1e-6, swiglu=True, add_bias_linear=False,
             untie_embeddings_and_output_weights=True)
# GPT-2: learned positions, LayerNorm, tanh GELU, biases, tied embeddings
GPT2 = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=48, max_position_embeddings=64,
            vocab_size=300, position_embedding_type="learned_absolute", normalization="LayerNorm", swiglu=False,
            add_bias_linear=True, untie_embeddings_and_output_weights=False)


def random_model(config: ModelConfig, seed: int = 7) -> GPTModel:
    """Our model with non-trivial norms and biases (so a misplaced one shows), in eval mode."""
    model = GPTModel(config)
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif "layernorm.weight" in name:
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
    return model.eval()


def save_ours(model: GPTModel, root, data: dict | None = None) -> str:
    """A single-process checkpoint of `model` as pretrain would write it (weights only)."""
    run_config = {"model": dataclasses.asdict(model.config), "data": data or {"tokenizer_type": "NullTokenizer"}}
    return save_checkpoint(str(root), TrainState(), dict(model.named_parameters()), None, run_config,
                           {"tp": 1, "pp": 1, "dp": 1})


def random_hf_llama(seed: int = 3, **overrides):
    import transformers

    torch.manual_seed(seed)
    values = dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    config = transformers.LlamaConfig(**{**values, **overrides})
    return _randomize(transformers.LlamaForCausalLM(config))


def random_hf_gpt2(seed: int = 3):
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _randomize(transformers.GPT2LMHeadModel(config))


def _randomize(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def ids(vocab_size: int, batch: int = 2, seq: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))

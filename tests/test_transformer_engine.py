"""Transformer Engine backend: without TE the flag fails clearly; names map 1:1 to the local backend; flag
validation. Tests that need TE and CUDA skip cleanly here (they run on a GPU machine)."""

import pytest
import torch

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.config import ModelConfig, PrecisionConfig
from megatron_eff.model.gpt_model import GPTModel
from megatron_eff.precision.transformer_engine import local_parameter_name, te_parameter_name


def _te_usable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_te_usable(), reason="Transformer Engine and CUDA are available")
def test_without_te_the_flag_fails_with_a_clear_message():
    with pytest.raises(ValueError, match=r"--transformer-impl transformer_engine.*(not importable|CUDA)"):
        GPTModel(ModelConfig(transformer_impl="transformer_engine"))
    assert ModelConfig().transformer_impl == "local"  # local stays the default


def test_name_mapping_is_one_to_one_with_local_names():
    local = GPTModel(ModelConfig(normalization="LayerNorm", num_layers=2))
    names = [n for n, _ in local.named_parameters()]
    te_names = [te_parameter_name(n) for n in names]
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in te_names
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_bias" in te_names
    assert "decoder.final_layernorm.weight" in te_names  # the final norm is not fused
    assert [local_parameter_name(n) for n in te_names] == names
    assert len(set(te_names)) == len(names)


def test_fp8_flag_validation_names_the_flag():
    with pytest.raises(ValueError, match="--fp8-recipe"):
        PrecisionConfig(fp8_format="hybrid", fp8_recipe="nvfp4")
    with pytest.raises(ValueError, match="--fp8-amax-history-len"):
        PrecisionConfig(fp8_format="hybrid", fp8_amax_history_len=0)
    with pytest.raises(ValueError, match="--first-last-layers-bf16 needs --fp8-format"):
        PrecisionConfig(first_last_layers_bf16=True)
    base = ["--model-preset", "llama-tiny", "--mock-data"]
    with pytest.raises(ValueError, match="not --fp16"):
        config_from_args(parse_args([*base, "--fp16", "--fp8-format", "e4m3"]))
    with pytest.raises(ValueError, match="--fp8-recipe blockwise .* divisible by its block size 128"):
        config_from_args(parse_args([*base, "--fp8-format", "e4m3", "--fp8-recipe", "blockwise"]))
    with pytest.raises(SystemExit):  # argparse choices
        parse_args([*base, "--fp8-format", "e5m2"])


@pytest.mark.skipif(not _te_usable(), reason="needs Transformer Engine and CUDA")
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_te_model_matches_local_names_and_trains_a_step(recipe):
    from megatron_eff.precision.transformer_engine import te_fp8_recipe

    config = ModelConfig(transformer_impl="transformer_engine", hidden_size=128, num_attention_heads=4,
                         ffn_hidden_size=256, swiglu=True, normalization="RMSNorm", add_bias_linear=False)
    te_model = GPTModel(config).cuda()
    local_model = GPTModel(ModelConfig(**{**config.__dict__, "transformer_impl": "local"}))
    assert sorted(local_parameter_name(n) for n, _ in te_model.named_parameters()) == sorted(
        n for n, _ in local_model.named_parameters())
    import transformer_engine.pytorch as te

    tokens = torch.randint(0, 256, (2, 128), device="cuda")
    fp8 = te_fp8_recipe(PrecisionConfig(fp8_format="hybrid", fp8_recipe=recipe))
    with torch.autocast("cuda", dtype=torch.bfloat16), te.fp8_autocast(enabled=True, fp8_recipe=fp8):
        loss = te_model(tokens=tokens, labels=tokens).mean()
    loss.backward()
    assert torch.isfinite(loss)

"""Config validation fails early with one message naming the flag and the value; presets fill shapes."""

import pytest

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.config import ModelConfig, ParallelConfig, TrainConfig


def _config(*flags):
    return config_from_args(parse_args(["--mock-data", *flags]))


def test_presets_fill_shape_and_flags_override():
    cfg = _config("--model-preset", "gpt2-124m", "--num-layers", "2")
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.ffn_hidden_size) == (2, 768, 3072)
    assert cfg.model.normalization == "LayerNorm" and cfg.model.add_bias_linear and cfg.model.tied_embeddings
    llama = _config("--model-preset", "llama-tiny")
    assert llama.model.swiglu and llama.model.normalization == "RMSNorm" and not llama.model.add_bias_linear
    assert llama.model.position_embedding_type == "rope" and not llama.model.tied_embeddings


def test_llama_flags_without_preset():
    cfg = _config("--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8",
                  "--group-query-attention", "--num-query-groups", "2", "--swiglu", "--normalization", "RMSNorm",
                  "--position-embedding-type", "rope", "--disable-bias-linear",
                  "--untie-embeddings-and-output-weights", "--vocab-size", "100")
    m = cfg.model
    assert m.num_query_groups == 2 and m.swiglu and not m.add_bias_linear and not m.tied_embeddings
    assert m.ffn_hidden_size == 192  # 8h/3 = 170 rounded up to a multiple of 64
    assert m.padded_vocab_size(1) == 128 and m.padded_vocab_size(2) == 256


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hidden-size", "66", "--num-attention-heads", "4"], "--hidden-size 66"),
        (["--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "3"], "--num-query-groups 3"),
        (["--num-query-groups", "2"], "--group-query-attention"),
        (["--tensor-model-parallel-size", "8"], "--num-attention-heads 4"),
        (["--pipeline-model-parallel-size", "3"], "--num-layers 2"),
        (["--lr", "-1"], "--lr"),
        (["--min-lr", "1", "--lr", "0.1"], "--min-lr"),
        (["--bf16", "--fp16"], "--bf16"),
        (["--save-interval", "5"], "--save"),
        (["--seq-length", "256", "--max-position-embeddings", "128"], "--seq-length 256"),
    ],
)
def test_bad_flags_name_the_flag(flags, message):
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--vocab-size", "64"]
    with pytest.raises(ValueError, match=message.replace("-", r"\-")):
        _config(*base, *flags)


def test_batch_divisibility():
    train = TrainConfig(micro_batch_size=2, global_batch_size=12)
    assert train.num_micro_batches(2) == 3
    with pytest.raises(ValueError, match="--global-batch-size 12"):
        train.num_micro_batches(4)
    with pytest.raises(ValueError, match="world size 6"):
        ParallelConfig(tensor_model_parallel_size=4).data_parallel_size(6)


def test_data_path_required():
    with pytest.raises(ValueError, match="--data-path"):
        config_from_args(parse_args(["--num-layers", "2"]))


def test_model_config_defaults_are_valid():
    m = ModelConfig()
    assert m.num_query_groups == m.num_attention_heads and m.ffn_hidden_size == 4 * m.hidden_size

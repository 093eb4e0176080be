"""Config validation fails early with one message naming the flag and the value; presets fill shapes."""

import re

import numpy as np
import pytest
import torch

import pretrain
from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.config import ModelConfig, ParallelConfig, TrainConfig
from megatron_eff.data.indexed_dataset import IndexedDatasetBuilder


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


def test_group_query_attention_without_groups_is_multi_query():
    shape = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
    assert _config(*shape, "--group-query-attention").model.num_query_groups == 1  # Megatron-LM's default
    assert _config(*shape).model.num_query_groups == 4  # no GQA: one group per head
    assert _config("--model-preset", "llama-tiny", "--group-query-attention").model.num_query_groups == 2


def _te_runs_here() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def _write_prefix(prefix: str) -> str:
    builder = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    builder.add_item(np.arange(100))
    builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


LAUNCH = ["--model-preset", "llama-tiny", "--train-iters", "1", "--micro-batch-size", "1"]
TE_FLAGS = ["--transformer-impl", "transformer_engine"]


@pytest.mark.parametrize(
    "world, flags, message",
    [
        ("3", ["--tensor-model-parallel-size", "2"],
         "world size 3 is not divisible by --tensor-model-parallel-size 2 x --pipeline-model-parallel-size 1"),
        ("2", ["--micro-batch-size", "2", "--global-batch-size", "6"],
         "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),
        ("2", ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
               "--global-batch-size", "3"],
         "--global-batch-size 3 / (--micro-batch-size 1 x data-parallel size 1) = 3, to be a multiple of "
         "--pipeline-model-parallel-size 2"),
        ("1", [*TE_FLAGS, "--unit-scaling"], "--unit-scaling is implemented for --transformer-impl local only"),
        pytest.param("1", TE_FLAGS, "--transformer-impl transformer_engine",
                     marks=pytest.mark.skipif(_te_runs_here(), reason="TE and CUDA are here")),
    ],
)
def test_launch_errors_exit_2_before_any_work(monkeypatch, capsys, tmp_path, world, flags, message):
    monkeypatch.setenv("WORLD_SIZE", world)
    save = tmp_path / "ckpt"
    assert pretrain.main([*LAUNCH, "--mock-data", *flags, "--save", str(save)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain.py: error: ") and len(err.splitlines()) == 1
    assert message in err
    assert not save.exists() and not torch.distributed.is_initialized()


def test_launch_errors_name_missing_files(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    good, half = _write_prefix(str(tmp_path / "good")), _write_prefix(str(tmp_path / "half"))
    (tmp_path / "half.idx").unlink()
    save = tmp_path / "ckpt"

    def error(*flags):
        assert pretrain.main([*LAUNCH, *flags, "--save", str(save)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pretrain.py: error: ") and len(err.splitlines()) == 1
        return err

    err = error("--data-path", "0.7", good, "0.3", half)
    assert re.search(r"--data-path .*half: .*half\.idx not found", err)
    assert "--data-path" in error("--data-path", "0.7", good, half)  # weights and prefixes not in pairs
    (tmp_path / "run").mkdir()
    assert "--finetune --load" in error("--mock-data", "--load", str(tmp_path / "run"), "--finetune")
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("5")
    assert "iter_0000005" in error("--mock-data", "--load", str(tmp_path / "run"))
    assert not save.exists()

"""Megatron-LM launch lines run here: its example scripts' flags (tiny shapes appended), sample-based
schedules equal to Megatron's formulas, the flags with semantics (decoupled LR, BF16 gradient reduction,
layernorm-1p, --no-mmap-bin-files, manual GC, the profiler), no-effect flags logged and refused ones named."""

import gc
import math

import numpy as np
import pytest
import torch

from megatron_eff import megatron_compat
from megatron_eff.arguments import build_parser, config_from_args, parse_args
from megatron_eff.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_eff.model.norms import LayerNorm, RMSNorm
from megatron_eff.training import trainer as trainer_lib
from megatron_eff.training.lr_schedule import learning_rate

# Megatron-LM examples/llama/train_llama3_8b_h100_fp8.sh, as its flags are written (MODEL_ARGS, TRAINING_ARGS,
# MODEL_PARALLEL_ARGS, DDP_ARGS, mock DATA_ARGS, EVAL_AND_LOGGING_ARGS), with FP8 left out (CPU) and the sizes
# and sample counts overridden by TINY below (argparse: the last occurrence wins).
LLAMA3_8B = """
--use-mcore-models --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
--group-query-attention --num-query-groups 8 --kv-channels 128 --seq-length 8192 --max-position-embeddings 8192
--position-embedding-type rope --rotary-base 1000000 --rotary-percent 1.0 --attention-dropout 0.0
--hidden-dropout 0.0 --swiglu --init-method-std 0.0134 --attention-backend fused --apply-layernorm-1p
--untie-embeddings-and-output-weights --disable-bias-linear
--micro-batch-size 1 --global-batch-size 128 --train-samples 1953125000 --lr-decay-samples 1949218748
--lr-warmup-samples 3906252 --lr 0.00015 --min-lr 0.00001 --decoupled-lr 5.0e-4 --decoupled-min-lr 4.5e-5
--lr-decay-style cosine --clip-grad 1.0 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --bf16
--grad-reduce-in-bf16 --cross-entropy-loss-fusion --calculate-per-token-loss --manual-gc
--empty-unused-memory-level 1 --exit-duration-in-mins 235
--tensor-model-parallel-size 1 --context-parallel-size 1 --sequence-parallel
--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
--mock-data --tokenizer-type NullTokenizer --vocab-size 128256 --tiktoken-pattern v2 --split 99,1,0
--no-create-attention-mask-in-dataloader --no-mmap-bin-files --num-workers 1
--log-interval 1 --eval-iters 32 --eval-interval 100 --save-interval 1000 --log-throughput --profile
--profile-step-start 4 --profile-step-end 6 --ckpt-format torch_dist --distributed-timeout-minutes 60
""".split()
# Tiny shapes and sample counts: 2 layers, hidden 64, 4 heads of kv-channels 32 (not 64 / 4 = 16), 2 groups;
# 24 samples of global batch 4 = 6 iterations, warm-up 8 samples = 2 iterations. FP32 on CPU (no --bf16).
TINY = """
--num-layers 2 --hidden-size 64 --ffn-hidden-size 96 --num-attention-heads 4 --num-query-groups 2
--kv-channels 32 --seq-length 32 --max-position-embeddings 32 --vocab-size 200 --global-batch-size 4
--micro-batch-size 2 --train-samples 24 --lr-decay-samples 24 --lr-warmup-samples 8 --eval-iters 1
--eval-interval 3 --save-interval 100 --profile-step-start 2 --profile-step-end 4 --tensor-model-parallel-size 1
--num-workers 0
""".split()


def _without(flags: list[str], *names: str) -> list[str]:
    return [f for f in flags if f not in names]


def test_megatron_llama3_launch_line_trains(tmp_path, capsys):
    flags = _without(LLAMA3_8B, "--bf16", "--sequence-parallel") + TINY  # SP needs TP > 1; BF16 is slow on CPU
    ckpt = str(tmp_path / "ckpt")
    config = config_from_args(parse_args([*flags, "--save", ckpt, "--load", ckpt, "--tensorboard-dir",
                                          str(tmp_path / "tb")]))
    assert config.train.train_iters == 6 and config.optim.lr_warmup_samples == 8
    assert config.optim.lr_decay_samples == 24
    assert config.model.head_dim == 32 and config.model.apply_layernorm_1p and config.data.mmap_bin_files is False
    assert config.parallel.grad_reduce_in_bf16 and config.train.manual_gc
    result = trainer_lib.pretrain(config)
    assert result.state.iteration == 6 and all(math.isfinite(loss) for loss in result.losses)
    # Mock data is uniform random tokens: the loss starts at ~ln(vocab) and has nothing to learn, so whether
    # iteration 6 is below iteration 1 is rounding noise that differs between CPUs; check what is determined.
    assert result.state.consumed_train_samples == 24
    out = capsys.readouterr().out
    for flag in ("--use-mcore-models", "--attention-backend", "--ckpt-format", "--empty-unused-memory-level",
                 "--no-create-attention-mask-in-dataloader", "--tiktoken-pattern"):
        assert f"{flag}: accepted, no effect here" in out, flag
    assert "--train-samples 24 -> 6 iterations" in out  # the sample-based run in iterations, said once
    traces = list((tmp_path / "tb").glob("trace_rank0/iterations_2-3.pt.trace.json"))
    assert traces and traces[0].stat().st_size > 0
    assert gc.isenabled()  # --manual-gc hands automatic collection back at the end


GPT3 = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
        "--attention-backend auto --micro-batch-size 2 --global-batch-size 6 --lr 6.0e-5 --lr-decay-style cosine "
        "--min-lr 6.0e-6 --lr-warmup-fraction .25 --mock-data --eval-iters 0 --log-interval 1").split()


def test_megatron_gpt3_launch_line_refuses_rampup_with_iterations():
    """examples/gpt3/train_gpt3_175b_distributed.sh combines --rampup-batch-size with --train-iters, which
    Megatron-LM itself refuses; so do we, naming the flag."""
    with pytest.raises(ValueError, match="--rampup-batch-size"):
        config_from_args(parse_args([*GPT3, "--rampup-batch-size", "2", "2", "12", "--train-iters", "10"]))


def test_batch_rampup_follows_megatron_and_resumes_exactly(tmp_path):
    """--rampup-batch-size 2 2 12 to a global batch of 6: one increment per 12 / 2 = 6 samples, so the batches
    are 2, 2, 2 (consumed 0, 2, 4), 4, 4 (consumed 6, 10), then 6 once consumed > 12; Megatron counts 5 ramp
    iterations (to 14 samples) + (26 - 14) // 6 = 2. A run stopped inside the ramp resumes it exactly."""
    flags = [*GPT3, "--rampup-batch-size", "2", "2", "12", "--train-samples", "26"]
    config = config_from_args(parse_args(flags))
    assert config.train.train_iters == 7 and config.optim.lr_decay_samples == 26
    assert config.optim.lr_warmup_samples == int(0.25 * 26)  # Megatron: fraction x decay samples
    straight = trainer_lib.pretrain(config)
    assert straight.state.iteration == 7 and straight.state.consumed_train_samples == 26
    ckpt = str(tmp_path / "ckpt")
    first = trainer_lib.pretrain(config_from_args(parse_args([*flags, "--save", ckpt, "--exit-interval", "4"])))
    assert first.state.consumed_train_samples == 2 + 2 + 2 + 4
    second = trainer_lib.pretrain(config_from_args(parse_args([*flags, "--load", ckpt])))
    assert first.losses + second.losses == straight.losses  # bitwise: the ramp continues where it stopped
    # sizes 2, 5, 8 with micro-batch 2: 5 is not whole micro-batches
    with pytest.raises(ValueError, match=r"--rampup-batch-size: global batch size\(s\) \[5\] of the schedule"):
        trainer_lib.Trainer(config_from_args(parse_args(
            [*GPT3, "--global-batch-size", "8", "--rampup-batch-size", "2", "3", "12", "--train-samples", "26"])))


def test_step_batch_size_schedule_steps_at_token_thresholds_and_resumes_exactly(tmp_path):
    """"0:2 64:4 0.16K:6" at seq 32: sizes 2, 4, 6 from samples 0, 2, 5 (tokens / 32, rounded up); 26 samples
    are 2 + 4 + 6 + 6 + 6 = 24 in 5 iterations (a partial last batch is dropped); resuming mid-way is exact."""
    flags = [*GPT3, "--step-batch-size-schedule", "0:2 64:4 0.16K:6", "--train-samples", "26"]
    config = config_from_args(parse_args(flags))
    assert config.train.train_iters == 5 and config.train.global_batch_size == 6
    straight = trainer_lib.pretrain(config)
    assert straight.state.consumed_train_samples == 24
    ckpt = str(tmp_path / "ckpt")
    first = trainer_lib.pretrain(config_from_args(parse_args([*flags, "--save", ckpt, "--exit-interval", "2"])))
    assert first.state.consumed_train_samples == 2 + 4
    second = trainer_lib.pretrain(config_from_args(parse_args([*flags, "--load", ckpt])))
    assert first.losses + second.losses == straight.losses


@pytest.mark.parametrize("schedule,message", [
    ("64:2 128:4", "the first threshold must be 0"),
    ("0:2 1K:x", "is not TOKENS:BATCH_SIZE"),
    ("0:2 64:4 64:6", "thresholds must increase"),
])
def test_step_batch_size_schedule_errors_name_the_flag(schedule, message):
    with pytest.raises(ValueError, match=message):
        config_from_args(parse_args([*GPT3, "--step-batch-size-schedule", schedule, "--train-samples", "26"]))


def test_step_batch_size_schedule_global_batch_is_its_largest():
    with pytest.raises(ValueError, match="the schedule's largest size, 4"):
        config_from_args(parse_args([*GPT3, "--step-batch-size-schedule", "0:2 64:4", "--train-samples", "26",
                                     "--global-batch-size", "8"]))


def _megatron_lr(samples: int, max_lr: float, min_lr: float, warmup: int, decay: int) -> float:
    """Megatron-LM's OptimizerParamScheduler.get_lr (cosine) at `samples` consumed samples."""
    if warmup > 0 and samples <= warmup:
        return max_lr * samples / warmup
    if samples > decay:
        return min_lr
    ratio = (samples - warmup) / (decay - warmup)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (max_lr - min_lr)


@pytest.mark.parametrize("gbs,warmup,decay,train", [(4, 8, 40, 40), (16, 64, 1000, 1100), (3, 10, 31, 33)])
def test_sample_schedule_equals_megatron(gbs, warmup, decay, train):
    """--train-samples runs: train_samples // gbs iterations, and the LR of every step (the decoupled group's
    too) is Megatron-LM's formula at the samples consumed before it, also where the lengths are not whole
    global batches."""
    config = config_from_args(parse_args(
        ["--mock-data", "--model-preset", "llama-tiny", "--global-batch-size", str(gbs), "--micro-batch-size",
         str(gbs), "--train-samples", str(train), "--lr-warmup-samples", str(warmup), "--lr-decay-samples",
         str(decay), "--lr", "1e-3", "--min-lr", "1e-4"]))
    iters = config.train.train_iters
    assert iters == train // gbs
    for k in range(iters):
        ours = learning_rate(k, config.optim, iters, consumed_samples=k * gbs)
        assert ours == pytest.approx(_megatron_lr(k * gbs, 1e-3, 1e-4, warmup, decay), rel=1e-12, abs=1e-18), k


@pytest.mark.parametrize("flags,message", [
    (["--train-iters", "10", "--lr-warmup-samples", "8", "--global-batch-size", "4"], "cannot be combined"),
    (["--train-samples", "10"], "need --global-batch-size"),
    (["--lr-decay-samples", "10"], "need --train-samples"),
    (["--train-samples", "16", "--lr-warmup-iters", "2", "--global-batch-size", "4"], "iteration-based"),
    (["--train-samples", "3", "--global-batch-size", "4"], "less than one global batch"),
    (["--train-samples", "40", "--global-batch-size", "8", "--rampup-batch-size", "3", "2", "10"],
     "non-negative multiple of the increment"),
    (["--train-samples", "16", "--train-iters", "4", "--global-batch-size", "4"], "cannot be combined"),
    (["--step-batch-size-schedule", "0:4"], "need --train-samples"),
    (["--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction"),
])
def test_refused_megatron_flags_name_themselves(flags, message):
    with pytest.raises(ValueError, match=message):
        config_from_args(parse_args(["--mock-data", "--model-preset", "llama-tiny", *flags]))


# The flags of Megatron-LM's GPT/LLaMA example scripts that this parser once did not know
MEGATRON_SCRIPT_FLAGS = """--train-samples --lr-warmup-samples --lr-decay-samples --lr-warmup-fraction
--step-batch-size-schedule --rampup-batch-size --kv-channels --rotary-percent --apply-layernorm-1p
--calculate-per-token-loss --cross-entropy-loss-fusion --context-parallel-size --distributed-timeout-minutes
--decoupled-lr --decoupled-min-lr --grad-reduce-in-bf16 --fp8-param-gather --profile --profile-step-start
--profile-step-end --log-throughput --manual-gc --tiktoken-pattern --no-mmap-bin-files
--no-create-attention-mask-in-dataloader --use-mcore-models --attention-backend --ckpt-format
--empty-unused-memory-level""".split()


def test_every_compat_flag_is_accounted_for():
    """Each Megatron-LM script flag is defined here (with semantics, or in `NO_EFFECT`, logged)."""
    parser_flags = {a for action in build_parser()._actions for a in action.option_strings}
    for flag in [*megatron_compat.NO_EFFECT, *MEGATRON_SCRIPT_FLAGS]:
        assert flag in parser_flags, flag


@pytest.mark.parametrize("norm_class", [LayerNorm, RMSNorm])
def test_layernorm_1p_is_the_norm_with_scale_one_plus_weight(norm_class):
    torch.manual_seed(0)
    plain, centred = norm_class(16), norm_class(16, zero_centered_gamma=True)
    with torch.no_grad():
        w = torch.randn(16) * 0.1
        plain.weight.copy_(1 + w)
        centred.weight.copy_(w)
        if norm_class is LayerNorm:
            plain.bias.normal_()
            centred.bias.copy_(plain.bias)
    x = torch.randn(3, 16)
    torch.testing.assert_close(centred(x), plain(x), rtol=0, atol=1e-6)  # 1 + w rounds once in FP32


def test_decoupled_lr_group_follows_its_own_bounds():
    config = config_from_args(parse_args(
        ["--mock-data", "--model-preset", "llama-tiny", "--untie-embeddings-and-output-weights", "--lr", "1e-3",
         "--min-lr", "1e-4", "--decoupled-lr", "5e-3", "--decoupled-min-lr", "5e-4", "--lr-warmup-iters", "2",
         "--train-iters", "10", "--micro-batch-size", "2", "--seq-length", "16", "--max-position-embeddings", "16",
         "--eval-iters", "0"]))
    trainer = trainer_lib.Trainer(config)
    names = {id(p): n for n, p in trainer.named_params.items()}
    groups = [g for g in trainer.optimizer.param_groups if "max_lr" in g]
    assert len(groups) == 1
    assert sorted(names[id(p)] for p in groups[0]["params"]) == ["embedding.word_embeddings.weight",
                                                                 "output_layer.weight"]
    assert groups[0]["weight_decay"] == config.optim.weight_decay
    trainer.train()
    # after the last step the LR was set for step 9 of 10: cosine near its end, between each group's bounds
    others = [g for g in trainer.optimizer.param_groups if "max_lr" not in g]
    progress = (9 - 2) / (10 - 2)
    coeff = 0.5 * (1 + math.cos(math.pi * progress))
    assert groups[0]["lr"] == pytest.approx(5e-4 + coeff * (5e-3 - 5e-4), rel=1e-12)
    assert others[0]["lr"] == pytest.approx(1e-4 + coeff * (1e-3 - 1e-4), rel=1e-12)


def test_no_mmap_bin_files_reads_the_same_tokens(tmp_path):
    prefix = str(tmp_path / "data")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    for length in (5, 1, 17, 3):
        builder.add_document(rng.integers(0, 1000, length), [length])
    builder.finalize(prefix + ".idx")
    mapped, read = IndexedDataset(prefix), IndexedDataset(prefix, mmap=False)
    assert not isinstance(read._bin, np.memmap)
    for i in range(len(mapped)):
        np.testing.assert_array_equal(read.get(i), mapped.get(i))
        np.testing.assert_array_equal(read.get(i, 1, 2) if len(mapped.get(i)) >= 3 else read.get(i),
                                      mapped.get(i, 1, 2) if len(mapped.get(i)) >= 3 else mapped.get(i))
    assert read.fingerprint == mapped.fingerprint


class _Done:
    def wait(self) -> None:
        pass


@pytest.mark.parametrize("shard", [False, True], ids=["all-reduce", "reduce-scatter"])
def test_grad_reduce_in_bf16_sends_bf16_and_keeps_fp32_buffer(monkeypatch, shard):
    """Two identical data-parallel ranks (a fake collective that doubles): the reduction sees BF16 tensors and
    the FP32 gradient is the BF16 rounding of the true one (x2 and /2 are exact), nothing else."""
    from megatron_eff.parallel import data_parallel
    from megatron_eff.parallel.data_parallel import GradSync
    from megatron_eff.parallel.state import ParallelState

    sent = []

    def fake_all_reduce(tensor, group=None, async_op=False):
        sent.append(tensor.dtype)
        tensor.mul_(2)
        return _Done()

    def fake_reduce_scatter(out, tensor, group=None, async_op=False):
        sent.append(tensor.dtype)
        out.copy_(tensor[: out.numel()] * 2)  # rank 0's slice, summed over two identical ranks
        return _Done()

    monkeypatch.setattr(data_parallel.dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(data_parallel, "_reduce_scatter_flat", fake_reduce_scatter)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(10))]
    sync = GradSync(params, ParallelState(dp_size=2, world_size=2, dp_group=object()), bucket_size=1000,
                    shard=shard, reduce_dtype=torch.bfloat16)
    sync.start(num_micro_batches=1)
    true = [torch.randn_like(p) * 1e-3 for p in params]
    sum((p * g).sum() for p, g in zip(params, true, strict=True)).backward()
    sync.finish()
    assert sent and set(sent) == {torch.bfloat16}
    assert sync.grad_buffer.dtype == torch.float32
    checked = 0
    for p, g in zip(params, true, strict=True):
        lo, hi = sync.owned_range(sync.bucket_of[p])  # with sharding, this rank's slice of the bucket only
        positions = torch.arange(sync.offsets[p], sync.offsets[p] + p.numel())
        owned = (positions >= lo) & (positions < hi)
        got, want = sync.grad_views[p].flatten()[owned], g.flatten()[owned].to(torch.bfloat16).float()
        assert torch.equal(got, want)
        assert not torch.equal(got, g.flatten()[owned])  # the rounding did happen: the path is BF16
        checked += int(owned.sum())
    assert checked == (sync.grad_buffer.numel() // 2 if shard else sync.grad_buffer.numel())


def _tiktoken_vocab(path, merges: list[bytes]) -> str:
    """A Megatron TikTokenizer vocabulary: the 256 bytes, then `merges` in rank order."""
    import base64
    import json

    tokens = [bytes([i]) for i in range(256)] + merges
    entries = [{"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("latin-1")}
               for i, t in enumerate(tokens)]
    path.write_text(json.dumps(entries))
    return str(path)


def test_tiktokenizer_ids_follow_megatron_layout(tmp_path):
    """Special tokens take ids 0..num_special-1 (<unk> <s> </s>, then <SPECIAL_i>); BPE rank r is id
    num_special + r; merges apply in rank order inside each pattern piece; decode inverts encode."""
    pytest.importorskip("tiktoken")
    from megatron_eff.data.tokenizer import build_tokenizer

    vocab = _tiktoken_vocab(tmp_path / "vocab.json", [b"th", b"the", b" t", b" the"])
    tok = build_tokenizer("TikTokenizer", tokenizer_model=vocab, vocab_size=10 + 260, tiktoken_pattern="v2",
                          tiktoken_num_special_tokens=10)
    assert tok.vocab_size == 270 and (tok.bos, tok.eod) == (1, 2)
    ids = tok.tokenize("the the!")
    assert ids == [10 + 257, 10 + 259, 10 + ord("!")]  # "the", " the", "!"
    assert tok.detokenize(ids) == "the the!"
    with pytest.raises(ValueError, match=r"260 BPE ranks \+ 10 special tokens != --vocab-size 300"):
        build_tokenizer("TikTokenizer", tokenizer_model=vocab, vocab_size=300, tiktoken_num_special_tokens=10)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"rank": 0, "token_bytes": "AQ==", "token_str": "x"}]')
    with pytest.raises(ValueError, match="entry 0 must be the single byte 0"):
        build_tokenizer("TikTokenizer", tokenizer_model=str(bad), vocab_size=11, tiktoken_num_special_tokens=10)


def test_tiktokenizer_preprocess_and_pretrain(tmp_path):
    """Megatron's --tokenizer-type TikTokenizer --tiktoken-pattern v2 through preprocessing and training."""
    pytest.importorskip("tiktoken")
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    vocab = _tiktoken_vocab(tmp_path / "vocab.json", [b"th", b"the", b" t", b" the"])
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the cat {i} sat on the mat. " * 20}) + "\n" for i in range(40)))
    tiktoken_flags = ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", vocab, "--tiktoken-pattern", "v2",
                      "--tiktoken-num-special-tokens", "10", "--vocab-size", "270"]
    subprocess.run([sys.executable, str(root / "tools" / "preprocess_data.py"), "--input", str(corpus),
                    "--output-prefix", str(tmp_path / "tt"), "--append-eod", *tiktoken_flags],
                   check=True, capture_output=True, cwd=root)
    data = IndexedDataset(str(tmp_path / "tt_text_document"))
    assert int(data.get(0)[-1]) == 2 and int(data.get(0).max()) < 270  # </s> ends each document
    config = config_from_args(parse_args(
        [*tiktoken_flags, "--data-path", str(tmp_path / "tt_text_document"), "--num-layers", "1",
         "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16", "--max-position-embeddings",
         "16", "--micro-batch-size", "2", "--train-iters", "2", "--eval-iters", "0", "--split", "1,0,0"]))
    assert config.model.vocab_size == 270
    assert trainer_lib.pretrain(config).state.iteration == 2


def test_decoupled_lr_keeps_unit_scaling_lr_multipliers():
    """The decoupled group is grouped like the default ones: a weight with an lr_scale keeps it (and its decay
    divided by it), so --decoupled-lr composes with --unit-scaling."""
    config = config_from_args(parse_args(
        ["--mock-data", "--model-preset", "llama-tiny", "--untie-embeddings-and-output-weights", "--unit-scaling",
         "--decoupled-lr", "5e-3", "--micro-batch-size", "2", "--seq-length", "16", "--max-position-embeddings",
         "16", "--eval-iters", "0", "--train-iters", "1"]))
    trainer = trainer_lib.Trainer(config)
    output = trainer.named_params["output_layer.weight"]
    assert getattr(output, "lr_scale", 1.0) != 1.0  # Unit Scaling gives the untied output layer a multiplier
    (group,) = [g for g in trainer.optimizer.param_groups if any(p is output for p in g["params"])]
    assert group["max_lr"] == 5e-3 and group["lr_scale"] == output.lr_scale
    assert group["weight_decay"] == pytest.approx(config.optim.weight_decay / output.lr_scale)


@pytest.mark.slow
def test_grad_reduce_in_bf16_under_torchrun_is_the_rounded_bf16_sum(tmp_path):
    """Two gloo ranks with different gradients: every reduced element equals round_bf16(bf16(g0) + bf16(g1)) / 2
    exactly (one correctly rounded addition, an exact halving), for the all-reduce and the reduce-scatter."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.dist_utils import free_port

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bf16"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", str(free_port()), str(root / "tests/dist/grad_reduce_bf16.py"),
                    str(out)], check=True, cwd=root, capture_output=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    ranks = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]
    for shard in (False, True):
        expected = torch.zeros_like(ranks[0][shard]["buffer"])
        for i, offset in ranks[0][shard]["offsets"].items():
            g0, g1 = (r[shard]["grads"][i].flatten().to(torch.bfloat16) for r in ranks)
            expected[offset:offset + g0.numel()] = (g0 + g1).float() / 2  # BF16 add: one correct rounding
        for rank in ranks:
            for lo, hi in rank[shard]["owned"]:
                assert torch.equal(rank[shard]["buffer"][lo:hi], expected[lo:hi]), (shard, lo, hi)

"""Tensor, sequence and data parallelism (bucketed, overlapped, ZeRO-1) against a single-process run.

Each multi-process case trains 5 iterations under torchrun (gloo, CPU) and must reproduce the
single-process losses (<= 1e-5 relative) and final parameters; the bucket test checks, in one process,
that reductions start during the last micro-batch's backward and never before.
"""

from __future__ import annotations

import pytest
import torch

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.model.gpt_model import GPTModel
from megatron_eff.parallel import data_parallel
from megatron_eff.parallel.data_parallel import GradSync
from megatron_eff.parallel.state import ParallelState
from megatron_eff.training.trainer import Trainer
from tests.dist_utils import GPT_TINY_FLAGS, TINY_FLAGS, assert_same_run, run_layout

TP2 = ["--tensor-model-parallel-size", "2"]
SMALL_BUCKETS = ["--overlap-grad-reduce", "--ddp-bucket-size", "4000"]  # several buckets on the tiny model


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, flags, nproc",
    [
        ("tp2", TP2, 2),
        ("tp2-sp", [*TP2, "--sequence-parallel"], 2),
        # the chunked cross entropy (5 tokens: chunks straddle sequences and micro-batches) against the plain one
        ("tp2-sp-ce-chunked", [*TP2, "--sequence-parallel", "--cross-entropy-loss-fusion",
                               "--cross-entropy-chunk-tokens", "5"], 2),
        ("dp2-overlap", SMALL_BUCKETS, 2),
        ("tp2-dp2", TP2, 4),
    ],
)
def test_llama_layouts_match_single_process(tmp_path, llama_reference, name, flags, nproc):
    run = run_layout(tmp_path / f"{name}.pt", [*TINY_FLAGS, *flags], nproc)
    assert_same_run(run, llama_reference)


@pytest.mark.slow
def test_gpt_tp2_sequence_parallel_matches_single_process(tmp_path, gpt_reference):
    """LayerNorm weights/biases, row-parallel biases and the learned position embedding under SP."""
    run = run_layout(tmp_path / "gpt.pt", [*GPT_TINY_FLAGS, *TP2, "--sequence-parallel"], 2)
    assert_same_run(run, gpt_reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, reference, flags, nproc, dp",
    [
        ("dp2", "llama_reference", [*TINY_FLAGS, *SMALL_BUCKETS], 2, 2),
        ("tp2-sp-dp2", "gpt_reference", [*GPT_TINY_FLAGS, *TP2, "--sequence-parallel", *SMALL_BUCKETS], 4, 2),
        ("dp2-overlap-param-gather", "llama_reference", [*TINY_FLAGS, *SMALL_BUCKETS, "--overlap-param-gather"], 2, 2),
    ],
)
def test_distributed_optimizer_matches_and_shards_state(tmp_path, request, name, reference, flags, nproc, dp):
    ref = request.getfixturevalue(reference)
    run = run_layout(tmp_path / f"{name}.pt", [*flags, "--use-distributed-optimizer"], nproc)
    assert_same_run(run, ref)
    full = ref["optimizer_numel"][0]  # two moments of every parameter, in one process
    tp = nproc // dp
    for numel in run["optimizer_numel"]:  # each rank: ~1/(tp x dp) of the moments (buckets are padded)
        assert full / (tp * dp) <= numel <= full / (tp * dp) * 1.05 + 64, (numel, full)


class _FakeWork:
    def wait(self) -> None:
        pass


def test_buckets_reduce_during_last_micro_batch_only(monkeypatch):
    """Reverse-order buckets; no reduction while accumulating; all launched by the last backward."""
    config = config_from_args(parse_args([*TINY_FLAGS, "--num-layers", "2"])).model
    model = GPTModel(config)
    params = [p for p in model.parameters() if p.requires_grad]
    launches = []

    def fake_all_reduce(tensor, group=None, async_op=False):
        launches.append(tensor.data_ptr())
        tensor.mul_(2)  # two identical data-parallel ranks
        return _FakeWork()

    monkeypatch.setattr(data_parallel.dist, "all_reduce", fake_all_reduce)
    pstate = ParallelState(dp_size=2, world_size=2, dp_group=object())
    sync = GradSync(params, pstate, bucket_size=20_000, overlap=True)
    assert len(sync.buckets) >= 3
    assert model.output_layer.weight in sync.buckets[0].params  # registered last, reduced first
    assert all(b.numel % 2 == 0 for b in sync.buckets)

    tokens = torch.randint(0, config.vocab_size, (3, 2, config.seq_length))
    sync.start(num_micro_batches=3)
    launched_after = []
    for i in range(3):
        (model(tokens=tokens[i], labels=tokens[i]).mean() / 3).backward()
        launched_after.append(len(launches))
    sync.finish()
    assert launched_after == [0, 0, len(sync.buckets)]
    assert launches == [sync.grad_buffer[b.start:].data_ptr() for b in sync.buckets]

    bucketed = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in params:
        p.grad = None
    for i in range(3):
        (model(tokens=tokens[i], labels=tokens[i]).mean() / 3).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(bucketed[name], p.grad, rtol=1e-6, atol=1e-7, msg=name)


class _DeferredGather:
    """A fake all-gather that lands only when waited for, bringing `gathered` (the other rank's updates)."""

    def __init__(self, out: torch.Tensor, gathered: torch.Tensor):
        self.out, self.gathered = out, gathered

    def wait(self) -> None:
        self.out.copy_(self.gathered)


def test_overlap_param_gather_waits_per_module_in_forward(monkeypatch):
    """After the step nothing is waited for; the next forward waits bucket by bucket (the logits layer, read
    without its forward, up front) and computes with the gathered weights."""
    config = config_from_args(parse_args([*TINY_FLAGS, "--num-layers", "2"])).model  # untied output layer
    model = GPTModel(config)
    pstate = ParallelState(dp_size=2, world_size=2, dp_group=object())
    logits_weight = model.output_layer.weight
    sync = GradSync(list(model.parameters()), pstate, bucket_size=logits_weight.numel(), shard=True,
                    overlap_param_gather=True)
    assert sync.buckets[0].params == [logits_weight]  # no other module's hook waits for its bucket
    sync.install_param_gather_hooks([model])
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_length))
    model(tokens=tokens, labels=tokens)  # the first forward learns which modules run

    gathered = sync.param_buffer + 0.01 * torch.randn_like(sync.param_buffer)  # the stepped weights of all ranks
    base = sync.param_buffer.storage_offset()

    def fake_all_gather(out, shard, group=None, async_op=False):
        start = out.storage_offset() - base
        return _DeferredGather(out, gathered[start:start + out.numel()])

    monkeypatch.setattr(data_parallel, "_all_gather_flat", fake_all_gather)
    sync.all_gather_params()
    assert len(sync.buckets) >= 3 and all(b.param_gather is not None for b in sync.buckets)
    pending_at_embedding = []
    model.embedding.register_forward_pre_hook(
        lambda module, args: pending_at_embedding.append(sum(b.param_gather is not None for b in sync.buckets)))
    with torch.no_grad():
        loss = model(tokens=tokens, labels=tokens)
    assert pending_at_embedding == [len(sync.buckets) - 1]  # only the logits layer's bucket waited up front
    assert not sync.param_gather_pending()
    sync.finish_param_gather()  # idempotent
    sync.param_buffer.copy_(gathered)
    with torch.no_grad():
        torch.testing.assert_close(loss, model(tokens=tokens, labels=tokens), rtol=0, atol=0)


def test_overlap_param_gather_needs_distributed_optimizer():
    with pytest.raises(ValueError, match="--overlap-param-gather needs --use-distributed-optimizer"):
        config_from_args(parse_args([*TINY_FLAGS, "--overlap-param-gather"]))


def test_sequence_parallel_flags_cover_norms_and_row_biases():
    """Every replicated parameter that sees only s/tp tokens under SP is flagged for the TP all-reduce."""
    config = config_from_args(parse_args(GPT_TINY_FLAGS)).model
    model = GPTModel(config, sequence_parallel=True)
    for name, p in model.named_parameters():
        partial = "norm" in name or name.endswith(("linear_proj.bias", "linear_fc2.bias"))
        assert getattr(p, "sequence_parallel", False) == partial, name


def test_distributed_optimizer_skips_non_finite_steps():
    """NaN grads: the global norm (over the shard pieces) is non-finite, the step is skipped, then stops."""
    config = config_from_args(parse_args([*TINY_FLAGS, "--train-iters", "5", "--max-bad-steps", "2",
                                          "--use-distributed-optimizer", "--overlap-grad-reduce"]))
    trainer = Trainer(config)
    with torch.no_grad():  # the distributed optimizer's shard is a view of the weights: poison in place
        trainer.model[0].embedding.word_embeddings.weight[:, 0] = float("nan")
    with pytest.raises(RuntimeError, match="2 consecutive non-finite steps"):
        trainer.train()

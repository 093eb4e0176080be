"""`--fp8-param-gather`: the FP8 linears hold E4M3 weights that the GEMM uses, training equals the run without
the flag bit for bit where the weight scale is the same, checkpoints hold the FP32 masters (they load into a run
without the flag and back, resume exact), refusals; dp2 with the distributed optimizer under torchrun (slow):
the same run as one process, the all-gather of the FP8 weights moves uint8."""

import pytest
import torch

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.precision.fp8 import quantize
from megatron_eff.training.checkpointing import load_model_tensors
from megatron_eff.training.trainer import Trainer
from tests.dist_utils import TINY_FLAGS, assert_same_run, run_layout

E4M3 = torch.float8_e4m3fn
FLAGS = ["--model-preset", "llama-tiny", "--mock-data", "--num-layers", "2", "--seq-length", "32",
         "--max-position-embeddings", "32", "--micro-batch-size", "2", "--lr", "1e-3", "--lr-warmup-iters", "0",
         "--eval-iters", "0", "--log-interval", "100", "--fp8-format", "hybrid"]
LINEARS = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")


def _trainer(*flags: str) -> Trainer:
    return Trainer(config_from_args(parse_args([*FLAGS, *flags])))


def _train(*flags: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    trainer = _trainer(*flags)
    losses = trainer.train().losses
    return losses, {n: p.detach().clone() for n, p in trainer.model[0].named_parameters()}


def _fp8_linears(trainer: Trainer) -> list:
    return [m for m in trainer.model[0].modules() if hasattr(m, "fp8_weight")]


def test_linears_hold_fp8_weights_that_the_gemm_uses():
    trainer = _trainer("--train-iters", "1", "--global-batch-size", "2", "--fp8-param-gather")
    linears = _fp8_linears(trainer)
    assert len(linears) == 4 * 2  # qkv, proj, fc1, fc2 of both layers
    for linear in linears:
        copy = linear.fp8_weight
        assert copy.data.dtype == E4M3 and copy.data.shape == linear.weight.shape
        assert torch.equal(copy.data.view(torch.uint8), quantize(linear.weight.detach(), copy.scale, E4M3)
                           .view(torch.uint8))
    fc1 = linears[2]
    x = torch.randn(5, 1, fc1.weight.shape[-1])
    with torch.no_grad():
        before = fc1(x)
        fc1.weight.add_(1.0)  # the master moves; the FP8 weight only when it is cast again
        assert torch.equal(fc1(x), before)
        trainer.precision.weights_stepped()
        assert not torch.equal(fc1(x), before)


@pytest.mark.parametrize("global_batch, extra", [
    ("2", []),  # delayed, one micro-batch per step: the same scale at the cast and in the GEMM
    ("4", ["--fp8-recipe", "tensorwise"]),  # two micro-batches: current scaling takes W's own amax at either point
    ("2", ["--fp8-gemm", "scaled_mm"]),  # torch._scaled_mm takes the FP8 weight as it is
])
def test_training_equals_the_run_without_the_flag(global_batch, extra):
    flags = ["--train-iters", "3", "--global-batch-size", global_batch, *extra]
    losses, params = _train(*flags)
    fp8_losses, fp8_params = _train(*flags, "--fp8-param-gather")
    assert fp8_losses == losses
    for name, value in params.items():
        assert torch.equal(fp8_params[name], value), name


def test_checkpoints_hold_the_masters_and_load_with_or_without_the_flag(tmp_path):
    flags = ["--global-batch-size", "2"]  # delayed scaling, one micro-batch: the flag changes nothing
    straight, _ = _train(*flags, "--train-iters", "4", "--fp8-param-gather")
    ckpt = str(tmp_path / "ckpt")
    halfway = ["--train-iters", "4", "--exit-interval", "2", "--save-interval", "2"]  # the same LR schedule
    trainer = _trainer(*flags, *halfway, "--fp8-param-gather", "--save", ckpt)
    trainer.train()
    _, saved = load_model_tensors(ckpt)
    for name, p in trainer.model[0].named_parameters():
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], p.detach()), name  # FP32 masters
    without, _ = _train(*flags, "--train-iters", "4", "--load", ckpt)
    again, _ = _train(*flags, "--train-iters", "4", "--load", ckpt, "--fp8-param-gather")
    assert without == straight[2:] and again == straight[2:]
    plain = str(tmp_path / "plain")
    _trainer(*flags, *halfway, "--save", plain).train()
    into_flag, _ = _train(*flags, "--train-iters", "4", "--load", plain, "--fp8-param-gather")
    assert into_flag == straight[2:]


@pytest.mark.parametrize("flags, message", [
    ([], "--fp8-param-gather needs --fp8-format"),
    (["--fp8-format", "hybrid", "--fp8-recipe", "mxfp8"], "per-tensor recipes"),
    (["--fp8-format", "hybrid", "--transformer-impl", "transformer_engine"], "built for --transformer-impl local"),
    (["--fp8-format", "hybrid", "--mst", "--train-iters", "100"], "--mst cannot be combined with --fp8-param-gather"),
    (["--fp8-format", "hybrid", "--sat"], "--sat cannot be combined with --fp8-param-gather"),
])
def test_refusals_name_the_flags(flags, message):
    with pytest.raises(ValueError, match=message):
        config_from_args(parse_args(["--model-preset", "llama-tiny", "--mock-data", "--fp8-param-gather", *flags]))


@pytest.mark.slow
def test_dp2_distributed_optimizer_gathers_uint8_and_equals_one_process(tmp_path):
    # tensorwise: every scale depends only on its tensor (W's amax MAX-reduced over the DP shards = the whole
    # W's), so dp2 (2 micro-batches per rank) quantises like one process (4); float64, see tests/dist_utils.py
    flags = [*TINY_FLAGS, "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise", "--train-iters", "3",
             "--fp8-param-gather"]
    reference = run_layout(tmp_path / "ref.pt", flags)
    ckpt = str(tmp_path / "ckpt")
    several_buckets = ["--ddp-bucket-size", "4000", "--overlap-grad-reduce", "--overlap-param-gather"]
    dp2 = run_layout(tmp_path / "dp2.pt", [*flags, "--use-distributed-optimizer", *several_buckets, "--save", ckpt],
                     nproc=2)
    assert_same_run(dp2, reference)
    fp8_numel = sum(p.numel() for name, p in reference["params"].items() if name.endswith(LINEARS))
    other_numel = sum(p.numel() for name, p in reference["params"].items() if not name.endswith(LINEARS))
    assert dp2["param_gather_bytes"] == {"uint8": fp8_numel, "float64": 8 * other_numel}
    _, saved = load_model_tensors(ckpt)  # the masters outside rank 0's slices were gathered before saving
    for name, value in reference["params"].items():
        assert (saved[name] - value).abs().max() <= 1e-5, name

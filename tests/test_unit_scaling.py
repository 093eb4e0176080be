"""Unit Scaling: the scale primitives, residual ops, unit-scale statistics at initialisation (every logged
activation and gradient std in [0.5, 2]), and emulated-FP8 training without loss scaling tracking FP32."""

import math

import pytest
import torch

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.parallel.state import ParallelState
from megatron_eff.precision.numerics import gradient_underflow, train_synthetic
from megatron_eff.precision.unit_scaling import activation_scale, attention_output_scale, scale_bwd, scale_fwd
from megatron_eff.training.trainer import Trainer, build_model


def test_scale_fwd_and_scale_bwd():
    x = torch.ones(3, requires_grad=True)
    y = scale_fwd(x, 4.0)
    y.sum().backward()
    assert y.tolist() == [4.0] * 3 and x.grad.tolist() == [1.0] * 3
    x.grad = None
    y = scale_bwd(x, 0.25)
    y.sum().backward()
    assert y.tolist() == [1.0] * 3 and x.grad.tolist() == [0.25] * 3


def test_scale_constants_match_the_paper():
    assert activation_scale(swiglu=False) == pytest.approx(math.sqrt(1 / 0.588 / 0.675), rel=2e-3)
    assert attention_output_scale(1) == 1.0
    assert attention_output_scale(128) == pytest.approx(math.sqrt(128 / sum(1 / t for t in range(1, 129))))


def _statistics(flags):
    """std of every layer's / linear's output and its gradient, and of every weight gradient, at init."""
    config = config_from_args(parse_args([*flags, "--mock-data"]))
    (model,) = build_model(config, ParallelState.single(), torch.device("cpu"))
    stats = {}

    def track(name):
        def hook(module, inputs, out):
            stats[f"{name} activation"] = out.detach().std().item()
            out.register_hook(lambda g: stats.__setitem__(f"{name} gradient", g.std().item()))
        return hook

    for name, module in model.named_modules():
        if name == "embedding" or name.endswith(("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")) or (
                name.startswith("decoder.layers.") and name.count(".") == 2):
            module.register_forward_hook(track(name))
    gen = torch.Generator().manual_seed(0)
    shape = (config.train.micro_batch_size, config.model.seq_length)
    tokens, labels = (torch.randint(0, config.model.vocab_size, shape, generator=gen) for _ in range(2))
    model(tokens=tokens, labels=labels).mean().backward()
    stats.update({f"{n} weight gradient": p.grad.std().item() for n, p in model.named_parameters() if p.ndim >= 2})
    return stats


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt-tiny"])
def test_unit_scale_at_initialisation(preset):
    flags = ["--model-preset", preset, "--micro-batch-size", "4", "--seq-length", "64",
             "--max-position-embeddings", "64"]
    stats = _statistics([*flags, "--unit-scaling"])
    assert len(stats) >= 30
    outside = {k: round(v, 3) for k, v in stats.items() if not 0.5 <= v <= 2.0}
    assert not outside, outside
    baseline = _statistics(flags)  # the standard parametrisation is far from unit scale
    assert max(baseline.values()) / min(baseline.values()) > 100


# --vocab-size 63: NullTokenizer ids 0..62 + eod = 64 ids, no vocabulary padding
BASE = ["--model-preset", "llama-tiny", "--micro-batch-size", "8", "--seq-length", "32", "--max-position-embeddings",
        "32", "--vocab-size", "63", "--make-vocab-size-divisible-by", "64", "--lr", "1e-2", "--lr-warmup-iters", "0",
        "--clip-grad", "0", "--weight-decay", "0"]


def test_unit_scaled_fp8_without_loss_scaling_tracks_fp32():
    steps = 30
    fp32 = train_synthetic([*BASE, "--unit-scaling"], steps)
    fp8 = train_synthetic([*BASE, "--unit-scaling", "--fp8-format", "hybrid"], steps)  # E4M3 fwd, E5M2 grads
    assert fp32[-1] < 0.75 * fp32[0]  # it learns
    final32, final8 = sum(fp32[-5:]) / 5, sum(fp8[-5:]) / 5
    assert abs(final8 - final32) <= 0.02 * final32, (final8, final32)
    # report: FP16 without loss scaling, with and without unit scaling (fraction of weight-gradient
    # elements below FP16's smallest normal, i.e. flushed or losing precision)
    plain = gradient_underflow([*BASE, "--fp16", "--loss-scale", "1"])
    unit = gradient_underflow([*BASE, "--fp16", "--loss-scale", "1", "--unit-scaling"])
    print(f"\nFP8 unit-scaled {final8:.4f} vs FP32 {final32:.4f}; FP16 subnormal/zero gradients: "
          f"plain {plain['subnormal']:.2%}, unit-scaled {unit['subnormal']:.2%}")


def test_tools_rebuild_the_unit_scaled_model(tmp_path, monkeypatch):
    """A --unit-scaling checkpoint: tools/generate's model gives the trained model's logits, tools/evaluate the
    trained model's loss, and the Hugging Face export refuses it (no HF class has tau-weighted residuals)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import torch.nn.functional as F

    from megatron_eff.hf.convert import export_to_hf
    from megatron_eff.model.gpt_model import GPTModel
    from megatron_eff.training.checkpointing import load_checkpoint
    from tools.generate import load_model

    ckpt = tmp_path / "ckpt"
    trainer = Trainer(config_from_args(parse_args([*BASE, "--unit-scaling", "--mock-data", "--train-iters", "3",
                                                   "--eval-iters", "0", "--save", str(ckpt)])))
    trainer.train()
    (trained,) = trainer.model  # the model the trainer trained, in memory
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (2, 32), generator=gen)
    with torch.no_grad():
        expected = trained.eval()(tokens)
        assert torch.equal(load_model(str(ckpt)).eval()(tokens), expected)
        plain = GPTModel(trained.config)  # the same weights without the unit scaling (what the tools built)
        load_checkpoint(str(ckpt), dict(plain.named_parameters()), None, finetune=True)
        assert (plain.eval()(tokens) - expected).abs().max() > 1.0

    ids = torch.randint(0, 64, (4 * 32 + 1,), generator=gen)  # 4 windows of 32 + 1 tokens
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids.tolist())))
    windows = torch.stack([ids[32 * i: 32 * i + 33] for i in range(4)])
    with torch.no_grad():
        reference = F.cross_entropy(trained(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten()).item()
    root = Path(__file__).resolve().parents[1]
    evaluate = [sys.executable, str(root / "tools" / "evaluate.py"), "--load", str(ckpt), "--text-file",
                str(tmp_path / "ids.txt"), "--micro-batch-size", "2"]
    proc = subprocess.run([*evaluate, "--results-json", str(tmp_path / "eval.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["loss"] == pytest.approx(reference, rel=1e-5)
    proc = subprocess.run([*evaluate, "--seq-length", "16"], capture_output=True, text=True)
    assert proc.returncode == 2 and "attention scale is set by its training sequence length, 32" in proc.stderr

    with pytest.raises(ValueError, match="a --unit-scaling checkpoint .* has no Hugging Face"):
        export_to_hf(str(ckpt), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()

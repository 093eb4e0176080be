"""Unit Scaling: the scale primitives, residual rules, unit-scale statistics at initialisation (every logged
activation and gradient std, 1-D parameters' too, in [0.5, 2]; also at 12 LLaMA layers), FP16 without loss
scaling, tied embeddings, per-tensor LR groups, and emulated-FP8 training without loss scaling tracking FP32."""

import math

import pytest
import torch

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.parallel.state import ParallelState
from megatron_eff.precision.numerics import gradient_underflow, init_statistics, layer_gradient_profile, train_synthetic
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


def _not_unit(stats: dict[str, float], seq_length: int) -> dict[str, float]:
    """Statistics outside [0.5, 2] (a factor 2 from unit: well inside FP8/FP16's range, where loss scaling's
    failures are orders of magnitude). 1-D parameters' gradients (norm weights and biases, biases) are sums
    over tokens scaled by tokens^-1/2, which is unit for independent terms; through attention they are not:
    uniform causal attention at init makes the value path's per-position gradients add up coherently to the
    attention output's gradient times its scale sqrt(s / H_s) (3.7 at s = 64), so their band is
    [0.5, 2 sqrt(s / H_s)] (unscaled they are 25-119 at 2 layers, ~10^4 at 24)."""
    one_d = 2.0 * attention_output_scale(seq_length)

    def band(name):
        one_dim = name.endswith(("norm.weight weight gradient", "norm.bias weight gradient", "bias weight gradient"))
        return one_d if one_dim else 2.0

    return {k: round(v, 3) for k, v in stats.items() if not 0.5 <= v <= band(k)}


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt-tiny"])
def test_unit_scale_at_initialisation(preset):
    flags = ["--model-preset", preset, "--micro-batch-size", "4", "--seq-length", "64",
             "--max-position-embeddings", "64"]
    stats = init_statistics([*flags, "--unit-scaling"])
    assert len(stats) >= 30
    assert any("layernorm.weight" in k for k in stats)  # 1-D parameters are checked too
    assert not _not_unit(stats, 64), _not_unit(stats, 64)
    baseline = init_statistics(flags)  # the standard parametrisation is far from unit scale
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


# --- residual rules at depth ----------------------------------------------------------------------------------

def test_depth_rule_taus_and_contributions():
    """r_i^2 = alpha_i^2 / (L + earlier branches' alpha^2) (the library's rule), tau = r^2 / (1 + r^2). With
    mult = ratio = 1: tau_i = 1 / (L + i + 1) for the i-th of the 2L branches. In general the final stream's
    variance shares are: embedding L, each attention branch alpha_attn^2, each MLP branch alpha_mlp^2."""
    from megatron_eff.precision.unit_scaling import depth_residual_rule

    rule = depth_residual_rule(3)
    taus = [rule(layer, branch) for layer in range(3) for branch in ("attention", "mlp")]
    assert taus == pytest.approx([1 / (3 + i + 1) for i in range(6)], rel=1e-12)

    layers, mult, ratio = 4, 0.5, 2.0
    rule = depth_residual_rule(layers, mult, ratio)
    shares = {"embedding": 1.0}  # share of each source in the unit-variance stream, updated add by add
    for layer in range(layers):
        for branch in ("attention", "mlp"):
            tau = rule(layer, branch)
            shares = {k: v * (1 - tau) for k, v in shares.items()}
            shares[f"{branch} {layer}"] = tau
    attn = sum(v for k, v in shares.items() if k.startswith("attention"))
    mlp = sum(v for k, v in shares.items() if k.startswith("mlp"))
    assert attn / mlp == pytest.approx(ratio**2)
    assert (attn + mlp) / 2 / shares["embedding"] == pytest.approx(mult**2)  # the mean of the two totals
    assert len({round(v, 12) for k, v in shares.items() if k.startswith("attention")}) == 1  # equal per layer


DEEP_LLAMA = ["--model-preset", "llama-tiny", "--num-layers", "12", "--hidden-size", "128", "--ffn-hidden-size",
              "344", "--num-attention-heads", "4", "--micro-batch-size", "2", "--seq-length", "32",
              "--max-position-embeddings", "32", "--unit-scaling"]


def test_depth_rule_keeps_a_deep_swiglu_model_unit_scaled():
    """12 LLaMA layers (SwiGLU, RMSNorm, GQA): every logged activation and gradient, and every parameter's
    gradient, within the same band as at 2 layers (`_not_unit`). v0.1's fixed taus (0.01, 0.5) grow the
    residual gradient going back by sqrt(1 - tau + tau g^2) per layer (g ~ 1.45, the MLP branch's backward
    gain): ~1.25^12 ~ 14x, far outside."""
    stats = init_statistics(DEEP_LLAMA)
    assert not _not_unit(stats, 32), _not_unit(stats, 32)
    fixed = layer_gradient_profile([*DEEP_LLAMA, "--unit-scaling-residual", "fixed"])
    assert fixed[0] / fixed[-1] > 8.0, fixed


# --- FP16, tied embeddings, 1-D gradients, dropout ---------------------------------------------------------------

def test_fp16_unit_scaling_uses_a_static_loss_scale_of_one():
    from megatron_eff.precision import PrecisionRuntime

    flags = [*BASE, "--fp16", "--unit-scaling"]  # no --loss-scale
    config = config_from_args(parse_args([*flags, "--mock-data"]))
    runtime = PrecisionRuntime(config, [], ParallelState.single())
    assert runtime.loss_scaler.scale == 1.0 and not runtime.loss_scaler.dynamic
    assert runtime.loss_scale(1) == 1.0
    losses = train_synthetic(flags, 8)  # no step is skipped: each one changes the loss
    assert all(math.isfinite(x) for x in losses) and len(set(losses)) == len(losses)
    assert losses[-1] < losses[0]
    explicit = config_from_args(parse_args([*flags, "--loss-scale", "8", "--mock-data"]))
    assert PrecisionRuntime(explicit, [], ParallelState.single()).loss_scaler.scale == 8.0
    plain = config_from_args(parse_args([*BASE, "--fp16", "--mock-data"]))  # standard model: dynamic, 2^16
    assert PrecisionRuntime(plain, [], ParallelState.single()).loss_scaler.dynamic


def test_word_plus_position_add_scales_both_passes():
    """GPT (tied embeddings, learned positions): y = (word + position) 2^-1/2, so each input's gradient is the
    output's times 2^-1/2 (exactly: a power of two). The forward-only scale gave the lookup's share of the tied
    weight's gradient sqrt(2) too much."""
    config = config_from_args(parse_args(["--model-preset", "gpt-tiny", "--unit-scaling", "--mock-data",
                                          "--seq-length", "16", "--max-position-embeddings", "16"]))
    (model,) = build_model(config, ParallelState.single(), torch.device("cpu"))
    grads = {}

    def keep_grad(name):
        def hook(module, inputs, out):
            out.register_hook(lambda g: grads.__setitem__(name, g.clone()))
        return hook

    model.embedding.word_embeddings.register_forward_hook(keep_grad("word"))
    model.embedding.register_forward_hook(keep_grad("sum"))
    tokens = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    model(tokens=tokens, labels=tokens).mean().backward()
    # "word": at the lookup's output (before its own weight-gradient scale); "sum": after the add's 2^-1/2
    torch.testing.assert_close(grads["word"], grads["sum"] * 2**-0.5, rtol=0, atol=0)


def test_norm_and_row_parallel_bias_gradients_are_scaled_by_tokens():
    """A 1-D parameter outside a scaled GEMM has gradient sum_tokens(...): times tokens^-1/2 under unit
    scaling. Same weights, with and without the rule (the fixed residual rule, LR scaling off: only this
    hook differs): the ratio is exactly tokens^-1/2 for norm weights/biases and linear_proj/fc2 biases."""
    from megatron_eff.precision import unit_scaling

    flags = ["--model-preset", "gpt-tiny", "--unit-scaling", "--mock-data", "--seq-length", "16",
             "--max-position-embeddings", "16", "--micro-batch-size", "2"]
    config = config_from_args(parse_args(flags))
    tokens = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))

    def grads(rule_on):
        original = unit_scaling._scale_unscaled_param_grads
        if not rule_on:
            unit_scaling._scale_unscaled_param_grads = lambda model: None
        try:
            (model,) = build_model(config, ParallelState.single(), torch.device("cpu"))
        finally:
            unit_scaling._scale_unscaled_param_grads = original
        model(tokens=tokens, labels=tokens).mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    on, off = grads(True), grads(False)
    names = [n for n in on if "layernorm" in n or n.endswith(("linear_proj.bias", "linear_fc2.bias"))]
    assert len(names) >= 10 and any(n.endswith("linear_fc2.bias") for n in names)
    for name in names:
        torch.testing.assert_close(on[name], off[name] * 32**-0.5, rtol=1e-6, atol=0)
    for name in set(on) - set(names):  # nothing else changed
        assert torch.equal(on[name], off[name]), name


def test_unit_scaling_refuses_dropout():
    for flag in ("--attention-dropout", "--hidden-dropout"):
        with pytest.raises(ValueError, match=f"--unit-scaling needs {flag} 0 .* got 0.1"):
            config_from_args(parse_args([*BASE, "--unit-scaling", flag, "0.1", "--mock-data"]))


def test_old_checkpoints_rebuild_with_the_fixed_rule():
    from megatron_eff.precision import inference_precision

    old = inference_precision({"precision": {"unit_scaling": True, "unit_scaling_residual_tau_mlp": 0.4}})
    assert old.unit_scaling_residual == "fixed" and old.unit_scaling_residual_tau_mlp == 0.4
    new = inference_precision({"precision": {"unit_scaling": True, "unit_scaling_residual": "depth"}})
    assert new.unit_scaling_residual == "depth"


# --- per-tensor learning rates ------------------------------------------------------------------------------------

def test_per_tensor_lr_moves_the_effective_weight_like_the_standard_model():
    """Adam's first step moves every element by lr_group * sign(g) (m / sqrt(v) = g / |g|). With lr_scale =
    (m n)^1/4 a layer linear's effective weight W (m n)^-1/4 moves by exactly --lr, as a standard model's
    weight does; decay is divided by lr_scale (LR-independent); norms keep lr_scale 1."""
    from megatron_eff.training.optimizer import build_optimizer, set_learning_rate

    flags = [*BASE, "--unit-scaling", "--weight-decay", "0.1", "--adam-eps", "1e-30"]
    config = config_from_args(parse_args([*flags, "--mock-data"]))
    (model,) = build_model(config, ParallelState.single(), torch.device("cpu"))
    optimizer = build_optimizer(model.named_parameters(), config.optim)
    set_learning_rate(optimizer, 1e-3)
    qkv = model.decoder.layers["0"].self_attention.linear_qkv
    scale = (qkv.input_size * qkv.output_size) ** 0.25
    group = next(g for g in optimizer.param_groups if any(p is qkv.weight for p in g["params"]))
    assert group["lr_scale"] == pytest.approx(scale) and group["lr"] == pytest.approx(1e-3 * scale)
    assert group["weight_decay"] == pytest.approx(0.1 / scale)
    norm = model.decoder.layers["0"].input_layernorm.weight
    assert next(g for g in optimizer.param_groups if any(p is norm for p in g["params"])).get("lr_scale", 1.0) == 1
    tokens = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    before = qkv.weight.detach().clone()
    model(tokens=tokens, labels=tokens).mean().backward()
    optimizer.step()
    effective_step = (qkv.weight.detach() - before * (1 - 1e-3 * 0.1)) / scale  # decay: lr * wd, as standard
    torch.testing.assert_close(effective_step.abs(), torch.full_like(before, 1e-3), rtol=1e-4, atol=0)

    plain = config_from_args(parse_args([*flags, "--no-unit-scaling-lr-scaling", "--mock-data"]))
    (model,) = build_model(plain, ParallelState.single(), torch.device("cpu"))
    assert all("lr_scale" not in g for g in build_optimizer(model.named_parameters(), plain.optim).param_groups)


def test_lr_scale_composes_with_groups_of_their_own_lr():
    from megatron_eff.config import OptimizerConfig
    from megatron_eff.training.optimizer import build_optimizer, set_learning_rate

    a, b, c = (torch.nn.Parameter(torch.ones(2, 2)) for _ in range(3))
    a.lr_scale = 4.0
    config = OptimizerConfig(lr=1e-3, min_lr=0.0, weight_decay=0.0)
    optimizer = build_optimizer([("a", a), ("b", b)], config,
                                extra_groups=[{"params": [c], "max_lr": 2e-3, "lr_scale": 3.0}])
    set_learning_rate(optimizer, 1e-3, 0, config, 10)
    lrs = sorted(g["lr"] for g in optimizer.param_groups)
    assert lrs == pytest.approx(sorted([4e-3, 1e-3, 3.0 * 2e-3]))


@pytest.mark.slow
def test_unit_scaling_tp2_sequence_parallel_matches_single_process(tmp_path):
    """Depth rule (global layer indices), per-tensor LR groups and the tokens^-1/2 norm-gradient rule under
    TP2 + sequence parallelism: a norm sees s/tp tokens there and its gradient is all-reduced over TP, so the
    rule must count the global tokens. float64 runs (tests/dist_utils.py): same losses and weights to 1e-5.
    --adam-eps 1 (~ the unit gradients' size) makes the update depend on each gradient's magnitude, which
    AdamW otherwise normalises away, so a wrong gradient scale shows in the weights."""
    from tests.dist_utils import TINY_FLAGS, assert_same_run, run_layout

    flags = [*TINY_FLAGS, "--unit-scaling", "--train-iters", "3", "--clip-grad", "0", "--adam-eps", "1"]
    reference = run_layout(tmp_path / "ref.pt", flags)
    tp2 = run_layout(tmp_path / "tp2.pt", [*flags, "--tensor-model-parallel-size", "2", "--sequence-parallel"],
                     nproc=2)
    assert_same_run(tp2, reference)

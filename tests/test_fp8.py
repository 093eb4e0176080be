"""Local FP8 emulation: fake-quantisation error bounds, saturation, block scales, delayed-scaling amax
history, the FP8 GEMM's quantised gradient, checkpointed FP8 state, and TP2 parity (slow)."""

import pytest
import torch
import torch.nn.functional as F

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.precision.fp8 import (
    Fp8Gemm,
    Fp8Meta,
    Fp8Recipe,
    block_fake_quantize,
    fake_quantize,
    scale_from_amax,
    update_fp8_meta,
)
from tests.dist_utils import TINY_FLAGS, run_layout

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.mark.parametrize("dtype, mantissa_bits", [(E4M3, 3), (E5M2, 2)])
def test_round_trip_error_is_half_an_ulp(dtype, mantissa_bits):
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    scale = scale_from_amax(x.abs().max(), dtype)
    q = fake_quantize(x, scale, dtype)
    normal = (x.abs() * scale) >= torch.finfo(dtype).tiny  # normal range after scaling
    rel = ((q - x).abs() / x.abs())[normal]
    assert rel.max() <= 2.0 ** -(mantissa_bits + 1) + 1e-7
    assert rel.mean() > 2.0 ** -(mantissa_bits + 4)  # it does quantise
    assert (q == fake_quantize(q, scale, dtype)).all()  # idempotent


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_saturating_values_clip_to_the_format_max(dtype):
    limit = torch.finfo(dtype).max
    q = fake_quantize(torch.tensor([1e9, -1e9, 0.5]), 1.0, dtype)
    assert q.tolist() == [limit, -limit, 0.5]
    assert torch.isfinite(q).all()


def test_mxfp8_scales_are_powers_of_two_per_block_of_32():
    base = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    x = (base.sign() * (base.abs() + 0.5)) * torch.logspace(-6, 6, 2).repeat_interleave(32)  # 1e-6 | 1e6
    q = block_fake_quantize(x, 1, 32, E4M3, power_of_two=True)
    rel = ((q - x).abs() / x.abs()).max()
    assert rel <= 2.0**-4 + 1e-6  # each block gets its own scale: no flushing of the small blocks
    per_tensor = fake_quantize(x, scale_from_amax(x.abs().max(), E4M3), E4M3)
    assert (per_tensor[:, :32] == 0).all() and (q == 0).sum() == 0  # one scale for both would flush 1e-6
    exact = block_fake_quantize(x, 1, 32, E4M3, power_of_two=False)
    assert not torch.equal(q, exact)  # power-of-two scales round differently from fp32 scales


def _linear_with_meta(history=4, algo="max", fmt="hybrid"):
    recipe = Fp8Recipe(fmt, "delayed", history, algo)
    meta = Fp8Meta(history)
    return recipe, meta, Fp8Gemm(recipe, meta)


def test_amax_history_rolls_and_scale_follows_the_max():
    recipe, meta, gemm = _linear_with_meta()
    w = torch.ones(3, 8)
    for step, amax in enumerate([2.0, 8.0, 1.0, 0.5, 0.25]):
        gemm(torch.full((5, 8), amax), w, None)
        update_fp8_meta([meta], recipe)
        history = meta.amax_history[:, 0].tolist()
        assert history[0] == 0.0  # the next step's accumulator
        assert history[-1] == amax  # this step's amax went to the end (TE's roll)
        window = [2.0, 8.0, 1.0, 0.5, 0.25][max(0, step - 3): step + 1]
        assert meta.scale[0].item() == pytest.approx(448.0 / max(window))
    assert meta.amax_history[-4:, 1].max().item() == 1.0  # weight amax recorded too


def test_most_recent_algo_and_non_finite_amax_keeps_the_scale():
    recipe, meta, gemm = _linear_with_meta(algo="most_recent")
    gemm(torch.full((2, 8), 8.0), torch.ones(3, 8), None)
    update_fp8_meta([meta], recipe)
    gemm(torch.full((2, 8), 2.0), torch.ones(3, 8), None)
    update_fp8_meta([meta], recipe)
    assert meta.scale[0].item() == pytest.approx(448.0 / 2.0)
    gemm(torch.full((2, 8), float("inf")), torch.ones(3, 8), None)
    update_fp8_meta([meta], recipe)
    assert meta.scale[0].item() == pytest.approx(448.0 / 2.0)


def test_fp8_gemm_quantises_inputs_and_the_output_gradient_e5m2():
    recipe, meta, gemm = _linear_with_meta(fmt="hybrid")
    meta.scale.fill_(1.0)
    x = (torch.randn(6, 16) * 3).requires_grad_()
    w = torch.randn(4, 16).requires_grad_()
    y = gemm(x, w, None)
    expected = F.linear(fake_quantize(x.detach(), 1.0, E4M3), fake_quantize(w.detach(), 1.0, E4M3))
    assert torch.equal(y.detach(), expected)
    g = torch.randn(6, 4) * 1e-3
    y.backward(g)
    qg = fake_quantize(g, 1.0, E5M2)
    assert not torch.equal(qg, g)
    assert torch.allclose(x.grad, qg @ fake_quantize(w.detach(), 1.0, E4M3), atol=1e-7)
    assert meta.amax_history[0, 2].item() == pytest.approx(g.abs().max().item())


def test_model_linears_get_fp8_and_state_goes_into_checkpoints(tmp_path):
    from megatron_eff.parallel.state import ParallelState
    from megatron_eff.precision import precision_state
    from megatron_eff.training import loop
    from megatron_eff.training.checkpointing import TrainState, load_checkpoint, save_checkpoint

    flags = ["--model-preset", "llama-tiny", "--mock-data", "--fp8-format", "hybrid", "--fp8-amax-history-len", "8",
             "--first-last-layers-bf16", "--num-layers", "3"]
    config = config_from_args(parse_args(flags))
    model = loop.build_model(config, ParallelState.single(), torch.device("cpu"))
    state = precision_state(model)
    assert sorted({k.split(".")[3] for k in state}) == ["1"]  # layers 0 and 2 kept out of FP8
    assert len(state) == 2 * 4  # 4 linears x (amax_history, scale)
    for t in state.values():
        t.uniform_()
    params = {n: p for chunk in model for n, p in chunk.named_parameters()}
    save_checkpoint(str(tmp_path), TrainState(iteration=1), params, None, {}, {}, extra_state=state)
    fresh = loop.build_model(config, ParallelState.single(), torch.device("cpu"))
    fresh_state = precision_state(fresh)
    load_checkpoint(str(tmp_path), {n: p for c in fresh for n, p in c.named_parameters()}, None,
                    extra_state=fresh_state)
    for key, tensor in state.items():
        assert torch.equal(fresh_state[key], tensor), key


@pytest.mark.slow
def test_fp8_emulation_tp2_matches_single_process(tmp_path):
    flags = [*TINY_FLAGS, "--fp8-format", "hybrid", "--train-iters", "4"]
    reference = run_layout(tmp_path / "ref.pt", flags)
    tp2 = run_layout(tmp_path / "tp2.pt", [*flags, "--tensor-model-parallel-size", "2"], nproc=2)
    for a, b in zip(tp2["losses"], reference["losses"]):
        assert abs(a - b) <= 1e-4 * abs(b)
    for name, ref in reference["params"].items():
        assert (tp2["params"][name] - ref).abs().max().item() <= 1e-3, name

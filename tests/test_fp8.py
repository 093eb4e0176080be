"""Local FP8 emulation: fake-quantisation error bounds, saturation, block scales, delayed-scaling amax
history (updated per micro-batch forward / backward, as TE), scale edge cases, FP32 GEMMs under BF16, the
unscaled recipe (unit-scaled vs standard underflow), the FP8 GEMM's quantised gradient, checkpointed FP8
state, and TP2 parity (slow). The real FP8
GEMMs of `--fp8-gemm scaled_mm` (torch._scaled_mm): parity with the emulation, training, bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.precision.fp8 import (
    Fp8Gemm,
    Fp8Meta,
    Fp8Recipe,
    ScaledMmFp8Gemm,
    block_fake_quantize,
    fake_quantize,
    scale_from_amax,
    update_fp8_meta,
)
from megatron_eff.precision.numerics import train_synthetic
from tests.dist_utils import TINY_FLAGS, assert_same_run, run_layout

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
    from megatron_eff.training.checkpointing import TrainState, load_checkpoint, save_checkpoint
    from megatron_eff.training.trainer import build_model

    flags = ["--model-preset", "llama-tiny", "--mock-data", "--fp8-format", "hybrid", "--fp8-amax-history-len", "8",
             "--first-last-layers-bf16", "--num-layers", "3"]
    config = config_from_args(parse_args(flags))
    model = build_model(config, ParallelState.single(), torch.device("cpu"))
    state = precision_state(model)
    assert sorted({k.split(".")[3] for k in state}) == ["1"]  # layers 0 and 2 kept out of FP8
    assert len(state) == 2 * 4  # 4 linears x (amax_history, scale)
    for t in state.values():
        t.uniform_()
    params = {n: p for chunk in model for n, p in chunk.named_parameters()}
    save_checkpoint(str(tmp_path), TrainState(iteration=1), params, None, {}, {}, extra_state=state)
    fresh = build_model(config, ParallelState.single(), torch.device("cpu"))
    fresh_state = precision_state(fresh)
    load_checkpoint(str(tmp_path), {n: p for c in fresh for n, p in c.named_parameters()}, None,
                    extra_state=fresh_state)
    for key, tensor in state.items():
        assert torch.equal(fresh_state[key], tensor), key


def _two_steps(gemm_cls, recipe):
    """Forward + backward of one FP8 linear on 15 tokens (not a multiple of 16: wgrad pads), twice, with the
    delayed-scaling update between (so step 2 quantises with scales != 1)."""
    meta = Fp8Meta(recipe.amax_history_len)
    gemm = gemm_cls(recipe, meta)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 3, 64, generator=gen) * 3).requires_grad_()  # [s, b, h]
    w = torch.randn(48, 64, generator=gen).requires_grad_()
    grad = torch.randn(5, 3, 48, generator=gen) * 1e-3
    for _ in range(2):
        x.grad = w.grad = None
        y = gemm(x, w, None)
        y.backward(grad)
        update_fp8_meta([meta], recipe)
    return y.detach(), x.grad, w.grad, meta


@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
@pytest.mark.parametrize("recipe_name", ["delayed", "tensorwise"])
def test_scaled_mm_matches_the_emulation(recipe_name, fmt):
    recipe = Fp8Recipe(fmt, recipe_name, amax_history_len=4)
    emulated = _two_steps(Fp8Gemm, recipe)
    real = _two_steps(ScaledMmFp8Gemm, Fp8Recipe(fmt, recipe_name, amax_history_len=4, gemm="scaled_mm"))
    # Same FP8 operands and scales; only where the scale is applied (per element vs after the FP32 sum) and
    # the accumulation order differ: FP32 rounding (~1e-7 of the max measured), 1e-5 leaves 100x headroom.
    for a, b in zip(emulated[:3], real[:3]):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert torch.equal(emulated[3].amax_history, real[3].amax_history)  # same amaxes recorded
    assert torch.equal(emulated[3].scale, real[3].scale)
    if recipe_name == "delayed":
        assert not torch.equal(real[3].scale, torch.ones(3))  # step 2 used the updated scales


@pytest.mark.parametrize("gemm_cls, gemm", [(Fp8Gemm, "emulate"), (ScaledMmFp8Gemm, "scaled_mm")])
def test_fp8_linear_with_bias_returns_the_autocast_dtype(gemm_cls, gemm):
    recipe = Fp8Recipe("hybrid", "delayed", amax_history_len=2, gemm=gemm)
    fp8 = gemm_cls(recipe, Fp8Meta(recipe.amax_history_len))
    x, w, bias = torch.randn(2, 3, 16), torch.randn(16, 16), torch.randn(16)  # FP32 master weight and bias
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, y, no_bias = F.linear(x, w, bias), fp8(x, w, bias), fp8(x, w, None)
    assert plain.dtype == torch.bfloat16
    assert y.dtype == plain.dtype and y.shape == plain.shape
    assert torch.equal(y, no_bias + bias.to(torch.bfloat16))  # delayed scaling: same scales in both calls


def test_scaled_mm_training_tracks_the_emulation():
    # --vocab-size 63: NullTokenizer ids 0..62 + eod = 64 ids, no vocabulary padding
    flags = ["--model-preset", "llama-tiny", "--micro-batch-size", "4", "--seq-length", "32",
             "--max-position-embeddings", "32", "--vocab-size", "63", "--make-vocab-size-divisible-by", "64",
             "--lr", "1e-2", "--lr-warmup-iters", "0", "--clip-grad", "0", "--fp8-format", "hybrid"]
    emulated = train_synthetic([*flags, "--fp8-gemm", "emulate"], 6)
    real = train_synthetic([*flags, "--fp8-gemm", "scaled_mm"], 6)
    assert emulated[-1] < emulated[0]
    # FP32-rounding differences flip a few FP8 roundings per step, so the runs drift apart slowly
    # (measured: <= 3e-7 relative for 3 steps, <= 4e-4 up to step 6, 1e-3 at step 10)
    for step, (a, b) in enumerate(zip(emulated, real)):
        assert abs(a - b) <= (1e-5 if step < 3 else 3e-3) * abs(a), (step, a, b)


@pytest.mark.parametrize("flags, message", [
    (["--fp8-format", "hybrid", "--fp8-recipe", "mxfp8"], "per-tensor recipes"),
    ([], "needs --fp8-format"),
    (["--fp8-format", "hybrid", "--transformer-impl", "transformer_engine"], "--transformer-impl local"),
])
def test_scaled_mm_bad_flags(flags, message):
    with pytest.raises(ValueError, match=message):
        config_from_args(parse_args(["--model-preset", "llama-tiny", "--mock-data", "--fp8-gemm", "scaled_mm",
                                     *flags]))


@pytest.mark.parametrize("sizes, shape", [
    (["--ffn-hidden-size", "40"], r"\[64, 40\]"),
    (["--tensor-model-parallel-size", "2"], r"\[64, 88\]"),  # ffn 176 / tp 2: the per-rank shard
])
def test_scaled_mm_weight_sizes_not_divisible_by_16_fail_with_the_flags(sizes, shape):
    from megatron_eff.parallel.state import ParallelState
    from megatron_eff.training.trainer import build_model

    flags = ["--model-preset", "llama-tiny", "--mock-data", "--fp8-format", "hybrid", *sizes]
    with pytest.raises(ValueError, match=rf"linear_fc2 has {shape} with --hidden-size 64, --ffn-hidden-size"):
        config_from_args(parse_args([*flags, "--fp8-gemm", "scaled_mm"]))  # before any process-group work
    config_from_args(parse_args(flags))  # emulate
    default = config_from_args(parse_args(flags[:5] + ["--fp8-gemm", "scaled_mm"]))  # llama-tiny's sizes: fine
    build_model(default, ParallelState.single(), torch.device("cpu"))


@pytest.mark.slow
def test_fp8_emulation_tp2_matches_single_process(tmp_path):
    flags = [*TINY_FLAGS, "--fp8-format", "hybrid", "--train-iters", "4"]
    # Delayed scaling MAX-reduces the amaxes over TP, so both layouts quantise with the same scales; in float64
    # (tests/dist_utils.py) their inputs differ by ~1e-16 relative, too little to move a value across an FP8
    # rounding boundary (spacing 2^-3 relative for E4M3) except with negligible probability: same run to 1e-5.
    reference = run_layout(tmp_path / "ref.pt", flags)
    tp2 = run_layout(tmp_path / "tp2.pt", [*flags, "--tensor-model-parallel-size", "2"], nproc=2)
    assert_same_run(tp2, reference)


# --- delayed scaling per micro-batch (TE's update points), scale edge cases, recipes ---------------------------

def test_delayed_scaling_updates_after_each_micro_batch_forward_and_backward():
    """TE: forward scales are updated at the end of every micro-batch's forward, gradient scales at the end of
    every backward, so micro-batch k quantises with the amax history of micro-batches < k, and the history
    rolls once per micro-batch."""
    import contextlib

    from megatron_eff.precision.fp8 import DelayedScalingUpdates

    recipe, meta, gemm = _linear_with_meta(history=8)
    updates = DelayedScalingUpdates([meta], recipe)
    w = torch.ones(3, 8, requires_grad=True)
    amaxes, grad_amaxes, scales_used = [2.0, 8.0, 1.0], [0.5, 4.0, 0.25], []

    @contextlib.contextmanager
    def forward():  # what PrecisionRuntime.wrap_autocast does around each micro-batch's forward
        yield
        updates.forward_done()

    for amax, grad_amax in zip(amaxes, grad_amaxes):
        scales_used.append((meta.scale[0].item(), meta.scale[2].item()))
        with forward():
            y = gemm(torch.full((5, 8), amax), w, None)
        assert meta.amax_history[-1, 0].item() == amax and meta.amax_history[0, 0].item() == 0.0
        y.backward(torch.full_like(y, grad_amax))  # the engine callback updates the gradient slot at its end
        assert meta.amax_history[-1, 2].item() == grad_amax and meta.amax_history[0, 2].item() == 0.0
        assert not updates.queued
    assert scales_used == [(1.0, 1.0), (448.0 / 2.0, 57344.0 / 0.5), (448.0 / 8.0, 57344.0 / 4.0)]
    assert meta.amax_history[-3:, 0].tolist() == amaxes  # one row per micro-batch
    assert meta.amax_history[-3:, 2].tolist() == grad_amaxes
    with torch.no_grad():  # evaluation: nothing recorded, nothing updated
        with forward():
            gemm(torch.full((5, 8), 100.0), w, None)
    assert meta.amax_history[-3:, 0].tolist() == amaxes and meta.scale[0].item() == 448.0 / 8.0


def test_train_step_rolls_the_history_once_per_micro_batch():
    from megatron_eff.parallel.state import ParallelState
    from megatron_eff.precision import PrecisionRuntime
    from megatron_eff.precision.fp8 import fp8_metas
    from megatron_eff.precision.numerics import synthetic_batches
    from megatron_eff.training import trainer as loop
    from megatron_eff.training.optimizer import build_optimizer

    flags = [*US_BASE, "--fp8-format", "hybrid", "--global-batch-size", "12", "--micro-batch-size", "4",
             "--mock-data"]
    config = config_from_args(parse_args(flags))
    pstate = ParallelState.single()
    model = loop.build_model(config, pstate, torch.device("cpu"))
    optimizer = build_optimizer([(n, p) for c in model for n, p in c.named_parameters()], config.optim)
    precision = PrecisionRuntime(config, model, pstate)
    autocast = precision.wrap_autocast(loop.autocast_context(config, torch.device("cpu")))
    batches = synthetic_batches(config.model.vocab_size, config.model.seq_length, 4)
    loop.train_step(model, optimizer, batches, 3, config, pstate, 1e-3, autocast, precision=precision)
    for meta in fp8_metas(model):
        assert (meta.amax_history[-3:] > 0).all() and (meta.amax_history[:-3] == 0).all()


def test_scale_edge_cases_as_transformer_engine():
    tiny = torch.tensor(1e-44)  # 448 / 1e-44 overflows FP32: clamped to FP32's max, not inf (no NaN downstream)
    scale = scale_from_amax(tiny, E4M3)
    assert scale.item() == torch.finfo(torch.float32).max
    assert torch.isfinite(fake_quantize(torch.tensor([1e-44, 0.0]), scale, E4M3)).all()
    assert scale_from_amax(torch.tensor(0.0), E4M3).item() == 1.0  # current scaling: zero / inf amax -> 1
    assert scale_from_amax(torch.tensor(float("inf")), E4M3).item() == 1.0
    recipe, meta, gemm = _linear_with_meta()
    gemm(torch.full((2, 8), 1e-44), torch.ones(3, 8), None)
    update_fp8_meta([meta], recipe)
    assert meta.scale[0].item() == torch.finfo(torch.float32).max


def test_blockwise_scales_are_powers_of_two_by_default():
    from megatron_eff.config import PrecisionConfig

    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)) * 3
    for flags, pow2 in (([], True), (["--fp8-block-fp32-scales"], False)):
        precision = PrecisionConfig(fp8_format="e4m3", fp8_recipe="blockwise",
                                    fp8_block_fp32_scales=bool(flags))
        recipe = Fp8Recipe.from_config(precision)
        assert recipe.block_power_of_two is pow2
        gemm = Fp8Gemm(recipe, Fp8Meta(1))
        got = gemm._quantizer(0)(x)
        assert torch.equal(got, block_fake_quantize(x, 1, 128, E4M3, power_of_two=pow2))
    assert not torch.equal(block_fake_quantize(x, 1, 128, E4M3, True), block_fake_quantize(x, 1, 128, E4M3, False))


@pytest.mark.parametrize("flags, message", [
    (["--fp8-recipe", "tensorwise", "--fp8-margin", "1"], "--fp8-margin applies to --fp8-recipe delayed"),
    (["--fp8-block-fp32-scales"], "--fp8-block-fp32-scales is for --fp8-recipe blockwise"),
])
def test_fp8_flags_that_do_not_apply_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        config_from_args(parse_args([*TINY_FLAGS, "--fp8-format", "hybrid", *flags]))


def test_bf16_dequantises_to_fp32_before_the_gemm():
    """Under BF16 autocast: y = bf16(Q(x) Q(W)^T computed in FP32), as an FP8 GEMM with FP32 accumulation;
    dequantising to BF16 first would round x/scale a second time (E4M3 values / a non-power-of-two scale)."""
    recipe = Fp8Recipe("hybrid", "tensorwise")
    gemm = Fp8Gemm(recipe, Fp8Meta(1))
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 64, generator=gen), torch.randn(32, 64, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gemm(x.bfloat16(), w, None)
    assert y.dtype == torch.bfloat16

    def q(t):
        return fake_quantize(t.float(), scale_from_amax(t.abs().amax(), E4M3), E4M3)

    want = F.linear(q(x.bfloat16()), q(w)).bfloat16()
    assert torch.equal(y, want)
    with_bf16_operands = F.linear(q(x.bfloat16()).bfloat16().float(), q(w).bfloat16().float()).bfloat16()
    assert not torch.equal(want, with_bf16_operands)


def test_unscaled_recipe_is_a_plain_cast():
    gemm = Fp8Gemm(Fp8Recipe("hybrid", "unscaled"), Fp8Meta(1))
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)) * 1e-3
    assert torch.equal(gemm._quantizer(0)(x), x.to(E4M3).float())
    assert (gemm._quantizer(0)(x) == 0).any()  # values below E4M3's smallest subnormal (2^-9) flush to zero


US_BASE = ["--model-preset", "llama-tiny", "--micro-batch-size", "8", "--seq-length", "32",
           "--max-position-embeddings", "32", "--vocab-size", "63", "--make-vocab-size-divisible-by", "64"]


def test_unscaled_fp8_underflows_the_standard_model_not_the_unit_scaled_one():
    """The paper's FP8 claim. One micro-batch's weight gradients at init when a step accumulates M = 64 of
    them (a 16k-token batch; LLM batches are ~4M): the schedule's 1/M leaves the standard model's output
    gradients mostly below E5M2's smallest subnormal (2^-16) without amax scaling, while a unit-scaled model
    (loss scale M) keeps them ~1. Error = relative L2 distance to the same model's FP32 gradients. Amax
    scaling (tensorwise) is the control: it removes the underflow, so the standard model's unscaled error must
    be far (3x) above its scaled one, while the unit-scaled model loses (almost) nothing without scaling: a
    scale only moves values relative to the subnormal range, where few unit-scaled values are (<1.25x)."""
    from megatron_eff.precision.numerics import weight_gradients

    def error(grads, reference):
        diff = torch.cat([(grads[n] - reference[n]).flatten() for n in reference])
        return (diff.norm() / torch.cat([g.flatten() for g in reference.values()]).norm()).item()

    errors = {}
    for name, us in (("standard", []), ("unit", ["--unit-scaling"])):
        reference = weight_gradients([*US_BASE, *us], num_micro_batches=64)
        for recipe in ("unscaled", "tensorwise"):
            flags = [*US_BASE, *us, "--fp8-format", "hybrid", "--fp8-recipe", recipe]
            errors[name, recipe] = error(weight_gradients(flags, num_micro_batches=64), reference)
    assert errors["standard", "unscaled"] > 3 * errors["standard", "tensorwise"], errors
    assert errors["unit", "unscaled"] < 1.25 * errors["unit", "tensorwise"], errors
    assert errors["standard", "unscaled"] > 3 * errors["unit", "unscaled"], errors

"""The seams methods use: row/column selection and weight override in the parallel linears, heads=/channels=
selection in a transformer layer, named sites (masks and hooks), typed discovery, and the GEMM chain (FP8
emulation + Unit Scaling compose, in either order of application).

Numerics: selection computes the same dot products as the masked dense computation, only in smaller GEMMs
(and multiplying by a 0/1 mask is exact), so in float64 the two differ by summation order alone: a few ulps
of sums of O(1) terms, ~1e-15 relative here. `EXACT` (1e-12) is far above that and far below any real
difference. FP8 tests use delayed scaling (fixed scales), so quantisation is elementwise and identical in
both computations.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_eff.config import MODEL_PRESETS, ModelConfig
from megatron_eff.model.gpt_model import GPTModel
from megatron_eff.model.sites import Site, find_modules, find_sites
from megatron_eff.model.transformer import LayerSelection, TransformerLayer
from megatron_eff.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_eff.precision.fp8 import Fp8Gemm, Fp8Meta, Fp8Recipe, apply_fp8, block_fake_quantize, fake_quantize
from megatron_eff.precision.gemm import gemm_chain
from megatron_eff.precision.unit_scaling import UnitScaledGemm, apply_unit_scaling, fixed_residual_rule
from tests.dist_utils import ROOT, free_port

EXACT = dict(rtol=1e-12, atol=1e-12)

# GQA (8 heads in 2 groups) + SwiGLU + biases + RoPE; and an MHA GELU model (a group is one head)
GQA = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=96,
           seq_length=16, vocab_size=300, position_embedding_type="rope", normalization="LayerNorm",
           swiglu=True, add_bias_linear=True, untie_embeddings_and_output_weights=True)


def configs():
    return [ModelConfig(**GQA), ModelConfig(**{**MODEL_PRESETS["gpt-tiny"], "seq_length": 16})]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _linears(num_fused=1):
    col = ColumnParallelLinear(8, 12, bias=True, num_fused=num_fused).double()
    row = RowParallelLinear(12, 6, bias=True).double()
    with torch.no_grad():
        for p in (*col.parameters(), *row.parameters()):
            p.copy_(randn(*p.shape, seed=p.numel()))
    return col, row


def _delayed_fp8(linear):
    meta = Fp8Meta(4)
    meta.scale.copy_(torch.tensor([64.0, 32.0, 1024.0]))  # fixed, non-trivial scales: elementwise quantisation
    linear.gemm = Fp8Gemm(Fp8Recipe("hybrid", "delayed", amax_history_len=4), meta)


@pytest.mark.parametrize("num_fused", [1, 2])
@pytest.mark.parametrize("fp8", [False, True])
def test_column_rows_equal_dense_with_other_rows_zeroed(num_fused, fp8):
    col, _ = _linears(num_fused)
    if fp8:
        _delayed_fp8(col)
    rows = torch.tensor([7, 0, 3, 10])
    x = randn(5, 2, 8, seed=1).requires_grad_()
    y = col(x, rows=rows)  # [s, b, len(rows)]
    assert y.shape == (5, 2, 4)
    keep = torch.zeros(12, dtype=torch.float64).index_fill_(0, rows, 1.0)
    masked = col.weight.flatten(0, -2) * keep[:, None]
    dense = col.gemm(x, masked, col.bias.flatten() * keep)  # [s, b, 12], zeros outside `rows`
    torch.testing.assert_close(y, dense[..., rows], **EXACT)
    grad = randn(5, 2, 4, seed=2)
    y.backward(grad)
    sel_grads = (x.grad.clone(), col.weight.grad.clone(), col.bias.grad.clone())
    for t in (x, col.weight, col.bias):
        t.grad = None
    full_grad = torch.zeros(5, 2, 12, dtype=torch.float64).index_copy_(-1, rows, grad)
    col(x).backward(full_grad)  # gradient only through `rows`
    for got, want in zip(sel_grads, (x.grad, col.weight.grad, col.bias.grad)):
        torch.testing.assert_close(got, want, **EXACT)
    assert sel_grads[1].flatten(0, -2)[keep == 0].abs().sum() == 0


@pytest.mark.parametrize("fp8", [False, True])
def test_row_cols_equal_dense_with_other_inputs_zeroed(fp8):
    _, row = _linears()
    if fp8:
        _delayed_fp8(row)
    cols = torch.tensor([11, 2, 5])
    x_sel = randn(5, 2, 3, seed=3).requires_grad_()
    y = row(x_sel, cols=cols)
    x_full = torch.zeros(5, 2, 12, dtype=torch.float64).index_copy(-1, cols, x_sel)
    torch.testing.assert_close(y, row(x_full), **EXACT)
    y.sum().backward()
    unused = torch.ones(12, dtype=torch.bool).index_fill_(0, cols, False)
    assert row.weight.grad[:, unused].abs().sum() == 0 and row.weight.grad[:, cols].abs().sum() > 0


def test_weight_override_replaces_the_weight_for_one_call():
    col, row = _linears(num_fused=2)
    x = randn(5, 2, 8, seed=4)
    w = randn(*col.weight.shape, seed=5).requires_grad_()
    y = col(x, weight=w)
    torch.testing.assert_close(y, F.linear(x, w.flatten(0, -2), col.bias.flatten()), **EXACT)
    y.sum().backward()
    assert w.grad is not None and col.weight.grad is None
    w2, x2 = randn(*row.weight.shape, seed=6), randn(5, 2, 2, seed=7)  # x2: input features 1 and 4
    torch.testing.assert_close(row(x2, weight=w2, cols=torch.tensor([1, 4])), F.linear(x2, w2[:, [1, 4]], row.bias),
                               **EXACT)


def test_block_quantiser_pads_a_partial_block():
    """A column selection of any width quantises: the partial last block is as if zero-padded."""
    x = randn(4, 40, seed=7).float()
    padded = F.pad(x, (0, 24))
    torch.testing.assert_close(block_fake_quantize(x, 1, 32, torch.float8_e4m3fn, True),
                               block_fake_quantize(padded, 1, 32, torch.float8_e4m3fn, True)[:, :40], rtol=0, atol=0)


# --- the GEMM chain: FP8 emulation + Unit Scaling -------------------------------------------------------------

def _precise_model(order: list[str], recipe: str = "tensorwise") -> GPTModel:
    config = ModelConfig(**GQA)
    model = GPTModel(config, seed=None).double()
    for step in order:
        if step == "fp8":
            apply_fp8(model, Fp8Recipe("hybrid", recipe, amax_history_len=4), config.num_layers)
        else:
            apply_unit_scaling(model, config, fixed_residual_rule(0.2, 0.5))
    model.init_weights(3)
    return model


def test_fp8_and_unit_scaling_compose_in_either_order():
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    models = {name: _precise_model(order) for name, order in
              (("fp8+us", ["fp8", "us"]), ("us+fp8", ["us", "fp8"]), ("us", ["us"]), ("fp8", ["fp8"]))}
    for name in ("fp8+us", "us+fp8"):  # the same chain, whatever the order: US around FP8 around the kernel
        for layer in models[name].decoder.layers.values():
            chain = gemm_chain(layer.mlp.linear_fc1.gemm)
            assert [type(g) for g in chain] == [UnitScaledGemm, Fp8Gemm, type(F.linear)]
    logits = {name: model(tokens) for name, model in models.items()}
    assert torch.equal(logits["fp8+us"], logits["us+fp8"])
    for alone in ("us", "fp8"):  # neither silently replaced the other
        assert not torch.allclose(logits["fp8+us"], logits[alone], rtol=1e-3, atol=1e-3)

    # the composition by hand on one linear: alpha * Q(x * input_scale) Q(W)^T + b (tensorwise: scale from amax)
    linear = models["fp8+us"].decoder.layers["0"].mlp.linear_fc2
    us = linear.gemm
    x = randn(5, 2, linear.weight.shape[1], seed=8)

    def q(t):
        return fake_quantize(t, 448.0 / t.abs().amax().float(), torch.float8_e4m3fn)

    want = us.scale * F.linear(q(x * us.input_scale), q(linear.weight)) + linear.bias
    torch.testing.assert_close(linear(x), want, **EXACT)


# --- heads / channels selection in a layer, and the sites ------------------------------------------------------

def _layer(config: ModelConfig, unit_scaling: bool = False) -> TransformerLayer:
    model = GPTModel(config, seed=None).double()
    if unit_scaling:
        apply_unit_scaling(model, config, fixed_residual_rule(0.2, 0.5))
    model.init_weights(5)
    return model.decoder.layers["1"]


def _head_mask(config, groups):
    per_group = config.num_attention_heads // config.num_query_groups
    mask = torch.zeros(config.num_attention_heads, dtype=torch.float64)
    for g in groups.tolist():
        mask[g * per_group:(g + 1) * per_group] = 1.0
    return mask


@pytest.mark.parametrize("config", configs(), ids=["gqa-swiglu", "mha-gelu"])
@pytest.mark.parametrize("unit_scaling", [False, True])
def test_layer_selection_equals_masking_heads_and_channels(config, unit_scaling):
    layer = _layer(config, unit_scaling)
    heads = torch.tensor([1]) if config.num_query_groups == 2 else torch.tensor([3, 0])
    channels = torch.tensor([5, 90, 17, 0, 33]) if config.swiglu else torch.tensor([200, 3, 64])
    x = randn(16, 2, config.hidden_size, seed=9).requires_grad_()

    layer.selection = LayerSelection(heads, channels)
    y_sel = layer(x)
    y_sel.square().sum().backward()
    sel_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    x_grad = x.grad.clone()
    layer.zero_grad()
    x.grad = None

    layer.selection = None
    layer.self_attention.head_site.mask = _head_mask(config, heads)
    layer.mlp.ffn_site.mask = torch.zeros(config.ffn_hidden_size, dtype=torch.float64).index_fill_(0, channels, 1.0)
    y_mask = layer(x)
    y_mask.square().sum().backward()
    torch.testing.assert_close(y_sel, y_mask, **EXACT)
    torch.testing.assert_close(x_grad, x.grad, **EXACT)
    for name, param in layer.named_parameters():
        torch.testing.assert_close(sel_grads[name], param.grad, **EXACT, msg=name)


def test_selection_argument_wins_and_site_mask_applies_to_the_selected_units():
    config = ModelConfig(**GQA)
    layer = _layer(config)
    x = randn(16, 2, 64, seed=10)
    layer.selection = LayerSelection(heads=torch.tensor([0]))
    both = layer(x, selection=LayerSelection(heads=torch.tensor([0, 1])))
    layer.selection = None
    torch.testing.assert_close(both, layer(x), **EXACT)  # all groups selected = no selection
    # a site mask with a selection: mask[index] applies to the units present
    layer.mlp.ffn_site.mask = torch.ones(96, dtype=torch.float64).index_fill_(0, torch.tensor([7]), 0.0)
    sel = layer(x, selection=LayerSelection(channels=torch.tensor([7, 8, 9])))
    layer.mlp.ffn_site.mask = None
    torch.testing.assert_close(sel, layer(x, selection=LayerSelection(channels=torch.tensor([8, 9]))), **EXACT)


def test_head_site_hook_equals_zeroing_heads():
    config = ModelConfig(**{**MODEL_PRESETS["gpt-tiny"], "seq_length": 16})
    layer = _layer(config)
    x = randn(16, 2, config.hidden_size, seed=11)
    kept = torch.tensor([0, 2])
    seen = []

    def hook(site, inputs, out):
        seen.append((out.shape, inputs[1]))
        keep = torch.zeros(out.shape[2], dtype=out.dtype).index_fill_(0, kept, 1.0)
        return out * keep[:, None]

    handle = layer.self_attention.head_site.register_forward_hook(hook)
    hooked = layer(x)
    handle.remove()
    assert seen == [((16, 2, config.num_attention_heads, config.head_dim), None)]
    torch.testing.assert_close(hooked, layer(x, selection=LayerSelection(heads=kept)), **EXACT)


def test_layer_sites_remove_the_layer_and_hidden_site_masks_the_output():
    config = ModelConfig(**GQA)
    layer = _layer(config)
    x = randn(16, 2, 64, seed=12)
    for _, site in find_sites(layer, "layer"):
        site.mask = torch.tensor(0.0, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x, rtol=0, atol=0)
    for _, site in find_sites(layer, "layer"):
        site.mask = None
    keep = (torch.arange(64) % 3 != 0).double()
    layer.output_site.mask = keep
    masked = layer(x)
    layer.output_site.mask = None
    torch.testing.assert_close(masked, layer(x) * keep, rtol=0, atol=0)


def test_find_modules_and_layer_numbers():
    config = ModelConfig(**{**GQA, "num_layers": 4})
    chunks = [GPTModel(config, layer_range=(0, 2), post_process=False),
              GPTModel(config, layer_range=(2, 4), pre_process=False)]
    layers = list(find_modules(chunks, TransformerLayer))
    assert [name for name, _ in layers] == [f"decoder.layers.{i}" for i in range(4)]
    assert [layer.layer_number for _, layer in layers] == [0, 1, 2, 3]
    sites = list(find_modules(chunks, Site))
    assert sorted({s.kind for _, s in sites}) == ["ffn", "head", "hidden", "layer"]
    for kind, per_layer in (("head", 1), ("ffn", 1), ("hidden", 1), ("layer", 2)):
        found = [site.layer for _, site in find_sites(chunks, kind)]
        assert sorted(found) == sorted(list(range(4)) * per_layer)
    assert {site.branch for _, site in find_sites(chunks, "layer")} == {"attention", "mlp"}
    assert not any(dict(chunk.named_parameters()).keys() & {n for n, _ in sites} for chunk in chunks)


# --- TP = 2 (and sequence parallel): selection with local indices equals the single-process selection ---------

@pytest.mark.slow
def test_selection_under_tp2_matches_single_process():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "tests" / "dist" / "run_sites_tp.py")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("ok") == 2

"""Transformer Engine backend: without TE the flag fails clearly; names map 1:1 to the local backend; flag
validation; the backend's wiring (DotProductAttention, TE's checkpoint, FP8 extra state) against a CPU
stand-in with TE's call signatures. Tests that need TE and CUDA skip cleanly here (they run on a GPU machine)."""

import functools
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.config import ModelConfig, PrecisionConfig
from megatron_eff.methods.mst.attention_patterns import masked_sdpa
from megatron_eff.model.gpt_model import GPTModel
from megatron_eff.model.te_backend import local_parameter_name, te_parameter_name


def _te_usable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_te_usable(), reason="Transformer Engine and CUDA are available")
def test_without_te_the_flag_fails_with_a_clear_message():
    with pytest.raises(ValueError, match=r"--transformer-impl transformer_engine.*(not importable|CUDA)"):
        GPTModel(ModelConfig(transformer_impl="transformer_engine"))
    assert ModelConfig().transformer_impl == "local"  # local stays the default


def test_name_mapping_is_one_to_one_with_local_names():
    local = GPTModel(ModelConfig(normalization="LayerNorm", num_layers=2))
    names = [n for n, _ in local.named_parameters()]
    te_names = [te_parameter_name(n) for n in names]
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in te_names
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_bias" in te_names
    assert "decoder.final_layernorm.weight" in te_names  # the final norm is not fused
    assert [local_parameter_name(n) for n in te_names] == names
    assert len(set(te_names)) == len(names)


def test_fp8_flag_validation_names_the_flag():
    with pytest.raises(ValueError, match="--fp8-recipe"):
        PrecisionConfig(fp8_format="hybrid", fp8_recipe="nvfp4")
    with pytest.raises(ValueError, match="--fp8-amax-history-len"):
        PrecisionConfig(fp8_format="hybrid", fp8_amax_history_len=0)
    with pytest.raises(ValueError, match="--first-last-layers-bf16 needs --fp8-format"):
        PrecisionConfig(first_last_layers_bf16=True)
    base = ["--model-preset", "llama-tiny", "--mock-data"]
    with pytest.raises(ValueError, match="not --fp16"):
        config_from_args(parse_args([*base, "--fp16", "--fp8-format", "e4m3"]))
    with pytest.raises(ValueError, match="--fp8-recipe blockwise .* divisible by its block size 128"):
        config_from_args(parse_args([*base, "--fp8-format", "e4m3", "--fp8-recipe", "blockwise"]))
    with pytest.raises(SystemExit):  # argparse choices
        parse_args([*base, "--fp8-format", "e5m2"])


@pytest.mark.skipif(not _te_usable(), reason="needs Transformer Engine and CUDA")
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_te_model_matches_local_names_and_trains_a_step(recipe):
    from megatron_eff.precision.transformer_engine import te_fp8_recipe

    config = ModelConfig(transformer_impl="transformer_engine", hidden_size=128, num_attention_heads=4,
                         ffn_hidden_size=256, swiglu=True, normalization="RMSNorm", add_bias_linear=False)
    te_model = GPTModel(config).cuda()
    local_model = GPTModel(ModelConfig(**{**config.__dict__, "transformer_impl": "local"}))
    assert sorted(local_parameter_name(n) for n, _ in te_model.named_parameters()) == sorted(
        n for n, _ in local_model.named_parameters())
    import transformer_engine.pytorch as te

    assert isinstance(te_model.decoder.layers["0"].self_attention.core_attention, te.DotProductAttention)

    tokens = torch.randint(0, 256, (2, 128), device="cuda")
    fp8 = te_fp8_recipe(PrecisionConfig(fp8_format="hybrid", fp8_recipe=recipe))
    with torch.autocast("cuda", dtype=torch.bfloat16), te.fp8_autocast(enabled=True, fp8_recipe=fp8):
        loss = te_model(tokens=tokens, labels=tokens).mean()
    loss.backward()
    assert torch.isfinite(loss)


TE_SIZES = dict(hidden_size=128, num_attention_heads=4, ffn_hidden_size=256, swiglu=True, add_bias_linear=False)


@pytest.mark.skipif(not _te_usable(), reason="needs Transformer Engine and CUDA")
def test_te_logits_match_local_with_te_attention():
    """Same seed -> same weights; TE's linears and DotProductAttention (GQA, RoPE) give the local logits: in
    FP32 (TE's unfused attention) tightly, under BF16 autocast (flash / cuDNN attention) to BF16 rounding."""
    config = ModelConfig(**{**TE_SIZES, "num_query_groups": 2, "normalization": "RMSNorm"},
                         transformer_impl="transformer_engine")
    te_model = GPTModel(config).cuda().eval()
    local = GPTModel(ModelConfig(**{**config.__dict__, "transformer_impl": "local"})).cuda().eval()
    tokens = torch.randint(0, 256, (2, 128), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(te_model(tokens), local(tokens), rtol=1e-4, atol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            te_logits, local_logits = te_model(tokens).float(), local(tokens).float()
    assert (te_logits - local_logits).abs().max() <= 0.05 * local_logits.abs().max()


@pytest.mark.skipif(not _te_usable(), reason="needs Transformer Engine and CUDA")
def test_te_fp8_recompute_uses_te_checkpoint_and_trains_like_no_recompute(monkeypatch):
    import transformer_engine.pytorch as te

    from megatron_eff.precision.transformer_engine import te_fp8_recipe

    calls = []
    te_checkpoint = te.checkpoint
    monkeypatch.setattr(te, "checkpoint", lambda *args, **kwargs: calls.append(1) or te_checkpoint(*args, **kwargs))
    fp8 = te_fp8_recipe(PrecisionConfig(fp8_format="hybrid", fp8_recipe="delayed"))
    tokens = torch.randint(0, 256, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses = {}
    for recompute in (False, True):
        config = ModelConfig(**TE_SIZES, transformer_impl="transformer_engine", recompute_activations=recompute)
        model = GPTModel(config).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[recompute] = []
        for _ in range(4):
            with torch.autocast("cuda", dtype=torch.bfloat16), te.fp8_autocast(enabled=True, fp8_recipe=fp8):
                loss = model(tokens=tokens, labels=tokens).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[recompute].append(loss.item())
    assert len(calls) == 4 * config.num_layers  # every layer, every step, through TE's checkpoint
    assert all(math.isfinite(x) for x in losses[True])
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)


# --- A stand-in for `transformer_engine.pytorch` (CPU): the constructor and call signatures of the TE classes the
# backend uses, copied from TE's source (DotProductAttention.__init__/forward, checkpoint's keyword arguments),
# so a misnamed argument or a wrong q/k/v shape fails here as it would in TE; the maths is plain PyTorch.
class _FakeTEModule(nn.Module):
    """A TE module with FP8 state (TE's base module implements get/set_extra_state)."""

    def get_extra_state(self):
        return torch.tensor([1.0])

    def set_extra_state(self, state):
        self.loaded_extra_state = state


class _FakeLinear(_FakeTEModule):
    def __init__(self, in_features, out_features, *, bias=True, parallel_mode=None, tp_group=None, tp_size=1,
                 sequence_parallel=False, params_dtype=None, device="cuda"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class _FakeLayerNormLinear(_FakeLinear):
    def __init__(self, in_features, out_features, *, eps=1e-5, normalization="LayerNorm", **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        self.eps, self.normalization = eps, normalization
        self.layer_norm_weight = nn.Parameter(torch.ones(in_features))
        self.layer_norm_bias = nn.Parameter(torch.zeros(in_features)) if normalization == "LayerNorm" else None

    def forward(self, x):
        if self.normalization == "LayerNorm":
            x = F.layer_norm(x, x.shape[-1:], self.layer_norm_weight, self.layer_norm_bias, self.eps)
        else:
            x = F.rms_norm(x, x.shape[-1:], self.layer_norm_weight, self.eps)
        return super().forward(x)


class _FakeAttentionKernel(nn.Module):
    """Like DotProductAttention's FlashAttention/FusedAttention submodules: a TE class without extra state."""


class _FakeDotProductAttention(_FakeTEModule):
    def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None, attention_dropout=0.0,
                 qkv_format="sbhd", attn_mask_type="causal", window_size=None, sequence_parallel=False, tp_size=1,
                 get_rng_state_tracker=None, tp_group=None, layer_number=None, attention_type="self",
                 softmax_scale=None):
        super().__init__()
        self.num_attention_heads, self.kv_channels = num_attention_heads, kv_channels
        self.num_gqa_groups = num_gqa_groups
        self.qkv_format, self.attn_mask_type, self.tp_size = qkv_format, attn_mask_type, tp_size
        self.attention_dropout = attention_dropout
        self.flash_attention = _FakeAttentionKernel()
        self.calls = 0

    def forward(self, query_layer, key_layer, value_layer, attention_mask=None, qkv_format=None):
        assert self.qkv_format == "sbhd" and self.attn_mask_type == "causal" and attention_mask is None
        s, b, heads, d = query_layer.shape
        assert heads == self.num_attention_heads // self.tp_size and d == self.kv_channels  # TE's shape checks
        assert key_layer.shape == value_layer.shape == (s, b, self.num_gqa_groups // self.tp_size, d)
        self.calls += 1
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query_layer, key_layer, value_layer))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attention_dropout if self.training else 0.0,
                                             is_causal=True, enable_gqa=True)
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)  # TE: [s, b, heads * d] for "sbhd"


for _cls in (_FakeLinear, _FakeLayerNormLinear, _FakeAttentionKernel, _FakeDotProductAttention):
    _cls.__module__ = "transformer_engine.pytorch.fake"


@pytest.fixture
def fake_te(monkeypatch):
    """`import transformer_engine.pytorch` gives the stand-in, and CUDA reads as available (nothing moves to it)."""
    te = types.ModuleType("transformer_engine.pytorch")
    te.Linear, te.LayerNormLinear, te.DotProductAttention = _FakeLinear, _FakeLayerNormLinear, _FakeDotProductAttention
    te.checkpoint_calls = []

    def checkpoint(function, *args, **kwargs):  # TE >= 1.5: TE's own options are keyword arguments
        use_reentrant = kwargs.pop("use_reentrant", True)
        for name in ("distribute_saved_activations", "get_rng_state_tracker", "tp_group"):
            kwargs.pop(name, None)
        te.checkpoint_calls.append(use_reentrant)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=use_reentrant, **kwargs)

    te.checkpoint = checkpoint
    package = types.ModuleType("transformer_engine")
    package.pytorch = te
    monkeypatch.setitem(sys.modules, "transformer_engine", package)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return te


# GQA (8 heads, 2 groups), RoPE, LayerNorm with biases, SwiGLU
GQA = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=96,
           seq_length=32, vocab_size=300, position_embedding_type="rope", normalization="LayerNorm", swiglu=True)


def test_te_backend_wiring_on_a_stand_in(fake_te):
    """The TE backend builds DotProductAttention with global head counts and the sbhd/causal contract, the
    model matches the local one on the same weights, MST's mask and the KV cache bypass DotProductAttention,
    and only TE modules with FP8 state are saved (not DotProductAttention's kernel submodules)."""
    from megatron_eff.model.inference_cache import InferenceCache
    from megatron_eff.model.te_backend import load_te_extra_state, te_extra_state

    te_model = GPTModel(ModelConfig(**GQA, transformer_impl="transformer_engine")).eval()
    local = GPTModel(ModelConfig(**GQA)).eval()
    te_params, local_params = dict(te_model.named_parameters()), dict(local.named_parameters())
    assert sorted(local_parameter_name(n) for n in te_params) == sorted(local_params)  # nothing from core_attention
    for name, param in te_params.items():  # same seed -> same weights, through the name map and fc1's view
        torch.testing.assert_close(param.view(local_params[local_parameter_name(name)].shape),
                                   local_params[local_parameter_name(name)], rtol=0, atol=0)
    attention = te_model.decoder.layers["1"].self_attention
    core = attention.core_attention
    assert isinstance(core, _FakeDotProductAttention)
    assert (core.num_attention_heads, core.kv_channels, core.num_gqa_groups) == (8, 8, 2)

    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(te_model(tokens), local(tokens), rtol=1e-4, atol=1e-5)
        assert core.calls == 1
        causal = torch.ones(32, 32, dtype=torch.bool).tril()
        attention.sparse_attention = functools.partial(masked_sdpa, mask=causal)  # MST's HSA (mask impl)
        te_model(tokens)
        attention.sparse_attention = None
        cache = InferenceCache(max_length=32)
        te_model(tokens, inference_cache=cache)
    assert core.calls == 1

    state = te_extra_state([te_model])
    assert "decoder.layers.1.self_attention.core_attention" in state
    assert "decoder.layers.1.self_attention.linear_qkv" in state
    assert not any(name.endswith("flash_attention") for name in state)
    load_te_extra_state([te_model], state)
    assert core.loaded_extra_state is state["decoder.layers.1.self_attention.core_attention"]


def test_te_backend_recomputes_with_te_checkpoint_on_a_stand_in(fake_te):
    config = ModelConfig(**GQA, transformer_impl="transformer_engine", recompute_activations=True)
    model = GPTModel(config)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    model(tokens, tokens).mean().backward()
    assert fake_te.checkpoint_calls == [False, False]  # one non-reentrant call per layer
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

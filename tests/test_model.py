"""The one transformer (GPT-2 and LLaMA shapes): parameter counts, causality, RoPE, GQA attention, MLP,
loss, recomputation, layout-independent init, and logits parity with Hugging Face on copied weights."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_eff.config import MODEL_PRESETS, ModelConfig
from megatron_eff.methods.mst.attention_patterns import masked_sdpa
from megatron_eff.model.attention import split_qkv
from megatron_eff.model.backends import build_backend
from megatron_eff.model.gpt_model import GPTModel
from megatron_eff.model.mlp import swiglu
from megatron_eff.model.rope import RotaryEmbedding, apply_rotary, rotary_reference
from megatron_eff.parallel.state import ParallelState
from megatron_eff.training.flops import count_parameters


def preset(name: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**MODEL_PRESETS[name], **overrides})


# GQA (8 heads, 2 groups) + untied output + biases + LayerNorm + RoPE + SwiGLU: a mix no preset has
MIX = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=96,
           seq_length=32, vocab_size=300, position_embedding_type="rope", normalization="LayerNorm",
           swiglu=True, add_bias_linear=True, untie_embeddings_and_output_weights=True)


def build(config: ModelConfig, seed: int = 7, **kwargs) -> GPTModel:
    model = GPTModel(config, **kwargs)
    model.init_weights(seed)
    return model


def tokens(config: ModelConfig, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", [preset("gpt-tiny"), preset("llama-tiny"), ModelConfig(**MIX)],
                         ids=["gpt-tiny", "llama-tiny", "gqa-untied-bias"])
def test_parameter_count_matches_analytic(config):
    model = GPTModel(config)
    assert model.num_parameters() == count_parameters(config)
    names = dict(model.named_parameters())
    assert ("output_layer.weight" in names) == config.untie_embeddings_and_output_weights
    assert ("decoder.layers.0.self_attention.linear_qkv.bias" in names) == config.add_bias_linear
    assert ("decoder.final_layernorm.bias" in names) == (config.normalization == "LayerNorm")


def test_gpt2_124m_parameter_count():
    # The famous 124,439,808 uses the raw 50,257-token vocabulary; Megatron pads it to a multiple of 128
    # (50,304), adding 47 embedding rows of 768.
    config = preset("gpt2-124m")
    assert config.padded_vocab_size(1) == 50304
    assert count_parameters(config) == 124_439_808 + (50304 - 50257) * 768 == 124_475_904
    with torch.device("meta"):  # builds the real module tree without allocating or initialising
        model = GPTModel(config)
    assert model.num_parameters() == 124_475_904


def test_causal_masking():
    for config in (preset("gpt-tiny"), preset("llama-tiny")):
        model = build(config).eval()
        ids = tokens(config)
        changed = ids.clone()
        t = 9
        changed[:, t] = (changed[:, t] + 1) % config.vocab_size
        with torch.no_grad():
            before, after = model(ids), model(changed)
        torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=0)
        assert (before[:, t:] - after[:, t:]).abs().amax(dim=-1).min() > 0


def rope_reference(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE as complex multiplication: pair (x[i], x[i + d/2]) is one complex number."""
    s, d = x.shape[0], x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(s, dtype=torch.float64)[:, None] * inv_freq  # [s, d/2]
    rotation = torch.polar(torch.ones_like(angle), angle)[:, None, None, :]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * rotation
    return torch.cat((z.real, z.imag), dim=-1).float()


def test_rope_matches_complex_reference():
    x = torch.randn(12, 2, 3, 16)
    cos, sin = RotaryEmbedding(16, base=500.0)(12, x.device, x.dtype)
    torch.testing.assert_close(apply_rotary(x, cos, sin), rope_reference(x, 500.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotary_dim", [8, 4, 0])  # all dims, --rotary-percent 0.5, no RoPE (GPT)
def test_rope_and_qkv_split_kernels_match_textbook_form_and_gradcheck(rotary_dim):
    """The pair-wise rotation (eager) = x cos + rotate_half(x) sin in values and gradients, float64 exact to
    rounding; gradcheck proves the hand-written backwards; the QKV split equals slicing (the rotated) QKV."""
    s, b, g, hpg, d = 5, 2, 3, 2, 8
    # Both forms round each of x1 c, x2 s and their sum once (the kernel may fuse into one FMA): a few ulps of
    # the largest |value| (< 10 for these randn inputs), i.e. < 1e-14 in float64.
    cos = sin = None
    if rotary_dim:
        cos, sin = RotaryEmbedding(rotary_dim, base=100.0)(s, torch.device("cpu"), torch.float64)
        x = torch.randn(s, b, g, d, dtype=torch.float64, requires_grad=True)
        torch.autograd.gradcheck(lambda t: apply_rotary(t, cos, sin), (x,))
        torch.testing.assert_close(apply_rotary(x, cos, sin), rotary_reference(x, cos, sin), rtol=0, atol=1e-14)

    qkv = torch.randn(s, b, g, hpg + 2, d, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: split_qkv(t, cos, sin), (qkv,))
    qk = qkv[:, :, :, :-1] if cos is None else rotary_reference(qkv[:, :, :, :-1], cos.unsqueeze(2),
                                                                 sin.unsqueeze(2))
    expected = (qk[:, :, :, :-1].reshape(s, b, -1, d), qk[:, :, :, -1], qkv[:, :, :, -1])
    outputs = split_qkv(qkv, cos, sin)
    for got, want in zip(outputs, expected):
        assert got.permute(1, 2, 0, 3).is_contiguous()  # [b, heads, s, d] memory, as SDPA reads it
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    # gradients when only some outputs are used (the others' gradient is None)
    (grad,) = torch.autograd.grad(outputs[1].sum(), qkv)
    (want,) = torch.autograd.grad(expected[1].sum(), qkv)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-14)
    # a rank whose selection keeps no query group (SAT / pruning under TP)
    empty = torch.randn(s, b, 0, hpg + 2, d, dtype=torch.float64, requires_grad=True)
    q, k, v = split_qkv(empty, cos, sin)
    (q.sum() + k.sum() + v.sum()).backward()
    assert q.shape == (s, b, 0, d) and empty.grad.shape == empty.shape


def attention_reference(attention, x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Naive GQA attention from the layer's weights: split the fused QKV per group by hand, repeat K/V
    for every query head of the group, explicit causal softmax."""
    nq, ng, d = config.num_attention_heads, config.num_query_groups, config.head_dim
    per_group = nq // ng
    qkv_w, qkv_b = attention.linear_qkv.weight, attention.linear_qkv.bias
    qkv = x @ qkv_w.T + (0 if qkv_b is None else qkv_b)  # [s, b, (nq + 2 ng) d]
    s = x.shape[0]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    heads = []
    for head in range(nq):
        group, j = divmod(head, per_group)
        base = group * (per_group + 2) * d
        q = qkv[..., base + j * d: base + (j + 1) * d]
        k = qkv[..., base + per_group * d: base + (per_group + 1) * d]
        v = qkv[..., base + (per_group + 1) * d: base + (per_group + 2) * d]
        if config.position_embedding_type == "rope":
            q = rope_reference(q.unsqueeze(2), config.rotary_base).squeeze(2)
            k = rope_reference(k.unsqueeze(2), config.rotary_base).squeeze(2)
        scores = torch.einsum("sbd,tbd->bst", q, k) / math.sqrt(d)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        heads.append(torch.einsum("bst,tbd->sbd", probs, v))
    out = torch.cat(heads, dim=-1) @ attention.linear_proj.weight.T
    return out if attention.linear_proj.bias is None else out + attention.linear_proj.bias


@pytest.mark.parametrize("position", ["rope", "learned_absolute"])
def test_gqa_attention_matches_naive_reference(position):
    config = ModelConfig(**{**MIX, "position_embedding_type": position})
    attention = build(config).decoder.layers["0"].self_attention
    with torch.no_grad():  # non-zero biases so a mis-split bias would show
        attention.linear_qkv.bias.normal_()
        attention.linear_proj.bias.normal_()
    x = torch.randn(10, 3, config.hidden_size)
    torch.testing.assert_close(attention(x), attention_reference(attention, x, config), rtol=1e-4, atol=1e-5)


def test_local_core_attention_is_causal_sdpa_and_the_mask_path_agrees():
    """The local backend's `core_attention` is the SDPA call attention.py made inline before the backend
    provided it (same dropout draws), and SelfAttention's sparse path (MST's `--mst-hsa-impl mask`: SDPA with a
    boolean mask) gives the same output with a plain causal mask."""
    config = ModelConfig(**{**MIX, "attention_dropout": 0.2})
    attention = build(config).decoder.layers["0"].self_attention
    core = attention.core_attention
    q, k, v = torch.randn(10, 3, 8, 16), torch.randn(10, 3, 2, 16), torch.randn(10, 3, 2, 16)  # [s, b, heads, d]
    for training in (True, False):
        core.train(training)
        torch.manual_seed(5)
        out = core(q, k, v)
        torch.manual_seed(5)
        expected = F.scaled_dot_product_attention(
            q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), dropout_p=0.2 if training else 0.0,
            is_causal=True, enable_gqa=True,
        ).permute(2, 0, 1, 3).reshape(10, 3, 8 * 16)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)

    attention.eval()
    x = torch.randn(10, 3, config.hidden_size)
    plain = attention(x)
    attention.sparse_attention = functools.partial(masked_sdpa, mask=torch.ones(32, 32, dtype=torch.bool).tril())
    torch.testing.assert_close(attention(x), plain, rtol=1e-5, atol=1e-6)


def test_swiglu_and_gelu_mlp_match_formula():
    x = torch.randn(5, 2, 64)
    mlp = build(preset("llama-tiny")).decoder.layers["1"].mlp
    gate, up = mlp.linear_fc1.weight  # [2, ffn, h]: index 0 = gate, 1 = up
    expected = (F.silu(x @ gate.T) * (x @ up.T)) @ mlp.linear_fc2.weight.T
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)

    mlp = build(preset("gpt-tiny")).decoder.layers["0"].mlp
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    hidden = x @ fc1.weight.T + fc1.bias
    gelu_tanh = 0.5 * hidden * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden**3)))
    torch.testing.assert_close(mlp(x), gelu_tanh @ fc2.weight.T + fc2.bias, rtol=1e-5, atol=1e-6)


def test_loss_is_cross_entropy_of_logits():
    config = ModelConfig(**MIX)
    model = build(config)
    ids, labels = tokens(config), tokens(config, seed=1)
    logits = model(ids)
    assert logits.shape == (2, 16, config.padded_vocab_size(1))
    loss = model(ids, labels)
    assert loss.shape == (2, 16) and loss.dtype == torch.float32
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, 16)
    torch.testing.assert_close(loss, expected)


def test_recompute_gives_same_loss_and_grads():
    results = []
    for recompute in (False, True):
        config = preset(
            "llama-tiny", recompute_activations=recompute, hidden_dropout=0.1, attention_dropout=0.1
        )
        model = build(config)
        torch.manual_seed(3)  # dropout masks must be replayed identically in the recomputation
        loss = model(tokens(config), tokens(config, seed=1)).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)


def test_layout_independent_init_and_pipeline_stages():
    for config in (preset("gpt-tiny"), ModelConfig(**MIX)):
        full = build(config)
        first = build(config, layer_range=(0, 1), post_process=False)
        last = build(config, layer_range=(1, 2), pre_process=False)
        full_params = dict(full.named_parameters())
        for stage in (first, last):
            for name, param in stage.named_parameters():
                if name == "output_layer.weight" and config.tied_embeddings:
                    name = "embedding.word_embeddings.weight"  # tied: starts equal to the embedding
                assert torch.equal(param, full_params[name]), name
        assert {n for n, _ in last.named_parameters()} >= {"decoder.layers.1.mlp.linear_fc2.weight"}
        assert not any(n.startswith("decoder.layers.0") for n, _ in last.named_parameters())
        ids, labels = tokens(config), tokens(config, seed=1)
        hidden = first(ids)
        assert hidden.shape == (16, 2, config.hidden_size)  # [s, b, h] between stages
        torch.testing.assert_close(last(labels=labels, input_tensor=hidden), full(ids, labels))


def test_tied_output_on_post_only_stage():
    config = preset("gpt-tiny")
    full = build(config, seed=11)
    last = build(config, seed=11, layer_range=(1, 2), pre_process=False)
    weight = last.output_layer.weight
    assert weight.shared_embedding and weight.init_name == "embedding.word_embeddings.weight"
    assert torch.equal(weight, full.embedding.word_embeddings.weight)
    first = GPTModel(config, layer_range=(0, 1), post_process=False)
    assert first.embedding.word_embeddings.weight.shared_embedding
    assert not getattr(full.embedding.word_embeddings.weight, "shared_embedding", False)


def test_transformer_engine_backend_is_a_clear_error():
    config = preset("llama-tiny", transformer_impl="transformer_engine")
    with pytest.raises(ValueError, match="--transformer-impl transformer_engine"):
        build_backend(config, ParallelState.single(), sequence_parallel=False)
    with pytest.raises(ValueError, match="--transformer-impl transformer_engine"):
        GPTModel(config)


def huggingface_copy(model: GPTModel):
    """The same weights in the `transformers` class the converter maps our shape to (megatron_eff.hf)."""
    from megatron_eff.hf.mapping import build_hf_model, to_hf

    return build_hf_model(*to_hf({n: p.detach() for n, p in model.named_parameters()}, model.config))


def test_llama_logits_match_huggingface():
    pytest.importorskip("transformers")
    config = preset("llama-tiny", num_attention_heads=8, num_query_groups=2, rotary_base=500.0)
    model = build(config).eval()
    with torch.no_grad():  # non-trivial norm weights so a swapped norm would show
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.uniform_(0.5, 1.5)
    hf = huggingface_copy(model)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 2
    ids = tokens(config, seq=40)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_gpt2_logits_match_huggingface():
    pytest.importorskip("transformers")
    config = preset("gpt-tiny")
    model = build(config).eval()
    with torch.no_grad():  # non-zero biases and non-trivial norms so a misplaced one would show
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
            elif "layernorm.weight" in name:
                param.uniform_(0.5, 1.5)
    hf = huggingface_copy(model)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    ids = tokens(config, seq=40)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_padded_vocabulary_columns_never_win():
    config = ModelConfig(**MIX)  # vocab 300, padded to 384
    model = build(config)
    ids, labels = tokens(config), tokens(config, seed=1)
    logits = model(ids)
    assert logits.shape[-1] == 384 and (logits[..., 300:] < -1e30).all()
    loss = model(ids, labels)
    expected = F.cross_entropy(logits[..., :300].flatten(0, 1), labels.flatten(), reduction="none")
    torch.testing.assert_close(loss.flatten(), expected)
    loss.sum().backward()
    assert model.output_layer.weight.grad[300:].abs().max() == 0


def _tensor_parallel_worker(rank: int, world: int, store: str, out: str):
    import torch.distributed as dist

    from megatron_eff.parallel.state import initialize_parallel_state

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    config = ModelConfig(**MIX)
    pstate = initialize_parallel_state(tp=world)
    results = {}
    for sequence_parallel in (False, True):
        model = build(config, pstate=pstate, sequence_parallel=sequence_parallel)
        loss = model(tokens(config), tokens(config, seed=1))
        loss.mean().backward()
        results[sequence_parallel] = {
            "loss": loss.detach(),
            "grads": {n: p.grad for n, p in model.named_parameters()},
            "partial": {n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)},
        }
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


def test_tensor_parallel_matches_single_process(tmp_path):
    """TP=2 with and without sequence parallel: GQA groups split across ranks, vocab-parallel loss, and the
    padded vocabulary (512 rows at TP=2, 384 at TP=1) changing nothing."""
    import torch.multiprocessing as mp

    config = ModelConfig(**MIX)
    reference = build(config)
    loss = reference(tokens(config), tokens(config, seed=1))
    loss.mean().backward()
    out = str(tmp_path / "result")
    mp.spawn(_tensor_parallel_worker, args=(2, str(tmp_path / "store"), out), nprocs=2)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for sequence_parallel in (False, True):
        shards = [results[sequence_parallel] for results in ranks]
        for shard in shards:
            torch.testing.assert_close(shard["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
        for name, param in reference.named_parameters():
            pieces = [shard["grads"][name] for shard in shards]
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                pieces = [torch.cat(pieces)[: param.shape[0]]]
            elif param.partition_dim is not None:
                pieces = [torch.cat(pieces, dim=param.partition_dim)]
            elif name in shards[0]["partial"]:
                assert sequence_parallel
                pieces = [sum(pieces)]  # partial over sequence shards: the trainer all-reduces them
            for piece in pieces:
                message = f"{name} sp={sequence_parallel}"
                torch.testing.assert_close(piece, param.grad, rtol=1e-4, atol=1e-6, msg=message)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_cross_entropy_equals_plain_in_loss_and_logits_grad(chunk, dtype):
    """--cross-entropy-loss-fusion: the chunked loss and d loss / d logits are the plain ones. In float64 both
    paths round at ~1e-16 relative; in BF16 both upcast the same BF16 logits to float32 and differ only by
    float32 summation order (~1e-6 relative), while the gradient rounds once to BF16 (2^-8 relative)."""
    from megatron_eff.parallel.cross_entropy import vocab_parallel_cross_entropy

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 5, 33, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, 33, (6, 5), generator=gen)
    weights = torch.rand(6, 5, generator=gen, dtype=torch.float64)  # an arbitrary upstream gradient (loss mask)
    results = []
    for chunk_tokens in (None, chunk):
        x = logits.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(x, target, chunk_tokens=chunk_tokens)
        (loss.double() * weights).sum().backward()
        results.append((loss, x.grad))
    (plain, plain_grad), (chunked, chunked_grad) = results
    assert chunked.dtype == plain.dtype and chunked_grad.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, plain, **tol)
    grad_tol = tol if dtype == torch.float64 else dict(rtol=2**-7, atol=2**-7 * plain_grad.abs().max().item())
    torch.testing.assert_close(chunked_grad, plain_grad, **grad_tol)


def test_swiglu_kernel_matches_plain_form_and_gradcheck():
    """The hand-written SwiGLU backward (one gradient buffer for gate and up) = autograd of silu(gate) * up;
    the forward runs the same two ops, so it is bitwise equal."""
    y = torch.randn(3, 2, 10, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(swiglu, (y,))
    gate, up = y.chunk(2, dim=-1)
    torch.testing.assert_close(swiglu(y), F.silu(gate) * up, rtol=0, atol=0)

"""Tensor mapping between megatron_eff's parameters and Hugging Face `LlamaForCausalLM` / `GPT2LMHeadModel`.

Both directions work on full (unsharded) tensors keyed by our global names (see `model/gpt_model.py`):

    to_hf(tensors, config, **token_ids)   -> (HF config.json dict, HF state dict)
    from_hf(hf_config, hf_tensors, ...)   -> (ModelConfig, our tensors)

Conventions (DESIGN.md, "Checkpoint <-> Hugging Face"):
- QKV: ours is one fused weight, rows per query group `[q heads of the group ; k ; v]`; HF LLaMA keeps
  `q_proj`, `k_proj`, `v_proj` apart (GQA: `num_key_value_heads` = our query groups); HF GPT-2 fuses
  them as `[all q ; all k ; all v]` in a `Conv1D` (weights stored `[in, out]`, i.e. transposed).
- SwiGLU fc1 `[2, ffn, h]` = `[gate ; up]` -> `gate_proj`, `up_proj`.
- RoPE: both sides use the non-interleaved ("rotate half") pairing `(x[i], x[i + d/2])`, so q/k rows are
  copied as they are; weights from the interleaved convention (Meta's original LLaMA files) would need
  `rotate_half_rows` first.
- Vocabulary: our embedding / output rows are padded for TP; `to_hf` keeps the first `vocab_size` rows,
  `from_hf` returns exactly `vocab_size` rows (`pad_vocab` re-adds padding for a TP size).
- Shapes are read from the tensors, layer by layer, so pruned models export when every layer has the same
  shape (HF configs hold one `intermediate_size` / head count); otherwise a clear error names the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_eff.config import ModelConfig

LAYER = "decoder.layers.{}."
ARCHITECTURES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
GPT2_GELU = ("gelu_new", "gelu_pytorch_tanh")  # the tanh approximation our GELU MLP uses
VOCAB_TABLES = ("embedding.word_embeddings.weight", "output_layer.weight")  # rows padded for TP


@dataclass(frozen=True)
class LayerShape:
    num_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int


def hf_architecture(config: ModelConfig) -> str:
    """'llama' or 'gpt2' for a config HF can represent; otherwise one message naming what does not fit."""
    llama = (config.position_embedding_type, config.normalization, config.swiglu) == ("rope", "RMSNorm", True)
    gpt2 = (config.position_embedding_type, config.normalization, config.swiglu) == (
        "learned_absolute", "LayerNorm", False)
    if llama:
        return "llama"
    if gpt2:
        if not config.add_bias_linear:
            raise ValueError("no Hugging Face architecture for a GPT-2 shape without biases "
                             "(GPT2LMHeadModel always has linear biases; train without --disable-bias-linear)")
        return "gpt2"
    raise ValueError(
        "no Hugging Face architecture matches position_embedding_type="
        f"{config.position_embedding_type}, normalization={config.normalization}, swiglu={config.swiglu}: "
        "LlamaForCausalLM needs rope + RMSNorm + SwiGLU, GPT2LMHeadModel learned_absolute + LayerNorm + GELU"
    )


def _layer_indices(tensors: dict[str, torch.Tensor]) -> list[int]:
    found = sorted({int(name.split(".")[2]) for name in tensors if name.startswith("decoder.layers.")})
    if found != list(range(len(found))) or not found:
        raise ValueError(f"checkpoint layers are not 0..L-1: found {found}")
    return found


def _get(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"checkpoint has no tensor {name!r}")
    return tensors[name]


def layer_shapes(tensors: dict[str, torch.Tensor], head_dim: int) -> list[LayerShape]:
    """Per layer: heads (from linear_proj's input), query groups (from the QKV rows), ffn (from fc2)."""
    shapes = []
    for i in _layer_indices(tensors):
        p = LAYER.format(i)
        heads = _get(tensors, p + "self_attention.linear_proj.weight").shape[1] // head_dim
        qkv_heads = _get(tensors, p + "self_attention.linear_qkv.weight").shape[0] // head_dim
        ffn = _get(tensors, p + "mlp.linear_fc2.weight").shape[1]
        shapes.append(LayerShape(heads, (qkv_heads - heads) // 2, head_dim, ffn))
    return shapes


def uniform_shape(shapes: list[LayerShape], architecture: str) -> LayerShape:
    """The one shape every layer has; HF configs cannot describe per-layer sizes."""
    for i, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise ValueError(
                f"layer {i} has {shape.num_heads} heads / {shape.num_query_groups} query groups / ffn "
                f"{shape.ffn_hidden_size}, layer 0 has {shapes[0].num_heads} / {shapes[0].num_query_groups} / "
                f"{shapes[0].ffn_hidden_size}: {ARCHITECTURES[architecture]} needs the same shape in every layer"
            )
    return shapes[0]


def _vocab_rows(tensor: torch.Tensor, vocab_size: int, name: str) -> torch.Tensor:
    if tensor.shape[0] < vocab_size:
        raise ValueError(f"{name} has {tensor.shape[0]} rows, fewer than the vocabulary ({vocab_size})")
    return tensor[:vocab_size]


# ---------------------------------------------------------------------------------------------- ours -> HF


def split_qkv(qkv: torch.Tensor, shape: LayerShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused rows per group `[q heads ; k ; v]` -> q `[nq d, ...]`, k `[g d, ...]`, v `[g d, ...]`
    (works for weights `[rows, h]` and biases `[rows]`)."""
    g, d = shape.num_query_groups, shape.head_dim
    per_group = shape.num_heads // g
    grouped = qkv.reshape(g, per_group + 2, d, *qkv.shape[1:])
    rest = qkv.shape[1:]
    return (grouped[:, :per_group].reshape(g * per_group * d, *rest),
            grouped[:, per_group].reshape(g * d, *rest), grouped[:, per_group + 1].reshape(g * d, *rest))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: LayerShape) -> torch.Tensor:
    """Inverse of `split_qkv`."""
    g, d = shape.num_query_groups, shape.head_dim
    rest = q.shape[1:]
    parts = (q.reshape(g, -1, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def rotate_half_rows(weight: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """q/k projection rows from the interleaved RoPE pairing `(x[2i], x[2i+1])` to rotate-half
    `(x[i], x[i + d/2])` (what HF's LLaMA conversion script does to Meta's files)."""
    rest = weight.shape[1:]
    return weight.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(num_heads * head_dim, *rest)


def one_to_one_names(architecture: str, config: ModelConfig, num_layers: int) -> list[tuple[str, str, bool]]:
    """(our name, HF name, transposed) of every tensor copied as it is (all but QKV and SwiGLU's fc1)."""
    suffixes = ("weight", "bias") if config.add_bias_linear else ("weight",)
    norm_suffixes = ("weight", "bias") if config.normalization == "LayerNorm" else ("weight",)
    if architecture == "llama":
        prefix, top = "model.layers.{}.", [("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                                           ("decoder.final_layernorm.weight", "model.norm.weight")]
        linears = [("self_attention.linear_proj", "self_attn.o_proj"), ("mlp.linear_fc2", "mlp.down_proj")]
        norms = [("input_layernorm", "input_layernorm"), ("pre_mlp_layernorm", "post_attention_layernorm")]
    else:  # GPT-2: Conv1D weights are stored [in, out]
        prefix, top = "transformer.h.{}.", [("embedding.word_embeddings.weight", "transformer.wte.weight"),
                                            ("embedding.position_embeddings.weight", "transformer.wpe.weight")]
        top += [(f"decoder.final_layernorm.{x}", f"transformer.ln_f.{x}") for x in norm_suffixes]
        linears = [("self_attention.linear_proj", "attn.c_proj"), ("mlp.linear_fc1", "mlp.c_fc"),
                   ("mlp.linear_fc2", "mlp.c_proj")]
        norms = [("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")]
    names = [(ours, hf, False) for ours, hf in top]
    if config.untie_embeddings_and_output_weights:
        names.append(("output_layer.weight", "lm_head.weight", False))
    for i in range(num_layers):
        p, q = LAYER.format(i), prefix.format(i)
        names += [(f"{p}{o}.{x}", f"{q}{h}.{x}", architecture == "gpt2" and x == "weight")
                  for o, h in linears for x in suffixes]
        names += [(f"{p}{o}.{x}", f"{q}{h}.{x}", False) for o, h in norms for x in norm_suffixes]
    return names


def _fused_to_hf(ours: dict, architecture: str, config: ModelConfig, num_layers: int, shape: LayerShape) -> dict:
    """QKV (and SwiGLU's [gate ; up]) of every layer in HF's layout."""
    hf = {}
    for i in range(num_layers):
        p = LAYER.format(i)
        for x in ("weight", "bias") if config.add_bias_linear else ("weight",):
            q, k, v = split_qkv(ours[f"{p}self_attention.linear_qkv.{x}"], shape)
            if architecture == "gpt2":  # one Conv1D [h, 3h]: [all q ; all k ; all v] on the output side
                qkv = torch.cat([q, k, v])
                hf[f"transformer.h.{i}.attn.c_attn.{x}"] = qkv.t() if x == "weight" else qkv
                continue
            layer = f"model.layers.{i}."
            for name, tensor in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                hf[f"{layer}self_attn.{name}.{x}"] = tensor
            gate, up = ours[f"{p}mlp.linear_fc1.{x}"]  # weight [2, ffn, h], bias [2, ffn]
            hf[f"{layer}mlp.gate_proj.{x}"], hf[f"{layer}mlp.up_proj.{x}"] = gate, up
    return hf


def _fused_from_hf(hf: dict, architecture: str, config: ModelConfig, shape: LayerShape) -> dict:
    """Inverse of `_fused_to_hf`."""
    ours = {}
    for i in range(config.num_layers):
        p = LAYER.format(i)
        for x in ("weight", "bias") if config.add_bias_linear else ("weight",):
            if architecture == "gpt2":
                qkv = hf[f"transformer.h.{i}.attn.c_attn.{x}"]
                qkv = qkv.t() if x == "weight" else qkv
                ours[f"{p}self_attention.linear_qkv.{x}"] = fuse_qkv(*qkv.chunk(3), shape)
                continue
            layer = f"model.layers.{i}."
            q, k, v = (hf[f"{layer}self_attn.{name}.{x}"] for name in ("q_proj", "k_proj", "v_proj"))
            ours[f"{p}self_attention.linear_qkv.{x}"] = fuse_qkv(q, k, v, shape)
            gate_up = [hf[f"{layer}mlp.gate_proj.{x}"], hf[f"{layer}mlp.up_proj.{x}"]]
            ours[f"{p}mlp.linear_fc1.{x}"] = torch.stack(gate_up)  # [2, ffn, h] / [2, ffn]
    return ours


def _check_present(tensors: dict, config: ModelConfig, num_layers: int, architecture: str) -> None:
    """Every tensor the HF model needs is in the checkpoint (one message listing what is missing)."""
    names = [ours for ours, _, _ in one_to_one_names(architecture, config, num_layers)]
    fused = ["self_attention.linear_qkv"] + (["mlp.linear_fc1"] if architecture == "llama" else [])
    suffixes = ("weight", "bias") if config.add_bias_linear else ("weight",)
    names += [f"{LAYER.format(i)}{n}.{x}" for i in range(num_layers) for n in fused for x in suffixes]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) the export needs: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))


def to_hf(tensors: dict[str, torch.Tensor], config: ModelConfig, *, bos_token_id: int | None = None,
          eos_token_id: int | None = None, pad_token_id: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our full tensors (vocab rows padded or not) -> (HF `config.json` dict, HF state dict, padding dropped).
    Tied embeddings: the state dict holds the input embedding only (HF ties `lm_head` to it)."""
    architecture = hf_architecture(config)
    num_layers = len(_layer_indices(tensors))
    _check_present(tensors, config, num_layers, architecture)
    shape = uniform_shape(layer_shapes(tensors, config.head_dim), architecture)
    v = config.vocab_size
    tokens = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    common = {"architectures": [ARCHITECTURES[architecture]], "model_type": architecture, "vocab_size": v,
              "initializer_range": config.init_method_std, "tie_word_embeddings": config.tied_embeddings,
              "torch_dtype": "float32", "use_cache": True, **tokens}
    if architecture == "gpt2" and (shape.num_query_groups != shape.num_heads
                                   or shape.num_heads * shape.head_dim != config.hidden_size):
        raise ValueError(
            f"GPT2LMHeadModel needs multi-head attention with heads x head_dim = hidden size; this model has "
            f"{shape.num_heads} heads, {shape.num_query_groups} query groups, head dim {shape.head_dim}, "
            f"hidden {config.hidden_size}"
        )
    hf = _fused_to_hf(tensors, architecture, config, num_layers, shape)
    for ours_name, hf_name, transposed in one_to_one_names(architecture, config, num_layers):
        tensor = tensors[ours_name]
        if ours_name in VOCAB_TABLES:
            tensor = _vocab_rows(tensor, v, ours_name)
        if config.apply_layernorm_1p and ours_name.endswith("layernorm.weight"):
            tensor = tensor + 1  # zero-centred scales (--apply-layernorm-1p): HF applies the scale as stored
        hf[hf_name] = tensor.t() if transposed else tensor
    if architecture == "llama":
        _require(config.rotary_percent == 1.0, f"--rotary-percent {config.rotary_percent}: LlamaForCausalLM "
                 "rotates every dim of a head; a partial rotary model cannot be exported to it")
        hf_config = {
            **common, "hidden_size": config.hidden_size, "intermediate_size": shape.ffn_hidden_size,
            "num_hidden_layers": num_layers, "num_attention_heads": shape.num_heads,
            "num_key_value_heads": shape.num_query_groups, "head_dim": shape.head_dim, "hidden_act": "silu",
            "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.norm_epsilon,
            "rope_theta": config.rotary_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_base},
            "attention_bias": config.add_bias_linear, "mlp_bias": config.add_bias_linear,
            "attention_dropout": config.attention_dropout, "pretraining_tp": 1,
        }
        return hf_config, hf
    hf_config = {
        **common, "n_positions": config.max_position_embeddings, "n_embd": config.hidden_size,
        "n_layer": num_layers, "n_head": shape.num_heads, "n_inner": shape.ffn_hidden_size,
        "activation_function": "gelu_new", "layer_norm_epsilon": config.norm_epsilon,
        "resid_pdrop": config.hidden_dropout, "embd_pdrop": config.hidden_dropout,
        "attn_pdrop": config.attention_dropout, "scale_attn_weights": True,
    }
    return hf_config, hf


# ---------------------------------------------------------------------------------------------- HF -> ours


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _rope_theta(hf_config: dict) -> float:
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _require(rope_type == "default", f"config.json: rope type {rope_type!r} is not supported (only 'default')")
    return float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))


def model_config_from_hf(hf_config: dict, *, seq_length: int | None = None,
                         make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """Our ModelConfig for an HF `config.json` (LLaMA or GPT-2); anything we cannot represent is an error."""
    model_type = hf_config.get("model_type")
    common = {"vocab_size": hf_config["vocab_size"], "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
              "init_method_std": hf_config.get("initializer_range", 0.02),
              "untie_embeddings_and_output_weights": not hf_config.get("tie_word_embeddings", True)}
    if model_type == "llama":
        hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
        head_dim = hf_config.get("head_dim") or hidden // heads  # != hidden / heads: our --kv-channels
        _require(hf_config.get("hidden_act", "silu") == "silu",
                 f"config.json: hidden_act {hf_config.get('hidden_act')!r} is not silu (SwiGLU)")
        bias = bool(hf_config.get("attention_bias", False))
        _require(bias == bool(hf_config.get("mlp_bias", False)),
                 "config.json: attention_bias and mlp_bias differ; megatron_eff has one --disable-bias-linear")
        positions = hf_config.get("max_position_embeddings", 2048)
        return ModelConfig(
            **common, num_layers=hf_config["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
            num_query_groups=hf_config.get("num_key_value_heads") or heads,
            ffn_hidden_size=hf_config["intermediate_size"], seq_length=seq_length or positions,
            max_position_embeddings=positions, position_embedding_type="rope", rotary_base=_rope_theta(hf_config),
            normalization="RMSNorm", norm_epsilon=hf_config.get("rms_norm_eps", 1e-6), swiglu=True,
            add_bias_linear=bias, attention_dropout=hf_config.get("attention_dropout", 0.0),
            kv_channels=None if head_dim * heads == hidden else head_dim,
        )
    if model_type == "gpt2":
        activation = hf_config.get("activation_function", "gelu_new")
        _require(activation in GPT2_GELU, f"config.json: activation_function {activation!r} is not one of "
                 f"{', '.join(GPT2_GELU)} (the tanh GELU megatron_eff uses)")
        _require(hf_config.get("scale_attn_weights", True) and not hf_config.get("scale_attn_by_inverse_layer_idx"),
                 "config.json: GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
        hidden, positions = hf_config["n_embd"], hf_config.get("n_positions", 1024)
        return ModelConfig(
            **common, num_layers=hf_config["n_layer"], hidden_size=hidden, num_attention_heads=hf_config["n_head"],
            ffn_hidden_size=hf_config.get("n_inner") or 4 * hidden, seq_length=seq_length or positions,
            max_position_embeddings=positions, position_embedding_type="learned_absolute",
            normalization="LayerNorm", norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-5), swiglu=False,
            add_bias_linear=True, hidden_dropout=hf_config.get("resid_pdrop", 0.0),
            attention_dropout=hf_config.get("attn_pdrop", 0.0),
        )
    architectures = hf_config.get("architectures")
    raise ValueError(f"config.json: unknown architecture model_type={model_type!r} ({architectures}); "
                     "supported: llama (LlamaForCausalLM), gpt2 (GPT2LMHeadModel)")


def _normalize_hf_names(hf_tensors: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Drop buffers some HF files carry (causal masks, rotary inv_freq); add GPT-2's `transformer.` prefix."""
    out = {}
    for name, tensor in hf_tensors.items():
        if name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
            continue
        if model_type == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        out[name] = tensor
    return out


def from_hf(hf_config: dict, hf_tensors: dict[str, torch.Tensor], *, seq_length: int | None = None,
            make_vocab_size_divisible_by: int = 128) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, our full tensors with exactly `vocab_size` embedding rows, float32) for an HF model.
    Missing, unexpected or mis-shaped tensors are one error naming them."""
    config = model_config_from_hf(hf_config, seq_length=seq_length,
                                  make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    hf = {k: t.float() for k, t in _normalize_hf_names(hf_tensors, hf_config.get("model_type")).items()}
    if config.tied_embeddings:
        hf.pop("lm_head.weight", None)  # a tied copy some files carry
    shape = LayerShape(config.num_attention_heads, config.num_query_groups, config.head_dim, config.ffn_hidden_size)
    # The mapping is linear and invertible: map a template of expected HF names back and compare.
    _, expected = to_hf(expected_shapes(config), config)
    missing = sorted(set(expected) - set(hf))
    unexpected = sorted(set(hf) - set(expected))
    if missing or unexpected:
        raise ValueError(f"HF checkpoint does not match config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, template in expected.items():
        if tuple(hf[name].shape) != tuple(template.shape):
            raise ValueError(f"HF tensor {name!r} has shape {tuple(hf[name].shape)}, config.json implies "
                             f"{tuple(template.shape)}")
    return config, _ours_from_hf(hf, config, shape, hf_config["model_type"])


def expected_shapes(config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full parameters (unpadded vocabulary) as meta tensors: the names and shapes a TP1 model has."""
    from megatron_eff.model.gpt_model import GPTModel

    with torch.device("meta"):
        model = GPTModel(config)
    tensors = dict(model.named_parameters())
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in tensors:
            tensors[name] = tensors[name][: config.vocab_size]
    return tensors


def _ours_from_hf(hf: dict, config: ModelConfig, shape: LayerShape, architecture: str) -> dict[str, torch.Tensor]:
    ours = _fused_from_hf(hf, architecture, config, shape)
    for ours_name, hf_name, transposed in one_to_one_names(architecture, config, config.num_layers):
        ours[ours_name] = hf[hf_name].t() if transposed else hf[hf_name]
    return {name: tensor.contiguous() for name, tensor in ours.items()}


def pad_vocab(tensors: dict[str, torch.Tensor], config: ModelConfig, tensor_parallel_size: int = 1) -> dict:
    """Zero rows appended to the embedding / output layer up to `padded_vocab_size(tp)` (never used)."""
    rows = config.padded_vocab_size(tensor_parallel_size)
    out = dict(tensors)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in out:
            table = out[name][: config.vocab_size]
            out[name] = torch.cat([table, table.new_zeros(rows - table.shape[0], *table.shape[1:])])
    return out


def build_hf_model(hf_config: dict, hf_tensors: dict[str, torch.Tensor]):
    """A `transformers` model (eval mode) from `to_hf`'s output, without files (tests, notebooks)."""
    import transformers

    config = transformers.AutoConfig.for_model(**hf_config)
    model = transformers.AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(hf_tensors, strict=False)
    missing = [n for n in missing if not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()

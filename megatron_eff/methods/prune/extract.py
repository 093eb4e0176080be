"""Extraction: the pruned dense model from a pruning run's full tensors (`tools/checkpoint/prune.py`).

1. Deterministic gates keeping exactly the target counts: per layer for query groups and MLP channels,
   over all layers for the layer mask, over the hidden dims (`hard_concrete.deterministic_gate`).
2. Fold each kept gate's soft value once into the weights it scales: a group's gate into its V rows (and
   bias), a channel's into fc2's input column, layer x hidden gates into the output rows (and bias) of
   `linear_proj` and `linear_fc2`, the hidden gate into every norm's weight (and bias), the embedding
   columns and -- with an untied output layer -- the final norm (tied: the shared embedding already
   carries it into the logits, so it is not folded twice).
3. Remove what is pruned (rows, columns, groups, channels, layers) and renumber the surviving layers.

The masked model in eval mode with these gates (`--prune-eval-target-shape`) and the extracted model
compute the same function: the masked norms take their statistics over the kept dims only.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from megatron_eff.methods.prune.hard_concrete import LOG_ALPHA_MAX, LOG_ALPHA_MIN, deterministic_gate


def target_config(model, targets: dict[str, tuple[int, int]]):
    """The dense `ModelConfig` of the target shape (`targets`: {module: (source, target)})."""
    per_group = model.num_attention_heads // model.num_query_groups
    groups = targets.get("head", (model.num_query_groups, model.num_query_groups))[1]
    hidden = targets.get("hidden", (model.hidden_size, model.hidden_size))[1]
    heads = groups * per_group
    kv_channels = None if hidden % heads == 0 and hidden // heads == model.head_dim else model.head_dim
    return dataclasses.replace(
        model, num_layers=targets.get("layer", (model.num_layers, model.num_layers))[1], hidden_size=hidden,
        ffn_hidden_size=targets.get("ffn", (model.ffn_hidden_size, model.ffn_hidden_size))[1],
        num_attention_heads=heads, num_query_groups=groups, kv_channels=kv_channels,
    )


def deterministic_gates(tensors: dict[str, torch.Tensor], model, targets) -> dict[str, torch.Tensor]:
    """{layer: [L], head: [L, g], ffn: [L, m], hidden: [h]} gates keeping exactly the target counts (all
    ones for a module without a target)."""
    L = model.num_layers
    logits = {}
    if "layer" in targets:
        logits["layer"] = torch.stack([tensors[f"prune.layers.{i}.layer"].reshape(()) for i in range(L)])
    for m in ("head", "ffn"):
        if m in targets:
            logits[m] = torch.stack([tensors[f"prune.layers.{i}.{m}"] for i in range(L)])
    if "hidden" in targets:
        logits["hidden"] = tensors["prune.hidden"]
    gates = {m: deterministic_gate(t.float().clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX), targets[m][1])
             for m, t in logits.items()}
    ones = {"layer": (L,), "head": (L, model.num_query_groups), "ffn": (L, model.ffn_hidden_size),
            "hidden": (model.hidden_size,)}
    return {m: gates.get(m, torch.ones(shape)) for m, shape in ones.items()}


def _layer_tensor(tensors: dict[str, torch.Tensor], layer: int, key: str) -> torch.Tensor | None:
    return tensors.get(f"decoder.layers.{layer}.{key}")


def _kept(gate: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(gate, as_tuple=True)[0]


def extract(tensors: dict[str, torch.Tensor], model, targets) -> tuple[object, dict[str, torch.Tensor]]:
    """(target `ModelConfig`, its full tensors) from a pruning run's full tensors (`prune.*` included)."""
    z = deterministic_gates(tensors, model, targets)
    zh, hidden = z["hidden"], _kept(z["hidden"])
    per_group, hd = model.num_attention_heads // model.num_query_groups, model.head_dim
    out = {}
    for name in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight"):
        if name in tensors:
            out[name] = (tensors[name] * zh)[:, hidden]
    for new, i in enumerate(_kept(z["layer"]).tolist()):
        dst = f"decoder.layers.{new}."
        get = functools.partial(_layer_tensor, tensors, i)
        delta = z["layer"][i] * zh  # [h]: the residual deltas' gate
        for norm in ("input_layernorm", "pre_mlp_layernorm"):
            for part in ("weight", "bias"):
                if get(f"{norm}.{part}") is not None:
                    out[f"{dst}{norm}.{part}"] = (get(f"{norm}.{part}") * zh)[hidden]
        groups = _kept(z["head"][i])
        gate_v = torch.ones(model.num_query_groups, per_group + 2)
        gate_v[:, -1] = z["head"][i]
        qkv = get("self_attention.linear_qkv.weight").view(model.num_query_groups, per_group + 2, hd, -1)
        qkv = (qkv * gate_v[:, :, None, None])[groups][..., hidden]
        out[dst + "self_attention.linear_qkv.weight"] = qkv.reshape(-1, len(hidden))
        if get("self_attention.linear_qkv.bias") is not None:
            bias = get("self_attention.linear_qkv.bias").view(model.num_query_groups, per_group + 2, hd)
            out[dst + "self_attention.linear_qkv.bias"] = (bias * gate_v[:, :, None])[groups].reshape(-1)
        proj = get("self_attention.linear_proj.weight").view(-1, model.num_query_groups, per_group * hd)
        proj = (proj * delta[:, None, None])[hidden][:, groups]
        out[dst + "self_attention.linear_proj.weight"] = proj.reshape(len(hidden), -1)
        channels = _kept(z["ffn"][i])
        fc1 = get("mlp.linear_fc1.weight")
        out[dst + "mlp.linear_fc1.weight"] = fc1.index_select(-2, channels)[..., hidden]
        if get("mlp.linear_fc1.bias") is not None:
            out[dst + "mlp.linear_fc1.bias"] = get("mlp.linear_fc1.bias").index_select(-1, channels)
        fc2 = get("mlp.linear_fc2.weight") * z["ffn"][i] * delta[:, None]
        out[dst + "mlp.linear_fc2.weight"] = fc2[hidden][:, channels]
        for key in ("self_attention.linear_proj.bias", "mlp.linear_fc2.bias"):
            if get(key) is not None:
                out[dst + key] = (get(key) * delta)[hidden]
    final_gate = torch.ones_like(zh) if model.tied_embeddings else zh
    for part in ("weight", "bias"):
        if f"decoder.final_layernorm.{part}" in tensors:
            out[f"decoder.final_layernorm.{part}"] = (tensors[f"decoder.final_layernorm.{part}"] * final_gate)[hidden]
    if "output_layer.weight" in tensors:
        out["output_layer.weight"] = tensors["output_layer.weight"][:, hidden]
    return target_config(model, targets), {k: v.contiguous() for k, v in out.items()}

"""The mask logits (log alpha) a pruning run adds to each model chunk, and where the gates act.

Each chunk gets a `prune` submodule, so the logits are ordinary parameters: bucketed, reduced, sharded and
checkpointed like the weights, under layout-independent names:

    prune.layers.{i}.layer   [1]         layer i (gates its attention and MLP residual deltas)
    prune.layers.{i}.head    [g/tp]      query groups of layer i (MHA: heads), sharded like the QKV rows
    prune.layers.{i}.ffn     [ffn/tp]    MLP channels of layer i, sharded like fc1's rows
    prune.hidden             [h]         hidden dims         (first chunk of every pipeline stage)
    prune.lambdas            [M, 2]      lambda_1, lambda_2 per pruned module (first chunk of every stage)

`hidden` and `lambdas` are replicated over pipeline stages (`pipeline_replicated`: their gradients are
summed over the pipeline group, and they count once in the gradient norm). Every logit is
`optional_in_checkpoint`: a pruning run starts from a checkpoint without them (`--load --finetune`).

Gates z (drawn per forward by the method) act at the model's sites (`model/sites.py`) and norms:
    head site      context of each query head, z of its group
    ffn site       the MLP's intermediate activation
    layer sites    each residual delta:  delta * z_layer * z_hidden
    embedding      its output * z_hidden
    every norm     statistics over the kept hidden dims only (z_hidden != 0), output * z_hidden
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_eff.methods.prune.hard_concrete import INIT_STD
from megatron_eff.parallel.layers import mark_sharded


def _logits(full_shape: tuple[int, ...], local_shape: tuple[int, ...], partition_dim: int | None) -> nn.Parameter:
    param = mark_sharded(nn.Parameter(torch.empty(local_shape)), partition_dim, full_shape, "normal", INIT_STD)
    param.optional_in_checkpoint = True
    return param


class LayerMasks(nn.Module):
    def __init__(self, modules: list[str], num_groups: int, ffn: int, tp_size: int):
        super().__init__()
        if "layer" in modules:
            self.layer = _logits((1,), (1,), None)
        if "head" in modules:
            self.head = _logits((num_groups,), (num_groups // tp_size,), 0)
        if "ffn" in modules:
            self.ffn = _logits((ffn,), (ffn // tp_size,), 0)


class PruneMasks(nn.Module):
    """One chunk's mask logits; `shared`: this chunk holds the stage's `hidden` and `lambdas`."""

    def __init__(self, modules: list[str], layer_indices: list[int], config, tp_size: int, shared: bool,
                 sequence_parallel: bool):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): LayerMasks(modules, config.num_query_groups, config.ffn_hidden_size,
                                                        tp_size) for i in layer_indices})
        if shared:
            if "hidden" in modules:
                self.hidden = _logits((config.hidden_size,), (config.hidden_size,), None)
                self.hidden.pipeline_replicated = True
                self.hidden.sequence_parallel = sequence_parallel
            self.lambdas = mark_sharded(nn.Parameter(torch.zeros(len(modules), 2)), None, (len(modules), 2), "zeros")
            self.lambdas.optional_in_checkpoint = True
            self.lambdas.pipeline_replicated = True
        for layer in self.layers.values():  # layer gates see s/tp tokens under sequence parallel
            if hasattr(layer, "layer"):
                layer.layer.sequence_parallel = sequence_parallel

    def logit_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if name != "lambdas"]


def masked_norm(norm: nn.Module, x: torch.Tensor, z_hidden: torch.Tensor) -> torch.Tensor:
    """`norm(x)` with its statistics over the dims where `z_hidden` is not 0, the output times `z_hidden`."""
    keep = (z_hidden != 0).to(x.dtype)  # [h]
    count = keep.sum().clamp(min=1)
    if getattr(norm, "bias", None) is None:  # RMSNorm
        var = (x.float().pow(2) * keep).sum(-1, keepdim=True) / count
        y = (x.float() * torch.rsqrt(var + norm.eps)).to(x.dtype) * norm.weight
    else:  # LayerNorm
        mean = (x.float() * keep).sum(-1, keepdim=True) / count
        var = ((x.float() - mean).pow(2) * keep).sum(-1, keepdim=True) / count
        y = ((x.float() - mean) * torch.rsqrt(var + norm.eps)).to(x.dtype) * norm.weight + norm.bias
    return y * z_hidden.to(y.dtype)


def install_norm_hook(norm: nn.Module, masks: PruneMasks) -> None:
    """Replace `norm`'s output with `masked_norm` while `masks.z_hidden` is set."""

    def hook(module, args, output):
        z = getattr(masks, "z_hidden", None)
        return output if z is None else masked_norm(module, args[0], z)

    norm.register_forward_hook(hook)


def install_embedding_hook(embedding: nn.Module, masks: PruneMasks) -> None:
    def hook(module, args, output):
        z = getattr(masks, "z_hidden", None)
        return output if z is None else output * z.to(output.dtype)

    embedding.register_forward_hook(hook)


__all__ = ["LayerMasks", "PruneMasks", "install_embedding_hook", "install_norm_hook", "masked_norm"]

"""AdamW with decoupled weight decay on matrices only, and the global gradient norm / clipping.

Parameters stay FP32 (they are the master weights); BF16/FP16 enter only through autocast. Torch's fused
AdamW is used where the device supports it (it is also the fastest on CPU). With
`--use-distributed-optimizer` the same AdamW runs on this data-parallel rank's shard only
(`parallel/data_parallel.DistributedOptimizer`).

Methods add their own groups (`Method.param_groups()`): a dict with "params" and optionally "max_lr" and
"min_lr" (the group follows the run's LR schedule between its own bounds), "weight_decay" (default 0) and
"maximize" (gradient ascent, e.g. Lagrange multipliers). Both optimizers offer `reset_state(param, mask)`
(zero the AdamW moments of a parameter's masked positions) and `state_rows` / `restore_state_rows` (copy
and put back the moments of some rows or columns, to keep them out of one step) so methods never reach
into their internals.

Per-tensor LR: a parameter with an `lr_scale` attribute (set by a model transform, e.g. Unit Scaling) gets
the scheduled LR times `lr_scale`; the default parameters are grouped by (lr_scale, weight decay), a group
carrying its "lr_scale" key (any group may: it multiplies whatever LR the group's schedule gives). Its weight
decay is divided by lr_scale, so AdamW's decoupled decay per step (lr x lr_scale x weight_decay) stays that of
--weight-decay at the scheduled LR: scaling a tensor's LR does not scale its decay.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from megatron_eff.config import OptimizerConfig
from megatron_eff.dtypes import upcast
from megatron_eff.parallel.data_parallel import DistributedOptimizer, GradSync
from megatron_eff.parallel.state import communication_device
from megatron_eff.training.lr_schedule import learning_rate


def _no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases, norm weights and 1-D parameters are not decayed (Megatron / GPT-2 practice)."""
    return param.ndim < 2 or name.endswith(".bias") or "layernorm" in name or "norm." in name


class AdamW(torch.optim.AdamW):
    """torch's AdamW plus the optimizer API methods use."""

    @torch.no_grad()
    def reset_state(self, param: torch.nn.Parameter, mask: torch.Tensor) -> None:
        """Zero the moments of `param` where `mask` (shaped like it) is True."""
        state = self.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].masked_fill_(mask, 0.0)

    @torch.no_grad()
    def state_rows(self, param: torch.nn.Parameter, dim: int, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Copies of `param`'s AdamW moments at positions `index` along `dim` (for `restore_state_rows`)."""
        state = self.state.get(param, {})
        return {key: state[key].index_select(dim, index) for key in ("exp_avg", "exp_avg_sq") if key in state}

    @torch.no_grad()
    def restore_state_rows(self, param: torch.nn.Parameter, dim: int, index: torch.Tensor, saved: dict) -> None:
        """Put back what `state_rows` copied; moments created since then are zeroed there."""
        state = self.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                if key in saved:
                    state[key].index_copy_(dim, index, saved[key])
                else:
                    state[key].index_fill_(dim, index, 0.0)


_GROUP_KEYS = ("params", "max_lr", "min_lr", "weight_decay", "maximize", "lr_scale")


def default_param_groups(named_params, weight_decay: float) -> list[dict]:
    """The parameters' groups keyed by (lr_scale, decayed or not): matrices decayed by `weight_decay`,
    biases/norms not; a group whose lr_scale is not 1 carries "lr_scale" and the decay `weight_decay / lr_scale`
    (module docstring). Order: as the parameters come, decayed group before undecayed for equal lr_scale."""
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        lr_scale, decayed = float(getattr(param, "lr_scale", 1.0)), not _no_weight_decay(name, param)
        if (lr_scale, decayed) not in groups:
            for key in ((lr_scale, True), (lr_scale, False)):  # keep the decayed group first (stable order)
                groups[key] = {"params": [], "weight_decay": weight_decay / lr_scale if key[1] else 0.0}
                if lr_scale != 1.0:
                    groups[key]["lr_scale"] = lr_scale
        groups[(lr_scale, decayed)]["params"].append(param)
    return [g for g in groups.values() if g["params"]]


def build_optimizer(named_params, config: OptimizerConfig, grad_sync: GradSync | None = None,
                    extra_groups: list[dict] | None = None):
    """AdamW over the default groups (decayed matrices, undecayed biases/norms; per lr_scale) plus the
    methods' `extra_groups` (their parameters leave the default groups). With a sharding `grad_sync`
    (`--use-distributed-optimizer`) it is the ZeRO-1 `DistributedOptimizer` over this rank's shard."""
    extra_groups = [dict(g) for g in extra_groups or []]
    for group in extra_groups:
        unknown = set(group) - set(_GROUP_KEYS)
        if unknown:
            raise ValueError(f"optimizer group keys {sorted(unknown)} are not supported (use {_GROUP_KEYS})")
        group.setdefault("weight_decay", 0.0)
        group["params"] = list(group["params"])
    claimed = {p for g in extra_groups for p in g["params"]}
    groups = [*default_param_groups(((n, p) for n, p in named_params if p not in claimed), config.weight_decay),
              *extra_groups]
    groups = [g for g in groups if g["params"]]
    for group in groups:  # the first step's LR before any `set_learning_rate`
        group.setdefault("lr", config.lr * group.get("lr_scale", 1.0))
    device = groups[0]["params"][0].device
    adam = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                fused=device.type in ("cuda", "cpu"))
    if grad_sync is not None and grad_sync.shard:
        return DistributedOptimizer(groups, grad_sync, **adam)
    return AdamW(groups, **adam)


# Megatron's embedding-or-output parameters: what --decoupled-lr trains with its own LR
_DECOUPLED_NAMES = ("embedding.word_embeddings.weight", "output_layer.weight")


def decoupled_lr_groups(named_params, config: OptimizerConfig) -> list[dict]:
    """With `--decoupled-lr`: the word embedding and output layer weights follow the run's LR schedule between
    `--decoupled-min-lr` (default `--min-lr`) and `--decoupled-lr`, decayed like every matrix (Megatron-LM's
    decoupled learning rate), grouped like the default groups (per lr_scale, so Unit Scaling's multipliers
    still apply). Empty without the flag or on a stage without them."""
    if config.decoupled_lr is None:
        return []
    named = [(name, p) for name, p in named_params if p.requires_grad and name.endswith(_DECOUPLED_NAMES)]
    min_lr = config.min_lr if config.decoupled_min_lr is None else config.decoupled_min_lr
    return [{**group, "max_lr": config.decoupled_lr, "min_lr": min_lr}
            for group in default_param_groups(named, config.weight_decay)]


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, iteration: int | None = None,
                      config: OptimizerConfig | None = None, train_iters: int | None = None,
                      consumed_samples: int | None = None) -> None:
    """`lr` for the default groups; a group with its own "max_lr" follows the same schedule between its
    "min_lr" (default 0) and "max_lr" (needs `iteration`, `config` and `train_iters`; `consumed_samples` for
    a sample-based schedule); either is then multiplied by the group's "lr_scale" (default 1)."""
    for group in optimizer.param_groups:
        if "max_lr" in group and config is not None:
            own = dataclasses.replace(config, lr=group["max_lr"], min_lr=group.get("min_lr", 0.0))
            group["lr"] = learning_rate(iteration, own, train_iters, consumed_samples) * group.get("lr_scale", 1.0)
        else:
            group["lr"] = lr * group.get("lr_scale", 1.0)


@torch.no_grad()
def global_grad_norm_sq(params, norm_group=None, is_owner=None) -> torch.Tensor:
    """The squared L2 norm of all gradients across the model-parallel group, as a 0-dim tensor on the device
    (not read on the host: the caller reads it with the iteration's other values in one sync).

    `is_owner(param)` tells whether this rank counts a parameter (replicated TP parameters and tied
    copies are counted once); `norm_group` is the group that holds the model's pieces (TP x PP).
    """
    grads = [p.grad for p in params if p.grad is not None and (is_owner is None or is_owner(p))]
    if grads:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(upcast(g)) for g in grads])) ** 2
    else:
        total = torch.zeros((), device=communication_device())
    if norm_group is not None and dist.get_world_size(norm_group) > 1:
        dist.all_reduce(total, group=norm_group)
    return total


@torch.no_grad()
def clip_gradients(params, max_norm: float, total_norm: float) -> None:
    """Scale all gradients so the global norm is at most `max_norm` (no-op when it already is)."""
    if max_norm <= 0 or not math.isfinite(total_norm) or total_norm <= max_norm:
        return
    grads = [p.grad for p in params if p.grad is not None]
    torch._foreach_mul_(grads, max_norm / (total_norm + 1e-6))

"""Mixed Sparsity Training (MST; Hu, Li, Huang 2024, arXiv 2408.11746): dynamic sparse training of the
transformer's linears through three phases, plus Hybrid Sparse Attention. See README.md, section "MST — Mixed
Sparsity Training".

    warm-up (dense -> s_max)  |  ultra-sparse (s_max)  |  restoration (s_max -> dense)  [| dense tail]

(the schedule and when the topology changes: `schedule.py`)

A training method (`methods/base.py`), built by `methods.build_methods` when `--mst` is given; the model does
not know it is there:
- `transform_model` (before the gradient buckets and the optimizer exist): every `linear_qkv`, `linear_proj`,
  `linear_fc1`, `linear_fc2` (and with `--mst-sparsify-head` the output layer / tied embedding) gets a
  boolean buffer `weight_mask`, shaped and TP-sharded like its weight;
- `param_groups`: with `--no-mst-decay-embeddings`, the embeddings (and a tied head's copy on the last
  pipeline stage) in a group without weight decay;
- `after_backward`: at a topology-update iteration the dense gradient (already averaged over DP, not yet
  clipped, masked positions included) is kept as the grow score; then the gradients of masked weights are
  zeroed, so norm, clipping and AdamW only see the active weights;
- `after_step`: weights are re-masked (masked weights stay exactly 0); at an update iteration the topology
  changes: drop the smallest |w| among active weights, grow the largest |dense grad| (r/(r+1) of them, the
  rest uniformly at random), grown weights start at 0 with zero AdamW moments (`optimizer.reset_state`);
- `before_iteration`: Hybrid Sparse Attention switches the attention modules' `sparse_attention` on inside its
  window (default: the ultra-sparse phase): the factorized pattern or, with `--mst-hsa-impl mask`, SDPA with
  the pattern as mask;
- training FLOPs (dense-equivalent vs actual) are accumulated per iteration and logged.

Global decisions: per layer, n_keep comes from the global shapes (ER or uniform) and the schedule, so every
rank agrees without communication. The top-k choices need the full layer: each rank all-gathers its TP
group's shards of |w|, the mask and |grad| and selects on the full flat tensor with a stable sort (ties go
to the lower global flat index), and the random part of growing uses a generator seeded by (seed,
iteration, layer name); the result equals the single-process decision and every rank keeps its own shard.
(For very large layers, a threshold search with all-reduced counts over TP avoids materialising the full
layer; gathering is simpler and cheap at the update interval.) DP replicas see identical weights and
DP-averaged gradients, and a checksum of every mask is compared across DP after each update. Pipeline
stages own their layers.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_eff.methods.base import FlopAccounting, Method
from megatron_eff.methods.mst.attention_patterns import (
    attention_pattern,
    masked_sdpa,
    pattern_density,
    sparse_attention,
)
from megatron_eff.methods.mst.config import MSTConfig
from megatron_eff.methods.mst.schedule import MSTSchedule
from megatron_eff.parallel.layers import local_shard
from megatron_eff.parallel.state import communication_device
from megatron_eff.training import flops as flops_lib

MASK = "weight_mask"
HEAD = "output_layer"


# --- per-layer densities and the prune/grow step (pure functions on full tensors) -------------------------


def layer_densities(shapes: dict[str, tuple[int, int]], sparsity: float, distribution: str = "er") -> dict[str, float]:
    """Density per layer so that sum(density_l * N_l) = (1 - sparsity) * N. `er`: density_l proportional to
    (n_in + n_out) / (n_in n_out), layers that would exceed 1 are made dense and the scale re-solved."""
    if distribution == "uniform" or sparsity == 0.0:
        return dict.fromkeys(shapes, 1.0 - sparsity)
    numel = {name: n_in * n_out for name, (n_in, n_out) in shapes.items()}
    raw = {name: (n_in + n_out) / (n_in * n_out) for name, (n_in, n_out) in shapes.items()}
    kept_total = (1.0 - sparsity) * sum(numel.values())
    dense: set[str] = set()
    while True:
        budget = kept_total - sum(numel[n] for n in dense)
        scale = budget / sum(raw[n] * numel[n] for n in shapes if n not in dense)
        over = [n for n in shapes if n not in dense and raw[n] * scale > 1.0]
        if not over:
            return {n: 1.0 if n in dense else raw[n] * scale for n in shapes}
        top = max(raw[n] for n in over)
        dense |= {n for n in over if raw[n] == top}


def prune_and_grow(weight: torch.Tensor, mask: torch.Tensor, grow_score: torch.Tensor, n_keep: int,
                   drop_fraction: float, grad_random_ratio: float, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One RigL-style update of a full flat layer; returns (new mask, newly grown positions).

    n_drop = max(floor(active * f), active - n_keep); n_grow = n_drop - (active - n_keep), so the layer ends
    with exactly `n_keep` active weights. Drop the smallest |w| among active weights; grow among the rest
    (just-dropped included, as the authors' code does): r/(r+1) by largest `grow_score`, the others at
    random. Scores are ranked at bfloat16 precision and ties go to the lower flat index (stable sorts): a
    parallel layout's float reduction order (~1e-7 relative) cannot reorder near-ties -- and AdamW makes
    many, since freshly grown weights with reset moments all take steps of about +-lr -- so the choice is
    layout-independent."""
    active = int(mask.sum())
    shrink = active - n_keep
    n_drop = min(active, max(int(active * drop_fraction), shrink))
    n_grow = n_drop - shrink
    drop_score = torch.where(mask, _rank_key(weight), torch.full_like(weight, math.inf, dtype=torch.float32))
    kept = mask.clone()
    kept[torch.sort(drop_score, stable=True).indices[:n_drop]] = False
    n_by_grad = int(n_grow * grad_random_ratio / (grad_random_ratio + 1))
    grad_score = torch.where(kept, torch.full_like(grow_score, -1.0, dtype=torch.float32), _rank_key(grow_score))
    grown = torch.zeros_like(mask)
    grown[torch.sort(grad_score, descending=True, stable=True).indices[:n_by_grad]] = True
    candidates = (~kept & ~grown).nonzero().squeeze(1)
    pick = torch.randperm(candidates.numel(), generator=generator)[:n_grow - n_by_grad]
    grown[candidates[pick.to(candidates.device)]] = True
    new_mask = kept | grown
    return new_mask, new_mask & ~mask


def _rank_key(score: torch.Tensor) -> torch.Tensor:
    """|score| rounded to bfloat16 (8 significant bits), as float32."""
    return score.abs().to(torch.bfloat16).float()


def _generator(seed: int, iteration: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"mst:{seed}:{iteration}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def sparse_layer_shapes(model_config, tp_size: int, sparsify_head: bool) -> dict[str, tuple[int, int]]:
    """{global module name: (n_in, n_out)} of every layer MST sparsifies, over the whole model (all stages):
    the transformer linears, and the output layer (padded vocabulary, as its weight) if asked."""
    shapes = flops_lib.linear_shapes(model_config)
    head = shapes.pop(HEAD)
    if sparsify_head:
        shapes[HEAD] = (head[0], model_config.padded_vocab_size(tp_size))
    return shapes


@dataclass
class SparseWeight:
    """One masked weight on this rank (`counted`: False for the first stage's copy of a tied head)."""

    name: str
    param: torch.nn.Parameter
    mask: torch.Tensor
    counted: bool = True
    dense: bool = True  # every position active: masking is a no-op and is skipped


# --- the method -----------------------------------------------------------------------------------------


class MST(FlopAccounting, Method):
    name = "mst"

    def __init__(self, mst_config: MSTConfig, config, pstate):
        self.cfg, self.model_config, self.seed = mst_config, config.model, config.train.seed
        self.optimizer = self.grad_sync = None  # `attach`
        self.pstate = pstate
        self.schedule = MSTSchedule.from_config(mst_config, config.train.train_iters)
        self.tokens_per_iter = config.train.resolved_global_batch_size(pstate.dp_size) * config.model.seq_length
        self.shapes = sparse_layer_shapes(config.model, pstate.tp_size, mst_config.sparsify_head)
        self.weights: list[SparseWeight] = []
        self._grow_scores: dict[str, torch.Tensor] = {}
        self.active = {name: n_in * n_out for name, (n_in, n_out) in self.shapes.items()}
        self.reset_flops()
        self.updates = 0

    # lifecycle
    def transform_model(self, chunks: list) -> None:
        self.weights = self._install_masks(chunks)
        self.embedding_params = self._embedding_params(chunks)
        self._install_attention(chunks)
        if self.schedule.target_sparsity(0) > 0:  # the run starts sparse: random masks (the authors' init)
            self._random_masks(self.schedule.target_sparsity(0))

    def param_groups(self) -> list[dict]:
        if self.cfg.decay_embeddings or not self.embedding_params:
            return []
        return [{"params": self.embedding_params, "weight_decay": 0.0}]

    def attach(self, trainer) -> None:
        self.optimizer, self.grad_sync = trainer.optimizer, trainer.grad_sync

    @staticmethod
    def _embedding_params(chunks) -> list[torch.nn.Parameter]:
        """Word and position embeddings, and the last stage's copy of a tied embedding (the output layer)."""
        params = []
        for chunk in chunks:
            if chunk.embedding is not None:
                params += [p for p in chunk.embedding.parameters() if p.requires_grad]
            head = chunk.output_layer
            if head is not None and getattr(head.weight, "shared_embedding", False):
                params.append(head.weight)
        return params

    # installation
    @staticmethod
    def _layers(chunk):
        """(global layer index, layer) of a chunk's transformer layers (`TransformerBlock.layers` is keyed
        by the global index)."""
        return [(int(index), layer) for index, layer in chunk.decoder.layers.items()]

    def _install_masks(self, chunks) -> list[SparseWeight]:
        weights = []
        for chunk in chunks:
            for index, layer in self._layers(chunk):
                prefix = f"decoder.layers.{index}"
                linears = {
                    f"{prefix}.self_attention.linear_qkv": layer.self_attention.linear_qkv,
                    f"{prefix}.self_attention.linear_proj": layer.self_attention.linear_proj,
                    f"{prefix}.mlp.linear_fc1": layer.mlp.linear_fc1,
                    f"{prefix}.mlp.linear_fc2": layer.mlp.linear_fc2,
                }
                weights += [self._mask_module(name, module) for name, module in linears.items() if name in self.shapes]
            if HEAD in self.shapes:
                if chunk.output_layer is not None:
                    weights.append(self._mask_module(HEAD, chunk.output_layer))
                elif chunk.post_process:  # the tied embedding is the head
                    weights.append(self._mask_module(HEAD, chunk.embedding.word_embeddings))
                if chunk.pre_process and chunk.output_layer is None and not chunk.post_process:
                    weights.append(self._mask_module(HEAD, chunk.embedding.word_embeddings, counted=False))
        return weights

    @staticmethod
    def _mask_module(name: str, module, counted: bool = True) -> SparseWeight:
        mask = torch.ones_like(module.weight, dtype=torch.bool)
        module.register_buffer(MASK, mask, persistent=False)  # saved by the checkpoint through the hooks
        return SparseWeight(name, module.weight, getattr(module, MASK), counted)

    def _install_attention(self, chunks) -> None:
        cfg, seq = self.cfg, self.model_config.seq_length
        self.hsa_on, self.hsa_mask, self.attention_modules = False, None, []
        if cfg.hsa_pattern == "none":
            self.hsa_density = 1.0
            return
        window = cfg.hsa_window or max(1, seq // 8)
        device = self.weights[0].param.device if self.weights else None
        self.hsa_mask = attention_pattern(cfg.hsa_pattern, seq, window, device)
        self.hsa_density = pattern_density(self.hsa_mask)
        if cfg.hsa_impl == "factorized":
            self.hsa_function = functools.partial(sparse_attention, pattern=cfg.hsa_pattern, window=window)
        else:  # mask: SDPA over all scores with hsa_mask
            self.hsa_function = functools.partial(masked_sdpa, mask=self.hsa_mask)
        self.hsa_window = cfg.hsa_iters or (self.schedule.warm_end, self.schedule.ultra_end)
        self.hsa_layers = set(cfg.hsa_layers) if cfg.hsa_layers else set(range(self.model_config.num_layers))
        self.attention_modules = [layer.self_attention for chunk in chunks for index, layer in self._layers(chunk)
                                  if index in self.hsa_layers]

    def hsa_active(self, iteration: int) -> bool:
        """Iteration `iteration` (1-based) runs with sparse attention: t = iteration - 1 in [start, end)."""
        return self.hsa_mask is not None and self.hsa_window[0] <= iteration - 1 < self.hsa_window[1]

    # events
    def before_iteration(self, iteration: int) -> None:
        on = self.hsa_active(iteration)
        if on != self.hsa_on:
            for module in self.attention_modules:
                module.sparse_attention = self.hsa_function if on else None
            self.hsa_on = on

    @torch.no_grad()
    def after_backward(self, iteration: int) -> None:
        update = self.schedule.is_update(iteration)
        self._account_flops(iteration, update)
        if update:
            if self.grad_sync is not None and self.grad_sync.shard:
                self.grad_sync.all_gather_grads()  # the whole dense gradient, not just the owned shard
            for w in self.weights:
                grad = w.param.grad
                self._grow_scores[w.name] = torch.zeros_like(w.mask, dtype=torch.float32) if grad is None \
                    else grad.detach().abs().float()  # copies
        for w in self.weights:
            if not w.dense and w.param.grad is not None:
                w.param.grad.masked_fill_(~w.mask, 0.0)

    @torch.no_grad()
    def after_step(self, iteration: int) -> None:
        for w in self.weights:
            if not w.dense:
                w.param.masked_fill_(~w.mask, 0.0)
        if self.schedule.is_update(iteration):
            self._update_topology(iteration)

    # topology
    def _full(self, tensor: torch.Tensor, param) -> torch.Tensor:
        """The full layer from this TP group's shards (concatenated along the weight's partition dim)."""
        dim = getattr(param, "partition_dim", None)
        view = getattr(param, "local_view_shape", None)  # TE's fused fc1 [2 ffn/tp, h] is our [2, ffn/tp, h]
        tensor = tensor.view(view) if view is not None else tensor
        if dim is None or self.pstate.tp_size == 1:
            return tensor
        send = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor.contiguous()
        parts = [torch.empty_like(send) for _ in range(self.pstate.tp_size)]
        dist.all_gather(parts, send, group=self.pstate.tp_group)
        full = torch.cat(parts, dim=dim)
        return full.bool() if tensor.dtype == torch.bool else full

    def _local(self, full: torch.Tensor, param) -> torch.Tensor:
        """This rank's shard of a full layer tensor, shaped like the parameter."""
        shard = local_shard(full, getattr(param, "partition_dim", None), self.pstate.tp_rank, self.pstate.tp_size)
        return shard.reshape(param.shape)

    @torch.no_grad()
    def _update_topology(self, iteration: int) -> None:
        densities = layer_densities(self.shapes, self.schedule.target_sparsity(iteration), self.cfg.distribution)
        drop_fraction = self.schedule.update_drop_fraction(iteration)
        for w in self.weights:
            numel = math.prod(self.shapes[w.name])
            n_keep = round(densities[w.name] * numel)
            score = self._grow_scores.pop(w.name)
            if n_keep == numel and w.dense:
                continue  # dense and staying dense: dropping would regrow the same weights
            weight, mask = self._full(w.param.detach(), w.param), self._full(w.mask, w.param)
            grow_score = self._full(score, w.param)
            new_mask, grown = prune_and_grow(
                weight.flatten(), mask.flatten(), grow_score.flatten(), n_keep, drop_fraction,
                self.cfg.grow_grad_random_ratio, _generator(self.seed, iteration, w.name),
            )
            self._set_mask(w, self._local(new_mask.view(mask.shape), w.param),
                           self._local(grown.view(mask.shape), w.param))
        self._grow_scores.clear()
        self.updates += 1
        self._refresh_counts()
        self._check_replicas_agree()

    def _set_mask(self, w: SparseWeight, mask: torch.Tensor, grown: torch.Tensor) -> None:
        """Install a new local mask: inactive and newly grown weights become 0 (and their moments)."""
        w.mask.copy_(mask)
        w.dense = bool(mask.all())
        zero = ~mask | grown
        w.param.masked_fill_(zero, 0.0)
        if self.cfg.reset_optimizer_state and self.optimizer is not None:  # (none yet in transform_model)
            self.optimizer.reset_state(w.param, zero)

    @torch.no_grad()
    def _random_masks(self, sparsity: float) -> None:
        densities = layer_densities(self.shapes, sparsity, self.cfg.distribution)
        for w in self.weights:
            numel = math.prod(self.shapes[w.name])
            keep = torch.randperm(numel, generator=_generator(self.seed, 0, w.name))[:round(densities[w.name] * numel)]
            full = torch.zeros(numel, dtype=torch.bool)
            full[keep] = True
            full_shape = getattr(w.param, "full_shape", tuple(w.param.shape))
            self._set_mask(w, self._local(full.view(full_shape), w.param).to(w.mask.device),
                           torch.zeros_like(w.mask))
        self._refresh_counts()

    def _refresh_counts(self) -> None:
        """Active weights per layer over the whole model (sum over TP shards and pipeline stages)."""
        names = list(self.shapes)
        counts = torch.zeros(len(names), dtype=torch.float64, device=communication_device())
        for w in self.weights:
            if w.counted:
                counts[names.index(w.name)] += int(w.mask.sum())
        group = self.pstate.model_parallel_group
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
        self.active = {name: int(c) for name, c in zip(names, counts.tolist())}

    def _check_replicas_agree(self) -> None:
        """Every data-parallel replica must hold the same masks (a cheap checksum per layer)."""
        if self.pstate.dp_size == 1 or self.pstate.dp_group is None or not self.weights:
            return
        sums = torch.tensor([int(w.mask.flatten().nonzero().sum()) for w in self.weights], dtype=torch.int64,
                            device=communication_device())
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.pstate.dp_group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.pstate.dp_group)
        if not torch.equal(low, high):
            bad = [w.name for w, lo, hi in zip(self.weights, low, high) if lo != hi]
            raise RuntimeError(f"MST: masks differ across data-parallel replicas for {bad}")

    # accounting and reporting
    def sparsity(self) -> float:
        total = sum(math.prod(s) for s in self.shapes.values())
        return 1.0 - sum(self.active.values()) / total

    def densities(self) -> dict[str, float]:
        return {name: self.active[name] / math.prod(shape) for name, shape in self.shapes.items()}

    def _account_flops(self, iteration: int, update: bool) -> None:
        attention = dict.fromkeys(self.hsa_layers, self.hsa_density) if self.hsa_active(iteration) else {}
        config, tokens = self.model_config, self.tokens_per_iter
        dense = flops_lib.model_flops_per_iteration(config, tokens, config.seq_length)
        actual = flops_lib.sparse_training_flops(config, tokens, config.seq_length, self.densities(), attention,
                                                 dense_weight_grad=update)
        self.add_flops(dense, actual)

    def log_scalars(self) -> dict[str, float]:
        return {
            "mst/sparsity": self.sparsity(),
            "mst/hsa": float(self.hsa_on),
            **self.flop_scalars(),
        }

    def checkpoint_tensors(self):
        return [(f"{w.name}.{MASK}", w.mask, w.param) for w in self.weights]

    def state_dict(self) -> dict:
        return {**self.flop_state(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        """After the masks were loaded in place (collective: recounts over the model-parallel group)."""
        self.load_flop_state(state)
        self.updates = state["updates"]
        for w in self.weights:
            w.dense = bool(w.mask.all())
        self._refresh_counts()

    def summary(self) -> str:
        return f"MST: {self.updates} topology updates, final sparsity {self.sparsity():.3f}; {self.flop_summary()}"

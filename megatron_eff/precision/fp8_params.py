"""`--fp8-param-gather` (Megatron-LM's flag): the weights of the FP8 linears are kept in FP8, and the
distributed optimizer's parameter all-gather moves those FP8 bytes instead of FP32.

    attach_fp8_weights(model_chunk)                  # apply_precision, after apply_fp8
    params = Fp8ParamGather(chunks, recipe, grad_sync)   # PrecisionRuntime: binds the copies, casts them once
    params.weights_stepped()   after optimizer.step()     params.weights_loaded()   after a checkpoint load
    params.gather_masters()    before a checkpoint is written (the full FP32 masters)

Each linear with an FP8 GEMM (`fp8.Fp8Gemm` in its chain) gets an `Fp8Weight`: its weight as E4M3 bytes
(`data`, float8_e4m3fn, the weight's shape), the `scale` they were quantised with and the `amax` of the master
they came from. The GEMM uses `data` directly (`Fp8Gemm.stored_weight`): the quantisation of W it would do
anyway is done once per optimizer step, here, instead of at every GEMM. The gradient still flows to the FP32
parameter, which is the master weight: AdamW steps it, checkpoints save it, so a checkpoint from a run with the
flag loads into a run without it and back (the FP8 copies are non-persistent buffers, cast again on load).

When the copy is cast (after each optimizer step, and after building / loading):
- without the distributed optimizer, every rank casts its whole (TP-local) FP32 master;
- with it (`GradSync(shard=True)`), FP8 weights sit in buckets of their own; each data-parallel rank casts its
  owned slice of the master into a flat uint8 buffer that holds every FP8 weight (`GradSync.fp8_buffer`, the
  copies are views of it), and the parameter all-gather of those buckets moves uint8: a quarter of the FP32
  bytes. The per-tensor amax is the MAX over the data-parallel shards (one all-reduce for all weights), so every
  rank quantises its slice with the same scale. The FP32 parameter outside the owned slice is then not
  updated (nothing reads it: the GEMM uses the FP8 copy); `gather_masters()` all-gathers it in FP32 before a
  checkpoint is written and at the end of the run.

The scale is the recipe's, taken at cast time: `delayed`, the linear's current weight scale (`Fp8Meta.scale`,
from the amax history; the master's amax is recorded into the history at every forward, as quantising W
there would); `tensorwise`, fp8_max / the master's amax (of this TP rank's shard, as the GEMM computes it);
`unscaled`, 1. So the FP8 weight equals what the GEMM would quantise W to, and a run equals one without the
flag bit for bit, except with `delayed` and several micro-batches per step: without the flag each
micro-batch's forward re-quantises W with the scale updated after the previous micro-batch (whose history
now holds W's amax), with it W is quantised once per step with the scale current after the previous step
(what Transformer Engine's FP8 parameters do too). Block recipes (mxfp8, blockwise) are refused with the flag.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_eff.precision.fp8 import WEIGHT, Fp8Gemm, Fp8Meta, Fp8Recipe, quantize, scale_from_amax
from megatron_eff.precision.gemm import gemm_chain

E4M3 = torch.float8_e4m3fn


class Fp8Weight(nn.Module):
    """The FP8 copy of one linear's weight. Non-persistent buffers: derived from the FP32 master, never saved."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("data", torch.zeros(weight.shape, dtype=E4M3, device=weight.device), persistent=False)
        self.register_buffer("scale", torch.ones((), device=weight.device), persistent=False)
        self.register_buffer("amax", torch.zeros((), device=weight.device), persistent=False)


def _fp8_link(module: nn.Module) -> Fp8Gemm | None:
    gemm = getattr(module, "gemm", None)
    return next((link for link in gemm_chain(gemm) if isinstance(link, Fp8Gemm)), None) if gemm else None


def attach_fp8_weights(model: nn.Module) -> int:
    """Give every linear of `model` with an FP8 GEMM its `fp8_weight` (the GEMM then uses it); returns how many."""
    count = 0
    for module in model.modules():
        link = _fp8_link(module)
        if link is not None:
            module.fp8_weight = link.stored = Fp8Weight(module.weight)
            count += 1
    return count


def fp8_weight_linears(model_chunks) -> list[nn.Module]:
    """The linears of `model_chunks` that hold an `Fp8Weight`."""
    modules = (m for chunk in model_chunks for m in chunk.modules())
    return [m for m in modules if isinstance(getattr(m, "fp8_weight", None), Fp8Weight)]


def fp8_weight_params(model_chunks) -> list[nn.Parameter]:
    """The FP32 master parameters whose model copy is FP8 (for the gradient buckets' layout)."""
    return [m.weight for m in fp8_weight_linears(model_chunks)]


def weight_scale(recipe: Fp8Recipe, meta: Fp8Meta, amax: torch.Tensor) -> torch.Tensor:
    """The scale a weight of global `amax` is quantised with now: what the FP8 GEMM would use for it."""
    if recipe.recipe == "delayed":
        return meta.scale[WEIGHT].clone()
    if recipe.recipe == "unscaled":
        return torch.ones((), device=amax.device)
    return scale_from_amax(amax, recipe.forward_dtype)


@torch.no_grad()
def cast_to_fp8(linears: list[nn.Module], pieces: list[list[tuple[torch.Tensor, torch.Tensor]]],
                recipe: Fp8Recipe, group=None) -> None:
    """Quantise each linear's master `pieces` (master piece, FP8 destination of the same shape) with one scale
    per weight, from its amax MAX-reduced over `group` (the ranks that hold the other pieces)."""
    if not linears:
        return
    zero = torch.zeros((), dtype=linears[0].weight.dtype, device=linears[0].weight.device)
    amax = torch.stack([torch.stack([m.abs().amax() for m, _ in ps]).amax() if ps else zero for ps in pieces])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    for linear, ps, weight_amax in zip(linears, pieces, amax):
        copy = linear.fp8_weight
        copy.amax = weight_amax.clone()
        copy.scale = weight_scale(recipe, linear.fp8_meta, weight_amax)
        for master, out in ps:
            out.copy_(quantize(master, copy.scale, E4M3))


class Fp8ParamGather:
    """A run's FP8 weights: casts them from the FP32 masters when those change (see the module docstring).
    With a sharded `grad_sync` (the distributed optimizer) the copies become views of its uint8 buffer and
    the cast of the owned slices runs just before its parameter all-gather."""

    def __init__(self, model_chunks, recipe: Fp8Recipe, grad_sync=None):
        self.linears, self.recipe = fp8_weight_linears(model_chunks), recipe
        sharded = grad_sync is not None and grad_sync.fp8_buffer is not None
        self.grad_sync = grad_sync if sharded else None
        if sharded:
            for linear in self.linears:
                linear.fp8_weight.data = grad_sync.fp8_view(linear.weight).view(E4M3)
            grad_sync.before_param_gather = self._cast_owned_slices
        self.weights_loaded()

    def _cast_whole(self) -> None:
        cast_to_fp8(self.linears, [[(m.weight.detach(), m.fp8_weight.data)] for m in self.linears], self.recipe)

    def _cast_owned_slices(self) -> None:
        sync = self.grad_sync
        pieces = {m.weight: [] for m in self.linears}
        for param, lo, hi in sync.shard_pieces():
            if param in pieces:
                pieces[param].append((sync.param_buffer[lo:hi], sync.fp8_buffer[lo:hi].view(E4M3)))
        cast_to_fp8(self.linears, list(pieces.values()), self.recipe, sync.dp_group)

    def weights_stepped(self) -> None:
        """After `optimizer.step()`: the distributed optimizer's step has cast and gathered already."""
        if self.grad_sync is None:
            self._cast_whole()

    def weights_loaded(self) -> None:
        """After building or loading the FP32 masters (complete on every rank): cast them (and gather)."""
        if self.grad_sync is None:
            self._cast_whole()
        else:
            self.grad_sync.all_gather_params()
            self.grad_sync.finish_param_gather()

    def gather_masters(self) -> None:
        """Make the full FP32 masters current on every rank (checkpoints; whoever reads the model next)."""
        if self.grad_sync is not None:
            self.grad_sync.gather_fp32_masters()

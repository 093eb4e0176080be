"""FP8: formats, recipes, and the local emulation that lets FP8 numerics run (and be tested) on a CPU.

Formats (`--fp8-format`): `e4m3` (E4M3 everywhere) or `hybrid` (E4M3 for forward GEMM inputs, E5M2 for
gradients), as Transformer Engine's `Format.E4M3` / `Format.HYBRID`.

Local emulation (`--transformer-impl local --fp8-format ...`): every decoder linear's GEMM becomes an
`Fp8Gemm` that *fake-quantises* its inputs: x and W are scaled, clipped to the format's max (saturating),
cast to a torch float8 dtype and back, and the output gradient gets the same treatment in backward before
the dgrad/wgrad GEMMs. The GEMM itself runs in the autocast dtype (FP32 or BF16), so results equal those of
an FP8 GEMM with higher-precision accumulation. Gradients pass straight through the quantiser.

Recipes (`--fp8-recipe`) = how the per-tensor scale is chosen, scale = fp8_max / amax / 2**margin:
- `delayed` (TE's DelayedScaling): the scale comes from the amax *history* (max over it, or the most recent
  entry). Each linear keeps `Fp8Meta` buffers: `amax_history [len, 3]` and `scale [3]` for (input, weight,
  output grad). Forward/backward record this step's amax into row 0; `update_fp8_meta` (once per optimizer
  step) reduces row 0 with MAX over the tensor- and data-parallel groups — so every rank holds the same
  state and a TP/DP run quantises exactly like the single-process run — computes the new scales and rolls
  the history (TE's order: row 0 moves to the end, a zero row 0 starts). The first step uses scale 1.
- `tensorwise` (TE's Float8CurrentScaling): the scale comes from the tensor's own amax, now. On this
  rank's shard: a TP run's scales for sharded weights/grads differ slightly from a single-process run's.
- `mxfp8` (MXFP8BlockScaling): one power-of-two scale per 32 consecutive elements of the GEMM's inner dim.
- `blockwise` (Float8BlockScaling): 1x128 blocks for activations and gradients, 128x128 for weights
  (1x128 when the weight's rows are not a multiple of 128).
  Block recipes quantise along the last dim only (TE also keeps a column-wise copy for wgrad; not emulated).
Non-finite or zero amaxes keep the previous scale (as TE).

The model does not know any of this: `apply_fp8` swaps the `gemm` callable of the linears.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
INPUT, WEIGHT, GRAD_OUTPUT = 0, 1, 2  # the three tensors of one GEMM that get a scale


def fp8_max(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


@dataclass(frozen=True)
class Fp8Recipe:
    """What `PrecisionConfig` says about FP8, in the form the emulation needs."""

    fp8_format: str = "hybrid"  # e4m3 | hybrid
    recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"  # max | most_recent
    margin: int = 0

    @classmethod
    def from_config(cls, precision) -> Fp8Recipe:
        return cls(precision.fp8_format, precision.fp8_recipe, precision.fp8_amax_history_len,
                   precision.fp8_amax_compute_algo, precision.fp8_margin)

    @property
    def forward_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn

    @property
    def backward_dtype(self) -> torch.dtype:
        return torch.float8_e5m2 if self.fp8_format == "hybrid" else torch.float8_e4m3fn

    def dtype(self, slot: int) -> torch.dtype:
        return self.backward_dtype if slot == GRAD_OUTPUT else self.forward_dtype


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype, margin: int = 0) -> torch.Tensor:
    """fp8_max / amax / 2**margin (float32); 1 where amax is zero or not finite."""
    amax = amax.float()
    scale = fp8_max(dtype) / amax / (2.0**margin)
    return torch.where((amax > 0) & torch.isfinite(amax), scale, torch.ones_like(scale))


def fake_quantize(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """dequantise(quantise(x)): scale, clip to +-fp8_max (saturate), cast to `dtype` and back, unscale.
    Returns x's dtype. Values below the format's smallest subnormal (after scaling) flush to zero."""
    limit = fp8_max(dtype)
    q = (x.float() * scale).clamp_(-limit, limit).to(dtype)
    return (q.float() / scale).to(x.dtype)


def block_fake_quantize(x: torch.Tensor, block_rows: int, block_cols: int, dtype: torch.dtype,
                        power_of_two: bool) -> torch.Tensor:
    """Fake-quantise with one scale per `block_rows x block_cols` block of `x` viewed as `[rows, last]`.
    `power_of_two` rounds each scale down to a power of two (MXFP8's E8M0 scales)."""
    shape = x.shape
    rows, cols = x.numel() // shape[-1], shape[-1]
    blocks = x.float().reshape(rows // block_rows, block_rows, cols // block_cols, block_cols)
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True)
    scale = scale_from_amax(amax, dtype)
    if power_of_two:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return fake_quantize(blocks, scale, dtype).reshape(shape).to(x.dtype)


class _FakeQuantize(torch.autograd.Function):
    """Forward: fake-quantise. Backward: straight through."""

    @staticmethod
    def forward(ctx, x, quantize):
        return quantize(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _FakeQuantizeGrad(torch.autograd.Function):
    """Forward: identity. Backward: fake-quantise the incoming gradient."""

    @staticmethod
    def forward(ctx, y, quantize):
        ctx.quantize = quantize
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return ctx.quantize(grad), None


class Fp8Meta(nn.Module):
    """Delayed-scaling state of one linear: buffers, so they move with `.to()` and go into checkpoints."""

    def __init__(self, history_len: int):
        super().__init__()
        self.register_buffer("amax_history", torch.zeros(history_len, 3))  # row 0: this step's amax
        self.register_buffer("scale", torch.ones(3))  # (input, weight, grad_output)

    @torch.no_grad()
    def record(self, slot: int, tensor: torch.Tensor) -> None:
        amax = tensor.detach().abs().amax().float()
        self.amax_history[0, slot] = torch.maximum(self.amax_history[0, slot], amax)


class Fp8Gemm:
    """`y = Q(x) Q(W)^T (+ b)` with `Q` the recipe's fake quantiser; the gradient of y is quantised too.

    A plain callable (not a module): it points at the linear's `Fp8Meta`, which the linear owns."""

    def __init__(self, recipe: Fp8Recipe, meta: Fp8Meta):
        self.recipe, self.meta = recipe, meta

    def _quantizer(self, slot: int):
        recipe, dtype = self.recipe, self.recipe.dtype(slot)

        def quantize(t: torch.Tensor) -> torch.Tensor:
            self.meta.record(slot, t)
            if recipe.recipe == "delayed":
                return fake_quantize(t, self.meta.scale[slot], dtype)
            if recipe.recipe == "tensorwise":
                return fake_quantize(t, scale_from_amax(t.detach().abs().amax(), dtype, recipe.margin), dtype)
            if recipe.recipe == "mxfp8":
                return block_fake_quantize(t, 1, 32, dtype, power_of_two=True)
            rows = 128 if slot == WEIGHT and t.shape[0] % 128 == 0 else 1  # blockwise: 128x128 weights
            return block_fake_quantize(t, rows, 128, dtype, power_of_two=False)

        return quantize

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = _FakeQuantize.apply(x, self._quantizer(INPUT))
        weight = _FakeQuantize.apply(weight, self._quantizer(WEIGHT))
        y = _FakeQuantizeGrad.apply(F.linear(x, weight), self._quantizer(GRAD_OUTPUT))
        return y if bias is None else y + bias


def fp8_metas(model: nn.Module | list[nn.Module]) -> list[Fp8Meta]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, Fp8Meta)]


@torch.no_grad()
def update_fp8_meta(model, recipe: Fp8Recipe, groups=()) -> None:
    """End of an optimizer step (delayed scaling): reduce this step's amaxes (MAX over `groups`, e.g. TP
    and DP), compute the new scales from the history, roll the history. A no-op without FP8 linears."""
    metas = fp8_metas(model)
    if not metas or recipe.recipe != "delayed":
        return
    current = torch.stack([m.amax_history[0] for m in metas])  # [n, 3]: one collective for all linears
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(current, op=dist.ReduceOp.MAX, group=group)
    current = torch.where(torch.isfinite(current), current, torch.zeros_like(current))  # an overflow: not kept
    limits = torch.tensor([fp8_max(recipe.dtype(slot)) for slot in (INPUT, WEIGHT, GRAD_OUTPUT)])
    for meta, amax_now in zip(metas, current):
        meta.amax_history[0] = amax_now
        amax = meta.amax_history.amax(dim=0) if recipe.amax_compute_algo == "max" else amax_now
        new = limits.to(amax.device) / amax / (2.0**recipe.margin)
        meta.scale.copy_(torch.where((amax > 0) & torch.isfinite(amax), new, meta.scale))
        meta.amax_history.copy_(meta.amax_history.roll(-1, dims=0))
        meta.amax_history[0] = 0.0


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        return int(parts[2])
    return None


def apply_fp8(model: nn.Module, recipe: Fp8Recipe, num_layers: int, first_last_layers_bf16: bool = False) -> int:
    """Make every transformer-layer linear of `model` (one pipeline chunk) an FP8 GEMM; returns how many.
    The output layer stays in high precision (as Megatron-LM with TE). `first_last_layers_bf16` leaves
    layers 0 and L-1 alone."""
    count = 0
    for name, module in model.named_modules():
        layer = _layer_index(name)
        if layer is None or not hasattr(module, "gemm"):
            continue
        if first_last_layers_bf16 and layer in (0, num_layers - 1):
            continue
        module.fp8_meta = Fp8Meta(recipe.amax_history_len)
        module.gemm = Fp8Gemm(recipe, module.fp8_meta)
        count += 1
    return count

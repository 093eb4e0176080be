"""FP8: formats, recipes, and the local emulation that lets FP8 numerics run (and be tested) on a CPU.

Formats (`--fp8-format`): `e4m3` (E4M3 everywhere) or `hybrid` (E4M3 for forward GEMM inputs, E5M2 for
gradients), as Transformer Engine's `Format.E4M3` / `Format.HYBRID`.

Local emulation (`--transformer-impl local --fp8-format ...`): every decoder linear's GEMM becomes an
`Fp8Gemm` that *fake-quantises* its inputs: x and W are scaled, clipped to the format's max (saturating),
cast to a torch float8 dtype and back, and the output gradient gets the same treatment in backward before
the dgrad/wgrad GEMMs. The GEMM itself runs in the autocast dtype (FP32 or BF16), so results equal those of
an FP8 GEMM with higher-precision accumulation. Gradients pass straight through the quantiser.

Real FP8 GEMMs (`--fp8-gemm scaled_mm`, per-tensor recipes only): `ScaledMmFp8Gemm` quantises x, W and the
output gradient the same way (same scales, same amax records) and runs forward, dgrad and wgrad with
`torch._scaled_mm` (E4M3 x E4M3; E5M2 gradient x E4M3 under hybrid), FP32 accumulation, output in the
autocast dtype. torch's FP8 path without Transformer Engine: FP8 tensor cores on an sm89+ GPU; on CPU a
reference kernel (a little slower than the emulation). The GPU kernel wants W's sizes divisible by 16 (checked
with the flags, `PrecisionConfig.check_run`, on every device; the token dim is zero-padded for wgrad) and
cuBLASLt's row-major x column-major operands (W gets a transposed FP8 copy for dgrad, x and the gradient for wgrad).

Recipes (`--fp8-recipe`) = how the per-tensor scale is chosen, scale = fp8_max / amax (/ 2**margin, delayed):
- `delayed` (TE's DelayedScaling): the scale comes from the amax *history* (max over it, or the most recent
  entry). Each linear keeps `Fp8Meta` buffers: `amax_history [len, 3]` and `scale [3]` for (input, weight,
  output grad). Updated where TE updates them: the forward slots (input, weight) at the end of each
  micro-batch's forward (the exit of the autocast region the schedule runs each forward in), the gradient
  slot at the end of each micro-batch's backward (an autograd engine callback queued by the first gradient
  quantised in that backward) -- so the history length counts micro-batches, as in TE. Each update reduces
  the new amaxes with MAX over the tensor- and data-parallel groups (every rank holds the same state and a
  TP/DP run quantises exactly like the single-process run), computes the new scales from the history and
  rolls it (TE's order: row 0 moves to the end, a zero row 0 starts). Until the first update the scale is
  1. Forwards without gradients (evaluation) record nothing and update nothing.
- `tensorwise` (TE's Float8CurrentScaling): the scale comes from the tensor's own amax, now (no margin). On
  this rank's shard: a TP run's scales for sharded weights/grads differ slightly from a single-process run's.
- `mxfp8` (MXFP8BlockScaling): one power-of-two scale per 32 consecutive elements of the GEMM's inner dim.
- `blockwise` (Float8BlockScaling): 1x128 blocks for activations and gradients, 128x128 for weights
  (1x128 when the weight's rows are not a multiple of 128); scales rounded down to powers of two (TE's
  default; `--fp8-block-fp32-scales` keeps them FP32, TE's NVTE_FP8_BLOCK_SCALING_FP32_SCALES).
  Block recipes quantise along the last dim only (TE also keeps a column-wise copy for wgrad; not emulated).
- `unscaled`: scale 1, a plain cast (the unit-scaling library's `simulate_fp8`): what a unit-scaled model
  makes possible, and what the standard parametrisation's small gradients underflow in. Local backend only.
Scale edge cases as TE: a zero or non-finite amax keeps the previous scale (delayed) or gives scale 1
(current/block scaling); a scale that overflows FP32 (a tiny amax) is clamped to FP32's max.

Under BF16 autocast the operands are dequantised to FP32 and the GEMM runs in FP32 (output cast to BF16),
as an FP8 GEMM with FP32 accumulation does: dequantising to BF16 would round x/scale a second time.

The model does not know any of this: `apply_fp8` swaps the `gemm` callable of the linears. With
`--fp8-param-gather` (`fp8_params.py`) the weight operand is the linear's stored FP8 weight instead of Q(W).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_eff.autograd import forward_backward_function
from megatron_eff.precision.gemm import FP8_DEPTH, GemmLink, add_link

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
INPUT, WEIGHT, GRAD_OUTPUT = 0, 1, 2  # the three tensors of one GEMM that get a scale


def fp8_max(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


@dataclass(frozen=True)
class Fp8Recipe:
    """What `PrecisionConfig` says about FP8, in the form the emulation needs."""

    fp8_format: str = "hybrid"  # e4m3 | hybrid
    recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise | unscaled
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"  # max | most_recent
    margin: int = 0
    gemm: str = "emulate"  # emulate (fake-quantised, high-precision GEMM) | scaled_mm (torch._scaled_mm)
    block_power_of_two: bool = True  # blockwise: scales rounded down to powers of two (TE's default)

    @classmethod
    def from_config(cls, precision) -> Fp8Recipe:
        return cls(precision.fp8_format, precision.fp8_recipe, precision.fp8_amax_history_len,
                   precision.fp8_amax_compute_algo, precision.fp8_margin, precision.fp8_gemm,
                   not precision.fp8_block_fp32_scales)

    @property
    def forward_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn

    @property
    def backward_dtype(self) -> torch.dtype:
        return torch.float8_e5m2 if self.fp8_format == "hybrid" else torch.float8_e4m3fn

    def dtype(self, slot: int) -> torch.dtype:
        return self.backward_dtype if slot == GRAD_OUTPUT else self.forward_dtype


FP32_MAX = torch.finfo(torch.float32).max


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype, margin: int = 0) -> torch.Tensor:
    """fp8_max / amax / 2**margin (float32), clamped to FP32's max (a tiny amax); 1 where amax is zero or not
    finite (TE's current scaling; delayed scaling keeps the previous scale instead, `update_fp8_meta`)."""
    amax = amax.float()
    scale = (fp8_max(dtype) / amax / (2.0**margin)).clamp(max=FP32_MAX)
    return torch.where((amax > 0) & torch.isfinite(amax), scale, torch.ones_like(scale))


def quantize(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """x * scale, clipped to +-fp8_max (saturating) and cast to the float8 `dtype`. Values below the format's
    smallest subnormal (after scaling) flush to zero."""
    limit = fp8_max(dtype)
    return (x.float() * scale).clamp_(-limit, limit).to(dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dequantise(quantise(x)): `quantize`, cast back and unscale. Returns `out_dtype` (default x's dtype)."""
    return (quantize(x, scale, dtype).float() / scale).to(out_dtype or x.dtype)


def block_fake_quantize(x: torch.Tensor, block_rows: int, block_cols: int, dtype: torch.dtype,
                        power_of_two: bool, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fake-quantise with one scale per `block_rows x block_cols` block of `x` viewed as `[rows, last]`.
    `power_of_two` rounds each scale down to a power of two (MXFP8's E8M0 scales)."""
    shape = x.shape
    rows, cols = x.numel() // shape[-1], shape[-1]
    flat = x.float().reshape(rows, cols)
    padded = -(-cols // block_cols) * block_cols  # a selection of columns (`cols=`) may end in a partial block
    if padded != cols:  # zeros change no block's amax
        flat = F.pad(flat, (0, padded - cols))
    blocks = flat.reshape(rows // block_rows, block_rows, padded // block_cols, block_cols)
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True)
    scale = scale_from_amax(amax, dtype)
    if power_of_two:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    out = fake_quantize(blocks, scale, dtype).reshape(rows, padded)[:, :cols]
    return out.reshape(shape).to(out_dtype or x.dtype)


_fake_quantize = forward_backward_function(  # forward: fake-quantise; backward: straight through
    "_FakeQuantize", lambda x, quantize: quantize(x), lambda grad, quantize: grad)
_fake_quantize_grad = forward_backward_function(  # forward: identity; backward: fake-quantise the gradient
    "_FakeQuantizeGrad", lambda y, quantize: y.view_as(y), lambda grad, quantize: quantize(grad))


class Fp8Meta(nn.Module):
    """Delayed-scaling state of one linear: buffers, so they move with `.to()` and go into checkpoints."""

    def __init__(self, history_len: int):
        super().__init__()
        self.register_buffer("amax_history", torch.zeros(history_len, 3))  # row 0: amaxes since the last update
        self.register_buffer("scale", torch.ones(3))  # (input, weight, grad_output)
        self.pending = [False, False]  # (forward, backward) amaxes recorded since their last update
        self.on_backward = None  # called when a gradient amax is recorded (`DelayedScalingUpdates`)

    def record(self, slot: int, tensor: torch.Tensor) -> None:
        self.record_amax(slot, tensor.detach().abs().amax())

    @torch.no_grad()
    def record_amax(self, slot: int, amax: torch.Tensor) -> None:
        self.amax_history[0, slot] = torch.maximum(self.amax_history[0, slot], amax.float())
        self.pending[slot == GRAD_OUTPUT] = True
        if slot == GRAD_OUTPUT and self.on_backward is not None:
            self.on_backward()


class Fp8Gemm(GemmLink):
    """`y = inner(Q(x), Q(W)) (+ b)` with `Q` the recipe's fake quantiser; the gradient of y is quantised too.
    `inner` is the GEMM it wraps (`F.linear`, the kernel, by default; see `precision/gemm.py`).

    A plain callable (not a module): it points at the linear's `Fp8Meta`, which the linear owns."""

    depth = FP8_DEPTH

    def __init__(self, recipe: Fp8Recipe, meta: Fp8Meta, inner=F.linear):
        self.recipe, self.meta, self.inner = recipe, meta, inner
        self.recording = True  # record forward amaxes: set per call (not under no_grad, i.e. evaluation)
        self.stored = None  # --fp8-param-gather: the linear's `fp8_params.Fp8Weight`, used instead of Q(W)

    def stored_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """--fp8-param-gather: the linear's FP8 weight (shaped like `weight`, the master it was cast from) and
        its scale; records the master's amax where quantising `weight` would have (delayed scaling's history)."""
        stored = self.stored
        if stored.data.numel() != weight.numel():  # a weight override or row selection: refused with the flags
            raise RuntimeError(f"--fp8-param-gather: this linear got a weight of shape {tuple(weight.shape)}, not "
                               f"its own {tuple(stored.data.shape)}")
        if self.recording:
            self.meta.record_amax(WEIGHT, stored.amax)
        return stored.data.view(weight.shape), stored.scale

    def tensor_scale(self, slot: int, t: torch.Tensor) -> torch.Tensor:
        """Record t's amax (delayed scaling's history) and return its per-tensor scale: the delayed scale in
        `Fp8Meta`, or (tensorwise) the one from t's own amax."""
        amax = t.detach().abs().amax()
        if self.recording or slot == GRAD_OUTPUT:  # evaluation's forwards leave the history alone
            self.meta.record_amax(slot, amax)
        if self.recipe.recipe == "delayed":
            return self.meta.scale[slot]
        if self.recipe.recipe == "unscaled":
            return torch.ones((), device=t.device)
        return scale_from_amax(amax, self.recipe.dtype(slot))

    def _quantizer(self, slot: int):
        recipe, dtype = self.recipe, self.recipe.dtype(slot)
        if slot == WEIGHT and self.stored is not None:  # already quantised: dequantise (as fake_quantize does)

            def dequantize(t: torch.Tensor) -> torch.Tensor:
                data, scale = self.stored_weight(t)
                return (data.float() / scale).to(self.compute_dtype(t))

            return dequantize

        def quantize(t: torch.Tensor) -> torch.Tensor:
            if recipe.recipe in ("delayed", "tensorwise", "unscaled"):
                return fake_quantize(t, self.tensor_scale(slot, t), dtype, self.compute_dtype(t))
            if self.recording or slot == GRAD_OUTPUT:
                self.meta.record(slot, t)
            if recipe.recipe == "mxfp8":
                return block_fake_quantize(t, 1, 32, dtype, True, self.compute_dtype(t))
            rows = 128 if slot == WEIGHT and t.shape[0] % 128 == 0 else 1  # blockwise: 128x128 weights
            return block_fake_quantize(t, rows, 128, dtype, recipe.block_power_of_two, self.compute_dtype(t))

        return quantize

    @staticmethod
    def compute_dtype(t: torch.Tensor) -> torch.dtype:
        """The dtype the dequantised operands and the GEMM use: FP32 under autocast (an FP8 GEMM accumulates
        in FP32), else the operand's own (FP32, or FP64 in tests)."""
        return torch.float32 if torch.is_autocast_enabled(t.device.type) else t.dtype

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        device = x.device.type  # the output dtype F.linear would give: autocast's, else x's
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        self.recording = torch.is_grad_enabled()
        x = _fake_quantize(x, self._quantizer(INPUT))
        weight = _fake_quantize(weight, self._quantizer(WEIGHT))
        with torch.autocast(device, enabled=False):  # operands already in `compute_dtype`
            y = _fake_quantize_grad(self.inner(x, weight, None), self._quantizer(GRAD_OUTPUT)).to(out_dtype)
        return y if bias is None else y + bias.to(y.dtype)  # y's dtype (autocast's), as F.linear(x, w, b)


class ScaledMmFp8Gemm(Fp8Gemm):
    """`--fp8-gemm scaled_mm`: the same per-tensor quantisation (delayed / tensorwise, same amax records), but
    the three GEMMs (forward, dgrad, wgrad) run on FP8 operands with `torch._scaled_mm`: FP8 tensor cores on
    an sm89+ GPU, a reference kernel on CPU. Saves x and W for backward in FP8. It is the chain's kernel:
    its `inner` is not called."""

    def to_fp8(self, slot: int, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t quantised, row-major; the inverse scale that `_scaled_mm` multiplies the product by)."""
        if slot == WEIGHT and self.stored is not None:
            data, scale = self.stored_weight(t)
            return data.contiguous(), scale.reciprocal()
        scale = self.tensor_scale(slot, t)
        return quantize(t, scale, self.recipe.dtype(slot)).contiguous(), scale.reciprocal()

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        device = x.device.type  # the output dtype F.linear would give: autocast's, else x's
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        self.recording = torch.is_grad_enabled()
        y = _ScaledMmLinear.apply(x.reshape(-1, x.shape[-1]), weight, self, out_dtype)  # [s*b, out]
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if bias is None else y + bias.to(y.dtype)  # out_dtype, as F.linear(x, w, b)


def _scaled_mm(a8: torch.Tensor, b8: torch.Tensor, a_inv: torch.Tensor, b_inv: torch.Tensor, out_dtype):
    """(a8 * a_inv) @ (b8 * b_inv); a8 [m, k] row-major, b8 [k, n] column-major (cuBLASLt's layout)."""
    return torch._scaled_mm(a8, b8, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype)


def _transposed_padded(t8: torch.Tensor) -> torch.Tensor:
    """[t, c] -> its transpose [c, t'] row-major, zero-padded to t' = t rounded up to 16 (`_scaled_mm`'s inner
    dim on GPU; zero tokens add nothing to the weight gradient)."""
    tokens = t8.shape[0]
    out = t8.new_zeros(t8.shape[1], -(-tokens // 16) * 16)
    out[:, :tokens] = t8.t()
    return out


class _ScaledMmLinear(torch.autograd.Function):
    """y = x W^T, dgrad = g W, wgrad = g^T x as FP8 GEMMs; x [t, k], W [n, k], g = dL/dy [t, n]."""

    @staticmethod
    def forward(ctx, x, weight, gemm: ScaledMmFp8Gemm, out_dtype):
        x8, x_inv = gemm.to_fp8(INPUT, x)  # [t, k]
        w8, w_inv = gemm.to_fp8(WEIGHT, weight)  # [n, k]
        ctx.save_for_backward(x8, w8, x_inv, w_inv)
        ctx.gemm, ctx.dtypes = gemm, (x.dtype, weight.dtype)
        return _scaled_mm(x8, w8.t(), x_inv, w_inv, out_dtype)  # [t, n]

    @staticmethod
    def backward(ctx, grad):
        x8, w8, x_inv, w_inv = ctx.saved_tensors
        g8, g_inv = ctx.gemm.to_fp8(GRAD_OUTPUT, grad)  # [t, n]
        dx = dw = None
        if ctx.needs_input_grad[0]:  # [t, n] @ [n, k], W column-major: a transposed FP8 copy (as TE's)
            dx = _scaled_mm(g8, w8.t().contiguous().t(), g_inv, w_inv, ctx.dtypes[0])
        if ctx.needs_input_grad[1]:  # [n, t'] @ [t', k]
            dw = _scaled_mm(_transposed_padded(g8), _transposed_padded(x8).t(), g_inv, x_inv, ctx.dtypes[1])
        return dx, dw, None, None


def fp8_metas(model: nn.Module | list[nn.Module]) -> list[Fp8Meta]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, Fp8Meta)]


FORWARD_SLOTS, BACKWARD_SLOTS = (INPUT, WEIGHT), (GRAD_OUTPUT,)


@torch.no_grad()
def update_fp8_meta(model, recipe: Fp8Recipe, groups=(), slots=(INPUT, WEIGHT, GRAD_OUTPUT)) -> None:
    """Delayed scaling's update of `slots` of every FP8 linear of `model` (chunks or `Fp8Meta`s): reduce the
    amaxes recorded since the last update (MAX over `groups`, e.g. TP and DP), compute the new scales from the
    history, roll the history. A no-op without FP8 linears or for other recipes."""
    _update(fp8_metas(model), recipe, groups, list(slots))


def _update(metas: list[Fp8Meta], recipe: Fp8Recipe, groups, slots: list[int]) -> None:
    if not metas or recipe.recipe != "delayed":
        return
    current = torch.stack([m.amax_history[0, slots] for m in metas])  # [n, slots]: one collective for all
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(current, op=dist.ReduceOp.MAX, group=group)
    current = torch.where(torch.isfinite(current), current, torch.zeros_like(current))  # an overflow: not kept
    limits = torch.tensor([fp8_max(recipe.dtype(slot)) for slot in slots])
    for meta, amax_now in zip(metas, current):
        history = meta.amax_history[:, slots]  # a copy: [len, slots]
        history[0] = amax_now
        amax = history.amax(dim=0) if recipe.amax_compute_algo == "max" else amax_now
        new = (limits.to(amax.device) / amax / (2.0**recipe.margin)).clamp(max=FP32_MAX)
        meta.scale[slots] = torch.where((amax > 0) & torch.isfinite(amax), new, meta.scale[slots])
        history = history.roll(-1, dims=0)
        history[0] = 0.0
        meta.amax_history[:, slots] = history
        for slot in slots:
            meta.pending[slot == GRAD_OUTPUT] = False


class DelayedScalingUpdates:
    """When delayed scaling updates, as TE: `forward_done()` after each micro-batch's forward updates the
    forward slots of the linears that ran; the first gradient amax recorded in a backward queues an autograd
    engine callback that updates the gradient slots at the end of that backward. Installs itself as the
    metas' `on_backward`."""

    def __init__(self, model_chunks, recipe: Fp8Recipe, groups=()):
        self.metas, self.recipe, self.groups = fp8_metas(model_chunks), recipe, groups
        self.queued = False
        for meta in self.metas:
            meta.on_backward = self._backward_recorded

    def forward_done(self) -> None:
        _update([m for m in self.metas if m.pending[0]], self.recipe, self.groups, list(FORWARD_SLOTS))

    def _backward_recorded(self) -> None:
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _backward_done(self) -> None:
        self.queued = False
        _update([m for m in self.metas if m.pending[1]], self.recipe, self.groups, list(BACKWARD_SLOTS))


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        return int(parts[2])
    return None


def apply_fp8(model: nn.Module, recipe: Fp8Recipe, num_layers: int, first_last_layers_bf16: bool = False) -> int:
    """Make every transformer-layer linear of `model` (one pipeline chunk) an FP8 GEMM (an `Fp8Gemm` link
    next to the kernel of its GEMM chain, `precision/gemm.py`); returns how many.
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
        gemm_class = ScaledMmFp8Gemm if recipe.gemm == "scaled_mm" else Fp8Gemm
        module.gemm = add_link(module.gemm, gemm_class(recipe, module.fp8_meta))  # below Unit Scaling, if on
        count += 1
    return count


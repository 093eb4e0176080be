"""Transformer Engine's FP8: recipes, `fp8_autocast`, and keeping chosen layers out of FP8.

The TE *backend* (building and naming TE layers, its FP8 extra state in checkpoints) is part of the model:
`megatron_eff/model/te_backend.py`. This module only decides how TE computes in FP8: forward runs inside
`te.pytorch.fp8_autocast(enabled=True, fp8_recipe=..., fp8_group=...)` with the recipe from `--fp8-recipe`;
the amax reduction group is TP x DP (as Megatron-LM's). The recipes leave `fp8_dpa` off, so
DotProductAttention computes in BF16 inside the FP8 region.
"""

from __future__ import annotations

import contextlib

from torch import nn

from megatron_eff.model.te_backend import import_transformer_engine


def te_fp8_recipe(precision):
    """The TE recipe object for `--fp8-format/--fp8-recipe/--fp8-amax-*/--fp8-margin`."""
    from transformer_engine.common import recipe

    fmt = recipe.Format.HYBRID if precision.fp8_format == "hybrid" else recipe.Format.E4M3
    if precision.fp8_recipe == "delayed":
        return recipe.DelayedScaling(margin=precision.fp8_margin, fp8_format=fmt,
                                     amax_history_len=precision.fp8_amax_history_len,
                                     amax_compute_algo=precision.fp8_amax_compute_algo)
    if precision.fp8_recipe == "tensorwise":
        return recipe.Float8CurrentScaling(fp8_format=fmt)
    if precision.fp8_recipe == "mxfp8":
        return recipe.MXFP8BlockScaling(fp8_format=fmt)
    return recipe.Float8BlockScaling(fp8_format=fmt)


def fp8_autocast(precision, amax_group=None, enabled: bool = True):
    """A context-manager factory: TE's FP8 autocast with our recipe."""
    te = import_transformer_engine()
    fp8_recipe = te_fp8_recipe(precision)
    return lambda: te.fp8_autocast(enabled=enabled, fp8_recipe=fp8_recipe, fp8_group=amax_group)


@contextlib.contextmanager
def _no_fp8(te):
    with te.fp8_autocast(enabled=False):
        yield


def keep_layers_out_of_fp8(model: nn.Module, layer_indices) -> None:
    """`--first-last-layers-bf16` under TE: those layers' forward runs in `fp8_autocast(enabled=False)`."""
    te = import_transformer_engine()
    for index, layer in model.decoder.layers.items():
        if int(index) in layer_indices:
            forward = layer.forward

            def no_fp8_forward(*args, _forward=forward, **kwargs):
                with _no_fp8(te):
                    return _forward(*args, **kwargs)

            layer.forward = no_fp8_forward

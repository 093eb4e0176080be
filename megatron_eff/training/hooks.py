"""Method hooks: how a training method (MST, SAT, CoLM, pruning) enters the loop without the loop or the
model knowing which one is on.

A method transforms the model once when it is built (masks as buffers, attention patterns, ...) and then
reacts at a few points of each iteration:

    hooks.before_iteration(it)      iteration `it` (1-based) is about to run forward/backward
    hooks.after_backward(it)        gradients are reduced (DP/TP/PP), before the norm, clipping and the step
    hooks.after_step(it)            the optimizer has stepped (not called for a skipped step)
    hooks.log_scalars()             extra scalars for the progress line and TensorBoard
    hooks.checkpoint_tensors()      [(key, local tensor, parameter it is sharded like)] saved with the model
    hooks.state_dict() / load_state_dict(state)   small JSON-able state saved in meta.json
    hooks.summary()                 a final line for the end of the run

`HookList` runs several methods in order; `build_method_hooks(config, ...)` builds the ones the flags ask for.
"""

from __future__ import annotations

import torch


class MethodHooks:
    """No-op base: a method overrides what it needs."""

    name = "method"

    def before_iteration(self, iteration: int) -> None:
        pass

    def after_backward(self, iteration: int) -> None:
        pass

    def after_step(self, iteration: int) -> None:
        pass

    def log_scalars(self) -> dict[str, float]:
        return {}

    def checkpoint_tensors(self) -> list[tuple[str, torch.Tensor, torch.nn.Parameter]]:
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def summary(self) -> str | None:
        return None


class HookList(MethodHooks):
    """Several methods behind one `MethodHooks`; state is keyed by each method's `name`."""

    def __init__(self, hooks: list[MethodHooks] | None = None):
        self.hooks = list(hooks or [])

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def before_iteration(self, iteration: int) -> None:
        for hook in self.hooks:
            hook.before_iteration(iteration)

    def after_backward(self, iteration: int) -> None:
        for hook in self.hooks:
            hook.after_backward(iteration)

    def after_step(self, iteration: int) -> None:
        for hook in self.hooks:
            hook.after_step(iteration)

    def log_scalars(self) -> dict[str, float]:
        return {k: v for hook in self.hooks for k, v in hook.log_scalars().items()}

    def checkpoint_tensors(self) -> list[tuple[str, torch.Tensor, torch.nn.Parameter]]:
        return [(f"{hook.name}.{key}", t, p) for hook in self.hooks for key, t, p in hook.checkpoint_tensors()]

    def state_dict(self) -> dict:
        return {hook.name: hook.state_dict() for hook in self.hooks}

    def load_state_dict(self, state: dict) -> None:
        for hook in self.hooks:
            if hook.name in state:
                hook.load_state_dict(state[hook.name])

    def summary(self) -> str | None:
        lines = [line for hook in self.hooks if (line := hook.summary())]
        return "\n".join(lines) or None


def build_method_hooks(config, model_chunks, optimizer, grad_sync, pstate) -> HookList:
    """The methods `config` turns on, installed on `model_chunks` (this rank's pipeline chunks)."""
    hooks = []
    if config.mst.enabled:
        from megatron_eff.sparsity.mst import MSTHooks  # imported lazily: only runs that ask for it

        hooks.append(MSTHooks(config, model_chunks, optimizer, grad_sync, pstate))
    return HookList(hooks)

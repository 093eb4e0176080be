"""The contract between the trainer and a training method (MST, SAT, CoLM, Sheared LLaMA, ...).

A method is an object with a lifecycle; the trainer calls each step below at its moment and knows nothing
else about the method, and the model does not know which methods are on:

    transform_model(chunks)         once, after the model chunks are built and initialised and before the
                                    gradient buckets and the optimizer exist: add masks, parameters,
                                    selections at the model's sites (`model/sites.py`) and linears
    param_groups()                  extra optimizer groups for parameters the method added: each a dict with
                                    "params" and optionally "max_lr"/"min_lr" (the LR schedule scales them
                                    like the main LR), "weight_decay", "maximize" (gradient ascent)
    attach(trainer)                 once, with the built trainer (model chunks, optimizer, grad sync,
                                    batch source, parallel state); the datasets exist
    state: checkpoint_tensors() [(key, tensor, the parameter it is sharded like)], state_dict() /
           load_state_dict(state) (JSON-able) -- restored after attach, so after the datasets exist
    per iteration (1-based `it`):
      before_iteration(it)          before anything of iteration `it` runs
      select_batch(it, source)      this rank's micro-batches of iteration `it`, or None for the source's next
                                    global batch: a method may `draw` candidates from the batch source
                                    (`data/batch_source.py`) and return `source.select(chosen)` (a coreset);
                                    at most one method selects
      loss_terms(chunk, batch)      at every forward of a model chunk: {name: scalar tensor} auxiliary loss
                                    terms, added to the loss on whatever pipeline stage `chunk` lives
      after_backward(it)            gradients are reduced (DP/TP/PP), before the norm, clipping and step
      after_step(it)                the optimizer stepped (not called for a skipped step)
      flops(it)                     (dense-equivalent, actual) training FLOPs of iteration `it`, or None
      log_scalars()                 extra scalars for the progress line and TensorBoard
      on_validation(it, losses)     after a validation: {"loss": overall, domain name: loss, ...} (domains:
                                    each --data-path prefix's basename, with several prefixes)
    summary()                       a line for the end of the run

Every hook has a no-op default here, so a method implements only what it needs. `MethodList` runs several
methods in registry order behind the same interface.
"""

from __future__ import annotations

import torch


class FlopAccounting:
    """For a method that makes training cheaper: the (dense-equivalent, actual) training FLOPs it counts each
    iteration (`add_flops`), their running totals (checkpointed), the `flops(it)` hook, the `flops/*` scalars
    and the summary fragment. The trainer reads `flops(it)` for TFLOP/s; `saved_x()` is dense / actual."""

    def reset_flops(self) -> None:
        self.flops_dense = self.flops_actual = 0.0
        self.last_flops = (0.0, 0.0)

    def add_flops(self, dense: float, actual: float) -> None:
        self.last_flops = (float(dense), float(actual))
        self.flops_dense += dense
        self.flops_actual += actual

    def flops(self, iteration: int) -> tuple[float, float]:
        return self.last_flops

    def saved_x(self) -> float:
        return self.flops_dense / self.flops_actual if self.flops_actual else 1.0

    def flop_scalars(self) -> dict[str, float]:
        return {"flops/dense": self.last_flops[0], "flops/actual": self.last_flops[1], "flops/saved_x": self.saved_x()}

    def flop_state(self) -> dict:
        return {"flops_dense": self.flops_dense, "flops_actual": self.flops_actual}

    def load_flop_state(self, state: dict) -> None:
        self.flops_dense, self.flops_actual = state["flops_dense"], state["flops_actual"]

    def flop_summary(self) -> str:
        saved = 1 - 1 / self.saved_x() if self.flops_actual else 0.0
        return (f"training FLOPs dense-equivalent {self.flops_dense:.4g}, actual {self.flops_actual:.4g} -> "
                f"{self.saved_x():.2f}x fewer ({100 * saved:.1f}% saved)")


class Method:
    """No-op base class: a method overrides what it needs. `name` keys its state in checkpoints."""

    name = "method"

    def transform_model(self, chunks: list) -> None:
        pass

    def param_groups(self) -> list[dict]:
        return []

    def attach(self, trainer) -> None:
        pass

    def before_iteration(self, iteration: int) -> None:
        pass

    def select_batch(self, iteration: int, source) -> list[dict] | None:
        return None

    def loss_terms(self, chunk, batch: dict) -> dict[str, torch.Tensor]:
        return {}

    def after_backward(self, iteration: int) -> None:
        pass

    def after_step(self, iteration: int) -> None:
        pass

    def flops(self, iteration: int) -> tuple[float, float] | None:
        return None

    def log_scalars(self) -> dict[str, float]:
        return {}

    def on_validation(self, iteration: int, losses: dict[str, float]) -> None:
        pass

    def checkpoint_tensors(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def summary(self) -> str | None:
        return None


class MethodList(Method):
    """Several methods behind one `Method`; checkpoint state is keyed by each method's `name`."""

    def __init__(self, methods: list[Method] | None = None):
        self.methods = list(methods or [])

    def __bool__(self) -> bool:
        return bool(self.methods)

    def __iter__(self):
        return iter(self.methods)

    def get(self, name: str) -> Method | None:
        """The method called `name`, if it is on."""
        return next((m for m in self.methods if m.name == name), None)

    def transform_model(self, chunks: list) -> None:
        for method in self.methods:
            method.transform_model(chunks)

    def param_groups(self) -> list[dict]:
        return [group for method in self.methods for group in method.param_groups()]

    def attach(self, trainer) -> None:
        for method in self.methods:
            method.attach(trainer)

    def before_iteration(self, iteration: int) -> None:
        for method in self.methods:
            method.before_iteration(iteration)

    def select_batch(self, iteration: int, source) -> list[dict] | None:
        chosen = [(m.name, b) for m in self.methods if (b := m.select_batch(iteration, source)) is not None]
        if len(chosen) > 1:
            raise RuntimeError(f"methods {[name for name, _ in chosen]} all selected the batch of iteration "
                               f"{iteration}: at most one method may select")
        return chosen[0][1] if chosen else None

    def loss_terms(self, chunk, batch: dict) -> dict[str, torch.Tensor]:
        return {f"{m.name}/{k}": v for m in self.methods for k, v in m.loss_terms(chunk, batch).items()}

    def after_backward(self, iteration: int) -> None:
        for method in self.methods:
            method.after_backward(iteration)

    def after_step(self, iteration: int) -> None:
        for method in self.methods:
            method.after_step(iteration)

    def flops(self, iteration: int) -> tuple[float, float] | None:
        """Combined (dense, actual) FLOPs: each method's saving applies to the same dense count, so savings
        multiply (actual = dense * prod(actual_i / dense_i)); None when no method counts FLOPs."""
        counts = [c for m in self.methods if (c := m.flops(iteration)) is not None]
        if not counts:
            return None
        dense = counts[0][0]
        actual = dense
        for d, a in counts:
            actual *= a / d if d else 1.0
        return dense, actual

    def log_scalars(self) -> dict[str, float]:
        return {k: v for method in self.methods for k, v in method.log_scalars().items()}

    def on_validation(self, iteration: int, losses: dict[str, float]) -> None:
        for method in self.methods:
            method.on_validation(iteration, losses)

    def checkpoint_tensors(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        return [(f"{m.name}.{key}", t, p) for m in self.methods for key, t, p in m.checkpoint_tensors()]

    def state_dict(self) -> dict:
        return {method.name: method.state_dict() for method in self.methods}

    def load_state_dict(self, state: dict) -> None:
        for method in self.methods:
            if method.name in state:
                method.load_state_dict(state[method.name])

    def summary(self) -> str | None:
        lines = [line for method in self.methods if (line := method.summary())]
        return "\n".join(lines) or None

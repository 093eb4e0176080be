"""A test method that uses every part of the method contract (`megatron_eff/methods/base.py`), registered by
`tests/dist/run_layout.py` when `DUMMY_METHOD=1`; `tests/test_method_contract.py` runs it under several
layouts and compares them with one process.

A small Lagrangian, like Sheared LLaMA's: every transformer layer gets a scalar gate g multiplying its
output (a parameter added in `transform_model`, trained by the model's loss) and a multiplier lambda; the
auxiliary loss `lambda (g - 1) + (g - 1)^2 / 2` is added on whatever pipeline stage holds the layer. g
descends with its own LR bounds, lambda ascends (`maximize`). An exponential moving average of g is method
state kept in the checkpoint sharded like g (`checkpoint_tensors`), the event counts are the JSON state; the
events are checked to come in the contract's order.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from megatron_eff.methods.base import Method

NAME = "dummy"


@dataclass
class Config:
    enabled: bool = False
    lr: float = 1e-2

    def check_run(self, config) -> None:
        pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dummy test method")
    g.add_argument("--dummy", action="store_true")
    g.add_argument("--dummy-lr", type=float, default=1e-2)


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(enabled=args.dummy, lr=args.dummy_lr)


def build(method_config: Config, config, pstate) -> DummyMethod:
    return DummyMethod(method_config)


class DummyMethod(Method):
    name = NAME

    def __init__(self, config: Config):
        self.config = config
        self.layers: list[torch.nn.Module] = []
        self.indices: list[int] = []  # global layer index of each (checkpoint keys must be global)
        self.events = {"before_iteration": 0, "after_backward": 0, "after_step": 0, "loss_terms": 0}
        self.last_event = None
        self.trainer = None

    def transform_model(self, chunks: list) -> None:
        for chunk in chunks:
            for index, layer in chunk.decoder.layers.items():
                reference = layer.input_layernorm.weight
                layer.register_parameter("dummy_gate", torch.nn.Parameter(torch.ones((), dtype=reference.dtype)))
                layer.register_parameter("dummy_lambda", torch.nn.Parameter(torch.zeros((), dtype=reference.dtype)))
                layer.register_buffer("dummy_ema", torch.ones((), dtype=reference.dtype), persistent=False)
                layer.register_forward_hook(lambda module, args, output: output * module.dummy_gate)
                self.layers.append(layer)
                self.indices.append(int(index))

    def param_groups(self) -> list[dict]:
        lr = self.config.lr
        return [{"params": [layer.dummy_gate for layer in self.layers], "max_lr": lr, "min_lr": lr / 10},
                {"params": [layer.dummy_lambda for layer in self.layers], "max_lr": lr, "maximize": True}]

    def attach(self, trainer) -> None:
        assert trainer.optimizer is not None and trainer.grad_sync is not None and trainer.train_ds is not None
        ours = {id(p) for layer in self.layers for p in (layer.dummy_gate, layer.dummy_lambda)}
        in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        # the plain optimizer holds our parameters; the distributed one holds pieces of the buffer they live in
        assert ours <= in_optimizer or hasattr(trainer.optimizer, "pieces")
        self.trainer = trainer

    def _event(self, name: str, allowed_previous: tuple) -> None:
        assert self.last_event in allowed_previous, f"{name} after {self.last_event}"
        self.events[name] += 1
        self.last_event = name

    def before_iteration(self, iteration: int) -> None:
        self._event("before_iteration", (None, "after_step", "after_backward"))

    def loss_terms(self, chunk, batch: dict) -> dict[str, torch.Tensor]:
        assert "tokens" in batch
        self.events["loss_terms"] += 1
        terms = [layer.dummy_lambda * (layer.dummy_gate - 1) + 0.5 * (layer.dummy_gate - 1) ** 2
                 for layer in chunk.decoder.layers.values()]
        return {"lagrangian": torch.stack(terms).sum()} if terms else {}

    def after_backward(self, iteration: int) -> None:
        self._event("after_backward", ("before_iteration",))

    @torch.no_grad()
    def after_step(self, iteration: int) -> None:
        self._event("after_step", ("after_backward",))
        for layer in self.layers:
            layer.dummy_ema.mul_(0.5).add_(0.5 * layer.dummy_gate)

    def checkpoint_tensors(self):
        return [(f"ema.{i}", layer.dummy_ema, layer.dummy_gate) for i, layer in zip(self.indices, self.layers)]

    def state_dict(self) -> dict:
        # written from rank 0: only what every rank agrees on (stage-local state goes in checkpoint_tensors)
        return {"steps": self.events["after_step"]}

    def load_state_dict(self, state: dict) -> None:
        self.events["after_step"] = state["steps"]

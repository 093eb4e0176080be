"""A probe method for tests/test_trainer_data.py: at iteration 3 it switches the blend to its second domain
through the batch source, and records the tokens of every micro-batch that reaches the loss."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from megatron_eff.methods.base import Method

NAME = "probe"


@dataclass
class Config:
    enabled: bool = False

    def check_run(self, config) -> None:
        pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--probe", action="store_true")


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(enabled=args.probe)


def build(method_config, config, pstate):
    return BlendProbe()


class BlendProbe(Method):
    name = NAME

    def __init__(self):
        self.trainer, self.seen = None, {}

    def attach(self, trainer) -> None:
        self.trainer = trainer

    def before_iteration(self, iteration: int) -> None:
        self.iteration = iteration
        if iteration == 3:
            self.trainer.batch_source.set_weights([0.0, 1.0])  # from here on: code only

    def loss_terms(self, chunk, batch: dict) -> dict[str, torch.Tensor]:
        self.seen.setdefault(self.iteration, []).append(batch["tokens"].clone())
        return {}

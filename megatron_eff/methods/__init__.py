"""Training methods as plugins: one package per method, registered in `REGISTRY` below.

A method package exposes

    NAME                       the method's name (its flag prefix, its key in `Config.methods` and in checkpoints)
    Config                     its config dataclass (`enabled` turns it on; `check_run(config)` checks it
                               against the rest of the run; an optional `samples_per_iteration(gbs)` says
                               how many training samples an iteration reads when that is more than the
                               global batch, e.g. CoLM's candidate pool, so the datasets are sized for it)
    add_arguments(parser)      its command-line group
    config_from_args(args)     its Config from parsed flags
    build(config, pstate)      its `Method` (`methods/base.py`) for a run that enabled it

The core never imports a method package by name: `arguments.py`, `config.py` and the trainer go through
the three functions here. Adding a method is adding its package and one line to `REGISTRY`.
"""

from __future__ import annotations

import argparse
import importlib

from megatron_eff.methods.base import Method, MethodList

# name -> package (imported when the parser is built; packages import their heavy parts lazily in `build`)
REGISTRY: dict[str, str] = {
    "mst": "megatron_eff.methods.mst",
    "prune": "megatron_eff.methods.prune",
    "dbl": "megatron_eff.methods.dbl",
    "colm": "megatron_eff.methods.colm",
    "sat": "megatron_eff.methods.sat",
}


def _package(name: str):
    return importlib.import_module(REGISTRY[name])


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """Every registered method's command-line group."""
    for name in REGISTRY:
        _package(name).add_arguments(parser)


def method_configs_from_args(args: argparse.Namespace) -> dict[str, object]:
    """{name: config} for every registered method (on or off), in registry order."""
    return {name: _package(name).config_from_args(args) for name in REGISTRY}


def default_method_configs() -> dict[str, object]:
    """{name: default (off) config}: what a `Config` built without flags holds."""
    return {name: _package(name).Config() for name in REGISTRY}


def build_methods(config, pstate) -> MethodList:
    """The methods `config` turns on, in registry order, as one `Method`."""
    return MethodList([_package(name).build(cfg, config, pstate) for name, cfg in config.enabled_methods().items()])


__all__ = ["Method", "MethodList", "REGISTRY", "add_method_arguments", "build_methods", "default_method_configs",
           "method_configs_from_args"]

"""Sheared LLaMA targeted structured pruning as a training method: README.md, "Sheared LLaMA"."""

from megatron_eff.methods.prune.config import PruneConfig as Config
from megatron_eff.methods.prune.config import add_arguments, config_from_args

NAME = "prune"


def build(method_config, config, pstate):
    """Pruning for a run (`config`) that enabled it; this rank's part (`pstate`)."""
    from megatron_eff.methods.prune.method import Prune

    return Prune(method_config, config, pstate)


__all__ = ["NAME", "Config", "add_arguments", "build", "config_from_args"]

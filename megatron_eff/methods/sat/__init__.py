"""Sparsity-Accelerated Training (SAT) as a training method: README.md, "SAT -- Sparsity-Accelerated Training"."""

from megatron_eff.methods.sat.config import SATConfig as Config
from megatron_eff.methods.sat.config import add_arguments, config_from_args

NAME = "sat"


def build(method_config, config, pstate):
    """SAT for a run (`config`) that enabled it; this rank's part (`pstate`)."""
    from megatron_eff.methods.sat.method import SAT

    return SAT(method_config, config, pstate)


__all__ = ["NAME", "Config", "add_arguments", "build", "config_from_args"]

"""Dynamic batch loading (Sheared LLaMA) as a training method: README.md, "Sheared LLaMA"."""

from megatron_eff.methods.dbl.config import DBLConfig as Config
from megatron_eff.methods.dbl.config import add_arguments, config_from_args

NAME = "dbl"


def build(method_config, config, pstate):
    """Dynamic batch loading for a run (`config`) that enabled it."""
    from megatron_eff.methods.dbl.method import DynamicBatchLoading

    return DynamicBatchLoading(method_config, config, pstate)


__all__ = ["NAME", "Config", "add_arguments", "build", "config_from_args"]

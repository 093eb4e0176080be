"""Mixed Sparsity Training (MST) as a training method: README.md, "MST — Mixed Sparsity Training"."""

from megatron_eff.methods.mst.config import MSTConfig as Config
from megatron_eff.methods.mst.config import add_arguments, config_from_args

NAME = "mst"


def build(method_config, config, pstate):
    """MST for a run (`config`) that enabled it; this rank's part (`pstate`)."""
    from megatron_eff.methods.mst.method import MST

    return MST(method_config, config, pstate)


__all__ = ["NAME", "Config", "add_arguments", "build", "config_from_args"]

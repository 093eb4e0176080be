"""CoLM, mini-batch coresets (Nguyen et al. 2024) as a training method: README.md, "CoLM — mini-batch coresets".

    selection.py   the selection math on plain tensors: Adam-normalised sketches, per-source budgets,
                   facility location by lazy greedy, the coreset of one iteration
    zo.py          per-candidate zeroth-order scalars through the model (trunk once, last layer twice)
    method.py      the `Method`: draw B_L candidates, score, select the same coreset on every rank, train it
"""

from megatron_eff.methods.colm.config import ColmConfig as Config
from megatron_eff.methods.colm.config import add_arguments, config_from_args

NAME = "colm"


def build(method_config, config, pstate):
    """CoLM for a run (`config`) that enabled it; this rank's part (`pstate`)."""
    from megatron_eff.methods.colm.method import CoLM

    return CoLM(method_config, config, pstate)


__all__ = ["NAME", "Config", "add_arguments", "build", "config_from_args"]

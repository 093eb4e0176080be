"""Extract the pruned model of a pruning run (`pretrain.py --prune ...`) as an ordinary checkpoint.

    .venv/bin/python tools/checkpoint/prune.py --load-dir work_dirs/prune/checkpoints \\
        --save-dir work_dirs/prune/pruned

Deterministic masks keep exactly the run's `--prune-target-*` counts; the kept gates' values are folded
into the weights once, the pruned rows/columns/heads/channels/layers removed and the layers renumbered
(`megatron_eff/methods/prune/extract.py`). The output (any TP/PP/DP layout loads it) has the target shape:
`pretrain.py --load DIR --finetune` continues it, and `tools/evaluate.py`, `tools/generate.py` and the HF
export accept it. The flags that build the target shape are printed, as the HF importer does.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megatron_eff.config import ModelConfig, ParallelConfig  # noqa: E402
from megatron_eff.hf.convert import atomic_output_dir, model_flags  # noqa: E402
from megatron_eff.methods.prune.config import PruneConfig  # noqa: E402
from megatron_eff.methods.prune.extract import extract  # noqa: E402
from megatron_eff.methods.prune.method import num_params  # noqa: E402
from megatron_eff.training.checkpointing import TrainState, load_model_tensors, save_checkpoint  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-dir", required=True, help="a pruning run's checkpoint (run dir or iter_N)")
    parser.add_argument("--save-dir", required=True, help="new folder for the pruned checkpoint")
    return parser.parse_args(argv)


def prune_checkpoint(load_dir: str, save_dir: str) -> tuple[ModelConfig, list[str]]:
    """Write the pruned checkpoint; returns (its model config, the pretrain.py flags that build it)."""
    meta, tensors = load_model_tensors(load_dir)
    run = meta.get("config", {})
    saved = run.get("methods", {}).get("prune")
    if not saved or not saved.get("enabled"):
        raise ValueError(f"--load-dir {load_dir}: not a pruning run's checkpoint (its run had no --prune)")
    model = ModelConfig(**run["model"])
    targets = PruneConfig(**saved).targets(model)
    missing = [k for k in ("prune.hidden", "prune.layers.0.layer", "prune.layers.0.head", "prune.layers.0.ffn")
               if k.split(".")[-1] in targets and k not in tensors]
    if missing:
        raise ValueError(f"--load-dir {load_dir}: no mask logits {missing} in the checkpoint")
    pruned, out = extract({k: v.float() for k, v in tensors.items()}, model, targets)
    flags = model_flags(pruned) + ["--load", str(save_dir), "--finetune"]
    run_config = {"model": dataclasses.asdict(pruned), "parallel": dataclasses.asdict(ParallelConfig()),
                  "data": run.get("data", {}), "precision": run.get("precision", {}),
                  "source": {"pruned_from": str(Path(load_dir).resolve()),
                             "iteration": meta["train_state"]["iteration"],
                             "targets": {m: list(t) for m, t in targets.items()}},
                  "pretrain_flags": flags}
    params = {name: torch.nn.Parameter(t, requires_grad=False) for name, t in out.items()}
    with atomic_output_dir(save_dir) as tmp:
        save_checkpoint(tmp, TrainState(), params, None, run_config, {"tp": 1, "pp": 1, "dp": 1})
    return pruned, flags


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        pruned, flags = prune_checkpoint(args.load_dir, args.save_dir)
    except (ValueError, FileNotFoundError) as error:
        print(f"prune.py: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.save_dir}: {pruned.num_layers} layers, hidden {pruned.hidden_size}, "
          f"{pruned.num_attention_heads} heads ({pruned.num_query_groups} query groups), ffn "
          f"{pruned.ffn_hidden_size}; {num_params(pruned):,} prunable parameters\n"
          f"continue pretraining with:\n  pretrain.py {' '.join(flags)} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())

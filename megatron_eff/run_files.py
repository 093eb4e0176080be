"""Checks of the files a training run will read and write, before it builds anything heavy.

`launch.check_launch` checks that the files exist; `check_run_files` checks that they fit the run, so a
mistake that would cost the whole compute (or the user's earlier checkpoints) fails first, with one line:

- `--save DIR` is a folder this process can write (a probe file is created, written and removed);
- `--save DIR` holds no checkpoints that this run would overwrite without having resumed from them
  (`--override-existing-checkpoints` allows it);
- the checkpoint to `--load` records the same architecture and tokenizer as these flags (a parallel layout
  change is fine; `--finetune` into another shape is not);
- `--split` parses, and every token id in the `--data-path` data is inside the model's vocabulary.

Each failure is a ValueError naming the flag, the file and the values, for `pretrain.py: error:`.
"""

from __future__ import annotations

import os
import re
import socket

from megatron_eff.config import Config, ModelConfig

# Recorded model fields that must match on --load: they decide the tensors' meaning, not only their shapes.
ARCHITECTURE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "head_dim", "vocab_size", "position_embedding_type", "normalization", "swiglu", "add_bias_linear",
                "untie_embeddings_and_output_weights", "rotary_percent", "norm_epsilon")
_FLAG = {"head_dim": "--kv-channels", "add_bias_linear": "--disable-bias-linear",
         "vocab_size": "vocabulary size (the tokenizer's or --vocab-size)"}
_CHECKPOINT = re.compile(r"iter_(\d{7})(\.old)?")


def check_run_files(config: Config) -> None:
    """Raise ValueError naming the flag and the file for the first problem found; see the module docstring."""
    ckpt = config.checkpoint
    if ckpt.load:
        check_resume_config(config)
    if not config.data.mock_data:
        from megatron_eff.data.builders import parse_split

        parse_split(config.data.split)
        check_token_ids(config.data.data_path, config.model.vocab_size)
    if ckpt.save:  # last: the probe creates the folder, which a run refused for another reason should not leave
        if not ckpt.override_existing_checkpoints:
            check_not_overwriting(ckpt.save, ckpt.load, ckpt.finetune)
        check_save_dir(ckpt.save)


def check_save_dir(save: str) -> None:
    probe = os.path.join(save, f".write_probe.{socket.gethostname()}.{os.getpid()}")
    try:
        os.makedirs(save, exist_ok=True)
        with open(probe, "w") as f:
            f.write("megatron_eff write probe\n")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"--save {save}: cannot write checkpoints there ({error.strerror or error})") from None


def complete_checkpoints(root: str) -> list[str]:
    """The complete checkpoints (with meta.json) in the run folder `root`, oldest first."""
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match = _CHECKPOINT.fullmatch(name)
        if match and os.path.isfile(os.path.join(root, name, "meta.json")):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def check_not_overwriting(save: str, load: str | None, finetune: bool) -> None:
    """Refuse a run that would write into `save` over checkpoints it did not resume from."""
    from megatron_eff.training.checkpointing import TRACKER, find_checkpoint

    existing = complete_checkpoints(save)
    if not existing:
        return
    loaded = find_checkpoint(load) if load else None
    same_root = loaded is not None and os.path.realpath(os.path.dirname(loaded)) == os.path.realpath(save)
    if same_root and not finetune:
        return
    names = ", ".join(os.path.basename(p) for p in existing[-3:]) + (" ..." if len(existing) > 3 else "")
    if loaded is None and load and os.path.realpath(load) == os.path.realpath(save):
        why = (f"--load {load} finds no checkpoint (its tracker {TRACKER} is missing); the newest complete one is "
               f"{existing[-1]}: resume from it with --load {existing[-1]}")
    elif finetune and loaded is not None:
        why = "--finetune restarts at iteration 0 and would overwrite them"
    elif load:
        why = f"this run resumes from --load {load}, not from them, and would overwrite them"
    else:
        why = f"this run starts from scratch and would overwrite them; to resume, add --load {save}"
    raise ValueError(f"--save {save} already holds checkpoints ({names}): {why}. To write there anyway pass "
                     "--override-existing-checkpoints, or choose another --save")


def _recorded(model: dict) -> dict:
    """The ARCHITECTURE values of a model config (as recorded in meta.json or a ModelConfig's fields)."""
    values = {name: model.get(name) for name in ARCHITECTURE if name != "head_dim"}
    heads = model.get("num_attention_heads") or 1
    values["head_dim"] = model.get("kv_channels") or (model.get("hidden_size") or 0) // heads
    return values


def architecture_differences(saved: dict, model: ModelConfig, saved_data: dict, tokenizer_type: str) -> list[str]:
    """'--flag checkpoint X, now Y' for every architecture or tokenizer difference."""
    old, new = _recorded(saved), _recorded(vars(model) | {"kv_channels": model.head_dim})
    differences = []
    for name in ARCHITECTURE:
        if name in saved or name == "head_dim":
            if old[name] != new[name]:
                flag = _FLAG.get(name, "--" + name.replace("_", "-"))
                differences.append(f"{flag}: checkpoint {old[name]}, now {new[name]}")
    saved_tokenizer = saved_data.get("tokenizer_type")
    if saved_tokenizer is not None and saved_tokenizer != tokenizer_type:
        differences.append(f"--tokenizer-type: checkpoint {saved_tokenizer}, now {tokenizer_type}")
    return differences


def check_resume_config(config: Config) -> None:
    """The checkpoint at `--load` was trained with the architecture and tokenizer of these flags."""
    from megatron_eff.training.checkpointing import find_checkpoint, read_meta

    load = config.checkpoint.load
    if find_checkpoint(load) is None:  # nothing to load: the trainer starts fresh (and says so)
        return
    path, meta = read_meta(load)
    saved = meta.get("config") or {}
    if "model" not in saved:
        return
    # --mock-data draws random ids: no tokenizer is involved, only the vocabulary size matters
    saved_data = {} if config.data.mock_data else saved.get("data") or {}
    differences = architecture_differences(saved["model"], config.model, saved_data, config.data.tokenizer_type)
    if differences:
        raise ValueError(f"--load {path}: the checkpoint was trained with another model or tokenizer: "
                         f"{'; '.join(differences)}. Use the checkpoint's flags (its meta.json 'config' lists "
                         "them); a parallel layout (TP/PP/DP) may differ")


def check_token_ids(data_path: list[str], vocab_size: int) -> None:
    """Every `--data-path` prefix's largest token id is below `vocab_size` (the model's, before padding)."""
    from megatron_eff.data.builders import parse_data_path
    from megatron_eff.data.indexed_dataset import data_file_path, max_token_id

    prefixes, _ = parse_data_path(data_path)
    for prefix in prefixes:
        largest = max_token_id(prefix)
        if largest >= vocab_size:
            raise ValueError(
                f"--data-path {prefix}: {data_file_path(prefix)} holds token id {largest}, outside the model's "
                f"vocabulary of {vocab_size} ids (0..{vocab_size - 1}, from the tokenizer or --vocab-size): the "
                "data was made with another tokenizer. Preprocess it with this run's tokenizer or set the "
                "tokenizer that made it")

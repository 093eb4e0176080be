"""Checkpoint <-> Hugging Face folder conversion (the library behind `tools/checkpoint/convert.py`).

    export_to_hf(load_dir, save_dir, tokenizer_args=None, max_shard_size="5GB", dtype="float32")
    import_from_hf(hf_dir, save_dir, tensor_parallel_size=1, pipeline_model_parallel_size=1)

Export reads a megatron_eff checkpoint of any TP/PP layout (DCP stores global tensors) and writes
`config.json`, `model.safetensors` (or shards + `model.safetensors.index.json` above `max_shard_size`),
`generation_config.json` and the tokenizer. Import writes a layout-free megatron_eff checkpoint
(`iter_0000000`, weights only) whose meta.json records the model config and the chosen layout; load it with
`pretrain.py --load DIR --finetune` and the model flags `import_from_hf` returns (also saved in meta.json).

Both write into a temporary folder beside `save_dir` and rename it at the end: an error leaves nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile

import torch

from megatron_eff.config import ModelConfig, ParallelConfig
from megatron_eff.files import umask_mode
from megatron_eff.hf import mapping
from megatron_eff.hf.tokenizer import export_tokenizer, import_tokenizer

SAFETENSORS_INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '10KB' or a byte count -> bytes (powers of 1000, as `transformers`)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", str(text).upper())
    if not match:
        raise ValueError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 1000000")
    scale = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12}
    return int(float(match.group(1)) * scale[match.group(2)])


@contextlib.contextmanager
def atomic_output_dir(save_dir: str, flag: str = "--save-dir"):
    """Yield a temporary folder that becomes `save_dir` only if the block succeeds."""
    save_dir = os.path.abspath(save_dir)
    if os.path.exists(save_dir) and (not os.path.isdir(save_dir) or os.listdir(save_dir)):
        raise ValueError(f"{flag} {save_dir} already exists and is not empty; choose a new folder")
    parent = os.path.dirname(save_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(save_dir) + ".tmp", dir=parent)
    try:
        yield tmp
        _apply_umask(tmp)
        if os.path.isdir(save_dir):
            os.rmdir(save_dir)  # empty (checked above)
        os.replace(tmp, save_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _apply_umask(folder: str) -> None:
    """Give `folder` and everything in it the modes `mkdir`/`open` would: mkdtemp makes the folder 0700 and
    safetensors writes its files 0600, modes the final rename would keep."""
    dir_mode, file_mode = umask_mode(0o777), umask_mode(0o666)
    os.chmod(folder, dir_mode)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------------------------- export


def model_config_from_meta(meta: dict, path: str) -> ModelConfig:
    try:
        config = ModelConfig(**meta["config"]["model"])
    except (KeyError, TypeError) as error:
        raise ValueError(f"--load-dir {path}: meta.json holds no usable model config ({error})") from None
    if meta["config"].get("precision", {}).get("unit_scaling"):
        # Scaled GEMMs fold into the weights, but the residuals' sqrt(1 - tau) skips do not: a plain x + f(x)
        # stream needs a per-layer rescaling that changes every norm's epsilon relative to its input.
        raise ValueError(f"--load-dir {path}: a --unit-scaling checkpoint (scaled ops, tau-weighted residuals) has "
                         "no Hugging Face LLaMA / GPT-2 equivalent; evaluate it with tools/evaluate.py or "
                         "tools/generate.py")
    return config


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: str, max_shard_size: int,
                      metadata: dict | None = None) -> list[str]:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` + index when the total exceeds the limit."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous().clone()  # own storage: safetensors refuses shared tensors
        size += nbytes
    metadata = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, file_name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(os.path.join(out_dir, SAFETENSORS_INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def export_to_hf(load_dir: str, save_dir: str, tokenizer_args: dict | None = None, *,
                 max_shard_size: str | int = "5GB", dtype: str = "float32") -> dict:
    """Write an HF folder for the checkpoint at `load_dir` (any layout). `tokenizer_args` (`tokenizer_type`,
    `tokenizer_model`, `vocab_file`, `merge_file`) default to the run's; returns the HF config dict."""
    from megatron_eff.training.checkpointing import load_model_tensors

    if dtype not in DTYPES:
        raise ValueError(f"--hf-dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    limit = parse_size(max_shard_size)
    meta, tensors = load_model_tensors(load_dir)
    config = model_config_from_meta(meta, load_dir)
    tokenizer_args = {**meta.get("config", {}).get("data", {}), **(tokenizer_args or {})}
    with atomic_output_dir(save_dir) as tmp:
        special = export_tokenizer(tokenizer_args, tmp, config.seq_length, config.vocab_size)
        hf_config, hf_tensors = mapping.to_hf(tensors, config, bos_token_id=special.get("bos"),
                                              eos_token_id=special.get("eos"), pad_token_id=special.get("pad"))
        hf_config["torch_dtype"] = hf_config["dtype"] = dtype
        write_safetensors({k: t.to(DTYPES[dtype]) for k, t in hf_tensors.items()}, tmp, limit)
        _write_json(os.path.join(tmp, "config.json"), hf_config)
        generation = {"bos_token_id": special.get("bos"), "eos_token_id": special.get("eos"),
                      "pad_token_id": special.get("pad"), "do_sample": False}
        _write_json(os.path.join(tmp, "generation_config.json"), generation)
    return hf_config


# ---------------------------------------------------------------------------------------------- import


def read_hf_folder(hf_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, every tensor) of an HF model folder: safetensors (single or sharded) or pytorch_model.bin."""
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"--load-dir {hf_dir}: no config.json (not a Hugging Face model folder)")
    with open(config_path) as f:
        hf_config = json.load(f)
    files = []
    for index_name in (SAFETENSORS_INDEX, "pytorch_model.bin.index.json"):
        index = os.path.join(hf_dir, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            break
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(hf_dir, n))][:1]
    if not files:
        raise FileNotFoundError(f"--load-dir {hf_dir}: no model.safetensors, pytorch_model.bin or index file")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--load-dir {hf_dir}: the index names {name}, which is missing")
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors.update(load_file(path))
        else:
            tensors.update(torch.load(path, map_location="cpu", weights_only=True))
    return hf_config, tensors


def model_flags(config: ModelConfig, null_tokenizer: bool = False) -> list[str]:
    """The pretrain.py model flags that build `config`. With `null_tokenizer` (no tokenizer files: pretrain.py's
    default NullTokenizer), --vocab-size counts the ids before eod, N for a vocabulary of N + 1."""
    flags = ["--num-layers", config.num_layers, "--hidden-size", config.hidden_size,
             "--ffn-hidden-size", config.ffn_hidden_size, "--num-attention-heads", config.num_attention_heads]
    if config.num_query_groups != config.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", config.num_query_groups]
    flags += ["--seq-length", config.seq_length, "--max-position-embeddings", config.max_position_embeddings,
              "--position-embedding-type", config.position_embedding_type, "--normalization", config.normalization,
              "--norm-epsilon", config.norm_epsilon, "--vocab-size", config.vocab_size - int(null_tokenizer),
              "--make-vocab-size-divisible-by", config.make_vocab_size_divisible_by,
              "--init-method-std", config.init_method_std]
    if config.kv_channels is not None:
        flags += ["--kv-channels", config.kv_channels]
    if config.position_embedding_type == "rope":
        flags += ["--rotary-base", config.rotary_base]
        flags += ["--rotary-percent", config.rotary_percent] if config.rotary_percent != 1.0 else []
    flags += ["--swiglu"] if config.swiglu else []
    flags += ["--apply-layernorm-1p"] if config.apply_layernorm_1p else []
    flags += [] if config.add_bias_linear else ["--disable-bias-linear"]
    flags += ["--untie-embeddings-and-output-weights"] if config.untie_embeddings_and_output_weights else []
    return [str(f) for f in flags]


PRETRAIN_FLAGS = "pretrain_flags.txt"  # in an imported checkpoint's folder: the flags that build its model


def import_from_hf(hf_dir: str, save_dir: str, *, tensor_parallel_size: int = 1,
                   pipeline_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 128,
                   seq_length: int | None = None) -> tuple[ModelConfig, list[str]]:
    """Write a megatron_eff checkpoint for an HF LLaMA / GPT-2 folder; returns (config, pretrain flags). The flags
    (model shape, layout, tokenizer) are also written to `save_dir/pretrain_flags.txt`, one a line."""
    from megatron_eff.training.checkpointing import TrainState, save_checkpoint

    hf_config, hf_tensors = read_hf_folder(hf_dir)
    config, tensors = mapping.from_hf(hf_config, hf_tensors, seq_length=seq_length,
                                      make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    parallel = ParallelConfig(tensor_model_parallel_size=tensor_parallel_size,
                              pipeline_model_parallel_size=pipeline_model_parallel_size)
    parallel.check_model(config)  # a layout that cannot hold this model fails here, naming the flag
    tensors = mapping.pad_vocab(tensors, config, tensor_parallel_size)
    final_dir = os.path.abspath(save_dir)
    with atomic_output_dir(save_dir) as tmp:
        data = import_tokenizer(hf_dir, os.path.join(tmp, "tokenizer"), os.path.join(final_dir, "tokenizer"))
        flags = model_flags(config, null_tokenizer=not data) + [
            "--tensor-model-parallel-size", str(tensor_parallel_size),
            "--pipeline-model-parallel-size", str(pipeline_model_parallel_size)]
        flags += [x for key, value in data.items() if value for x in (f"--{key.replace('_', '-')}", value)]
        with open(os.path.join(tmp, PRETRAIN_FLAGS), "w") as f:  # one flag a line: `$(cat ...)` or `mapfile -t`
            f.write("".join(f"{flag}\n" for flag in flags))
        run_config = {"model": dataclasses.asdict(config), "parallel": dataclasses.asdict(parallel), "data": data,
                      "source": {"hf_dir": os.path.abspath(hf_dir), "architectures": hf_config.get("architectures")},
                      "pretrain_flags": flags}
        layout = {"tp": tensor_parallel_size, "pp": pipeline_model_parallel_size, "dp": 1}
        params = {name: torch.nn.Parameter(tensor, requires_grad=False) for name, tensor in tensors.items()}
        save_checkpoint(tmp, TrainState(), params, None, run_config, layout)
    return config, flags

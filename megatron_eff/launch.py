"""Checks an entry point runs before any process-group work: what needs the world size or the file system.

`config.py` checks what the flags alone decide; `check_launch` adds the rules that depend on how the run
was launched (torchrun's `WORLD_SIZE`), on what is installed (Transformer Engine; a C++ compiler for
`--torch-compile` on CPU) and on files (data prefixes, the checkpoint to load). `pretrain.py` and the tools
call it first, so a bad launch fails on every rank with one line and before anything is built.
"""

from __future__ import annotations

import os

from megatron_eff.config import Config


def check_launch(config: Config, world_size: int | None = None) -> int:
    """Raise ValueError/FileNotFoundError naming the problem; return the data-parallel size.
    `world_size` defaults to `WORLD_SIZE` (set by torchrun; 1 for a plain `python` launch)."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dp = config.parallel.data_parallel_size(world_size)
    train = config.train
    num_micro_batches = train.num_micro_batches(dp)
    if config.parallel.num_layers_per_virtual_pipeline_stage:  # (check_model: only with pp > 1)
        from megatron_eff.parallel.pipeline import check_interleaved

        check_interleaved(num_micro_batches, config.parallel.pipeline_model_parallel_size,
                          f"--global-batch-size {train.resolved_global_batch_size(dp)} / (--micro-batch-size "
                          f"{train.micro_batch_size} x data-parallel size {dp}) = ")
    if config.model.transformer_impl == "transformer_engine":
        from megatron_eff.model.te_backend import check_transformer_engine

        check_transformer_engine()
    if config.train.torch_compile:
        from megatron_eff.parallel.state import use_cuda
        from megatron_eff.training.compile import check_cpp_compiler

        if not use_cuda():
            check_cpp_compiler()
    if not config.data.mock_data:
        from megatron_eff.data.builders import parse_data_path

        parse_data_path(config.data.data_path)  # the format, and every prefix's .bin and .idx
    if config.checkpoint.load:
        from megatron_eff.training.checkpointing import find_checkpoint

        found = find_checkpoint(config.checkpoint.load)  # a tracker naming a missing checkpoint: an error
        if found is None and config.checkpoint.finetune:
            raise FileNotFoundError(f"--finetune --load {config.checkpoint.load}: no checkpoint there")
    return dp

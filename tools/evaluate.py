"""Loss and perplexity of a checkpoint on indexed data or a text file, under any TP/PP/DP layout.

    python tools/evaluate.py --load work_dirs/quickstart/checkpoints \\
        --data-path work_dirs/quickstart/data/milton_text_document --split 95,5,0 --eval-split valid

    python tools/evaluate.py --load work_dirs/quickstart/checkpoints --text-file some.txt \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model work_dirs/quickstart/tokenizer.model

    torchrun --nproc_per_node 4 tools/evaluate.py --load ... --tensor-model-parallel-size 2 \\
        --pipeline-model-parallel-size 2 --data-path ...

The model shape and its Unit Scaling come from the checkpoint (`--seq-length` may change the window length,
except under Unit Scaling; FP8 training is not emulated: GEMMs run in full precision, or BF16 with `--bf16`),
the tokenizer and `--split` default to the checkpoint's run. Windows of `seq_length + 1` tokens cover the
stream in order (see `megatron_eff/evaluation.py`); prints `loss`, `ppl` and the number of tokens scored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from megatron_eff.config import (  # noqa: E402
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainConfig,
)
from megatron_eff.errors import RunError  # noqa: E402
from megatron_eff.launch import check_launch  # noqa: E402
from megatron_eff.precision import inference_precision  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint (run dir or iter_N), any layout")
    data = parser.add_argument_group("data (one of --data-path / --text-file)")
    data.add_argument("--data-path", nargs="+", help="indexed dataset prefixes (weights, if given, are ignored)")
    data.add_argument("--split", help="train,valid,test proportions (default: the checkpoint's run)")
    data.add_argument("--eval-split", default="valid", choices=["train", "valid", "test", "all"])
    data.add_argument("--text-file", help="a UTF-8 text file, tokenized whole")
    data.add_argument("--tokenizer-type", help="for --text-file (default: the checkpoint's run)")
    data.add_argument("--tokenizer-model")
    data.add_argument("--vocab-file")
    data.add_argument("--merge-file")
    run = parser.add_argument_group("layout and batches")
    run.add_argument("--tensor-model-parallel-size", type=int, default=1)
    run.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    run.add_argument("--num-layers-per-virtual-pipeline-stage", type=int)
    run.add_argument("--sequence-parallel", action="store_true")
    run.add_argument("--micro-batch-size", type=int, default=1)
    run.add_argument("--global-batch-size", type=int, help="default: micro-batch size x data-parallel size")
    run.add_argument("--seq-length", type=int, help="window length (default: the checkpoint's)")
    run.add_argument("--eval-iters", type=int, help="at most this many global batches (default: all)")
    run.add_argument("--bf16", action="store_true")
    parser.add_argument("--results-json", help="also write {loss, ppl, tokens, windows} here")
    args = parser.parse_args(argv)
    if bool(args.data_path) == bool(args.text_file):
        parser.error("give exactly one of --data-path and --text-file")
    return args


def build_config(args: argparse.Namespace, meta: dict) -> Config:
    model = dict(meta["config"]["model"])
    precision = inference_precision(meta["config"])  # the checkpoint's Unit Scaling; FP8 is not emulated
    if args.seq_length and precision.unit_scaling and args.seq_length != model["seq_length"]:
        raise ValueError(f"--seq-length {args.seq_length}: a --unit-scaling model's attention scale is set by its "
                         f"training sequence length, {model['seq_length']}; evaluate with that window")
    if args.seq_length:
        model["seq_length"] = args.seq_length
    return Config(
        model=ModelConfig(**model),
        parallel=ParallelConfig(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
            sequence_parallel=args.sequence_parallel,
        ),
        optim=OptimizerConfig(),
        train=TrainConfig(micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                          train_iters=1, bf16=args.bf16),
        data=DataConfig(data_path=args.data_path or [], mock_data=not args.data_path),
        checkpoint=CheckpointConfig(load=args.load, finetune=True),
        logging=LoggingConfig(),
        precision=precision,
    )


def read_text_file(path: str) -> str:
    """The text of `--text-file`; ValueError naming the file (and where) if it cannot be read or is not UTF-8."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"--text-file {path}: cannot read ({error.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"--text-file {path}: not valid UTF-8 at byte {error.start} (line {line}: "
                         f"{error.reason})") from None


def build_windows(args: argparse.Namespace, meta: dict, config: Config):
    from megatron_eff.data.builders import parse_data_path
    from megatron_eff.data.tokenizer import checkpoint_tokenizer
    from megatron_eff.evaluation import indexed_windows, text_windows

    run_data = meta["config"].get("data", {})
    seq = config.model.seq_length
    if args.data_path:
        prefixes, _ = parse_data_path(args.data_path)
        return indexed_windows(prefixes, args.split or run_data.get("split", "969,30,1"), args.eval_split, seq)
    tokenizer = checkpoint_tokenizer(vars(args), run_data, config.model.vocab_size)
    if not Path(args.text_file).is_file():
        raise FileNotFoundError(f"--text-file {args.text_file}: file not found")
    ids = tokenizer.tokenize(read_text_file(args.text_file))
    if ids and max(ids) >= config.model.vocab_size:
        raise ValueError(f"--tokenizer-type {type(tokenizer).__name__}: id {max(ids)} is outside the model's "
                         f"vocabulary ({config.model.vocab_size}); is it the tokenizer the model was trained with?")
    return text_windows(ids, seq)


def main(argv=None) -> int:
    from megatron_eff.evaluation import count_batches, evaluate_windows
    from megatron_eff.parallel.state import init_distributed, initialize_parallel_state
    from megatron_eff.training.checkpointing import load_checkpoint, read_meta
    from megatron_eff.training.trainer import autocast_context, build_model, device_for_run

    args = parse_args(argv)
    try:  # every input error surfaces here, before any process-group work
        _, meta = read_meta(args.load)
        config = build_config(args, meta)
        dp_size = check_launch(config)
        windows = build_windows(args, meta, config)
        count_batches(windows, config, dp_size, args.eval_iters)
    except (ValueError, FileNotFoundError, KeyError, RunError) as error:  # RunError: a damaged meta.json
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2
    init_distributed()
    pstate = initialize_parallel_state(config.parallel.tensor_model_parallel_size,
                                       config.parallel.pipeline_model_parallel_size,
                                       cp=config.parallel.context_parallel_size,
                                       cp_comm_type=config.parallel.cp_comm_type)
    device = device_for_run()
    model = build_model(config, pstate, device)
    named_params = {name: p for chunk in model for name, p in chunk.named_parameters()}
    try:
        load_checkpoint(args.load, named_params, None, finetune=True, pstate=pstate)
    except RunError as error:  # damaged or non-finite: every rank fails the same check
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2
    result = evaluate_windows(model, windows, config, pstate, autocast_context(config, device), args.eval_iters)
    if pstate.rank == 0:
        print(f"evaluate: loss {result.loss:.6f} | ppl {result.perplexity:.4f} | {result.tokens} tokens in "
              f"{result.windows} windows of {config.model.seq_length} ({pstate.describe()})")
        if args.results_json:
            Path(args.results_json).write_text(json.dumps(dataclasses.asdict(result)) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What checkpoint integrity costs: a save with its checksums and non-finite check vs the plain write, and
the verification on load, for a model with AdamW state (one process).

    .venv/bin/python bench/checkpoint_integrity.py                    # ~20 M parameters, ~0.25 GB checkpoint
    .venv/bin/python bench/checkpoint_integrity.py --hidden-size 512 --num-layers 8 --repeats 3

Reported (best of `--repeats`): checkpoint size; save seconds; of it the checksums (`compute_checksums`,
SHA-256 over every file) and the non-finite scan; verification seconds (`verify_checksums`) and its MB/s.
Under torchrun each rank hashes 1/world of the files, so the checksum share falls with the world size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eff.arguments import config_from_args, parse_args  # noqa: E402
from megatron_eff.parallel.state import ParallelState  # noqa: E402
from megatron_eff.training import checkpoint_integrity  # noqa: E402
from megatron_eff.training.checkpointing import TrainState, save_checkpoint  # noqa: E402
from megatron_eff.training.optimizer import build_optimizer  # noqa: E402
from megatron_eff.training.trainer import build_model  # noqa: E402


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = config_from_args(parse_args([
        "--model-preset", "llama-tiny", "--mock-data", "--hidden-size", str(args.hidden_size), "--num-layers",
        str(args.num_layers), "--num-attention-heads", "8", "--ffn-hidden-size", str(4 * args.hidden_size),
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(args.vocab_size)]))
    torch.set_num_threads(1)
    (model,) = build_model(config, ParallelState.single(), torch.device("cpu"))
    params = dict(model.named_parameters())
    optimizer = build_optimizer(params.items(), config.optim)
    root = tempfile.mkdtemp(prefix="ckpt_bench_")
    try:
        save = lambda: save_checkpoint(root, TrainState(iteration=1), params, optimizer, {}, {})  # noqa: E731
        save_s = timed(save, args.repeats)
        path = os.path.join(root, "iter_0000001")
        size = sum(os.path.getsize(os.path.join(path, f)) for f in checkpoint_integrity.checkpoint_files(path))
        checksum_s = timed(lambda: checkpoint_integrity.compute_checksums(path), args.repeats)
        named = [(n, p.detach()) for n, p in params.items()]
        named += [(f"{n}.{k}", v) for n, p in params.items() for k, v in optimizer.state[p].items()]
        scan_s = timed(lambda: checkpoint_integrity.non_finite_names(named), args.repeats)
        recorded = checkpoint_integrity.compute_checksums(path)
        verify_s = timed(lambda: checkpoint_integrity.verify_checksums(path, recorded), args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = sum(p.numel() for p in params.values())
    print(f"model {n / 1e6:.1f} M parameters + AdamW state: checkpoint {size / 1e6:.0f} MB")
    print(f"save {save_s:.3f} s, of it checksums {checksum_s:.3f} s ({100 * checksum_s / save_s:.0f} %) and "
          f"non-finite scan {scan_s:.3f} s ({100 * scan_s / save_s:.0f} %)")
    print(f"verify on load {verify_s:.3f} s ({size / 1e6 / verify_s:.0f} MB/s)")


if __name__ == "__main__":
    main()

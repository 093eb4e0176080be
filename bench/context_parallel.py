"""Activation memory per rank under context parallelism, and the step time of its two attention schemes.

    .venv/bin/python bench/context_parallel.py                          # seq 2048, cp 1 2 4, ~1 minute on CPU
    .venv/bin/python bench/context_parallel.py --seq-length 4096 --cp 1 2 --comm-types p2p

For each CP size (one torchrun launch of `--cp` processes on gloo, or the plain process for cp 1) and each
`--comm-types` scheme, a small LLaMA-shaped model (RoPE, GQA, SwiGLU) runs forward and backward on one
micro-batch of `--seq-length` random tokens. Reported per rank (the largest over the CP ranks):

- saved MiB: the bytes of every tensor autograd saves for backward during the forward (distinct storages,
  counted by `torch.autograd.graph.saved_tensors_hooks`) -- the activation memory training holds at its peak,
  independent of the allocator and of the machine;
- ms/step: the median forward + backward time of `--steps` steps after one warm-up (CPU, `OMP_NUM_THREADS`
  threads per process; with more processes than cores this is not a speed figure).

Ring attention (`p2p`) holds one K/V block of another rank at a time; `allgather` holds every rank's K/V;
both split every other activation (and the attention scores) by cp.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_eff.config import ModelConfig  # noqa: E402
from megatron_eff.model.gpt_model import GPTModel  # noqa: E402
from megatron_eff.model.loss import lm_forward_step  # noqa: E402
from megatron_eff.parallel.state import initialize_parallel_state  # noqa: E402

MiB = 2**20


def saved_bytes(function) -> tuple[object, int]:
    """(function(), bytes of the distinct storages autograd saved for backward while it ran)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = function()
    return result, sum(storages.values())


def worker(args: argparse.Namespace) -> None:
    """One rank: build the model under this CP size, measure, print one JSON line from rank 0."""
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    cp = dist.get_world_size() if dist.is_initialized() else 1
    pstate = initialize_parallel_state(cp=cp, cp_comm_type=args.comm_type)
    config = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=8,
                         num_query_groups=4, ffn_hidden_size=4 * args.hidden_size, seq_length=args.seq_length,
                         position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                         add_bias_linear=False, vocab_size=1024)
    model = GPTModel(config, pstate, seed=0)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (1, args.seq_length + 1), generator=generator)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}

    def step() -> int:
        def forward():
            out, loss_func = lm_forward_step(model, batch, None)
            loss_sum, num_tokens, _ = loss_func(out)
            return loss_sum / num_tokens

        loss, nbytes = saved_bytes(forward)
        loss.backward()
        return nbytes

    step()  # warm-up
    times, nbytes = [], 0
    for _ in range(args.steps):
        start = time.perf_counter()
        nbytes = step()
        times.append(time.perf_counter() - start)
    figures = torch.tensor([nbytes, statistics.median(times)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(figures, op=dist.ReduceOp.MAX)
    if pstate.rank == 0:
        print(json.dumps({"cp": cp, "comm_type": args.comm_type, "saved_mib": figures[0].item() / MiB,
                          "ms_per_step": figures[1].item() * 1e3}))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, cp: int, comm_type: str) -> dict:
    flags = ["--worker", "--comm-type", comm_type, "--seq-length", str(args.seq_length), "--steps",
             str(args.steps), "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size)]
    script = os.path.abspath(__file__)
    if cp == 1:
        cmd = [sys.executable, script, *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cp), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), script, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--comm-types", nargs="+", choices=("p2p", "allgather"), default=["p2p", "allgather"])
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--comm-type", default="p2p", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"seq {args.seq_length}, {args.num_layers} layers, hidden {args.hidden_size}, micro-batch 1")
    print(f"{'cp':>3} {'attention':>10} {'saved MiB/rank':>15} {'ms/step':>9}")
    for cp in args.cp:
        for comm_type in (args.comm_types if cp > 1 else ["-"]):
            row = launch(args, cp, comm_type if cp > 1 else "p2p")
            print(f"{cp:>3} {comm_type:>10} {row['saved_mib']:>15.1f} {row['ms_per_step']:>9.0f}", flush=True)


if __name__ == "__main__":
    main()

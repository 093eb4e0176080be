"""Index-building times and memory at pretraining scale: blending indices and GPT-dataset indices.

    .venv/bin/python bench/data_index.py                       # all of it: ~2 minutes, ~7 GB at 10^8 docs
    .venv/bin/python bench/data_index.py --docs 1e7 --samples 1e6 2e7      # a smaller run
    .venv/bin/python bench/data_index.py --megatron-helpers DIR            # also Megatron-LM's C++ helper
    .venv/bin/python bench/data_index.py --blend-sizes --previous          # the unchunked GPT builder before

Blending: ``build_blending_indices`` (the compiled helper) for each ``--blend-sizes`` over 6 domains; the
Python rule at the first size only, extrapolated linearly to the others (~2 µs a sample); with
``--megatron-helpers DIR`` (a folder holding Megatron-LM's ``helpers_cpp`` extension, built from
``megatron/core/datasets/helpers.cpp`` of the ``megatron-core`` package outside this repository) also
Megatron's ``build_blending_indices``, whose output is checked equal to ours.

GPT dataset: for each ``--docs`` a synthetic ``.bin/.idx`` pair (random document lengths 1..2047, uint16
tokens; the ``.bin`` is a sparse file) in a temp folder; then, for each ``--samples``, a fresh child process
opens it (``IndexedDataset``: header checks, document lengths, the cache-key md5) and builds the document,
sample and shuffle indices (``build_gpt_indices``, as ``GPTDataset`` does on a cache miss, without writing
the cache; ``--previous``: the unchunked builder it replaced, kept in ``tests/test_gpt_dataset.py`` as the
reference). Reported: seconds per step, the peak of numpy's heap (tracemalloc) and of the process's
resident memory (VmHWM), beside the size of the arrays built. Both peaks count from after the imports; the
RSS one also counts the ``.idx`` pages read through its memory map (4 + 8 + 8 bytes per document here).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_eff.data.blended_dataset import build_blending_indices  # noqa: E402
from megatron_eff.data.blending_indices import load_helper, reference_blending_indices  # noqa: E402
from megatron_eff.data.gpt_dataset import build_gpt_indices, count_tokens  # noqa: E402
from megatron_eff.data.indexed_dataset import IndexedDataset, encode_index  # noqa: E402

WEIGHTS = [0.3, 0.25, 0.15, 0.12, 0.1, 0.08]  # 6 domains
MiB = 2**20


def timed(function, *args):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def megatron_blending(helpers_cpp, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron-LM's C++ ``build_blending_indices`` (dataset index int16, sample index int64)."""
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    weights = np.array(WEIGHTS, dtype=np.float64)
    helpers_cpp.build_blending_indices(dataset_index, dataset_sample_index, weights, len(WEIGHTS), size, False)
    return dataset_index, dataset_sample_index


def bench_blending(sizes: list[int], megatron_dir: str | None) -> None:
    """Print the blending table."""
    helpers_cpp = None
    if megatron_dir:
        sys.path.insert(0, megatron_dir)
        import helpers_cpp  # Megatron-LM's extension, only when asked for
    print(f"== blending indices, 6 domains {WEIGHTS} (helper: {'compiled' if load_helper() else 'Python rule'})")
    python_per_sample = None
    header = f"{'samples':>12} {'ours s':>8} {'Python rule s':>14}"
    print(header + (f" {'Megatron C++ s':>15} {'ours/Megatron':>14}" if helpers_cpp else ""))
    for size in sizes:
        ours_s, ours = timed(build_blending_indices, WEIGHTS, size)
        if python_per_sample is None:
            python_s, reference = timed(reference_blending_indices, WEIGHTS, size)
            assert all(np.array_equal(a, b) for a, b in zip(ours, reference))
            python_per_sample, python_text = python_s / size, f"{python_s:.2f}"
        else:
            python_text = f"~{python_per_sample * size:.0f} (extrap.)"
        line = f"{size:>12,} {ours_s:>8.2f} {python_text:>14}"
        if helpers_cpp is not None:
            megatron_s, theirs = timed(megatron_blending, helpers_cpp, size)
            assert np.array_equal(theirs[0], ours[0]) and np.array_equal(theirs[1], ours[1])
            line += f" {megatron_s:>15.2f} {ours_s / megatron_s:>14.2f}"
        print(line, flush=True)
        del ours


def write_synthetic_prefix(directory: str, num_docs: int) -> str:
    """PREFIX.idx with random document lengths and a sparse PREFIX.bin of the matching size."""
    prefix = os.path.join(directory, f"synthetic_{num_docs}")
    lengths = np.random.RandomState(0).randint(1, 2048, size=num_docs).astype(np.int32)
    with open(prefix + ".idx", "wb") as f:
        f.write(encode_index(np.uint16, lengths, np.arange(num_docs + 1, dtype=np.int64)))
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum(dtype=np.int64)) * 2)
    return prefix


def peak_rss_mib(reset: bool = False) -> float:
    """This process's peak resident memory (Linux VmHWM; ``ru_maxrss`` elsewhere); ``reset`` restarts it."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark (ru_maxrss cannot be reset and survives exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def chunked_builder(ids, lengths, num_samples, seq_length, seed) -> dict[str, np.ndarray]:
    """What ``GPTDataset`` runs on a cache miss."""
    return build_gpt_indices(ids, lengths, count_tokens(lengths, ids), num_samples, seq_length, seed)


def measure_gpt_indices(prefix: str, num_samples: int, seq_length: int, builder) -> dict:
    """In this (fresh) process: open ``prefix`` and build its indices; seconds and peak memory."""
    rss_before = peak_rss_mib(reset=True)
    tracemalloc.start()
    open_s, indexed = timed(IndexedDataset, prefix)
    lengths_s, lengths = timed(lambda: indexed.document_lengths)
    md5_s, _ = timed(lambda: indexed.fingerprint)
    ids = np.arange(indexed.num_documents, dtype=np.int64)
    build_s, arrays = timed(builder, ids, lengths, num_samples, seq_length, 1234)
    heap_peak = tracemalloc.get_traced_memory()[1]
    return {
        "open_s": open_s,
        "lengths_s": lengths_s,
        "md5_s": md5_s,
        "build_s": build_s,
        "epochs": len(arrays["document_index"]) // len(ids),
        "arrays_mib": sum(a.nbytes for a in arrays.values()) / MiB,
        "inputs_mib": (lengths.nbytes + ids.nbytes) / MiB,
        "heap_peak_mib": heap_peak / MiB,
        "rss_peak_mib": peak_rss_mib() - rss_before,
    }


def bench_gpt(doc_counts: list[int], sample_counts: list[int], seq_length: int, previous: bool) -> None:
    """Print the GPT-dataset table, one child process per (documents, samples)."""
    builder = "the previous unchunked builder" if previous else "build_gpt_indices"
    print(f"== GPT dataset indices ({builder}), seq_length {seq_length}, document lengths uniform 1..2047")
    print(
        f"{'docs':>12} {'samples':>12} {'epochs':>6} {'open s':>7} {'lengths s':>9} {'md5 s':>6} {'build s':>8} "
        f"{'arrays MiB':>10} {'lengths+ids MiB':>15} {'heap peak MiB':>13} {'RSS peak MiB':>12}"
    )
    with tempfile.TemporaryDirectory() as directory:
        for num_docs in doc_counts:
            prefix = write_synthetic_prefix(directory, num_docs)
            for num_samples in sample_counts:
                command = [sys.executable, __file__, "--child", prefix, str(num_samples), str(seq_length)]
                command += ["--previous"] if previous else []
                result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                print(
                    f"{num_docs:>12,} {num_samples:>12,} {result['epochs']:>6} {result['open_s']:>7.2f} "
                    f"{result['lengths_s']:>9.2f} {result['md5_s']:>6.2f} {result['build_s']:>8.2f} "
                    f"{result['arrays_mib']:>10.0f} {result['inputs_mib']:>15.0f} "
                    f"{result['heap_peak_mib']:>13.0f} {result['rss_peak_mib']:>12.0f}",
                    flush=True,
                )
            os.remove(prefix + ".idx")
            os.remove(prefix + ".bin")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blend-sizes", type=float, nargs="*", default=[1e6, 2e7, 1e8])
    parser.add_argument("--docs", type=float, nargs="*", default=[1e7, 1e8])
    parser.add_argument("--samples", type=float, nargs="*", default=[1e6, 2e7, 1e8])
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--megatron-helpers", help="folder with Megatron-LM's built helpers_cpp extension")
    parser.add_argument("--previous", action="store_true", help="GPT indices with the unchunked builder before")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # PREFIX SAMPLES SEQ: one measurement
    args = parser.parse_args()
    if args.child:
        prefix, num_samples, seq_length = args.child
        builder = chunked_builder
        if args.previous:
            from tests.test_gpt_dataset import unchunked_gpt_indices as builder
        print(json.dumps(measure_gpt_indices(prefix, int(num_samples), int(seq_length), builder)))
        return
    if args.blend_sizes:
        bench_blending([int(s) for s in args.blend_sizes], args.megatron_helpers)
    if args.docs and args.samples:
        bench_gpt([int(d) for d in args.docs], [int(s) for s in args.samples], args.seq_length, args.previous)


if __name__ == "__main__":
    main()

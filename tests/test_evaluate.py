"""`tools/evaluate.py`: windows cover the token stream once, the loss equals cross entropy computed by hand,
and TP2 / PP2 under torchrun give the single-process loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_eff.config import ModelConfig
from megatron_eff.data.indexed_dataset import IndexedDatasetBuilder
from megatron_eff.evaluation import TokenWindows, indexed_windows, text_windows
from tests.dist_utils import ROOT, free_port
from tests.hf_utils import LLAMA, random_model, save_ours

# 4 layers so PP2 splits them; vocab 201 = NullTokenizer ids 0..199 + eod 200; windows of 16 (+1)
CONFIG = {**LLAMA, "num_layers": 4, "vocab_size": 201, "seq_length": 16}


def test_windows_cover_documents_in_order():
    docs = [np.arange(0, 7), np.arange(100, 103), np.arange(200, 215)]  # 25 tokens
    windows = TokenWindows(np.array([len(d) for d in docs]), lambda d, o, n: docs[d][o:o + n], seq_length=4)
    stream = np.concatenate(docs)
    assert len(windows) == 6  # (25 - 1) // 4
    for i in range(len(windows)):
        assert windows[i]["tokens"].tolist() == stream[4 * i: 4 * i + 5].tolist()
    labels = np.concatenate([windows[i]["tokens"][1:] for i in range(len(windows))])
    assert labels.tolist() == stream[1:25].tolist()  # every token after the first predicted once
    with pytest.raises(IndexError):
        windows[6]
    assert len(text_windows([1, 2, 3], seq_length=4)) == 0


def write_indexed(prefix, documents):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in documents:
        builder.add_document(np.asarray(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")


def reference_loss(model, windows, count):
    with torch.no_grad():
        batch = torch.from_numpy(np.stack([windows[i]["tokens"] for i in range(count)]))
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()


def run_evaluate(args, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
        "127.0.0.1", "--master_port", str(free_port())]
    return subprocess.run([*launcher, str(ROOT / "tools" / "evaluate.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = random_model(ModelConfig(**CONFIG))
    save_ours(model, root / "ckpt")
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 200, rng.integers(5, 60)) for _ in range(40)]
    write_indexed(root / "docs", documents)
    return model, root


def test_evaluate_matches_cross_entropy(checkpoint_and_data):
    model, root = checkpoint_and_data
    windows = indexed_windows([str(root / "docs")], "80,20,0", "valid", 16)
    run = run_evaluate(["--load", root / "ckpt", "--data-path", root / "docs", "--split", "80,20,0",
                        "--micro-batch-size", "2", "--results-json", root / "single.json"])
    assert run.returncode == 0, run.stderr
    result = json.loads((root / "single.json").read_text())
    count = len(windows) // 2 * 2
    assert result["windows"] == count and result["tokens"] == 16 * count
    assert abs(result["loss"] - reference_loss(model, windows, count)) <= 1e-5
    assert "ppl" in run.stdout

    text = " ".join(str(i) for i in np.random.default_rng(1).integers(0, 200, 100))
    (root / "ids.txt").write_text(text)  # NullTokenizer: the text is the ids
    run = run_evaluate(["--load", root / "ckpt", "--text-file", root / "ids.txt", "--results-json", root / "t.json"])
    assert run.returncode == 0, run.stderr
    result = json.loads((root / "t.json").read_text())
    windows = text_windows([int(t) for t in text.split()], 16)
    assert result["windows"] == 6 and abs(result["loss"] - reference_loss(model, windows, 6)) <= 1e-5

    run = run_evaluate(["--load", root / "ckpt", "--text-file", root / "ids.txt", "--global-batch-size", "64"])
    assert run.returncode == 2 and "fewer than one global batch (64)" in run.stderr


LAYOUT_COMMON = ["--split", "80,20,0", "--eval-split", "all", "--micro-batch-size", "2", "--global-batch-size", "4"]


@pytest.fixture(scope="module")
def single_process_result(checkpoint_and_data):
    _, root = checkpoint_and_data
    run = run_evaluate(["--load", root / "ckpt", "--data-path", root / "docs", *LAYOUT_COMMON,
                        "--results-json", root / "ref.json"])
    assert run.returncode == 0, run.stderr
    return json.loads((root / "ref.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]],
                         ids=["tp2", "pp2"])
def test_parallel_layouts_match_single_process(checkpoint_and_data, single_process_result, layout):
    _, root = checkpoint_and_data
    parallel = run_evaluate(["--load", root / "ckpt", "--data-path", root / "docs", *LAYOUT_COMMON, *layout,
                             "--results-json", root / "par.json"], nproc=2)
    assert parallel.returncode == 0, parallel.stderr
    ref, got = single_process_result, json.loads((root / "par.json").read_text())
    assert got["windows"] == ref["windows"] > 20
    assert abs(got["loss"] - ref["loss"]) <= 1e-5 * ref["loss"]

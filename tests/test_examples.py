"""The GPU example launchers (which CI cannot run) print a command that our argument parser and the
layout rules accept for their default world size: a flag typo or an indivisible batch fails here."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from megatron_eff.arguments import config_from_args, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_ENV = {"DATA": "/data/corpus_text_document", "VOCAB": "vocab.json", "MERGES": "merges.txt",
            "TOKENIZER": "tokenizer.model"}


def dry_run(script: str, **env: str) -> list[str]:
    """The pretrain.py flags `script` would launch with DRY_RUN=1, and the torchrun flags before them."""
    proc = subprocess.run(["bash", f"examples/{script}"], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "DRY_RUN": "1", **env})
    return shlex.split(proc.stdout)


@pytest.mark.parametrize("script,nnodes", [("gpt2_124m_8gpu.sh", 1), ("gpt2_124m_8gpu.sh", 2),
                                           ("llama_1b_8gpu.sh", 1), ("llama_1b_8gpu.sh", 2), ("mst_gpt2_124m.sh", 1),
                                           ("sat_llama_1b.sh", 1)])
@pytest.mark.parametrize("data", ["mock", "files"])
def test_gpu_example_flags_are_valid(script, nnodes, data):
    env = {"MOCK": "1"} if data == "mock" else DATA_ENV
    argv = dry_run(script, NNODES=str(nnodes), NODE_RANK=str(nnodes - 1), **env)
    launcher, flags = argv[:argv.index("pretrain.py")], argv[argv.index("pretrain.py") + 1:]
    assert launcher[argv.index("-m") + 1] == "torch.distributed.run"
    for name, value in (("--nproc_per_node", "8"), ("--nnodes", str(nnodes)), ("--node_rank", str(nnodes - 1))):
        assert launcher[launcher.index(name) + 1] == value
    config = config_from_args(parse_args(flags), vocab_size=32000)
    dp = config.parallel.data_parallel_size(8 * nnodes)
    config.parallel.check_model(config.model)
    assert config.train.num_micro_batches(dp) >= 1
    assert config.data.mock_data == (data == "mock")
    if data == "files":
        assert config.data.data_path == [DATA_ENV["DATA"]]


def test_gpu_example_names_missing_data():
    proc = subprocess.run(["bash", "examples/llama_1b_8gpu.sh"], cwd=ROOT, capture_output=True, text=True,
                          env={k: v for k, v in {**os.environ, "DRY_RUN": "1"}.items() if k not in DATA_ENV})
    assert proc.returncode != 0 and "set DATA=" in proc.stderr


def test_rerun_keeps_the_previous_run(tmp_path):
    """The CPU examples move an earlier run's checkpoints to *.previous (saying so) instead of deleting them;
    only the run before that is replaced."""
    ckpt = tmp_path / "checkpoints"
    for run in ("first", "second"):
        ckpt.mkdir()
        (ckpt / "run.txt").write_text(run)
        proc = subprocess.run(["bash", "examples/keep_previous.sh", str(ckpt), str(tmp_path / "absent")], cwd=ROOT,
                              capture_output=True, text=True, check=True)
        assert proc.stdout.strip() == f"== kept the earlier {ckpt} as {ckpt}.previous (replacing an older one)"
        assert not ckpt.exists() and (tmp_path / "checkpoints.previous" / "run.txt").read_text() == run
    assert not (tmp_path / "absent.previous").exists()
    for script in ("quickstart.sh", "mst_cpu.sh", "cpu_8proc.sh"):
        text = open(os.path.join(ROOT, "examples", script)).read()
        assert "keep_previous.sh" in text and "rm -rf" not in text, script

"""Shared fixtures: the single-process reference runs every multi-process parity test compares against
(computed once per test session), and `float64` (the default dtype for one test).

The suite runs on CPU with gloo even on a GPU machine (MEGATRON_EFF_DEVICE=cpu, inherited by the torchrun
subprocesses): its multi-process layouts need more ranks than one GPU. tests/test_gpu.py sets cuda itself."""

import os

import pytest
import torch

os.environ["MEGATRON_EFF_DEVICE"] = "cpu"

from tests.dist_utils import GPT_TINY_FLAGS, TINY_FLAGS, run_layout


@pytest.fixture(scope="session")
def llama_reference(tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("ref") / "llama.pt", TINY_FLAGS)


@pytest.fixture(scope="session")
def gpt_reference(tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("ref") / "gpt.pt", GPT_TINY_FLAGS)


@pytest.fixture
def float64():
    """The default dtype float64 for one test (parity runs in one process), restored after it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)

"""Reshardable checkpoints: save under one parallel layout, resume under another, same next losses.

Each case trains 3 of 5 iterations under a multi-process layout and saves (`--exit-interval 3`), then
resumes for iterations 4-5 under other layouts; their losses must match a straight 5-iteration
single-process run (<= 1e-5 relative), and so must the final parameters.
"""

from __future__ import annotations

import pytest
import torch.distributed.checkpoint as dcp

from tests.dist_utils import GPT_TINY_FLAGS, TINY_FLAGS, run_layout

pytestmark = pytest.mark.slow

SAVE_AT_3 = ["--exit-interval", "3"]


def assert_resumed(resumed: dict, straight: dict, vocab_size: int = 201) -> None:
    losses = straight["losses"][3:]
    assert len(resumed["losses"]) == len(losses) == 2
    for i, (a, b) in enumerate(zip(resumed["losses"], losses)):
        assert abs(a - b) <= 1e-5 * abs(b), f"iteration {i + 4}: loss {a} vs straight run {b}"
    for name, ref in straight["params"].items():
        got = resumed["params"][name]
        if name.endswith(("word_embeddings.weight", "output_layer.weight")):
            got, ref = got[:vocab_size], ref[:vocab_size]  # padded rows are never used
        diff = (got - ref).abs().max().item()
        assert diff <= 1e-5, f"{name}: max abs diff {diff}"


@pytest.fixture
def straight(llama_reference):
    return llama_reference  # the straight 5-iteration single-process run


SAVE_LAYOUTS = [
    pytest.param(["--tensor-model-parallel-size", "2", "--use-distributed-optimizer", "--overlap-grad-reduce",
                  "--overlap-param-gather"], id="tp2-dp2-distopt"),  # saved right after an overlapped step
    pytest.param(["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], id="tp2-pp2"),
]


@pytest.mark.parametrize("save_flags", SAVE_LAYOUTS)
def test_resume_in_other_layouts(tmp_path, straight, save_flags):
    ckpt = tmp_path / "ckpt"
    first = run_layout(tmp_path / "first.pt", [*TINY_FLAGS, *save_flags, *SAVE_AT_3, "--save", str(ckpt)], 4)
    assert first["losses"] == pytest.approx(straight["losses"][:3], rel=1e-5)
    saved = dcp.FileSystemReader(str(ckpt / "iter_0000003")).read_metadata().state_dict_metadata
    # Global (layout-free) shapes: SwiGLU fc1 [2, ffn, h], QKV [(nq + 2g) d, h], Adam moments alike.
    assert tuple(saved["model.decoder.layers.0.mlp.linear_fc1.weight"].size) == (2, 128, 64)
    assert tuple(saved["optimizer.decoder.layers.0.self_attention.linear_qkv.weight.exp_avg"].size) == (128, 64)

    load = ["--load", str(ckpt)]
    dp4 = run_layout(tmp_path / "dp4.pt", [*TINY_FLAGS, *load, "--use-distributed-optimizer"], 4)
    assert_resumed(dp4, straight)
    single = run_layout(tmp_path / "single.pt", [*TINY_FLAGS, *load], 1)
    assert_resumed(single, straight)


def test_vocab_padding_differs_between_layouts(tmp_path):
    """Padded to 32 x TP: 256 rows under TP2, 224 under TP1 (tied GPT embedding, sequence parallel)."""
    flags = [*GPT_TINY_FLAGS, "--make-vocab-size-divisible-by", "32"]
    straight = run_layout(tmp_path / "straight.pt", flags)
    ckpt = tmp_path / "ckpt"
    run_layout(tmp_path / "tp2.pt", [*flags, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                                     *SAVE_AT_3, "--save", str(ckpt)], 2)
    saved = dcp.FileSystemReader(str(ckpt / "iter_0000003")).read_metadata().state_dict_metadata
    assert tuple(saved["model.embedding.word_embeddings.weight"].size) == (256, 64)
    resumed = run_layout(tmp_path / "tp1.pt", [*flags, "--load", str(ckpt)])
    assert resumed["params"]["embedding.word_embeddings.weight"].shape == (224, 64)
    assert_resumed(resumed, straight)

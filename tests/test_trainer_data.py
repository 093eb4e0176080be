"""The trainer with the stateful batch source: per-domain validation losses, and blend weights changed by a
method in the middle of a run with `--num-workers 2` (worker processes), seen in the batches that train."""

from __future__ import annotations

import math

import numpy as np
import torch

from megatron_eff import methods as methods_lib
from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.data.builders import collate_samples
from megatron_eff.data.indexed_dataset import IndexedDatasetBuilder
from megatron_eff.training.trainer import Trainer

SEQ = 16


def make_domain(directory, name: str, low: int, high: int, seed: int, num_docs: int = 60) -> str:
    """A domain whose token ids all lie in [low, high): which domain a batch came from is visible."""
    rng = np.random.RandomState(seed)
    prefix = str(directory / name)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    for _ in range(num_docs):
        builder.add_item(rng.randint(low, high, rng.randint(8, 40)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def flags(tmp_path, *extra: str) -> list[str]:
    prose = make_domain(tmp_path, "prose", 0, 50, seed=1)
    code = make_domain(tmp_path, "code", 100, 150, seed=2)
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", str(SEQ),
            "--max-position-embeddings", str(SEQ), "--vocab-size", "200", "--data-path", "0.5", prose, "0.5",
            code, "--split", "80,20,0", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--log-interval", "100", "--lr", "3e-3", "--seed", "5", *extra]


def test_per_domain_validation_losses(tmp_path):
    trainer = Trainer(config_from_args(parse_args(flags(tmp_path, "--train-iters", "4", "--eval-interval", "2",
                                                        "--eval-iters", "2"))))
    result = trainer.train()
    assert set(trainer.valid_domains) == {"prose", "code"}
    for name, (low, high) in {"prose": (0, 50), "code": (100, 150)}.items():  # each set holds its domain only
        tokens = np.concatenate([trainer.valid_domains[name][i]["tokens"] for i in range(8)])
        assert low <= tokens.min() and tokens.max() < high, name
    assert set(result.valid_domain_losses) == {2, 4}
    assert all(math.isfinite(v) for domains in result.valid_domain_losses.values() for v in domains.values())
    # the last validation, recomputed by hand: the model's token-mean loss on the first eval-iters x global
    # batch samples of each domain's own validation set (fp32 sums of 128 terms: 1e-5 is ~100x rounding)
    model = trainer.model[0].eval()
    for name, dataset in trainer.valid_domains.items():
        batch = collate_samples([dataset[i] for i in range(2 * 4)])
        with torch.no_grad():
            expected = model(tokens=batch["tokens"], labels=batch["labels"]).mean().item()
        assert abs(result.valid_domain_losses[4][name] - expected) <= 1e-5 * expected, name


def test_blend_weights_changed_mid_run_reach_the_batches_with_workers(tmp_path, monkeypatch):
    monkeypatch.setitem(methods_lib.REGISTRY, "probe", "tests.dist.blend_probe")
    config = config_from_args(parse_args(flags(tmp_path, "--train-iters", "6", "--eval-iters", "0", "--num-workers",
                                           "2", "--data-max-blend-weight", "1", "--probe")))
    trainer = Trainer(config)
    trainer.train()
    probe = trainer.methods.get("probe")
    code = {it: torch.cat(batches) >= 100 for it, batches in probe.seen.items()}
    assert sorted(code) == [1, 2, 3, 4, 5, 6]
    assert any(not c.all() for it, c in code.items() if it < 3)  # the 50/50 blend: prose in the first batches
    assert all(c.all() for it, c in code.items() if it >= 3)  # new weights, though workers had read ahead
    assert list(trainer.batch_source.state_dict()["weight_schedule"][-1]) == [8, [0.0, 1.0]]
